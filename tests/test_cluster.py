"""Multi-node behaviour on a real Ray cluster of three nodes on this machine (`ray.cluster_utils.Cluster`)
with the store on the S3 test server: actors spread by resources, a node removed mid-evaluation, a node
that joins mid-run, a candidate that keeps killing its worker. These tests run last (conftest): they
replace the session's one-node Ray with their own cluster."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from typing import Iterator

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from storage import S3Store
from tests.conftest import S3Server
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.evaluation.pool import EvalPool
from workers.evaluation.resources import Resources
from workers.evaluation.spec import CandidateSpec
from workers.training.teacher import TeacherConfig, load_or_train_teacher
from workers.training.train import DistillConfig, TrainConfig

pytestmark = [pytest.mark.cluster, pytest.mark.s3]

DATA = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=512, test_size=128))
TRAIN = TrainConfig(epochs=8, batch_size=64, augment=False, distill=DistillConfig(alpha=0.5))  # ~2 s per candidate
ONE_CPU = Resources(gpus_per_eval=0, cpus_per_eval=1)


@pytest.fixture(scope="module")
def cluster(s3_server: S3Server) -> Iterator[Cluster]:
    """A head without CPUs (the driver only) and two 1-CPU worker nodes; the S3 keys in the environment
    the nodes inherit, as on a real cluster whose nodes have an instance role."""
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
        patch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        cluster = Cluster(initialize_head=True, connect=True,
                          head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
def prepared(cluster: Cluster, s3_server: S3Server) -> tuple[S3Store, str]:
    store = S3Store(s3_server.shared_bucket, f"cluster/{uuid.uuid4().hex[:8]}", endpoint=s3_server.endpoint)
    teacher = load_or_train_teacher(store, TeacherConfig(arch="tiny_cnn", epochs=3, batch_size=64), DATA,
                                    load_dataset(DATA), torch.device("cpu"), progress=False)
    return store, teacher.teacher_hash


def specs(teacher_hash: str, count: int, **changes) -> list[CandidateSpec]:
    base = CandidateSpec(arch="tiny_cnn", teacher=teacher_hash, dataset=DATA, train=TRAIN, **changes)
    return [dataclasses.replace(base, seed=1000 + i) for i in range(count)]


def node_of(worker: str) -> str:
    return worker.rsplit("@", 1)[1]  # host:pid@node


def test_node_removed_mid_evaluation_and_a_joining_node_gets_work(cluster, prepared):
    store, teacher_hash = prepared
    nodes = [n for n in cluster.worker_nodes]
    pool = EvalPool(store, teacher_hash, DATA, ONE_CPU)
    try:
        assert pool.size == 2  # sized by the cluster's CPUs: the head has none
        pool.grow_every_s = 1.0
        placed = ray.get([a.node_id.remote() for a in pool.actors])
        assert len(set(placed)) == 2  # spread over both worker nodes
        victim = nodes[1]
        outcomes: list = []
        # The driver loop runs in a thread: Ray adds nodes only from the main thread.
        thread = threading.Thread(target=lambda: outcomes.extend(pool.map_unordered(specs(teacher_hash, 12))))
        thread.start()
        time.sleep(3.0)  # both actors are mid-evaluation (each candidate takes ~2 s or more)
        cluster.remove_node(victim)
        joined = cluster.add_node(num_cpus=1).node_id
        thread.join(timeout=300)
        assert not thread.is_alive()
    finally:
        pool.shutdown()
    hashes = [o.spec.spec_hash for o in outcomes]
    assert len(hashes) == len(set(hashes)) == 12  # every candidate once
    assert all(o.metrics.status == "ok" for o in outcomes)
    retried = [o for o in outcomes if o.attempts > 1]
    # What was in flight on the removed node's one actor, run elsewhere: the candidate on its device, and
    # possibly the one before it, whose store write (beside the next candidate's training) had not returned.
    assert 1 <= len(retried) <= 2 and pool.lost == 1
    assert all(node_of(o.metrics.worker) != victim.node_id[:8] for o in retried)
    assert joined[:8] in {node_of(o.metrics.worker) for o in outcomes}  # the new node worked
    for o in outcomes:  # stored once, complete
        assert set(store.verify(f"candidates/{o.spec.spec_hash}")) == {"spec.json", "model.pt", "metrics.json"}


def test_a_candidate_that_keeps_killing_its_worker_becomes_invalid_alone(cluster, prepared):
    """A candidate whose evaluation kills the process every time (a crashing kernel, an OOM kill): the pool
    retries it a bounded number of times on fresh actors, then records it invalid; the others finish."""
    from workers.evaluation.pool import EvalWorker

    store, teacher_hash = prepared
    good = specs(teacher_hash, 3, widths=(("layer2", 8),))
    poison = dataclasses.replace(good[0], seed=4242)

    class CrashingWorker(EvalWorker):  # defined here so Ray ships it by value
        def evaluate(self, spec, takeover=False):
            if spec.seed == 4242:
                os._exit(1)
            return super().evaluate(spec, takeover)

    pool = EvalPool(store, teacher_hash, DATA, ONE_CPU, max_retries=2, worker_class=CrashingWorker)
    try:
        outcomes = {o.spec.spec_hash: o for o in pool.map_unordered([poison, *good])}
    finally:
        pool.shutdown()
    assert outcomes[poison.spec_hash].metrics.status == "invalid"
    assert "worker died 3 times" in outcomes[poison.spec_hash].metrics.error
    assert outcomes[poison.spec_hash].attempts == 3 and pool.lost == pool.replaced == 3
    assert all(outcomes[s.spec_hash].metrics.status == "ok" for s in good)
    assert not store.exists(f"candidates/{poison.spec_hash}/manifest.json")  # nothing half-written stays
