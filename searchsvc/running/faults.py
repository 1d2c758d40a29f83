"""Faults of the infrastructure, not of the user's input: Ray killed a worker (its memory monitor, SIGKILL, the
kernel's OOM killer, a crash) or lost a node, and the retries ran out (Tune's `max_failures` for a trial, the
pool's bound for an evaluation). The run is recorded as `failed`, the CLI prints one line naming the cause and
the `searchsvc resume` that continues the run, and exits with EXIT_CODE. Kept free of heavy imports: Ray's
exception types are looked up only where Ray is already imported (an error of Ray's cannot exist otherwise)."""

from __future__ import annotations

import re
import sys

from core.errors import SearchsvcError, first_line

EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, try again (`searchsvc resume`); 1 is a bug's traceback
# What Tune keeps of a trial error it could not pickle (an OutOfMemoryError is kept as text only), by its cause.
TEXT_MARKERS = (("running low on memory", "memory"), ("node has died", "node"), ("worker process has died", "worker"),
                ("actor died unexpectedly", "worker"))


class RunFailed(SearchsvcError):
    """Ray lost a worker or a node and the retries ran out: the run is recorded as failed and can be resumed."""

    exit_code = EXIT_CODE


def ray_fault(err: BaseException) -> BaseException | None:
    """The error of Ray's infrastructure behind `err` (along its causes, a RayTaskError's own cause, a Tune error's
    text), or None: an error of the run's own code or of the user's input is not one."""
    seen: set[int] = set()
    pending: list[object] = [err]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if _kind(current) is not None:
            return current
        pending.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None


def run_failed(err: BaseException, store_uri: str, run_id: str) -> RunFailed | None:
    """A RunFailed naming the cause of `err` and the command that continues the run; None if Ray is not the cause."""
    fault = ray_fault(err)
    if fault is None:
        return None
    return RunFailed(f"run {run_id} failed: {describe(fault)}; nothing recorded is lost, and `searchsvc resume "
                     f"--store {store_uri} --run {run_id}` continues it")


def describe(fault: BaseException) -> str:
    """One line naming what Ray lost and why."""
    kind = _kind(fault)
    text = str(fault)
    if kind == "memory":
        usage = re.search(r"was (\S+ used / \S+ limit)", text)
        return (f"Ray's memory monitor killed a worker: the node ran out of memory"
                f"{f' ({usage.group(1)})' if usage else ''} ({type(fault).__name__})")
    if kind == "node":
        return f"a Ray node died with the run's workers on it ({type(fault).__name__})"
    if kind == "worker":
        return (f"a Ray worker process died (SIGKILL, the kernel's OOM killer, or a crash) and its retries ran out "
                f"({type(fault).__name__})")
    return f"Ray failed ({type(fault).__name__}: {first_line(fault)})"


def _kind(err: BaseException) -> str | None:
    """"memory", "node", "worker" or "ray" for an infrastructure error of Ray's; None for anything else."""
    exceptions = sys.modules.get("ray.exceptions")
    if exceptions is None:
        return None
    if isinstance(err, exceptions.RayTaskError):  # the task's own error: its cause decides (ray_fault looks)
        return None
    if isinstance(err, exceptions.OutOfMemoryError):
        return "memory"
    if isinstance(err, (exceptions.NodeDiedError, exceptions.LocalRayletDiedError)):
        return "node"
    if isinstance(err, exceptions.RayActorError):
        if err.actor_init_failed:  # its __init__ raised: the worker's data or teacher, not the infrastructure
            return None
        return "node" if "node has died" in str(err) else "worker"
    if isinstance(err, exceptions.WorkerCrashedError):
        return "worker"
    if isinstance(err, (exceptions.ObjectLostError, exceptions.RaySystemError)):  # Ray's own state lost
        return "ray"
    tune = sys.modules.get("ray.tune.error")
    if tune is not None and isinstance(err, tune.TuneError):
        text = str(err)
        return next((kind for marker, kind in TEXT_MARKERS if marker in text), None)
    return None
