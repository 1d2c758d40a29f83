"""Shared by the benchmarks: where results go and what every result records."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from searchsvc.version import code_version  # noqa: E402

if TYPE_CHECKING:
    from workers.data.datasets import DatasetConfig


def cifar_shaped(images: int, test: int = 256, val_fraction: float = 0.1) -> "DatasetConfig":
    """CIFAR-10-shaped synthetic data (10 classes, 3x32x32; the content does not change the speed), so that no
    benchmark downloads anything: `images` official training images, `test` test images."""
    from workers.data.datasets import DatasetConfig, SyntheticConfig

    synthetic = SyntheticConfig(num_classes=10, channels=3, image_size=32, train_size=images, test_size=test)
    return DatasetConfig(name="synthetic", synthetic=synthetic, val_fraction=val_fraction)


def write_result(folder: str | Path, name: str, result: dict[str, Any], version: str | None = None) -> Path:
    """Write `result` plus machine, GPU, torch version, date and code version (`version`, else this checkout's)
    as `<folder>/<name>.json`; return the path."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    record = {**result, "machine": platform.node(), "cpu": platform.processor() or platform.machine(), "gpu": gpu,
              "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "code_version": version or code_version()}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


class UtilisationSampler:
    """`nvidia-smi` sampling GPU utilisation (%) every 0.5 s in the background; None without one."""

    def __init__(self) -> None:
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> list[float] | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return [float(line.split(",")[0]) for line in out.split() if line.strip().replace(".", "").isdigit()]
