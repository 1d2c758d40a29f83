"""The actor pool on a real Ray runtime: streaming evaluation, cache, retries after a killed actor, invalid results."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import ray
import torch

from storage import CorruptArtifactError, LocalStore
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.evaluation.pool import EvalPool
from workers.evaluation.resources import Resources
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics, stored_metrics
from workers.training.teacher import TeacherConfig, load_or_train_teacher
from workers.training.train import DistillConfig, TrainConfig

DATA = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=512, test_size=128))
TRAIN = TrainConfig(epochs=1, batch_size=64, augment=False, distill=DistillConfig(alpha=0.5))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_session):
    store = LocalStore(tmp_path_factory.mktemp("pool") / "store")
    teacher = load_or_train_teacher(store, TeacherConfig(arch="tiny_cnn", epochs=3, batch_size=64), DATA,
                                    load_dataset(DATA), torch.device("cpu"), progress=False)
    return store, teacher.teacher_hash


def spec(teacher_hash: str, **changes) -> CandidateSpec:
    base = CandidateSpec(arch="tiny_cnn", teacher=teacher_hash, dataset=DATA, train=TRAIN)
    return dataclasses.replace(base, **changes)


def pool_for(prepared, size: int = 2) -> EvalPool:
    store, teacher_hash = prepared
    return EvalPool(store, teacher_hash, DATA, Resources(gpus_per_eval=0, cpus_per_eval=1), size=size)


def test_pool_streams_results_and_stores_each_candidate(prepared):
    store, teacher_hash = prepared
    specs = [spec(teacher_hash, widths=(("layer2", w),)) for w in (4, 8, 12)]
    pool = pool_for(prepared)
    try:
        outcomes = list(pool.map_unordered(specs))
    finally:
        pool.shutdown()
    assert sorted(o.spec.spec_hash for o in outcomes) == sorted(s.spec_hash for s in specs)
    for outcome in outcomes:
        m = outcome.metrics
        assert m.status == "ok" and not outcome.cached and outcome.attempts == 1
        assert 0 <= m.accuracy <= 1 and m.params > 0 and m.macs > 0 and m.latency_ms > 0
        prefix = f"candidates/{outcome.spec.spec_hash}"
        assert set(store.verify(prefix)) == {"spec.json", "model.pt", "metrics.json"}
        assert CandidateSpec.from_json(store.get_bytes(f"{prefix}/spec.json").decode()) == outcome.spec
    params = {dict(o.spec.widths)["layer2"]: o.metrics.params for o in outcomes}
    assert params[4] < params[8] < params[12]


def test_stored_candidates_are_not_evaluated_again(prepared):
    _, teacher_hash = prepared
    specs = [spec(teacher_hash, seed=s) for s in (11, 12)]
    pool = pool_for(prepared)
    try:
        first = {o.spec.spec_hash: o for o in pool.map_unordered(specs)}
        # a pool with no live actors can only answer from the store
        for actor in pool.actors:
            ray.kill(actor)
        second = {o.spec.spec_hash: o for o in pool.map_unordered(specs)}
    finally:
        pool.shutdown()
    assert all(not o.cached for o in first.values())
    assert all(o.cached and o.attempts == 0 for o in second.values())
    assert pool.cache_hits == 2 and pool.replaced == 0
    for key, outcome in second.items():
        assert outcome.metrics == first[key].metrics


def test_an_edited_stored_result_is_refused_not_taken_as_a_cache_hit(prepared):
    """Trust no stored byte: the cache lookup checks metrics.json against the candidate's manifest."""
    store, teacher_hash = prepared
    edited = spec(teacher_hash, seed=13)
    pool = pool_for(prepared, size=1)
    try:
        [outcome] = pool.map_unordered([edited])
        path = store.root / "candidates" / edited.spec_hash / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "accuracy": 0.9999}))
        with pytest.raises(CorruptArtifactError, match=f"candidates/{edited.spec_hash}/metrics.json is corrupt"):
            list(pool.map_unordered([edited]))
    finally:
        pool.shutdown()
    assert outcome.metrics.status == "ok" and outcome.metrics.accuracy != 0.9999


def test_killed_actor_leads_to_one_retried_result(prepared):
    store, teacher_hash = prepared
    slow = spec(teacher_hash, seed=21, train=dataclasses.replace(TRAIN, epochs=40))
    pool = pool_for(prepared, size=1)
    ray.get(pool.actors[0].name.remote())  # the actor has loaded data and teacher
    victim = pool.actors[0]
    killer = threading.Timer(1.0, lambda: ray.kill(victim))
    killer.start()
    try:
        started = time.perf_counter()
        outcomes = list(pool.map_unordered([slow]))
    finally:
        killer.cancel()
        pool.shutdown()
    assert len(outcomes) == 1
    assert outcomes[0].attempts == 2 and pool.replaced == 1
    assert outcomes[0].metrics.status == "ok"
    assert store.list(f"candidates/{slow.spec_hash}/").count(f"candidates/{slow.spec_hash}/model.pt") == 1
    assert time.perf_counter() - started > 1.0


def test_invalid_candidates_are_results_and_the_rest_finish(prepared):
    _, teacher_hash = prepared
    bad_width = spec(teacher_hash, widths=(("layer9", 3),))
    too_wide = spec(teacher_hash, widths=(("layer2", 999),))
    diverging = spec(teacher_hash, seed=31, train=dataclasses.replace(TRAIN, lr=1e12, distill=DistillConfig(alpha=0)))
    fine = spec(teacher_hash, seed=32)
    pool = pool_for(prepared)
    try:
        outcomes = pool.evaluate([bad_width, too_wide, diverging, fine])
    finally:
        pool.shutdown()
    statuses = [o.metrics.status for o in outcomes]
    assert statuses == ["invalid", "invalid", "invalid", "ok"]
    assert "layer9" in outcomes[0].metrics.error
    assert "diverged" in outcomes[2].metrics.error


@pytest.mark.parametrize("case", ["missing", "other files"])
def test_a_worker_that_cannot_start_fails_the_pool_with_its_cause(prepared, tmp_path, case):
    """Workers that cannot load their data — or that see other files than the run started on (a node with another
    copy of the folder) — are a configuration error, not a stream of invalid candidates."""
    from core.errors import SearchsvcError
    from tests.test_user_data import _image_folder

    store, teacher_hash = prepared
    if case == "missing":
        data, says = DatasetConfig(name="fashion_mnist", root=str(tmp_path / "nowhere"), download=False), "dataset.root"
    else:
        _image_folder(tmp_path / "pets", {"train": 4, "test": 2})
        data = DatasetConfig(name="imagefolder", root=str(tmp_path / "pets"), image_size=8, fingerprint="0" * 16)
        says = "are not the data this run started on"
    pool = EvalPool(store, teacher_hash, data, Resources(gpus_per_eval=0, cpus_per_eval=1), size=1)
    try:
        with pytest.raises(SearchsvcError, match=f"failed to start.*{says}"):
            list(pool.map_unordered([spec(teacher_hash, seed=41)]))
    finally:
        pool.shutdown()


@pytest.mark.parametrize("takeover", [True, False])
def test_files_left_by_a_writer_that_died_mid_save_are_replaced(prepared, monkeypatch, takeover):
    """A node removed while its worker saved a candidate leaves files but no manifest. The retry (takeover,
    what the pool asks after an actor died) replaces them at once; any other writer after OTHER_WRITER_S."""
    from workers.evaluation import evaluate

    store, teacher_hash = prepared
    dead = spec(teacher_hash, seed=77 if takeover else 78)
    prefix = f"candidates/{dead.spec_hash}"
    store.put_bytes(f"{prefix}/spec.json", dead.canonical_json().encode(), write_once=True)
    store.put_bytes(f"{prefix}/metrics.json", b'{"half": "written"}', write_once=True)
    monkeypatch.setattr(evaluate, "OTHER_WRITER_S", 60.0 if takeover else 0.5)  # takeover never waits
    metrics = CandidateMetrics(dead.spec_hash, "ok", accuracy=0.5)
    started = time.monotonic()
    kept = evaluate.save_candidate(store, dead, torch.nn.Linear(2, 2), metrics, takeover=takeover)
    waited = time.monotonic() - started
    assert kept.accuracy == 0.5 and kept.artifact.endswith(f"{prefix}/model.pt")
    assert set(store.verify(prefix)) == {"spec.json", "model.pt", "metrics.json"}
    assert stored_metrics(store, dead.spec_hash) == kept
    assert (waited < 30) if takeover else (waited >= 0.5)
    # a finished candidate is never replaced: a later writer gets the stored result
    again = evaluate.save_candidate(store, dead, None, dataclasses.replace(metrics, accuracy=0.9), takeover=True)
    assert again == kept


def test_candidate_metrics_round_trip_flat_with_the_methods_extras():
    metrics = CandidateMetrics("abc", "ok", accuracy=0.5, val_accuracy=0.625, params=1200, macs=34_000,
                               wall_s=2.5, history=({"epoch": 1, "loss": 0.75},), arch={"convs": [4, 8]},
                               extra={"sparsity": 0.5, "nonzero_params": 600, "thinned": {"conv1": 3}})
    data = json.loads(json.dumps(metrics.to_data()))
    assert data["sparsity"] == 0.5 and data["thinned"] == {"conv1": 3} and "extra" not in data  # flat
    assert data["history"] == [{"epoch": 1, "loss": 0.75}] and "latency_ms" not in data  # not measured: left out
    back = CandidateMetrics.from_data(data, source="metrics.json")
    assert back == metrics
    assert back.get("nonzero_params") == 600 and back.get("params") == 1200 and back.get("latency_ms", 0.0) == 0.0


def test_an_invalid_result_is_stored_with_the_keys_it_always_had():
    data = CandidateMetrics.invalid("abc", "out of memory", wall_s=1.5).to_data()
    assert data == {"spec_hash": "abc", "status": "invalid", "error": "out of memory", "accuracy": 0.0,
                    "wall_s": 1.5, "worker": None, "artifact": None}


@pytest.mark.parametrize("raw, problem", [
    (b"[]", "must be a mapping"),
    (b'{"spec_hash": "x", "status": "ok", "accuracy": "\xff\xfe"}', "not JSON"),
    (b'{"spec_hash": "x", "status": "ok", "accuracy": "high"}', "accuracy: must be a number"),
    (b'{"spec_hash": "x", "status": "ok", "accuracy": 0.5, "val_accuracy": NaN}', "val_accuracy: must be a finite"),
    (b'{"status": "ok", "accuracy": 0.5}', "spec_hash: missing required key"),
])
def test_an_undecodable_stored_metrics_json_is_a_corrupt_artifact_naming_it(tmp_path, raw, problem):
    """Bytes that match their manifest can still be no result (written by hand, or by a bug): one line naming
    the file and the key, never a traceback and never a result."""
    store = LocalStore(tmp_path / "store")
    prefix = "candidates/x"
    store.put_bytes(f"{prefix}/metrics.json", raw)
    store.write_manifest(prefix, {"metrics.json": raw})
    with pytest.raises(CorruptArtifactError, match=f"{prefix}/metrics.json is corrupt: .*{problem}"):
        stored_metrics(store, "x")
