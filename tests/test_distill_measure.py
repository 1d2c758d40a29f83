"""Distillation losses, teacher logits, the training loop with distillation, augmentation, and measurement.

Expected values are computed by hand in the tests: softmax / log-softmax written out with exp and log in
float64, MACs as cout·H_out·W_out·cin·k·k per conv plus in·out per linear layer, parameter counts from the
architecture (conv k×k = k·k·cin·cout, BN = 2·c, projection shortcut = cin·cout + 2·cout, fc = cin·classes + classes).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.measurement.measure import count_macs, count_parameters, latency_ms, measure, model_bytes
from workers.models.inputs import InputSpec
from workers.models.surgery import shrink
from workers.models.zoo import BlockArch, ResNetArch, build_model, create_model
from workers.training.distill import distill_loss_fn, kd_loss, teacher_logits
from workers.training.train import DistillConfig, Recipe, TrainConfig, augment, recalibrate_batchnorm, train_model

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- hand arithmetic --------------------------------------------------------------------------------------

def log_softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    """log softmax over dim 1 in float64, with the max subtracted for stability."""
    z = z.double()
    shifted = z - z.max(dim=1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))


def cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logp = log_softmax_by_hand(logits)
    return -sum(logp[i, int(labels[i])].item() for i in range(len(labels))) / len(labels)


def kd_by_hand(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, t: float) -> float:
    log_ps = log_softmax_by_hand(student / t)
    log_pt = log_softmax_by_hand(teacher / t)
    pt = torch.exp(log_pt)
    kl = (pt * (log_pt - log_ps)).sum(dim=1).mean().item()
    return (1 - alpha) * cross_entropy_by_hand(student, labels) + alpha * t * t * kl


def mse_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    d = a.double() - b.double()
    return (d * d).sum().item() / d.numel()


def conv_macs(cin: int, cout: int, k: int, out_size: int) -> int:
    return cout * out_size * out_size * cin * k * k


def tiny_cnn_params(in_channels: int, classes: int) -> int:
    stem = 3 * 3 * in_channels * 8 + 2 * 8
    layer1 = (3 * 3 * 8 * 8 + 2 * 8) + (3 * 3 * 8 * 8 + 2 * 8)
    layer2 = (3 * 3 * 8 * 16 + 2 * 16) + (3 * 3 * 16 * 16 + 2 * 16) + (8 * 16 + 2 * 16)
    return stem + layer1 + layer2 + 16 * classes + classes


def saved_size(model: nn.Module) -> int:
    """Bytes of model.pt as the evaluator writes it: the CPU, contiguous state_dict through torch.save."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    return len(buffer.getvalue())


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model


def small_splits(train_size: int = 512, test_size: int = 64):
    syn = SyntheticConfig(num_classes=4, channels=1, image_size=16, train_size=train_size, test_size=test_size)
    return load_dataset(DatasetConfig(name="synthetic", synthetic=syn))


# ---- fixed logits -----------------------------------------------------------------------------------------

STUDENT = torch.tensor([[2.0, -1.0, 0.5, 0.0], [-0.3, 1.7, 0.2, -2.5], [0.9, 0.1, -0.4, 3.1]])
TEACHER = torch.tensor([[3.0, 0.5, -1.0, 0.2], [0.1, 2.2, -0.7, -1.5], [-0.2, 0.4, 0.3, 2.4]])
LABELS = torch.tensor([0, 2, 3])


# ---- kd_loss --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_kl_equals_the_hand_formula(alpha, temperature):
    config = DistillConfig(alpha=alpha, temperature=temperature, loss="kl")
    got = kd_loss(STUDENT, TEACHER, LABELS, config).item()
    assert got == pytest.approx(kd_by_hand(STUDENT, TEACHER, LABELS, alpha, temperature), rel=1e-5, abs=1e-6)


def test_kd_loss_with_alpha_zero_is_plain_cross_entropy():
    got = kd_loss(STUDENT, TEACHER, LABELS, DistillConfig(alpha=0.0, temperature=4.0)).item()
    assert got == pytest.approx(cross_entropy_by_hand(STUDENT, LABELS), rel=1e-6)


def test_kd_loss_kl_term_vanishes_when_student_equals_teacher():
    got = kd_loss(TEACHER, TEACHER, LABELS, DistillConfig(alpha=1.0, temperature=4.0)).item()
    assert got == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_kl_scales_with_temperature_squared_not_more():
    # Same logits scaled by T: the softened distributions are identical, so the KL term differs by T² only.
    at_1 = kd_loss(STUDENT, TEACHER, LABELS, DistillConfig(alpha=1.0, temperature=1.0)).item()
    at_3 = kd_loss(3 * STUDENT, 3 * TEACHER, LABELS, DistillConfig(alpha=1.0, temperature=3.0)).item()
    assert at_3 == pytest.approx(9 * at_1, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_kd_loss_logits_option_is_mean_squared_error_by_hand(alpha):
    config = DistillConfig(alpha=alpha, temperature=4.0, loss="logits")
    expected = (1 - alpha) * cross_entropy_by_hand(STUDENT, LABELS) + alpha * mse_by_hand(STUDENT, TEACHER)
    assert kd_loss(STUDENT, TEACHER, LABELS, config).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_kd_loss_accepts_bfloat16_logits_and_returns_float32():
    got = kd_loss(STUDENT.bfloat16(), TEACHER.bfloat16(), LABELS, DistillConfig(alpha=0.5))
    assert got.dtype == torch.float32
    expected = kd_by_hand(STUDENT.bfloat16().float(), TEACHER.bfloat16().float(), LABELS, 0.5, 4.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ---- distill_loss_fn ----------------------------------------------------------------------------------------

def test_distill_loss_fn_looks_cached_logits_up_by_batch_index():
    # Row i of the cache is i everywhere: the batch [3, 0, 5] must be compared against rows of 3s, 0s and 5s.
    cached = torch.arange(8, dtype=torch.float32).view(8, 1).expand(8, 4).contiguous()
    loss_fn = distill_loss_fn(DistillConfig(alpha=1.0, loss="logits"), cached=cached)
    student = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -0.5, 1.0], [5.0, 6.0, 4.0, 5.0]])
    index = torch.tensor([3, 0, 5])
    got = loss_fn(student, torch.tensor([0, 1, 2]), index, torch.zeros(3, 1, 4, 4)).item()
    rows = torch.tensor([[3.0] * 4, [0.0] * 4, [5.0] * 4])
    assert got == pytest.approx(mse_by_hand(student, rows), rel=1e-6)
    assert got != pytest.approx(mse_by_hand(student, cached[:3]), rel=1e-3)  # not the first rows of the cache


class FirstPixels(nn.Module):
    """A stand-in teacher whose logits are the first four pixels of each image, with a parameter and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.drop = nn.Dropout(0.9)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.drop(self.scale * images.flatten(1)[:, :4])


def test_distill_loss_fn_with_a_teacher_runs_it_on_the_images():
    teacher = FirstPixels().train()
    loss_fn = distill_loss_fn(DistillConfig(alpha=1.0, loss="logits"), teacher=teacher)
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    student = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    got = loss_fn(student, torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9]), images).item()
    # Dropout at p=0.9 would zero most targets in training mode: equality shows eval mode is used.
    assert got == pytest.approx(mse_by_hand(student, images.flatten(1)[:, :4]), rel=1e-6)


def test_distill_loss_fn_sends_no_gradient_into_the_teacher():
    teacher = FirstPixels()
    loss_fn = distill_loss_fn(DistillConfig(alpha=0.5, loss="kl"), teacher=teacher)
    student = torch.randn(3, 4, requires_grad=True)
    loss_fn(student, torch.tensor([0, 1, 2]), torch.arange(3), torch.randn(3, 1, 4, 4)).backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    assert teacher.scale.grad is None


def test_distill_loss_fn_needs_a_cache_or_a_teacher():
    with pytest.raises(ValueError):
        distill_loss_fn(DistillConfig())


# ---- teacher_logits ------------------------------------------------------------------------------------------

def test_teacher_logits_match_the_eval_mode_teacher_on_normalised_images():
    torch.manual_seed(0)
    teacher = randomise_bn(create_model("tiny_cnn", in_channels=2, num_classes=5), seed=1).train()
    images = torch.randint(0, 256, (5, 2, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mean, std = (0.4, 0.6), (0.2, 0.3)
    reference = copy.deepcopy(teacher).eval()
    x = images.double() / 255.0
    x = (x - torch.tensor(mean, dtype=torch.float64).view(1, 2, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(1, 2, 1, 1)
    with torch.no_grad():
        expected = reference(x.float())
    got = teacher_logits(teacher, images, mean, std, batch_size=2)  # three chunks: 2, 2, 1
    assert got.shape == (5, 5) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not teacher.training


# ---- counting ---------------------------------------------------------------------------------------------------

def test_count_macs_of_tiny_cnn_at_16x16_grey_is_the_hand_count():
    model = create_model("tiny_cnn", in_channels=1, num_classes=10)
    expected = (
        conv_macs(1, 8, 3, 16)  # stem
        + conv_macs(8, 8, 3, 16) + conv_macs(8, 8, 3, 16)  # layer1.0
        + conv_macs(8, 16, 3, 8) + conv_macs(16, 16, 3, 8) + conv_macs(8, 16, 1, 8)  # layer2.0 (stride 2) + projection
        + 16 * 10  # fc
    )
    assert expected == 542_880
    assert count_macs(model, InputSpec.image(1, 16)) == expected


def test_count_macs_of_a_hand_built_one_block_net():
    arch = ResNetArch("probe", in_channels=2, num_classes=5, stem=4, stages=((BlockArch(mid=6, out=4, stride=1),),))
    expected = conv_macs(2, 4, 3, 8) + conv_macs(4, 6, 3, 8) + conv_macs(6, 4, 3, 8) + 4 * 5
    assert count_macs(build_model(arch), InputSpec.image(2, 8)) == expected


def test_count_macs_of_a_removed_block_counts_only_its_projection():
    arch = ResNetArch("probe", in_channels=1, num_classes=3, stem=4,
                      stages=((BlockArch(mid=4, out=4, stride=1, removed=True),),
                              (BlockArch(mid=8, out=8, stride=2, removed=True),)))
    expected = conv_macs(1, 4, 3, 8) + conv_macs(4, 8, 1, 4) + 8 * 3
    assert count_macs(build_model(arch), InputSpec.image(1, 8)) == expected


def test_count_macs_leaves_the_training_mode_as_it_was():
    model = create_model("tiny_cnn", in_channels=1, num_classes=10).train()
    count_macs(model, InputSpec.image(1, 16))
    assert model.training


@pytest.mark.parametrize("in_channels, classes", [(1, 10), (3, 100)])
def test_count_parameters_is_the_hand_formula(in_channels, classes):
    model = create_model("tiny_cnn", in_channels=in_channels, num_classes=classes)
    assert count_parameters(model) == tiny_cnn_params(in_channels, classes)


def test_model_bytes_is_the_size_of_the_saved_state_dict():
    model = create_model("tiny_cnn", in_channels=1, num_classes=10)
    assert model_bytes(model) == saved_size(model)


def test_model_bytes_of_a_channels_last_model_is_the_size_of_the_saved_state_dict():
    model = create_model("resnet20", in_channels=1, num_classes=10).to(memory_format=torch.channels_last)
    assert model_bytes(model) == saved_size(model)


def test_model_bytes_of_a_shrunk_model_is_smaller_than_the_teachers():
    teacher = create_model("resnet20", in_channels=1, num_classes=10).eval()
    student = shrink(teacher, removed=["layer3.2"], widths={"layer2": 20})
    assert count_parameters(student) < count_parameters(teacher)
    assert model_bytes(student) < model_bytes(teacher)
    # fp32 weights dominate: the difference is at least 4 bytes per dropped parameter, less some slack
    dropped = count_parameters(teacher) - count_parameters(student)
    assert model_bytes(teacher) - model_bytes(student) >= 4 * dropped - 4096


# ---- latency and measure ------------------------------------------------------------------------------------

def test_latency_ms_is_a_positive_finite_median():
    model = create_model("tiny_cnn", in_channels=1, num_classes=10)
    value = latency_ms(model, CPU, InputSpec.image(1, 16), batch=2, repeats=3, warmup=1)
    assert isinstance(value, float)
    assert math.isfinite(value) and value > 0


def test_measure_returns_every_metric_with_sane_values():
    splits = small_splits()
    model = create_model("tiny_cnn", in_channels=splits.inputs.channels, num_classes=splits.num_classes)
    result = measure(model, splits, CPU, latency_repeats=2, large_batch=8)
    assert set(result) == {"accuracy", "val_accuracy", "params", "macs", "latency_ms", "latency_b256_ms",
                           "model_bytes"}
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 0.0 <= result["val_accuracy"] <= 1.0
    assert result["params"] == tiny_cnn_params(1, 4)
    assert result["macs"] == count_macs(model, InputSpec.image(1, 16)) > 0
    assert math.isfinite(result["latency_ms"]) and result["latency_ms"] > 0
    assert math.isfinite(result["latency_b256_ms"]) and result["latency_b256_ms"] > 0
    assert result["model_bytes"] == saved_size(model)


# ---- training with distillation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("live_teacher", [False, True], ids=["cached_logits", "live_teacher_with_augmentation"])
def test_train_model_with_distillation_lowers_the_loss(live_teacher):
    splits = small_splits()
    torch.manual_seed(0)
    teacher = create_model("tiny_cnn", in_channels=1, num_classes=4)
    student = create_model("tiny_cnn", in_channels=1, num_classes=4)
    config = DistillConfig(alpha=0.5, temperature=4.0)
    if live_teacher:
        loss_fn = distill_loss_fn(config, teacher=teacher)
    else:
        cached = teacher_logits(teacher, splits.train[0], splits.mean, splits.std)
        assert cached.shape == (len(splits.train[1]), 4)
        loss_fn = distill_loss_fn(config, cached=cached)
    history = train_model(student, splits, Recipe(epochs=4, batch_size=64, augment=live_teacher), CPU, seed=0,
                          progress=False, loss_fn=loss_fn)
    losses = [epoch["loss"] for epoch in history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[0] > losses[-1]


# ---- augmentation -------------------------------------------------------------------------------------------------

def distinct_images(n: int = 16, c: int = 3, size: int = 8) -> torch.Tensor:
    """uint8 images whose pixels are all different within an image and never zero (1..c·size²)."""
    base = torch.arange(1, c * size * size + 1, dtype=torch.uint8).view(c, size, size)
    perms = [torch.randperm(c * size * size, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    return torch.stack([base.flatten()[p].view(c, size, size) for p in perms])


def test_augment_keeps_shape_and_dtype():
    images = distinct_images()
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    floats = images.float() / 255
    out_f = augment(floats, torch.Generator().manual_seed(0))
    assert out_f.shape == floats.shape and out_f.dtype == torch.float32


def test_augment_only_moves_pixels_of_the_zero_padded_original():
    images = distinct_images()
    out = augment(images, torch.Generator().manual_seed(3))
    for original, augmented in zip(images, out):
        allowed = set(original.flatten().tolist()) | {0}
        assert set(augmented.flatten().tolist()) <= allowed


def test_augment_is_a_crop_of_the_padded_image_possibly_flipped():
    images = distinct_images()
    size, pad = 8, 1  # pad = size // 8
    out = augment(images, torch.Generator().manual_seed(4))
    flips = 0
    for original, augmented in zip(images, out):
        padded = F.pad(original, (pad, pad, pad, pad))
        crops = {(dy, dx, flip): padded[:, dy:dy + size, dx:dx + size].flip(-1) if flip
                 else padded[:, dy:dy + size, dx:dx + size]
                 for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)}
        matches = [key for key, crop in crops.items() if torch.equal(crop, augmented)]
        assert len(matches) == 1
        flips += matches[0][2]
    assert 0 < flips < len(images)  # both flipped and unflipped images occur in 16 draws


def test_augment_with_the_same_generator_seed_is_reproducible():
    images = distinct_images()
    a = augment(images, torch.Generator().manual_seed(5))
    b = augment(images, torch.Generator().manual_seed(5))
    c = augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_max_images_limits_each_epoch_to_a_fresh_random_subset():
    splits = small_splits()
    seen: list[torch.Tensor] = []

    def recording_loss(logits, labels, index, images):
        seen.append(index.clone())
        return torch.nn.functional.cross_entropy(logits, labels)

    model = create_model("tiny_cnn", in_channels=1, num_classes=4)
    history = train_model(model, splits, Recipe(epochs=2, batch_size=16, max_images=64, augment=False), CPU,
                          progress=False, loss_fn=recording_loss)
    assert len(history) == 2 and len(seen) == 2 * (64 // 16)
    first, second = torch.cat(seen[:4]), torch.cat(seen[4:])
    assert len(first.unique()) == 64 and len(second.unique()) == 64  # no image twice within an epoch
    assert not torch.equal(first.sort().values, second.sort().values)  # a different subset next epoch


@pytest.mark.parametrize("batch_size", [7, 115])
def test_odd_batches_train_on_the_cpu(batch_size):
    """torch 2.14.1's oneDNN crashes (SIGSEGV) on odd channels_last batches through a strided 1x1 conv."""
    splits = small_splits()
    model = create_model("tiny_cnn", in_channels=1, num_classes=4)
    history = train_model(model, splits, Recipe(epochs=1, batch_size=batch_size, augment=False), CPU, progress=False)
    assert math.isfinite(history[0]["loss"])


@pytest.mark.parametrize("train_size", [40, 90])
def test_runs_with_only_a_few_steps_train(train_size):
    """One to four steps in all: the one-cycle schedule would have empty phases."""
    splits = small_splits(train_size=train_size)
    model = create_model("tiny_cnn", in_channels=1, num_classes=4)
    history = train_model(model, splits, Recipe(epochs=1, batch_size=20, augment=False), CPU, progress=False)
    assert math.isfinite(history[0]["loss"])


# ---- batch-norm recalibration -----------------------------------------------------------------------------

def test_recalibration_replaces_lagging_statistics_with_the_training_batches_own():
    """After recalibration every BN layer's running mean / variance are the mean of the per-batch statistics
    over the calibration batches (a cumulative average), the weights are untouched, and eval-mode accuracy
    recovers from statistics that describe another network."""
    splits = load_dataset(DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=512, test_size=256)))
    torch.manual_seed(0)
    model = create_model("tiny_cnn", splits.inputs.channels, splits.num_classes)
    train_model(model, splits, TrainConfig(epochs=4, batch_size=64, augment=False, bn_recalibration_batches=0), CPU,
                progress=False)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    trained = evaluate_model(model, splits)
    for m in model.modules():  # statistics of some other network: what a pruning step or 7 steps leave
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.add_(3.0)
            m.running_var.mul_(9.0)
    lagging = evaluate_model(model, splits)
    stem = model.get_submodule("stem")[1]  # the first BN: its input does not depend on other BN statistics
    inputs = []
    hook = stem.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach().clone()))
    used = recalibrate_batchnorm(model, splits, batches=4, batch_size=64, seed=3)
    hook.remove()
    assert used == 4 and len(inputs) == 4
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    assert torch.allclose(stem.running_mean, expected_mean, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    recalibrated = evaluate_model(model, splits)
    assert lagging < trained - 0.2 and recalibrated > lagging + 0.2, (trained, lagging, recalibrated)
    assert recalibrate_batchnorm(model, splits, batches=0, batch_size=64) == 0


def evaluate_model(model: nn.Module, splits) -> float:
    from workers.training.train import evaluate

    return evaluate(model, *splits.test, splits.mean, splits.std)


def test_count_macs_counts_each_architecture_once_and_other_models_every_time(monkeypatch):
    import workers.measurement.measure as measure_module

    calls = []
    real = measure_module._count_macs
    monkeypatch.setattr(measure_module, "_MACS", {})  # other tests filled the process's cache
    monkeypatch.setattr(measure_module, "_count_macs", lambda *args: calls.append(args[1:]) or real(*args))
    first, second = create_model("tiny_cnn", 1, 10), create_model("tiny_cnn", 1, 10)
    assert count_macs(first, InputSpec.image(1, 16)) == count_macs(second, InputSpec.image(1, 16)) == 542_880
    assert count_macs(second, InputSpec.image(1, 8)) < 542_880  # another input size is another count
    other = ResNetArch("probe", in_channels=2, num_classes=5, stem=4, stages=((BlockArch(mid=6, out=4, stride=1),),))
    expected = conv_macs(2, 4, 3, 8) + conv_macs(4, 6, 3, 8) + conv_macs(6, 4, 3, 8) + 4 * 5
    assert count_macs(build_model(other), InputSpec.image(2, 8)) == count_macs(build_model(other), InputSpec.image(2, 8)) == expected
    assert calls == [(InputSpec.image(1, 16),), (InputSpec.image(1, 8),), (InputSpec.image(2, 8),)]
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 3))  # no `arch`: never remembered
    assert count_macs(plain, InputSpec.image(1, 16)) == count_macs(plain, InputSpec.image(1, 16)) == 2 * 14 * 14 * 9 + 2 * 14 * 14 * 3
    assert calls[3:] == [(InputSpec.image(1, 16),)] * 2


def test_a_trained_candidate_is_measured_with_its_last_epochs_accuracies_not_a_second_pass(tmp_path, monkeypatch):
    import workers.measurement.measure as measure_module
    from storage import LocalStore
    from workers.evaluation.evaluate import EvalContext, evaluate_candidate, load_candidate_model
    from workers.evaluation.spec import CandidateSpec
    from workers.training.teacher import TeacherConfig, load_or_train_teacher
    from workers.training.train import evaluate, evaluate_split

    data = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=256, test_size=64))
    splits = load_dataset(data)
    store = LocalStore(tmp_path / "store")
    teacher = load_or_train_teacher(store, TeacherConfig(arch="tiny_cnn", epochs=1, batch_size=64), data, splits, CPU,
                                    progress=False)
    passes = []
    monkeypatch.setattr(measure_module, "evaluate_split",
                        lambda *args, **kw: passes.append(1) or evaluate_split(*args, **kw))
    spec = CandidateSpec(arch="tiny_cnn", teacher=teacher.teacher_hash, dataset=data,
                         train=TrainConfig(epochs=2, batch_size=64, augment=False), widths=(("layer1.0", 4),))
    metrics = evaluate_candidate(spec, EvalContext(store, teacher, splits, CPU))
    assert metrics.status == "ok" and passes == []
    stored = load_candidate_model(store, spec.spec_hash)  # the figures are the kept model's own
    assert metrics.accuracy == metrics.history[-1]["test_accuracy"] == evaluate(stored, *splits.test, splits.mean,
                                                                                    splits.std)
    assert metrics.val_accuracy == evaluate(stored, *splits.val, splits.mean, splits.std)


PROBE = """
import sys, torch
conv = torch.nn.Conv2d(int(sys.argv[2]), 16, 1, stride=2).to(memory_format=torch.channels_last)
side = int(sys.argv[3])
x = torch.randn(int(sys.argv[1]), int(sys.argv[2]), side, side).contiguous(memory_format=torch.channels_last)
for _ in range(20):
    conv(x.requires_grad_(True)).sum().backward()
"""


def test_the_onednn_workaround_is_still_needed():
    """`training_memory_format` trains some CPU networks in NCHW because oneDNN crashes in the backward pass
    of a strided 1x1 conv on odd channels_last batches with few input channels. When this test fails, the
    installed torch no longer crashes: remove the workaround (and this test)."""
    import subprocess
    import sys

    from tests.conftest import unpinned_env

    # oneDNN crashes with its default thread count, not on the one thread the test processes are pinned to
    probe = lambda *args: subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,  # noqa: E731
                                         timeout=120, env=unpinned_env()).returncode != 0
    crashed = [probe(batch, channels, 16) for batch, channels in ((7, 8), (7, 12), (115, 4))]
    assert any(crashed), "oneDNN no longer crashes here: training_memory_format's NCHW fallback can go"
    # an even batch and 8 channels crash too, on large images (64 px; the driver of a 160 px run died of it)
    assert probe(16, 8, 64), "oneDNN no longer crashes on large images: drop ONEDNN_LARGE_SIDE's rule"


@pytest.mark.parametrize("batch, channels, side, expected", [
    (8, 16, 16, torch.channels_last), (7, 16, 16, torch.contiguous_format), (8, 12, 16, torch.contiguous_format),
    (8, 8, 48, torch.channels_last), (8, 8, 64, torch.contiguous_format), (8, 16, 224, torch.channels_last)])
def test_training_memory_format_falls_back_to_nchw_only_where_onednn_crashes(batch, channels, side, expected):
    from workers.training.train import training_memory_format

    model = nn.Sequential(nn.Conv2d(3, channels, 3), nn.Conv2d(channels, 16, 1, stride=2))
    assert training_memory_format(model, CPU, batch, side) == expected
    assert training_memory_format(nn.Sequential(nn.Conv2d(3, channels, 3)), CPU, batch) == torch.channels_last
