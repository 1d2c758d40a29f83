"""searchsvc: a distributed search for smaller, faster neural networks on Ray.

    from searchsvc import load_config, run, results
    result = run(load_config("configs/quickstart.yaml"))
    table = results("./searchsvc-store", result.run_id)     # a pyarrow.Table, best first

`searchsvc` decides what to try, `workers` how a candidate becomes a measured model, `storage` where
everything lives. The names below are imported on first use, so `searchsvc --help` does not pay for
torch and Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "searchsvc.config", "JobConfig": "searchsvc.config", "load_config": "searchsvc.config",
    "RunResult": "searchsvc.running.job", "run": "searchsvc.running.job", "resume": "searchsvc.running.job",
    "load_candidate": "searchsvc.candidates", "results": "searchsvc.api", "SearchsvcError": "storage.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'searchsvc' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
