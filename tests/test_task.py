"""Issue 37: the task section — the user's loss, a torchmetrics metric, the prediction among a network's outputs,
dense targets, distillation per position — and classification unchanged without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassJaccardIndex

from core.errors import SearchsvcError
from searchsvc.config import ConfigError, parse_config
from workers.data.python_source import decode
from workers.training.distill import kd_loss
from workers.training.task import Task, TaskConfig, prediction
from workers.training.train import DistillConfig, evaluate_split

JACCARD = "torchmetrics.classification.MulticlassJaccardIndex"


def test_no_task_section_leaves_the_recipes_as_they_were():
    config = parse_config({"method": "grid"})
    assert config.train.task is None and config.teacher.task is None
    default = parse_config({"method": "grid", "task": {}})  # an empty section is classification too
    assert default.train.task is None


def test_a_task_travels_in_both_recipes_and_a_second_copy_is_refused():
    config = parse_config({"method": "grid", "task": {"metric": JACCARD, "metric_kwargs": {"num_classes": 4}}})
    assert config.train.task == config.teacher.task == config.task
    with pytest.raises(ConfigError, match="train.task: set from the top-level task: section"):
        parse_config({"method": "grid", "train": {"task": {"metric": JACCARD}}})


def test_the_metric_is_a_torchmetrics_class_or_a_factory_and_nothing_else():
    task = Task(TaskConfig(metric=JACCARD, metric_kwargs={"num_classes": 3}))
    assert isinstance(task.metric(), MulticlassJaccardIndex)
    assert Task(TaskConfig(metric="tests.test_task:jaccard_factory")).metric().num_classes == 5
    with pytest.raises(SearchsvcError, match="task.metric: tests.test_task:not_a_metric made a dict, not a"):
        Task(TaskConfig(metric="tests.test_task:not_a_metric")).metric()
    with pytest.raises(SearchsvcError, match="task.metric: .* has no callable 'Nope'"):
        Task(TaskConfig(metric="torchmetrics.classification.Nope"))
    assert Task().metric() is None  # top-1 by argmax, as before


def jaccard_factory() -> MulticlassJaccardIndex:
    return MulticlassJaccardIndex(num_classes=5)


def not_a_metric() -> dict:
    return {}


def test_the_prediction_is_out_of_a_dict_the_first_of_a_tuple_or_the_named_one():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert prediction(a) is a
    assert prediction({"aux": b, "out": a}) is a and prediction({"logits": b}) is b
    assert prediction((a, b)) is a and prediction((a, b), 1) is b and prediction({"aux": b, "out": a}, "aux") is b
    with pytest.raises(SearchsvcError, match="task.output: the network's outputs have no 'x'"):
        prediction({"out": a}, "x")


def test_distillation_of_dense_outputs_is_the_mean_kl_over_every_position():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    targets = torch.randint(0, 4, (2, 3, 5))
    config = DistillConfig(alpha=1.0, temperature=2.0)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731 — one row per position
    by_hand = F.kl_div(F.log_softmax(flat(student) / 2, 1), F.log_softmax(flat(teacher) / 2, 1),
                       reduction="batchmean", log_target=True) * 4
    got = kd_loss({"out": student}, {"out": teacher}, targets, config, Task(TaskConfig(metric=JACCARD)))
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(SearchsvcError, match="task.distill_on: the student's output"):
        kd_loss(student, teacher[:, :, :2], targets, config, Task())


def test_every_shared_output_is_matched_with_distill_on_outputs():
    torch.manual_seed(0)
    s = {"out": torch.randn(2, 4, 3, 3), "aux": torch.randn(2, 4, 3, 3)}
    t = {"out": torch.randn(2, 4, 3, 3), "aux": torch.randn(2, 4, 3, 3)}
    targets = torch.randint(0, 4, (2, 3, 3))
    config = DistillConfig(alpha=1.0, loss="logits")
    both = kd_loss(s, t, targets, config, Task(TaskConfig(distill_on="outputs")))
    assert both.item() == pytest.approx(((F.mse_loss(s["out"], t["out"]) + F.mse_loss(s["aux"], t["aux"])) / 2).item())


def test_a_users_loss_gets_the_raw_outputs():
    task = Task(TaskConfig(loss="tests.test_task:aux_weighted"))
    outputs = {"out": torch.zeros(2, 3), "aux": torch.ones(2, 3)}
    assert task.loss(outputs, torch.tensor([0, 1])).item() == pytest.approx(
        F.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1])).item() + 0.5)


def aux_weighted(outputs: dict, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs["out"], targets) + 0.5 * outputs["aux"].mean()


def test_dense_targets_are_decoded_into_one_tensor_and_mixed_targets_are_one_line():
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    masks = torch.randint(0, 3, (6, 8, 8))
    loaded = decode({"train": TensorDataset(images, masks), "test": TensorDataset(images[:2], masks[:2])}, "f")
    assert loaded.train[1].shape == (6, 8, 8) and loaded.train[1].dtype == torch.uint8  # a byte a pixel
    assert torch.equal(loaded.train[1].long(), masks) and loaded.classes == int(masks.max()) + 1
    wide = masks.clone()
    wide[3, 0, 0] = 300  # a class past 255: the split is held as int64 from then on, earlier rows kept
    loaded = decode({"train": TensorDataset(images, wide), "test": TensorDataset(images[:2], masks[:2])}, "f")
    assert loaded.train[1].dtype == torch.int64 and torch.equal(loaded.train[1], wide)

    class Mixed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int):
            return images[i], (masks[i] if i == 0 else 1)

    with pytest.raises(SearchsvcError, match="example 1: the target is a class, the split's first"):
        decode({"train": Mixed(), "test": Mixed()}, "f")
    bad = TensorDataset(images[:2], torch.full((2, 8, 8), -1))
    with pytest.raises(SearchsvcError, match="holds negative values"):
        decode({"train": bad, "test": bad}, "f")


class PerPixel(nn.Module):
    """A 1x1 convolution to 3 classes per pixel, returned as torchvision's segmentation networks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def test_evaluation_reports_the_tasks_metric_over_every_batch():
    torch.manual_seed(0)
    model = PerPixel().eval()
    images = torch.randint(0, 255, (10, 3, 6, 6), dtype=torch.uint8)
    masks = torch.randint(0, 3, (10, 6, 6))
    task = Task(TaskConfig(metric=JACCARD, metric_kwargs={"num_classes": 3}))
    mean, std = (0.5,) * 3, (0.25,) * 3
    got = evaluate_split(model, (images, masks), mean, std, batch_size=3, task=task)  # 4 batches, the last of 1
    x = (images.float() / 255 - 0.5) / 0.25
    expected = MulticlassJaccardIndex(num_classes=3)(model(x)["out"], masks).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert 0 <= got <= 1


def test_an_error_rate_is_scored_as_one_minus_it_and_a_metric_off_the_scale_is_one_line():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).eval()
    x, labels = torch.randn(40, 4), torch.randint(0, 3, (40,))
    error = Task(TaskConfig(metric="torchmetrics.classification.MulticlassHammingDistance",
                            metric_kwargs={"num_classes": 3, "average": "micro"}, higher_is_better=False))
    assert error.config.metric_name == "1-MulticlassHammingDistance"
    top1 = evaluate_split(model, (x, labels), (0.0,), (1.0,))
    assert evaluate_split(model, (x, labels), (0.0,), (1.0,), task=error) == pytest.approx(top1)  # 1 - error rate
    percent = Task(TaskConfig(metric="tests.test_task:percent_accuracy"))
    with pytest.raises(SearchsvcError, match=r"task.metric: tests.test_task:percent_accuracy gave \d+.*a score is a "
                                             r"fraction in \[0, 1\]"):
        evaluate_split(model, (x, labels), (0.0,), (1.0,), task=percent)


def percent_accuracy():
    from torchmetrics.classification import MulticlassAccuracy

    class Percent(MulticlassAccuracy):
        def compute(self) -> torch.Tensor:
            return 100 * super().compute()

    return Percent(num_classes=3, average="micro")


def test_teacher_outputs_are_cached_only_where_they_fit(monkeypatch):
    """A mask of logits per pixel for every training example may not fit memory: then the teacher runs live."""
    from workers.data.datasets import DatasetConfig, load_dataset
    from workers.training import distill

    splits = load_dataset(DatasetConfig(name="python", factory="examples.segmentation:shapes", in_memory=True,
                                        kwargs={"train": 64, "val": 16, "test": 16, "size": 8}))
    teacher = PerPixel()
    needed = len(splits.train[0]) * 3 * 8 * 8 * 4  # float32 logits of 3 classes per pixel
    monkeypatch.setattr(distill, "available_memory", lambda: int(needed / distill.CACHE_SHARE))
    assert distill.cache_fits(teacher, splits, None)
    monkeypatch.setattr(distill, "available_memory", lambda: int(needed / distill.CACHE_SHARE) - 1)
    assert not distill.cache_fits(teacher, splits, None)


def test_an_iterable_splits_dense_targets_are_stacked_as_a_map_style_ones_are():
    images = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    masks = torch.randint(0, 3, (5, 4, 4))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(images, masks))

    loaded = decode({"train": Stream(), "test": TensorDataset(images, masks)}, "f")
    assert loaded.train[1].dtype == loaded.test[1].dtype == torch.uint8
    assert torch.equal(loaded.train[1].long(), masks) and torch.equal(loaded.test[1].long(), masks)
