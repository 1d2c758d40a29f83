"""cluster.yaml (AWS) and cluster.local.yaml (on-premise) pass Ray's own launcher checks offline, and keep
the promises the README makes about them: GPU workers declared, MinIO and the dashboard not exposed, no
secret in the file, this package installed on every node."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO

CONFIGS = ["cluster.yaml", "cluster.local.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_cluster_config(name):
    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", CONFIGS)
def test_nodes_install_this_package_and_start_ray_with_the_keys_file_only(name):
    config = load(name)
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/searchsvc" in setup
    assert config["file_mounts"]["~/searchsvc"] == "."
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # job server and dashboard: loopback, reached over SSH
    assert "start-minio.sh" in head
    for commands in (head, workers):
        assert ". ~/.searchsvc/cluster.env" in commands  # keys from the file cluster-env.sh wrote
    text = (REPO / name).read_text()
    assert not re.search(r"(SECRET|PASSWORD|TOKEN)\w*\s*[=:]\s*(?!\.\.\.)\S", text)  # no values ("..." in docs)


def test_aws_cluster_declares_gpu_workers_and_a_cpu_free_head():
    types = load("cluster.yaml")["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}  # evaluation workers never land on the head
    gpus = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["node_config"]["InstanceType"] for t in gpus.values()} >= {"g5.xlarge", "p4d.24xlarge"}
    for node_type in gpus.values():
        assert node_type["min_workers"] == 0 < node_type["max_workers"]  # autoscaled from zero


def test_minio_listens_on_the_private_address_only():
    script = (REPO / "scripts" / "start-minio.sh").read_text()
    assert '--address "${PRIVATE_IP}:9000"' in script and "--console-address 127.0.0.1:9001" in script
    assert "0.0.0.0" not in script
    assert 'MINIO_ROOT_PASSWORD="$AWS_SECRET_ACCESS_KEY"' in script  # from the keys file, never literal
