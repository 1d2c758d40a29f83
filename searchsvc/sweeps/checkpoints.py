"""A Tune trial's epoch checkpoints, on the run's store: a restarted or restored trial continues mid-training."""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from storage import CorruptArtifactError
from workers.training.train import Checkpointer


class TrialCheckpoints(Checkpointer):
    """A Tune trial's epoch checkpoints, on the run's store. After each epoch but the last, validation accuracy
    (ASHA's signal; and the record's `extra` keys) is reported with the training state; the trial's final
    report, with the stored candidate, is its own (ASHA stops a trial that reaches max_t). A restarted trial
    (its worker lost, or the driver killed and the run resumed) loads the latest state, checked against the
    sha256 written beside it, and continues from that epoch."""

    FILE = "train_state.pt"

    def __init__(self, *extra: str, spec_hash: str = "", files: dict[str, str] | None = None,
                 fixed: dict[str, Any] | None = None) -> None:
        """`extra`: record keys each report carries; `spec_hash`: the candidate being trained (a checkpoint of
        another one is not loaded); `files`: text files saved beside the state (a Taylor trial's own state.json,
        so a restore knows its iteration); `fixed`: keys every epoch report carries (Tune wants its metric in
        each: a Taylor trial's reward so far). train_model saves after every epoch but the last."""
        self.extra, self.spec_hash = extra, spec_hash
        self.files, self.fixed = files or {}, fixed or {}

    def load(self) -> dict[str, Any] | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            path = Path(folder) / self.FILE
            if not path.exists():
                return None
            raw, digest = path.read_bytes(), Path(folder) / f"{self.FILE}.sha256"
            if not digest.exists() or hashlib.sha256(raw).hexdigest() != digest.read_text().strip():
                raise CorruptArtifactError(f"trial checkpoint {checkpoint.path}/{self.FILE} is corrupt "
                                           "(its sha256 does not match)")
            state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        return state if state.get("spec_hash") == self.spec_hash else None  # an earlier candidate's epochs

    def save(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "spec_hash": self.spec_hash}, buffer)
        with tempfile.TemporaryDirectory() as folder:
            for name, text in self.files.items():
                (Path(folder) / name).write_text(text)
            (Path(folder) / self.FILE).write_bytes(buffer.getvalue())
            (Path(folder) / f"{self.FILE}.sha256").write_text(hashlib.sha256(buffer.getvalue()).hexdigest())
            tune.report({**self.fixed, "epoch": state["epoch"], "val_accuracy": record["val_accuracy"],
                         **{k: record.get(k, 0.0) for k in self.extra}},
                        checkpoint=tune.Checkpoint.from_directory(folder))
