"""The search methods, one package each: its `search:` schema, its validate-time checks and its registration in
`__init__.py`, its driver in `driver.py` (imported only when a run starts). Importing this package registers
every method (searchsvc.registry); `get_method` and `list_methods` are the registry's, re-exported for callers
that need the methods registered.
"""

from searchsvc.methods import agp, grid, n2n, rigl, sensitivity, taylor  # noqa: F401 — each registers itself
from searchsvc.registry import get_method, list_methods

__all__ = ["get_method", "list_methods"]
