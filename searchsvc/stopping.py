"""Stopping a run from outside: SIGTERM (`ray job stop`, a batch scheduler, `kill`) asks the driver to stop,
and the driver's loops call `check()` at safe points (between Ray waits, when a result is recorded): it
raises `Stopped`, the driver unwinds through its `finally` blocks (results flushed, actors stopped) and
records the run as stopped; `searchsvc resume` continues it. The handler only sets a flag, because an
exception raised inside a Ray call from a signal handler surfaces as a SystemError. A second SIGTERM
raises at once. Kept free of heavy imports: the CLI catches `Stopped`."""

from __future__ import annotations

import signal
import threading
from typing import Any

_requested: list[int] = []  # signals received and not yet acted on


class Stopped(BaseException):
    """SIGTERM (`ray job stop`, a scheduler, `kill`): the run unwinds, records itself as stopped, and exits."""


def _handler(signum: int, frame: Any) -> None:
    _requested.append(signum)
    if len(_requested) > 1:  # asked twice: stop wherever the driver is
        raise Stopped(f"stopped by signal {signum}")


def stop_on_sigterm() -> None:
    """Install the SIGTERM handler (main thread only). Ray installs one of its own when it starts a local
    cluster: call this after `ray.init` too."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raise `Stopped` if a stop was asked for (a cheap call: drivers make it in their loops)."""
    if _requested:
        signum = _requested.pop()
        _requested.clear()
        raise Stopped(f"stopped by signal {signum}")
