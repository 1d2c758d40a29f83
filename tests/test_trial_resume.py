"""Issue 21: a restarted trial continues from its last finished epoch. `train_model` under an AGP schedule and
under RigL is stopped after an epoch, then started again in a fresh model from the saved state (serialised
as a Tune checkpoint would be, read with weights_only): the final weights, masks and losses equal an
uninterrupted run's, and no epoch is trained twice."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import searchsvc
from storage import LocalStore
from tests.conftest import REPO
from workers.compression.rigl import RigLCallback
from workers.compression.schedule import CompressionScheduler, parse_schedule
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.models.zoo import create_model
from workers.training.train import Checkpointer, Recipe, TrainCallback, TrainConfig, train_model

CPU = torch.device("cpu")
EPOCHS = 4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(Exception):
    """The trial's process died here."""


class BytesCheckpoints(Checkpointer):
    """Keeps the last state as the bytes a Tune checkpoint file would hold; 'dies' after `die_after` epochs."""

    def __init__(self, die_after: int | None = None) -> None:
        self.saved: bytes | None = None
        self.die_after = die_after

    def load(self):
        return None if self.saved is None else torch.load(io.BytesIO(self.saved), weights_only=True)

    def save(self, state, record) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.saved = buffer.getvalue()
        if state["epoch"] == self.die_after:
            raise Killed


class EpochCount(TrainCallback):
    def __init__(self) -> None:
        self.trained: list[int] = []

    def on_epoch_begin(self, epoch: int) -> None:
        self.trained.append(epoch)


AGP = {"version": 1, "pruners": {"all": {"class": "AutomatedGradualPruner", "initial_sparsity": 0.1,
                                         "final_sparsity": 0.7, "weights": ["layer1.0.conv1.0.weight",
                                                                            "layer2.0.conv2.0.weight"]}},
       "policies": [{"pruner": {"instance_name": "all"}, "starting_epoch": 0, "ending_epoch": EPOCHS,
                     "frequency": 1}]}


def _agp(model):
    return CompressionScheduler(parse_schedule(AGP, model), model)


def _rigl(model):
    return RigLCallback(0.75, seed=3, dense_allocation=0.3, delta=3, alpha=0.3)


@pytest.fixture(scope="module")
def splits():
    return load_dataset(DatasetConfig(name="synthetic", synthetic=SyntheticConfig(
        num_classes=4, channels=1, image_size=16, train_size=384, test_size=64)))


@pytest.mark.parametrize("method", [_agp, _rigl], ids=["agp", "rigl"])
def test_a_restarted_trial_continues_from_its_last_epoch_exactly(splits, method):
    recipe = TrainConfig(epochs=EPOCHS, batch_size=64, lr=0.05, augment=False)

    def fresh():
        torch.manual_seed(0)
        return create_model("tiny_cnn", 1, 4)

    whole = fresh()
    expected = train_model(whole, splits, recipe, CPU, seed=5, progress=False, callbacks=[method(whole)])

    first, checkpoints = fresh(), BytesCheckpoints(die_after=2)
    with pytest.raises(Killed):
        train_model(first, splits, recipe, CPU, seed=5, progress=False, callbacks=[method(first), checkpoints])
    checkpoints.die_after = None
    again, count = fresh(), EpochCount()
    history = train_model(again, splits, recipe, CPU, seed=5, progress=False,
                          callbacks=[method(again), checkpoints, count])

    assert count.trained == [2, 3]  # epochs 0 and 1 were done before the restart, and are not trained again
    assert [r["loss"] for r in history] == [r["loss"] for r in expected]
    assert [r["test_accuracy"] for r in history] == [r["test_accuracy"] for r in expected]
    for (name, value), (_, other) in zip(whole.state_dict().items(), again.state_dict().items()):
        assert torch.equal(value, other), name  # masks (zeros) included: the same weights, bit for bit


def test_without_a_checkpoint_training_starts_at_epoch_0(splits):
    model, count = create_model("tiny_cnn", 1, 4), EpochCount()
    train_model(model, splits, Recipe(epochs=2, batch_size=64, lr=0.05, augment=False), CPU, progress=False,
                callbacks=[BytesCheckpoints(), count])
    assert count.trained == [0, 1]


def _trial_workers(session: int) -> list[int]:
    """Pids of the processes running a Tune trial of the run in `session` (Ray names them after the
    trainable's actor; a local Ray's processes stay in the session of the driver that started them)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ray::ImplicitFunc" in (entry / "cmdline").read_bytes() and \
                    os.getsid(int(entry.name)) == session:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


SWEEPS = {  # one 6-epoch trial each, no ASHA stop, two restarts allowed
    "agp": ("agp-smoke.yaml", ["train.epochs=6",
                               "search.tune={final_sparsity: [{filters: 0.6}], grace_period: 6, max_failures: 2}"]),
    "taylor": ("taylor-smoke.yaml", ["train.epochs=6", "search.iterations=1", "search.stop.max_drop=100",
                                     "search.tune={filters_per_iteration: [0.15], grace_period: 1, max_failures: 2}"]),
}


def _sweep_run(method: str, store: Path, kill_after_epoch: int | None) -> subprocess.CompletedProcess:
    """The method's smoke sweep as one 6-epoch trial; with `kill_after_epoch`, its worker is SIGKILLed once a
    checkpoint of that epoch is on the store (Tune then restarts the trial)."""
    config, sets = SWEEPS[method]
    command = [sys.executable, "-m", "searchsvc", "run", str(REPO / "configs" / config), "--store", str(store),
               "--no-progress", *[arg for item in sets for arg in ("--set", item)]]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              start_new_session=True)
    if kill_after_epoch is not None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            if any(_checkpoint_epoch(p) >= kill_after_epoch for p in store.glob("runs/*/state/**/train_state.pt")):
                break
            time.sleep(0.1)
        workers = _trial_workers(driver.pid)
        assert driver.poll() is None and workers, "the trial ended before it could be killed"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    _, err = driver.communicate(timeout=300)
    return subprocess.CompletedProcess(command, driver.returncode, "", err)


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 — still being written
        return -1


@pytest.mark.slow  # two sweeps and a trial restart, about a minute; train_model's resume is covered above, and
# every agp / rigl sweep in `make test` writes its epoch checkpoints through TrialCheckpoints
@pytest.mark.parametrize("method", sorted(SWEEPS))
def test_a_killed_trial_worker_resumes_from_its_checkpoint_in_the_sweep(tmp_path, method):
    whole = _sweep_run(method, tmp_path / "whole", None)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _sweep_run(method, tmp_path / "killed", kill_after_epoch=2)
    assert killed.returncode == 0, killed.stderr[-3000:]
    (expected,), (row,) = (searchsvc.results(LocalStore(tmp_path / d)).to_pylist() for d in ("whole", "killed"))
    assert row["spec_hash"] == expected["spec_hash"] and row["status"] == "ok"
    assert (row["accuracy"], row["val_accuracy"], row["params"]) == (expected["accuracy"], expected["val_accuracy"],
                                                                      expected["params"])
    history = [epoch for path in (tmp_path / "killed").glob("runs/*/state/**/result.json")
               for line in path.read_text().splitlines() if line.strip()
               if (epoch := json.loads(line).get("epoch")) is not None]
    assert history == sorted(set(history)) and history[-1] >= 5, history  # reported once each: none re-trained
