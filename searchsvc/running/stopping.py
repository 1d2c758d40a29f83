"""Stopping a run from outside: SIGTERM (`ray job stop`, a batch scheduler, `timeout`, `kill`) ends the run as
`stopped`, whatever it is doing, and `searchsvc resume` continues it.

Until Ray starts (dataset, teacher training) the signal raises `Stopped` at once. From Ray's start on, it
only sets a flag, because an exception raised inside a Ray call from a signal handler surfaces as a
SystemError (or, inside ray.init, is swallowed by a fork callback and leaves a half-started Ray); the
driver's loops call `check()` at safe points (between Ray waits, when a result is recorded), which raises
`Stopped`, and the driver unwinds through its `finally` blocks (results flushed, actors stopped). A second
SIGTERM raises at once. Kept free of heavy imports: the CLI catches `Stopped`."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

_requested: list[int] = []  # signals received and not yet acted on
_deferred = [False]  # True once Ray runs in this process: the first signal only sets the flag
# What to record when a signal lands while Ray starts: a signal sent to the whole process group (`timeout`, a
# scheduler) kills Ray's own daemons too, and the driver may then abort inside Ray's C++ without unwinding.
_last_words: list[Callable[[int], None]] = []
_ray_starting = [False]


class Stopped(BaseException):
    """SIGTERM (`ray job stop`, a scheduler, `kill`): the run unwinds, records itself as stopped, and exits."""


def _handler(signum: int, frame: Any) -> None:
    _requested.append(signum)
    if _ray_starting[0]:  # the main thread is inside ray.init, not writing to the store
        if _last_words:
            _last_words[-1](signum)
        # Out of ray.init at once (Ray's daemons got the same signal when it went to the process group); an
        # exception a fork callback swallows leaves the flag set, and check() acts after ray.init.
        raise Stopped(f"stopped by signal {signum}")
    if not _deferred[0] or len(_requested) > 1:  # no Ray call to break, or asked twice: stop wherever it is
        _requested.clear()
        raise Stopped(f"stopped by signal {signum}")


def stop_on_sigterm(deferred: bool = False) -> None:
    """Install the SIGTERM handler (main thread only): raising at once, or (`deferred`, once Ray runs) setting
    the flag `check()` acts on. Ray installs a handler of its own when it starts: call this after it too."""
    if threading.current_thread() is threading.main_thread():
        _deferred[0] = deferred
        signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def ray_keeps_our_handler() -> Iterator[None]:
    """Around `ray.init`: Ray would install a handler that calls sys.exit wherever the signal lands (inside a
    fork callback it is swallowed, and the run hangs on a half-started Ray); the run's own, deferred handler
    stays in place instead (Ray's driver does not need its own), and `check()` acts once Ray is up."""
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    stop_on_sigterm(deferred=True)
    if original is None:  # a Ray without the hook: its handler may replace ours until ray.init returns
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    _ray_starting[0] = True
    try:
        yield
    finally:
        _ray_starting[0] = False
        ray_utils.set_sigterm_handler = original


def clear() -> None:
    """Forget signals already acted on (a process that runs several jobs starts each with none pending)."""
    _requested.clear()


def requested() -> bool:
    """A stop was asked for and not yet acted on: whatever fails now fails because of it."""
    return bool(_requested)


@contextlib.contextmanager
def last_words(record: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, `record(signum)` is called from the handler if a signal lands while Ray starts."""
    _last_words.append(record)
    try:
        yield
    finally:
        _last_words.remove(record)


def check() -> None:
    """Raise `Stopped` if a stop was asked for (a cheap call: drivers make it in their loops)."""
    if _requested:
        signum = _requested.pop()
        _requested.clear()
        raise Stopped(f"stopped by signal {signum}")
