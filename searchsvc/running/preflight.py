"""What a run checks before it records anything: that this machine can do what the config and flags ask.

A run that would only fail later — `device: cuda` on a machine without CUDA fails when the teacher starts
training; an `--address` where no Ray listens makes `ray.init` retry for minutes; `resources.cpus_per_eval`
beyond every node leaves each evaluation pending forever — ends here in seconds with one line, and no run is
left behind in the store.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import yaml

from core.errors import SearchsvcError
from workers.evaluation.resources import Resources

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


def check_resources(resources: Resources, address: str | None) -> None:
    """One evaluation's request (`resources.cpus_per_eval`, and `gpus_per_eval` where the cluster has GPUs, as the
    workers ask Ray) fits on some node of the cluster the run will use, or on a node type its autoscaler may add:
    beyond every node, Ray would keep the evaluation pending forever. A Ray of the run's own is this machine,
    counted without starting it; a cluster at `address` is joined (as the run does next anyway)."""
    nodes, types = _cluster_nodes(address)
    has_gpu = any(node.get("GPU", 0) > 0 for node in nodes)
    need = {"CPU": resources.cpus_per_eval, "GPU": resources.gpus_per_eval if has_gpu else 0.0}
    if types is None or any(_fits(need, node) for node in [*nodes, *types]):
        return  # fits, or an autoscaler whose node types are not known may add one that does
    keys = {"CPU": "resources.cpus_per_eval", "GPU": "resources.gpus_per_eval"}
    largest = {kind: max((node.get(kind, 0) for node in [*nodes, *types]), default=0) for kind in keys}
    short = [kind for kind in keys if need[kind] > largest[kind]] or [kind for kind in keys if need[kind] > 0]
    asked = " and ".join(f"{need[kind]:g} {kind}" for kind in short)
    has = " and ".join(f"{largest[kind]:g} {kind}" for kind in short)
    raise SearchsvcError(f"{', '.join(keys[kind] for kind in short)}: one evaluation asks for {asked}, but no node of "
                         f"the Ray cluster has that many{' at once' if len(short) > 1 else ''} (the largest has "
                         f"{has}); an evaluation would wait forever")


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(kind, 0) >= amount for kind, amount in need.items() if amount > 0)


def _cluster_nodes(address: str | None) -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """(each alive node's resources, each node type an autoscaler may add: [] if none, None if it cannot tell)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if not ray.is_initialized() and address == "local":  # `ray.init` would detect this machine's CPUs and GPUs
        return [{"CPU": float(_local_cpus()), "GPU": float(_local_gpus())}], []
    if not ray.is_initialized():
        from searchsvc.running.ray_start import ensure_ray

        ensure_ray(address)
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return nodes, ([] if address == "local" else _autoscaled_types())  # a Ray started here has no autoscaler


def _local_cpus() -> float:
    """The CPUs a Ray started here counts (cgroup quotas in containers included)."""
    try:
        from ray._private.utils import get_num_cpus

        return get_num_cpus()
    except Exception:  # noqa: BLE001 — Ray's own helper moved: the machine's count
        return os.cpu_count() or 1


def _local_gpus() -> int:
    """The GPUs a Ray started here counts (CUDA_VISIBLE_DEVICES honoured)."""
    import torch

    return torch.cuda.device_count()


def _autoscaled_types() -> list[dict[str, float]] | None:
    """The resources of each node type the cluster's autoscaler may start: from the cluster config it publishes
    (autoscaler v2, KubeRay), else from the cluster launcher's config on the head node (v1); None when it cannot
    tell (no such config here, or a node type whose resources Ray detects when the node starts)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 — Ray's internal API moved: cannot tell
        return None
    if config is not None and config.node_group_configs:
        return [dict(group.resources) for group in config.node_group_configs]
    launcher = Path("~/ray_bootstrap_config.yaml").expanduser()
    if not launcher.exists():  # not a `ray up` head: KubeRay's v1 autoscaler, a driver on a worker node, ...
        return None
    try:
        types = (yaml.safe_load(launcher.read_text()) or {}).get("available_node_types") or {}
        found = [dict(kind.get("resources") or {}) for kind in types.values()]
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return found if found and all("CPU" in kind for kind in found) else None
