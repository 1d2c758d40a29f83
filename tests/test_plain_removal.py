"""Issue 38: removal on networks without skip connections — the N2N paper's removal policy acts on every layer of a
VGG. A conv or linear layer (with the norm after it) is removable where the network still runs without it; the
wider of its two sides is cut to the narrower first, so the next layer keeps the teacher's weights of the channels
it still reads. The smaller networks are real (fewer parameters), rebuild from their tensors and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchvision.models import vgg11, vgg11_bn

from searchsvc.candidates import export_model
from workers.measurement import ort
from workers.models.cutting import shrink_graph
from workers.models.inputs import InputSpec
from workers.models.layer_removal import removable_layers
from workers.models.rebuild import rebuild_mismatch
from workers.models.structure import structure_of
from workers.models.surgery import InvalidTransform

VGG_CONVS = ("features.0", "features.3", "features.6", "features.8", "features.11", "features.13", "features.16",
             "features.18")
SMALL = InputSpec.image(3, 32)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_vgg11_conv_and_its_hidden_linear_are_units_and_the_classifier_is_not():
    torch.manual_seed(0)
    units = structure_of(vgg11(num_classes=10), SMALL)
    assert units.names == (*VGG_CONVS, "classifier.3")  # classifier.0 reads 25,088 flattened values: it stays
    assert units.members["features.3"] == ("features.3",) and units.inner["features.3"] == {"features.3": 128}
    assert [units.rows["features.0"].as_row()[i] for i in (2, 3, 4, 5, 6)] == [0, 64, 3, 1, 1]  # conv, 64, 3x3, s1, p1
    bn = structure_of(vgg11_bn(num_classes=10), SMALL)
    assert bn.members["features.4"] == ("features.4", "features.5")  # a layer goes with its batch norm


def test_removed_vgg_layers_build_a_smaller_network_that_rebuilds_and_exports(tmp_path):
    torch.manual_seed(0)
    teacher = vgg11_bn(num_classes=10).eval()
    # features.4 widens (64 -> 128): its output group is cut to 64; features.11 is square (256 -> 256)
    removed = ("features.4", "features.5", "features.11", "features.12")  # each conv with its batch norm
    example = SMALL.example(teacher)
    small = shrink_graph(teacher, example, removed, {"features.25": 256}, kernels={"features.8": 1})
    assert _params(small) < _params(teacher) - 2_000_000
    assert small.features[8].in_channels == 64  # the conv after the removed one reads what features.4 read
    assert small.features[8].kernel_size == (1, 1) and small.features[8].padding == (0, 0)  # its kernel's centre
    assert small.features[25].out_channels == 256 and small.classifier[0].in_features == 256 * 49
    assert rebuild_mismatch(small, vgg11_bn(num_classes=10), removed, example) is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = small(x).numpy()
    # TorchScript: torch's ONNX exporter cannot export VGG's adaptive pooling of a 1x1 map (32 px) to 7x7
    traced = torch.jit.load(str(export_model(small, tmp_path / "small.pt", SMALL)))
    np.testing.assert_allclose(traced(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    # it trains: VGG's ReLU(inplace=True) after a removed conv would overwrite what the ReLU before needs
    small.train()(x).sum().backward()


def test_a_plain_networks_removed_layers_export_to_onnx():
    import onnxruntime

    torch.manual_seed(0)
    model = Narrowing().eval()
    inputs = InputSpec.image(1, 16)
    small = shrink_graph(model, inputs.example(model), ["features.5", "features.2", "features.3"])
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = small(x).numpy()
    session = onnxruntime.InferenceSession(ort.onnx_bytes(small, inputs), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {ort.INPUT: x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


class Narrowing(nn.Module):
    """A conv that narrows (16 -> 8) between two others: removing it cuts the conv before it to 8."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                                      nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(8 * 7 * 7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def test_a_narrowing_layer_goes_by_cutting_the_layer_before_it_and_a_shape_changing_one_stays():
    torch.manual_seed(0)
    model = Narrowing().eval()
    inputs = InputSpec.image(1, 16)
    example = inputs.example(model)
    found = removable_layers(model, example)
    # features.7 (stride 2, no padding) feeds a flatten of fixed size: without it the head cannot read its input
    assert list(found) == ["features.0", "features.2", "features.5"]
    assert found["features.2"] == ("features.2", "features.3")
    small = shrink_graph(model, example, found["features.2"])
    assert small.features[0].out_channels == 8 and small.features[5].in_channels == 8
    assert rebuild_mismatch(small, Narrowing(), found["features.2"], example) is None
    with pytest.raises(InvalidTransform, match="features.3 goes with the layer before it"):
        shrink_graph(model, example, ["features.2"])
    with pytest.raises(InvalidTransform, match="unknown units to remove: \\['nowhere'\\]"):
        shrink_graph(model, example, ["nowhere"])


def test_n2n_removes_and_shrinks_layers_of_the_zoos_plain_network(tmp_path, ray_session):
    """simplenet_cifar (Distiller's: two 5x5 convs, three linear layers), PPO with the paper's continuous
    shrinkage: each candidate is recorded as the architecture it has (widths and removed layers), and comes back
    from it."""
    import searchsvc
    from searchsvc.cli import main
    from storage import open_store

    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({
        "method": "n2n", "dataset": {"name": "synthetic", "synthetic": {
            "num_classes": 4, "channels": 3, "image_size": 32, "train_size": 512, "test_size": 128}},
        "teacher": {"arch": "simplenet_cifar", "epochs": 3, "batch_size": 128, "augment": False},
        "train": {"epochs": 1, "batch_size": 128, "augment": False},
        "search": {"agent": "ppo", "max_evaluations": 8, "num_envs": 4, "iteration_evaluations": 4,
                   "shrink_share": 0.5, "shrink_ratios": "continuous", "min_ratio": 0.1, "shrink_kernels": True,
                   "top_k": 0},
        "resources": {"gpus_per_eval": 0, "cpus_per_eval": 1}}))
    store = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 0
    rows = searchsvc.results(open_store(str(store))).to_pylist()
    assert rows and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    removed = [r for r in rows if r["removed"] != "[]"]
    assert removed and all(r["compression"] > 1 for r in removed)
    for row in removed[:2]:
        metrics = json.loads((store / "candidates" / row["spec_hash"] / "metrics.json").read_text())
        assert metrics["arch"]["skipped"] == json.loads(row["removed"])  # conv1, conv2 or fc2
        model = searchsvc.load_candidate(row["spec_hash"], store=open_store(str(store)))
        assert sum(p.numel() for p in model.parameters()) == row["params"]
    # a 5x5 kernel cut by the shrink stage's ratio comes back from the architecture recorded
    from dataclasses import replace

    from searchsvc.methods.n2n.env import shrink_stage
    from workers.evaluation.spec import CandidateSpec
    from workers.models.cutting import shrink_graph as cut
    from workers.models.zoo import build_model, model_arch

    spec = CandidateSpec.from_json(next(store.glob("candidates/*/spec.json")).read_text())
    units = structure_of(build_model(model_arch("simplenet_cifar", 3, 4)), SMALL)
    assert units.kernels == {"conv1": 5, "conv2": 5}
    shrunk = shrink_stage(replace(spec, removed=("fc2",), widths=()), units.inner, (), 1, 0.1, units.kernels
                          ).make_spec(np.array([1.0, 0.5, 1.0], np.float32))
    assert dict(shrunk.kernels) == {"conv2": 3} and dict(shrunk.widths) == {"conv2": 8}
    teacher = build_model(model_arch("simplenet_cifar", 3, 4)).eval()
    small = cut(teacher, SMALL.example(teacher), shrunk.removed, shrunk.widths, kernels=shrunk.kernels)
    again = build_model(small.described())
    again.load_state_dict(small.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), small(x))


def test_the_shrink_stage_starts_from_the_widths_a_removal_left():
    """Removing a narrowing layer cuts the layer before it: the shrink stage scales that layer's new width, not
    the teacher's (a scale of the teacher's 16 would ask for more channels than the 8 left)."""
    from workers.models.structure import widths_after

    model = Narrowing().eval()
    inputs = InputSpec.image(1, 16)
    units = structure_of(model, inputs)
    after = widths_after(model, inputs, units.members["features.2"], units.inner)
    assert units.inner["features.0"] == {"features.0": 16} and after["features.0"] == {"features.0": 8}
    assert after["features.5"] == units.inner["features.5"]  # untouched by that removal
