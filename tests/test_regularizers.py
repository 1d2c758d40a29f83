"""Distiller's `regularizers:` in a schedule (workers/compression/regularizers.py): the penalty is added to the loss in
the policy's epochs only, group lasso drives the groups it targets towards zero, threshold_criteria zeros
them for good, and a malformed regularizer is named at validate."""

from __future__ import annotations

import copy

import pytest
import torch

from workers.compression.regularizers import GroupLassoRegularizer, L1Regularizer
from workers.compression.schedule import CompressionScheduler, ScheduleError, parse_schedule
from workers.models.zoo import create_model
from workers.training.train import Recipe, train_model

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _schedule(regularizer: dict, start: int = 0, end: int = 4) -> dict:
    return {"version": 1, "regularizers": {"reg": regularizer},
            "policies": [{"regularizer": {"instance_name": "reg"}, "starting_epoch": start, "ending_epoch": end,
                          "frequency": 1}]}


def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().flatten(1).norm(dim=1)


def test_the_penalty_is_the_formula_and_only_in_the_policys_epochs():
    model = create_model("simplenet_cifar", 3, 4)
    schedule = parse_schedule(_schedule({"class": "GroupLassoRegularizer",
                                         "reg_regims": {"module.conv2.weight": [0.01, "Filters"],
                                                        "fc1.weight": [0.002, "Rows"]}}, start=1, end=2), model)
    scheduler = CompressionScheduler(schedule, model)
    loss = torch.tensor(1.5)
    expected = 1.5 + 0.01 * _filter_norms(model.conv2.weight).sum() + 0.002 * model.fc1.weight.norm(dim=1).sum()
    assert scheduler.before_backward_pass(1, 0, 8, loss).item() == pytest.approx(expected.item(), rel=1e-6)
    assert scheduler.before_backward_pass(0, 0, 8, loss) is loss and scheduler.before_backward_pass(2, 0, 8, loss) is loss
    l1 = L1Regularizer(reg_regims={"conv1.weight": 0.5})
    assert l1.loss(dict(model.named_parameters())).item() == pytest.approx(0.5 * model.conv1.weight.abs().sum().item())


def test_group_lasso_shrinks_the_filters_it_targets_far_more_than_training_alone(rgb32):
    """Same seed, same data: with group lasso on conv2's filters, their norms end far below those of the run
    without it, while conv1 (not targeted) ends about where it would anyway."""
    torch.manual_seed(0)
    base = create_model("simplenet_cifar", 3, 4)
    plain, lasso = copy.deepcopy(base), copy.deepcopy(base)
    recipe = Recipe(epochs=4, batch_size=64, lr=0.05)
    train_model(plain, rgb32, recipe, CPU, progress=False)
    schedule = parse_schedule(_schedule({"class": "GroupLassoRegularizer",
                                         "reg_regims": {"conv2.weight": [0.2, "Filters"]}}), lasso)
    history = train_model(lasso, rgb32, recipe, CPU, progress=False, callbacks=[CompressionScheduler(schedule, lasso)])
    assert _filter_norms(lasso.conv2.weight).sum() < 0.2 * _filter_norms(plain.conv2.weight).sum()
    ratio = (_filter_norms(lasso.conv1.weight).sum() / _filter_norms(plain.conv1.weight).sum()).item()
    assert 0.8 < ratio < 1.25
    assert all(h["group_sparsity.reg"] == 0.0 for h in history)  # a penalty alone makes no exact zeros


def test_threshold_criteria_raises_the_group_sparsity_and_the_zeroed_filters_stay_zero(rgb32):
    torch.manual_seed(0)
    model = create_model("simplenet_cifar", 3, 4)
    # conv2's filters start with a mean |w| of 0.038 to 0.045: at 0.035 the penalty drives some of them below
    schedule = parse_schedule(_schedule({"class": "GroupLassoRegularizer", "threshold_criteria": "Mean_Abs",
                                         "reg_regims": {"conv2.weight": [0.035, "Filters"]}}, end=2), model)
    history = train_model(model, rgb32, Recipe(epochs=4, batch_size=64, lr=0.05), CPU, progress=False,
                          callbacks=[CompressionScheduler(schedule, model)])
    sparsity = [h["group_sparsity.reg"] for h in history]
    assert sparsity[1] > 0 and sparsity[1] >= sparsity[0]  # the groups below 0.05 mean |w| zeroed
    zero = _filter_norms(model.conv2.weight) == 0
    assert zero.float().mean().item() == pytest.approx(sparsity[-1]) and sparsity[-1] >= sparsity[1]
    assert 0 < int(zero.sum()) < 16  # whole filters, not the weight


@pytest.mark.parametrize("regularizer, needle", [
    ({"class": "DropFilterRegularizer", "reg_regims": {}}, "supported: L1Regularizer, GroupLassoRegularizer"),
    ({"class": "GroupLassoRegularizer", "reg_regims": {"conv2.weight": [0.1, "Blocks"]}}, "group type 'Blocks'"),
    ({"class": "GroupLassoRegularizer", "reg_regims": {"conv2.weight": 0.1}}, "expected [strength, group type]"),
    ({"class": "GroupLassoRegularizer", "reg_regims": {"conv9.weight": [0.1, "Filters"]}},
     "regularizers.reg.reg_regims.conv9.weight: the model has no such weight"),
    ({"class": "GroupLassoRegularizer", "reg_regims": {"fc1.weight": [0.1, "Channels"]}}, "needs a conv weight"),
    ({"class": "L1Regularizer", "reg_regims": {"conv1.weight": -1}}, "the strength must be a number >= 0"),
    ({"class": "L1Regularizer", "reg_regims": {"conv1.weight": 1}, "threshold_criteria": "Median"},
     "regularizers.reg.threshold_criteria: must be one of"),
])
def test_a_malformed_regularizer_is_named_by_its_key(regularizer, needle):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(_schedule(regularizer), create_model("simplenet_cifar", 3, 4))
    assert any(needle in problem for problem in caught.value.problems), caught.value.problems


def test_group_lasso_filters_of_a_linear_weight_are_its_rows():
    weight = torch.arange(12.0).reshape(3, 4)
    lasso = GroupLassoRegularizer(reg_regims={"w": [1.0, "Rows"]})
    assert lasso.loss({"w": weight}).item() == pytest.approx(weight.norm(dim=1).sum().item())
