"""Quantization-aware training from a Distiller schedule's `quantizers:` (workers/compression/qat.py): fake quantization
from the policy's first epoch, ranges that move in training only, overrides that keep layers in fp32, state
that resumes, an AGP run whose result is an int8 model, and unsupported quantizers named at validate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import onnx
import pytest
import torch

from searchsvc.cli import main
from storage import LocalStore
from workers.compression.quantize import accuracy
from workers.compression.schedule import CompressionScheduler, ScheduleError, parse_schedule
from workers.data.datasets import load_dataset
from workers.evaluation.spec import CandidateSpec
from workers.models.zoo import create_model
from workers.training.train import Recipe, TrainCallback, train_model

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUANTIZER = {"class": "QuantAwareTrainRangeLinearQuantizer", "bits_activations": 8, "bits_weights": 8,
             "mode": "ASYMMETRIC_UNSIGNED", "ema_decay": 0.99, "per_channel_wts": True,
             "overrides": {"conv1": {"bits_weights": None, "bits_activations": None}}}


def _schedule(quantizer: dict, start: int = 1, end: int = 3) -> dict:
    return {"version": 1, "quantizers": {"q": quantizer},
            "policies": [{"quantizer": {"instance_name": "q"}, "starting_epoch": start, "ending_epoch": end}]}


class _Watch(TrainCallback):
    """Which layers run a fake-quantized forward at the start of each epoch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.seen = model, []

    def on_minibatch_begin(self, epoch: int, step: int, steps: int) -> None:
        if step == 0:
            self.seen.append(sorted(n for n, m in self.model.named_modules() if "forward" in m.__dict__))


def test_fake_quantization_runs_from_the_policys_epoch_and_the_float_network_comes_back(rgb32):
    model = create_model("simplenet_cifar", 3, 4)
    scheduler = CompressionScheduler(parse_schedule(_schedule(QUANTIZER), model), model)
    watch = _Watch(model)
    train_model(model, rgb32, Recipe(epochs=3, batch_size=64, lr=0.02), CPU, progress=False,
                callbacks=[scheduler, watch])
    quantized = ["conv2", "fc1", "fc2", "fc3"]  # conv1: the override keeps it in fp32
    assert watch.seen == [[], quantized, quantized]
    # in training the weights a layer computes with are int8 levels: scale · integer in [-128, 127]
    fake_input, fake_weight = scheduler.fake.fakes["conv2"]
    levels = fake_weight(model.conv2.weight.detach()) / fake_weight.scale.view(-1, 1, 1, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 128
    # evaluation does not move the activation ranges: only training data set them
    ranges = fake_input.activation_post_process.min_val.clone(), fake_input.activation_post_process.max_val.clone()
    model.eval()
    model(torch.randn(8, 3, 32, 32) * 50)
    assert torch.equal(fake_input.activation_post_process.min_val, ranges[0])
    assert torch.equal(fake_input.activation_post_process.max_val, ranges[1])
    assert scheduler.finish_quantization().per_channel_wts is True
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert set(model.state_dict()) == set(create_model("simplenet_cifar", 3, 4).state_dict())  # architecture kept


def test_the_fake_quantizers_ranges_resume_from_the_schedulers_state(rgb32):
    model = create_model("simplenet_cifar", 3, 4)
    schedule = parse_schedule(_schedule(QUANTIZER, start=0), model)
    first = CompressionScheduler(schedule, model)
    train_model(model, rgb32, Recipe(epochs=1, batch_size=64, lr=0.02), CPU, progress=False, callbacks=[first])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a trial checkpoint keeps it (weights_only loads it back)
    buffer.seek(0)
    restored = CompressionScheduler(schedule, model)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name, (fake_input, _) in first.fake.fakes.items():
        again = restored.fake.fakes[name][0]
        assert torch.equal(again.scale, fake_input.scale) and torch.equal(again.zero_point, fake_input.zero_point)


@pytest.mark.parametrize("quantizer, needle", [
    ({**QUANTIZER, "class": "DorefaQuantizer"}, "quantizers.q.class: quantizer 'DorefaQuantizer' is not supported"),
    ({**QUANTIZER, "class": "PostTrainLinearQuantizer"},
     "supported: QuantAwareTrainRangeLinearQuantizer, LinearQuantAwareTraining"),
    ({**QUANTIZER, "bits_weights": 4}, "quantizers.q.bits_weights: 8 or null (lower bit widths are not supported yet)"),
    ({**QUANTIZER, "mode": "SYMMETRIC"}, "quantizers.q.mode: must be one of"),
    ({**QUANTIZER, "overrides": {"conv7": {"bits_weights": None}}}, "quantizers.q.overrides.conv7: matches no module"),
    ({**QUANTIZER, "overrides": {"conv1": {"bits_weights": 4}}}, "8 or null"),
])
def test_an_unsupported_quantizer_is_named_with_what_is_supported(quantizer, needle):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(_schedule(quantizer), create_model("simplenet_cifar", 3, 4))
    assert any(needle in problem for problem in caught.value.problems), caught.value.problems


def test_an_agp_schedule_with_a_quantizer_trains_into_an_int8_model(tmp_path, ray_session, capsys):
    """agp-smoke with element-wise pruning and a quantizer: the trial's candidate keeps its float model, and
    its int8 model (QDQ: int8 weights, conv1 left fp32 by the override) is stored in int8-qat; a fresh ONNX
    Runtime session on the stored file gives the recorded int8 accuracy, and the row names its source."""
    schedule = {"version": 1,
                "pruners": {"fc": {"class": "AutomatedGradualPruner", "initial_sparsity": 0.2, "final_sparsity": 0.6,
                                   "weights": ["fc1.weight", "fc2.weight"]}},
                "quantizers": {"q": QUANTIZER},
                "policies": [{"pruner": {"instance_name": "fc"}, "starting_epoch": 0, "ending_epoch": 2},
                             {"quantizer": {"instance_name": "q"}, "starting_epoch": 1, "ending_epoch": 3}]}
    path = tmp_path / "qat.yaml"
    path.write_text(json.dumps(schedule))
    store_dir = tmp_path / "s"
    assert main(["run", str(REPO / "configs/agp-smoke.yaml"), "--store", str(store_dir), "--no-progress",
                 "--set", f"search.schedule={path}", "--set", "search.tune.final_sparsity=[0.6]",
                 "--set", "train.epochs=3"]) == 0
    store = LocalStore(store_dir)
    run_id = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    (row,) = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    assert row["status"] == "ok" and row["int8_source"] == "qat" and row["sparsity"] > 0.3
    prefix = f"candidates/{row['spec_hash']}/int8-qat"
    recorded = json.loads(store.get_verified(prefix, "int8.json"))
    assert recorded["metrics"]["int8_accuracy"] == row["int8_accuracy"]
    assert recorded["config"]["quantizer"]["overrides"] == {"conv1": {"bits_weights": None, "bits_activations": None}}
    model = store.get_verified(prefix, "model.onnx")
    graph = onnx.load_from_string(model).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    weights = [made_by.get(node.input[1], "fp32") for node in graph.node if node.op_type in ("Conv", "Gemm")]
    assert weights == ["fp32", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear"]
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    spec = CandidateSpec.from_json(store.get_verified(f"candidates/{row['spec_hash']}", "spec.json").decode())
    splits = load_dataset(spec.dataset)
    assert accuracy(model, splits.test, splits, threads=1) == row["int8_accuracy"]
