"""Reading results from Python: `searchsvc.results(store, run_id)`."""

from __future__ import annotations

import pyarrow as pa

from searchsvc.reporting.table import read_results
from storage import ArtifactStore, StoreOptions, open_store


def results(store: ArtifactStore | str, run_id: str | None = None, endpoint: str | None = None) -> pa.Table:
    """The ranked results table of `run_id` (the latest run by default)."""
    if not isinstance(store, ArtifactStore):
        store = open_store(store, endpoint=endpoint, create=False, options=StoreOptions.from_env())
    return read_results(store, run_id)
