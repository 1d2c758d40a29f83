"""Starting or joining the Ray cluster a run's workers use: once per process, a signal handled throughout."""

from __future__ import annotations

import logging
import os

import ray

from core.errors import SearchsvcError, first_line
from searchsvc.running import stopping
from searchsvc.running.stopping import stop_on_sigterm


def ensure_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at `address` (or RAY_ADDRESS), or start a local one, once per process.

    Without either, a Ray of this run's own ("local"): never the cluster another process recorded in
    /tmp/ray/ray_current_cluster, which may belong to another run and end under this one. That Ray starts
    without its dashboard, which would double its start-up cost (~4 CPU-seconds more, measured on 2 cores) and
    contend for port 8265 with any other run; `ray start --head` and `--address auto` give a dashboard."""
    stop_on_sigterm(deferred=True)  # from here on a signal must not raise inside a Ray call
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        with stopping.ray_keeps_our_handler():
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False,
                     include_dashboard=False if address == "local" else None)
    except ConnectionError as err:  # something answered at the address (job.run checked), but not a Ray cluster
        raise SearchsvcError(f"--address {address}: cannot connect to a Ray cluster ({first_line(err)})") from None
    stop_on_sigterm(deferred=True)  # a Ray without the hook may have put its own handler in place of the run's
    stopping.check()  # a signal that came while Ray started
