"""searchsvc: a distributed search for smaller, faster neural networks on Ray.

    from searchsvc import load_config, run, results
    result = run(load_config("configs/quickstart.yaml"))
    table = results("./searchsvc-store", result.run_id)     # a pyarrow.Table, best first

`searchsvc` decides what to try, `workers` how a candidate becomes a measured model, `storage` where
everything lives.
"""

from __future__ import annotations

import pyarrow as pa

from searchsvc.candidates import load_candidate
from searchsvc.config import ConfigError, JobConfig, load_config
from searchsvc.job import RunResult, run
from storage import ArtifactStore, SearchsvcError, open_store
from storage.tables import read_results


def results(store: ArtifactStore | str, run_id: str | None = None, endpoint: str | None = None) -> pa.Table:
    """The ranked results table of `run_id` (the latest run by default)."""
    if not isinstance(store, ArtifactStore):
        store = open_store(store, endpoint=endpoint, create=False)
    return read_results(store, run_id)


__all__ = ["ConfigError", "JobConfig", "RunResult", "SearchsvcError", "load_candidate", "load_config", "results",
           "run"]
