"""What a run checks before it records anything: that this machine can do what the config and flags ask.

A run that would only fail later — `device: cuda` on a machine without CUDA fails when the teacher starts
training; an `--address` where no Ray listens makes `ray.init` retry for minutes — ends here in seconds
with one line, and no run is left behind in the store.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from core.errors import SearchsvcError

RAY_CLIENT_PORT, RAY_GCS_PORT = 10001, 6379  # Ray's defaults for ray:// and for host[:port]
CONNECT_TIMEOUT_S = 3.0


def check_device(name: str) -> None:
    """`device: cuda` needs CUDA in this process (the driver trains or evaluates the teacher on it)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SearchsvcError("device: cuda, but this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                             "False); use device: auto or cpu")


def check_ray_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Something listens at the Ray cluster the run will join (`address`, else RAY_ADDRESS; none or "local":
    a Ray of the run's own). One TCP connect, `timeout_s` at most: a wrong address fails at once."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return
    given = address
    if address == "auto":  # the cluster `ray start` recorded on this machine
        recorded = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        try:
            address = recorded.read_text().strip()
        except OSError:
            raise SearchsvcError("--address auto: no Ray cluster was started on this machine (`ray start --head`), "
                                 "or give its address") from None
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if not host:
        host, port = rest, str(RAY_CLIENT_PORT if scheme == "ray" else RAY_GCS_PORT)
    if not host or not port.isdigit() or scheme not in ("", "ray"):
        raise SearchsvcError(f"--address {given}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise SearchsvcError(f"--address {given}: no Ray cluster answers at {host}:{port} ({reason})") from None
