"""Latency where the user deploys (workers.measurement.latency, workers.measurement.ort): a budget's probe times every kept candidate
with ONNX Runtime on the CPU or with torch at any batch size, stored candidates included (timed again from
their stored model, never retrained)."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from core.records import RecordError, from_data
from searchsvc.budget import Budget, probes_of
from searchsvc.cli import main
from searchsvc.methods.grid import GridSearch
from storage import LocalStore
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.evaluation.evaluate import EvalContext, complete, evaluate_candidate
from workers.evaluation.spec import CandidateSpec
from workers.measurement import ort
from workers.measurement.latency import LatencyProbe, measure_probes, time_probe
from workers.measurement.metrics import stored_metrics
from workers.measurement.run_measures import Measures
from workers.models.inputs import InputSpec
from workers.models.zoo import create_model
from workers.training.teacher import TeacherConfig, load_or_train_teacher
from workers.training.train import TrainConfig

CPU = torch.device("cpu")
ORT_B1 = LatencyProbe("onnxruntime", batch=1, threads=1)


@pytest.mark.parametrize("name, size", [("tiny_cnn", 16), ("resnet20", 16), ("lenet_300_100", 28)])
def test_the_onnx_model_gives_torchs_logits(name, size):
    """What ONNX Runtime times is the model itself: its logits equal torch's (eval mode, fp32)."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=4).eval()
    images = torch.randn(5, 1, size, size)
    runner = ort.session(ort.onnx_bytes(model, InputSpec.image(1, size)), threads=1)
    got = runner.run([ort.OUTPUT], {ort.INPUT: images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(images).numpy(), rtol=1e-4, atol=1e-5)


def test_ort_probes_time_a_zoo_and_a_torchvision_model_into_their_own_columns():
    probes = (ORT_B1, LatencyProbe("onnxruntime", batch=32, threads=2), LatencyProbe("torch", batch=16),
              LatencyProbe("torch", batch=1))  # the last is standard: measured by every worker anyway
    for model, channels, size in ((create_model("tiny_cnn", 1, 4), 1, 16),
                                  (torchvision.models.mobilenet_v3_small(num_classes=10), 3, 32)):
        timed = measure_probes(model, probes, CPU, InputSpec.image(channels, size))
        assert set(timed) == {"ort_latency_b1_t1_ms", "ort_latency_b32_t2_ms", "latency_b16_ms"}
        assert all(math.isfinite(v) and v > 0 for v in timed.values())
        assert timed["ort_latency_b32_t2_ms"] > timed["ort_latency_b1_t1_ms"]  # 32 images, not one


def test_a_model_onnx_cannot_export_is_left_untimed_with_a_warning(caplog):
    class Unexportable(nn.Module):  # an operator the ONNX exporter has no mapping for
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16 * 16, 4)

        def forward(self, x):
            flat = x.flatten(1)
            return self.fc(flat) + torch.linalg.svdvals(flat[:, :4].reshape(-1, 2, 2)).sum(-1, keepdim=True)

    with caplog.at_level(logging.WARNING, logger="workers.measurement.latency"):
        assert time_probe(Unexportable(), ORT_B1, CPU, InputSpec.image(1, 16)) is None
        assert measure_probes(Unexportable(), (ORT_B1,), CPU, InputSpec.image(1, 16)) == {}
    assert "ONNX Runtime on 1 CPU thread, batch 1: not measured" in caplog.text


def test_a_budget_names_the_column_its_latency_is_judged_by():
    ort_budget = from_data(Budget, {"latency_ms": 2, "latency_batch": 8, "latency_backend": "onnxruntime",
                                    "latency_threads": 4}, path="search.budget")
    assert ort_budget.columns("latency_ms") == ("ort_latency_b8_t4_ms",)
    assert ort_budget.label() == "latency_ms <= 2 (ONNX Runtime on 4 CPU threads, batch 8)"
    assert ort_budget.within({"ort_latency_b8_t4_ms": 2.0, "latency_ms": 9.0}.get) is True
    assert ort_budget.within({"latency_ms": 0.1}.get) is None  # not timed at its setting: not judged
    default_threads = from_data(Budget, {"latency_ms": 2, "latency_batch": 1, "latency_backend": "onnxruntime"})
    assert default_threads.probe() == ORT_B1
    torch_64 = from_data(Budget, {"latency_ms": 2, "latency_batch": 64})
    assert torch_64.columns("latency_ms") == ("latency_b64_ms",)
    # torch at 1 or 256 is what every worker measures: nothing extra for the workers to time
    for batch, column in ((1, "latency_ms"), (256, "latency_b256_ms")):
        standard = from_data(Budget, {"latency_ms": 2, "latency_batch": batch})
        assert standard.columns("latency_ms") == (column,) and probes_of(GridSearch(budget=standard)) == ()
    assert probes_of(GridSearch(budget=ort_budget)) == (LatencyProbe("onnxruntime", 8, 4),)


@pytest.mark.parametrize("budget, problem", [
    ({"latency_ms": 2, "latency_batch": 1, "latency_threads": 2}, "search.budget.latency_threads: ONNX Runtime's"),
    ({"latency_ms": 2, "latency_batch": 0}, "search.budget.latency_batch: must be an integer in [1, 4096]"),
    ({"latency_ms": 2, "latency_batch": 1, "latency_backend": "tensorrt"}, "search.budget.latency_backend: must be"),
    ({"latency_ms": 2, "latency_batch": 1, "latency_backend": "onnxruntime", "latency_threads": 0},
     "search.budget.latency_threads: must be a positive integer"),
])
def test_bad_latency_settings_are_named(budget, problem):
    with pytest.raises(RecordError) as caught:
        from_data(Budget, budget, path="search.budget")
    assert caught.value.problems[0].startswith(problem), caught.value.problems


def test_validate_refuses_onnxruntime_latency_where_it_is_not_installed(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: grid\ndataset: {name: synthetic}\nteacher: {arch: tiny_cnn}\nsearch:\n"
                      "  candidates: [{}]\n  budget: {latency_ms: 2, latency_batch: 1, latency_backend: onnxruntime}\n")
    assert main(["validate", str(config)]) == 0
    monkeypatch.setattr(ort, "available", lambda: False)
    capsys.readouterr()
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search.budget.latency_backend: onnxruntime is not installed" in err


def test_a_probe_times_each_fresh_candidate_and_a_stored_one_again_without_training(tmp_path, monkeypatch):
    """With the budget's probe a worker stores its column with the candidate; a candidate stored without it
    is timed again from its stored model (the training loop is never entered) and its metrics.json is left
    as written."""
    data = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=128, test_size=64))
    splits, store = load_dataset(data), LocalStore(tmp_path / "store")
    teacher = load_or_train_teacher(store, TeacherConfig(arch="tiny_cnn", epochs=1, batch_size=64), data, splits, CPU,
                                    progress=False)
    spec = CandidateSpec(arch="tiny_cnn", teacher=teacher.teacher_hash, dataset=data,
                         train=TrainConfig(epochs=1, batch_size=64, augment=False), widths=(("layer1.0", 4),))
    plain = EvalContext(store, teacher, splits, CPU)
    probed = EvalContext(store, teacher, splits, CPU, measures=Measures(probes=(ORT_B1,)))
    metrics = evaluate_candidate(spec, plain)
    assert metrics.status == "ok" and metrics.get("ort_latency_b1_t1_ms") is None
    stored = stored_metrics(store, spec.spec_hash)
    before = store.get_bytes(f"candidates/{spec.spec_hash}/metrics.json")
    assert probed.measures.missing_probes(stored) == (ORT_B1,)

    with monkeypatch.context() as patch:
        patch.setattr("workers.evaluation.evaluate.train_model", lambda *a, **k: pytest.fail("a stored candidate retrained"))
        timed = complete(stored, probed)
    assert timed.get("ort_latency_b1_t1_ms") > 0 and not probed.measures.incomplete(timed)
    assert (timed.accuracy, timed.params, timed.latency_ms) == (stored.accuracy, stored.params, stored.latency_ms)
    assert store.get_bytes(f"candidates/{spec.spec_hash}/metrics.json") == before

    fresh = evaluate_candidate(dataclasses.replace(spec, seed=2), probed)
    assert fresh.get("ort_latency_b1_t1_ms") > 0
    assert stored_metrics(store, fresh.spec_hash).get("ort_latency_b1_t1_ms") == fresh.get("ort_latency_b1_t1_ms")
