"""Issue 35: latency as a pruning step's cost — a per-layer table timed on the budget's backend (torch, ONNX Runtime
fp32 or int8), the names a spec carries it by, group costs priced by it, and a step that lands under a latency
limit. Timings are real (no mocks); assertions compare figures that differ many times over, never a hard-coded ms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from searchsvc.budget import Budget
from searchsvc.methods.taylor import TaylorSearch
from searchsvc.methods.taylor.driver import step_params
from workers.compression import taylor
from workers.compression.costs import counter, group_costs
from workers.compression.latency_table import LatencyCounter, LayerTable, layer_inputs, measured_ms
from workers.compression.quantize import QuantizeConfig
from workers.compression.ranking import Step
from workers.compression.taylor import group_widths, taylor_prune
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.measurement.latency import LatencyCost, LatencyProbe
from workers.measurement.run_measures import Measures
from workers.models.inputs import InputSpec
from workers.models.surgery import derive_arch, width_keys
from workers.models.zoo import build_model, create_model

SIZE = 32
IMAGES = InputSpec.image(3, SIZE)
CPU = torch.device("cpu")
ORT_B16 = LatencyCost(LatencyProbe("onnxruntime", 16, 1))


@pytest.fixture(scope="module")
def splits():
    return load_dataset(DatasetConfig(name="synthetic", synthetic=SyntheticConfig(
        num_classes=10, channels=3, image_size=SIZE, train_size=256, test_size=64)))


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", 3, 10)


def test_a_latency_cost_is_named_by_its_probe_column_and_read_back():
    costs = [LatencyCost(LatencyProbe("torch", 1)), LatencyCost(LatencyProbe("torch", 256)),
             LatencyCost(LatencyProbe("onnxruntime", 8, 2)), LatencyCost(LatencyProbe("onnxruntime", 1, 1), int8=True)]
    assert [c.name for c in costs] == ["latency_ms", "latency_b256_ms", "ort_latency_b8_t2_ms",
                                       "int8_ort_latency_b1_t1_ms"]
    assert [LatencyCost.parse(c.name) for c in costs] == costs
    assert LatencyCost.parse("macs") is None and LatencyCost.parse("params") is None
    with pytest.raises(ValueError, match="int8 model's latency is timed with ONNX Runtime"):
        LatencyCost.parse("int8_latency_ms")


def test_a_latency_budget_is_the_cost_a_step_ranks_by_and_lands_on():
    assert Budget(latency_ms=2.0, latency_batch=1).cost() == ("latency_ms", 2.0)
    assert Budget(latency_ms=9.0, latency_batch=64, latency_backend="onnxruntime", latency_threads=2).cost() == \
        ("ort_latency_b64_t2_ms", 9.0)
    assert Budget(int8_latency_ms=0.5).cost(int8_threads=2) == ("int8_ort_latency_b1_t2_ms", 0.5)
    assert Budget(macs=10, latency_ms=2.0, latency_batch=1).cost() == ("macs", 10)  # a counted limit goes first
    # The driver names the int8 cost with the run's quantize.threads.
    search = TaylorSearch(budget=Budget(int8_latency_ms=0.5))
    params = dict(step_params(search, 16, 2, Measures(quantize=QuantizeConfig(threads=3))))
    assert params["cost"] == "int8_ort_latency_b1_t3_ms" and params["limit"] == 0.5 and params["steps_left"] == 2


def test_the_table_sees_every_layer_called_with_its_input_shape_and_times_each_configuration_once():
    model = _resnet20()
    seen = layer_inputs(model, IMAGES)
    assert len(seen) == 22  # 19 convolutions, 2 projection shortcuts, the classifier
    assert seen[0][1] == (3, SIZE, SIZE) and seen[-1][1] == (64,)
    table = LayerTable(LatencyCost(LatencyProbe("torch", 8)), CPU)
    first = table.model_ms(model, IMAGES)
    configurations = len({(repr(layer), shape) for layer, shape in seen})
    assert len(table.times) == configurations < len(seen)  # repeated blocks share their entries
    assert table.model_ms(model, IMAGES) == first  # read from the table, not timed again


@pytest.mark.parametrize("cost", [LatencyCost(LatencyProbe("torch", 16)), ORT_B16,
                                  LatencyCost(LatencyProbe("onnxruntime", 16, 1), int8=True)], ids=lambda c: c.name)
def test_a_wide_layer_costs_more_than_a_thin_one_on_every_backend(cost):
    """64 x 64 channels against 4 x 4 at 32 px: 256 times the MACs, so many times the time on any backend."""
    table = LayerTable(cost, CPU)
    wide = table.layer_ms(nn.Conv2d(64, 64, 3, padding=1), (64, SIZE, SIZE))
    thin = table.layer_ms(nn.Conv2d(4, 4, 3, padding=1), (4, SIZE, SIZE))
    assert wide > 3 * thin > 0


def test_a_cut_network_is_predicted_and_measured_faster():
    """Every width halved (a quarter of the MACs): the table predicts less than the parent's measured latency,
    and the cut network measures faster too."""
    model = _resnet20()
    half = build_model(derive_arch(model.arch, widths={k: w // 2 for k, w in width_keys(model.arch).items()}))
    count = counter(ORT_B16.name, IMAGES, model)
    assert isinstance(count, LatencyCounter)
    assert count(model) == pytest.approx(count.parent_ms)
    assert count(half) < 0.8 * count.parent_ms
    assert measured_ms(half, ORT_B16, IMAGES, CPU) < measured_ms(model, ORT_B16, IMAGES, CPU)


def test_group_costs_are_priced_per_position_over_a_chunk():
    model = _resnet20()
    count = counter(ORT_B16.name, IMAGES, model)
    costs = group_costs(model, ORT_B16.name, IMAGES, {key: 8 for key in width_keys(model.arch)}, count)
    assert set(costs) == set(width_keys(model.arch)) and all(c >= 0 for c in costs.values())
    # The residual stream of the last stage touches 8 layers at 8 x 8 px; one block's inner width two.
    narrower = build_model(derive_arch(model.arch, widths={"layer3": 56}))
    assert costs["layer3"] == pytest.approx(max(0.0, count(model) - count(narrower)) / 8)


def test_a_step_lands_under_a_latency_limit(splits, monkeypatch):
    """A step allowed to remove everything stops at the fewest ranked chunks whose predicted latency is within the
    limit, and close under it; it prices the cut with the same table the ranking used."""
    made: list[LatencyCounter] = []

    def spy(*args, **kwargs):
        made.append(counter(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(taylor, "counter", spy)
    model = _resnet20()
    full = group_widths(model, IMAGES)
    parent = measured_ms(model, ORT_B16, IMAGES, CPU)
    limit = 0.6 * parent
    student, plan = taylor_prune(copy.deepcopy(model), splits, Step(10 ** 6, round_to=8, cost_power=1.0), 1, 64, 0,
                                 full, ORT_B16.name, limit)
    (count,) = made
    assert plan and count(student) <= limit
    assert count(student) >= 0.75 * limit  # a chunk of the widest stage is a few percent of this small network
