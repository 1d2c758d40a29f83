"""Issue 21, class 5: environment errors surface before a run exists — exit 2 in seconds, one line, no run left
in the store, no flood of Ray's retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from searchsvc.cli import main
from tests.conftest import REPO

GRID = REPO / "configs" / "grid-smoke.yaml"


def _closed_port() -> int:
    with socket.socket() as s:  # bound and released: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "searchsvc", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:CLOSED", "no Ray cluster answers at 127.0.0.1"),  # a port closed when the test runs
    ("ray://127.0.0.1:notaport", "expected host:port or ray://host:port"),
    ("auto", "--address auto: no Ray cluster was started on this machine"),
])
def test_an_address_where_no_ray_listens_fails_in_seconds(tmp_path: Path, address: str, expected: str):
    address = address.replace("CLOSED", str(_closed_port()))  # not at collection: the same ids in every process
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "no-ray")}  # `auto` finds no cluster record
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    done = _run_cli(["run", str(GRID), "--store", str(tmp_path / "store"), "--address", address, "--no-progress"],
                    env)
    assert time.perf_counter() - started < 30  # Python and torch start-up included; Ray would retry for minutes
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines == [lines[-1]] and expected in lines[-1], done.stderr[-2000:]
    assert not (tmp_path / "store" / "runs").exists()  # nothing recorded for a run that could not start


def test_cuda_asked_for_on_a_machine_without_it_is_one_line(tmp_path: Path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the machine's answer, whatever it has
    assert main(["run", str(GRID), "--store", str(tmp_path / "store"), "--set", "device=cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device: cuda, but this machine has no usable CUDA GPU" in err[0], err
    assert not (tmp_path / "store" / "runs").exists()
