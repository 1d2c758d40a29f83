"""Issue 21: random and mutated configs and store files against `validate`, `results`, `report` and `export`.

A seeded generator (the seed is in every failure message) mutates the shipped configs and the files of a real
grid run's store: lines dropped, doubled or cut, scalars replaced by NaN, huge, negative, empty or aliased
values, bytes flipped, files truncated or replaced by JSON of the wrong shape. Every command must exit 0 or 2
with no traceback, and no byte of the store may change. Bounded in time (FUZZ_SECONDS per part).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from pathlib import Path

from searchsvc.cli import main
from tests.conftest import REPO

SEED = 20261126
FUZZ_SECONDS = 5.0  # per part: configs, store files
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SCALARS = [".nan", ".inf", "-.inf", "1e400", "-1", "0", "99999999999999999999", "[]", "{}", "null", "''", "true",
           "'x'", "*a", "&a 3", "!!python/object:os.system", "[1, [2, [3]]]", "{a: {b: {c: 1}}}", "\"\\x00\""]
STORE_JUNK = [b"", b"[]", b"{}", b"null", b"\xff\xfe\x00garbage", b'{"sha256": 5}', b"PAR1", b"\x80\x04K\x01."]


def mutate_text(text: str, rng: random.Random) -> str:
    """One to three edits of a YAML text: a line dropped, doubled or cut; a value replaced; bytes inserted."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        if not lines:
            break
        i = rng.randrange(len(lines))
        kind = rng.randrange(5)
        if kind == 0:
            del lines[i]
        elif kind == 1:
            lines.insert(i, lines[i])
        elif kind == 2:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif kind == 3 and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {rng.choice(SCALARS)}"
        else:
            lines[i] += rng.choice(["\t", " {", " [", "]", "\x00", " #", ": :", " - x"])
    return "\n".join(lines) + "\n"


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """A stored file damaged: replaced by junk, truncated, or a few bytes flipped."""
    kind = rng.randrange(3)
    if kind == 0 or not raw:
        return rng.choice(STORE_JUNK)
    if kind == 1:
        return raw[: rng.randrange(len(raw))]
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args: list[str], capsys, why: str) -> int:
    """The command in this process: any exception but SystemExit is a traceback the user would have seen."""
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 2), f"{why}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{why}: traceback\n{err[-2000:]}"
    return code


def test_mutated_configs_are_accepted_or_refused_in_one_line(tmp_path, capsys):
    rng = random.Random(SEED)
    deadline, tried = time.monotonic() + FUZZ_SECONDS, 0
    refused = 0
    while time.monotonic() < deadline or tried < 20:  # 20 at least: a user model's config validates in seconds
        source = rng.choice(CONFIGS)
        text = mutate_text(source.read_text(), rng)
        path = tmp_path / "configs" / source.name  # beside no schedule file: relative paths fail cleanly
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        code = run_cli(["validate", str(path)], capsys, f"seed {SEED}, case {tried} ({source.name}):\n{text}")
        refused += code == 2
        tried += 1
    assert tried >= 20 and refused > 0, (tried, refused)
    print(f"{tried} mutated configs, {refused} refused")


def test_damaged_store_files_never_give_a_traceback_or_change_the_store(grid_report, tmp_path, capsys):
    _, source, run_id = grid_report  # a real grid run's store (copied before each damage)
    candidate = next(p.parent.name for p in sorted((source / "candidates").glob("*/model.pt")))
    files = [p for p in sorted(source.rglob("*")) if p.is_file() and "/state/" not in str(p)]
    rng = random.Random(SEED)
    deadline, tried = time.monotonic() + FUZZ_SECONDS, 0
    while time.monotonic() < deadline:
        store = tmp_path / f"case{tried}"
        shutil.copytree(source, store)
        victim = store / rng.choice(files).relative_to(source)
        victim.write_bytes(mutate_bytes(victim.read_bytes(), rng))
        before = snapshot(store)
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        command = rng.choice([["results", "--run", run_id], ["results", "--json"],
                              ["report", "--run", run_id, "-o", str(out / "r.html")],
                              ["export", candidate, "-o", str(out / "m.onnx")]])
        why = f"seed {SEED}, case {tried}: {' '.join(command)} with {victim.relative_to(store)} damaged"
        run_cli([*command, "--store", str(store)], capsys, why)
        assert snapshot(store) == before, f"{why}: the store changed"
        shutil.rmtree(store)
        tried += 1
    assert tried >= 10, tried
    print(f"{tried} damaged stores")
