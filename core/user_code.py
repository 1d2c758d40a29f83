"""The user's code (a model's module and factory; later a dataset's or a task's) tried in a child process first.

A module or factory that calls `sys.exit`, `os._exit` or kills its own process would end searchsvc with its
status and no message. Tried first in a forked child, it ends only the child, and the caller reports it in one
line naming the config key. Exceptions are left to the caller's own call, which names them as before. The
child is a fork: no interpreter start, no second import of torch — an import costs milliseconds, a factory
call the time to build the model once more. Each (module, factory and arguments) is tried once per process.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import sys
import time
from typing import Callable

from core.errors import SearchsvcError

CHILD_TIMEOUT_S = 300.0  # seconds a user module's import or factory call may take in the child
_RETURNED = "returned"  # what the child writes when the code came back (or raised an Exception)
_TRIED: set[str] = set()  # calls that came back in a child once: this process's memo, never a decision


def named_callable(name: str, key: str, form: str) -> Callable[..., object]:
    """The callable "package.module:attr" names, its module imported here; SearchsvcError naming `key` if `name`
    is not of that form (the error says it should be `form`), its module does not import, or nothing callable is
    there. Callers that run user code try the module in a child first (`import_module_safely`)."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise SearchsvcError(f"{key}: {name!r} is {form}")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # noqa: BLE001 — the user's module: ImportError, or what it raises
        raise SearchsvcError(f"{key}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise SearchsvcError(f"{key}: {module_name} has no callable {attr!r}")
    return found


def import_module_safely(name: str, key: str) -> None:
    """Import the module `name` in a forked child first (once per process); SearchsvcError naming `key`
    (e.g. "teacher.model") if that import ends or hangs the child's process. Does not import it here."""
    if name not in sys.modules:
        try_once_in_child(lambda: importlib.import_module(name), key, f"importing {name!r}", f"import {name}")


def try_once_in_child(call: Callable[[], object], key: str, doing: str, same_as: str) -> None:
    """`try_in_child(call, key, doing)` once per process for each `same_as` (what `call` does, as text): a
    module imported or a factory called cleanly in a child once needs no second child."""
    if same_as not in _TRIED:
        try_in_child(call, key, doing)
        _TRIED.add(same_as)


def try_in_child(call: Callable[[], object], key: str, doing: str) -> None:
    """Run `call` in a forked child; SearchsvcError "<key>: <doing> ..." if it ended, killed or hung the
    child's process (SystemExit, KeyboardInterrupt, os._exit, a signal). Its result and its Exceptions are
    dropped: the caller makes the call itself, in this process, once this returns."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the code, say how it came back, never return into the caller's stack
        os.close(read)
        os._exit(_child(call, write))
    os.close(write)
    status = _wait(pid, CHILD_TIMEOUT_S)
    said = _read_said(read)
    if said == _RETURNED:
        return
    if status is None:
        raise SearchsvcError(f"{key}: {doing} did not finish in {CHILD_TIMEOUT_S:.0f} s")
    if os.WIFSIGNALED(status):
        raise SearchsvcError(f"{key}: {doing} killed its process ({signal.Signals(os.WTERMSIG(status)).name})")
    if said:
        raise SearchsvcError(f"{key}: {doing} {said}; code searchsvc runs must not end its process")
    raise SearchsvcError(f"{key}: {doing} ended its process (exit status {os.WEXITSTATUS(status)})")


def _child(call: Callable[[], object], write: int) -> int:
    """The child's side: writes _RETURNED if `call` returned or raised an Exception (the caller's own call
    reports that), what it raised otherwise; nothing if the code ended the process itself."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler (a run's stop) is not the child's
    faulthandler.disable()  # an abort here is reported by the parent in one line, not as a dump of every thread
    torch = sys.modules.get("torch")
    if torch is not None:  # the parent's OpenMP pool is not the child's: one thread, as DataLoader workers do
        torch.set_num_threads(1)
    try:
        call()
    except Exception:  # noqa: BLE001 — reported by the caller's own call, in the parent
        pass
    except BaseException as err:  # SystemExit, KeyboardInterrupt, GeneratorExit: the process would end
        os.write(write, f"raised {type(err).__name__}({', '.join(map(repr, err.args))})".encode()[:400])
        return 0
    os.write(write, _RETURNED.encode())
    return 0


def _read_said(read: int) -> str:
    """What the child wrote (non-blocking: a process the user's code started may hold the pipe open)."""
    os.set_blocking(read, False)
    try:
        return os.read(read, 400).decode(errors="replace")
    except BlockingIOError:
        return ""
    finally:
        os.close(read)


def _wait(pid: int, timeout_s: float) -> int | None:
    """The child's wait status, or None after killing it when it outlives `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001  # seconds; doubled up to 0.1: a clean import returns in milliseconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None
