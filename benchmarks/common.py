"""Shared by the benchmarks: where results go and what every result records."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from searchsvc.version import code_version  # noqa: E402


def write_result(folder: str | Path, name: str, result: dict[str, Any]) -> Path:
    """Write `result` plus machine, date and code version as `<folder>/<name>.json`; return the path."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    record = {**result, "machine": platform.node(), "cpu": platform.processor() or platform.machine(), "gpu": gpu,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code_version": code_version()}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
