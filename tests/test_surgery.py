"""Surgery: a smaller ResNet cut from a teacher — blocks removed, widths shrunk, weights inherited.

Expected parameter counts come from hand formulas written from the architecture:
conv k×k = k·k·cin·cout (no bias), BatchNorm = 2·c, projection shortcut (stride ≠ 1 or cin ≠ cout) =
cin·cout + 2·cout, classifier = cin·classes + classes; a removed block keeps only its shortcut.
Teachers get random BatchNorm statistics and affine parameters so that "the same outputs" is not trivial.
"""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
from torch import nn

from workers.models.surgery import InvalidTransform, derive_arch, predicted_params, shrink, width_keys
from workers.models.zoo import create_model, is_residual, list_models

IN_CHANNELS, IMAGE, BATCH, CLASSES = 3, 32, 2, 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name → (stem width, stage widths, blocks per stage); every stage after the first starts with stride 2.
ZOO = {
    "tiny_cnn": (8, (8, 16), 1),
    "resnet20": (16, (16, 32, 64), 3),
    "resnet56": (16, (16, 32, 64), 9),
    "resnet18_cifar": (64, (64, 128, 256, 512), 2),
}


# ---- helpers ----------------------------------------------------------------------------------------------

def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random BN running statistics and affine parameters, random classifier bias (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                module.num_batches_tracked.fill_(7)
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=gen))
    return model


def make_teacher(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(create_model(name, in_channels=IN_CHANNELS, num_classes=CLASSES), seed + 1).eval()


@functools.lru_cache(maxsize=None)
def shared_teacher(name: str) -> nn.Module:
    """One teacher per zoo model for the tests that only read it."""
    return make_teacher(name)


def batch(seed: int = 123) -> torch.Tensor:
    return torch.randn(BATCH, IN_CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_names(name: str) -> list[str]:
    _, widths, depth = ZOO[name]
    return [f"layer{s + 1}.{b}" for s in range(len(widths)) for b in range(depth)]


def teacher_width_keys(name: str) -> dict[str, int]:
    """Stream keys (one per stage; the stem rides on layer1's stream) and block inner widths."""
    _, widths, depth = ZOO[name]
    keys = {f"layer{s + 1}": w for s, w in enumerate(widths)}
    keys.update({f"layer{s + 1}.{b}": w for s, w in enumerate(widths) for b in range(depth)})
    return keys


def hand_params(name: str, removed=(), widths=None, in_channels: int = IN_CHANNELS, classes: int = CLASSES) -> int:
    """Parameter count of the transformed network, from the architecture alone."""
    widths = widths or {}
    _, stage_widths, depth = ZOO[name]
    stem = widths.get("layer1", stage_widths[0])
    total = 3 * 3 * in_channels * stem + 2 * stem
    cin = stem
    for s, teacher_width in enumerate(stage_widths):
        out = widths.get(f"layer{s + 1}", teacher_width)
        for b in range(depth):
            block = f"layer{s + 1}.{b}"
            stride = 2 if s > 0 and b == 0 else 1
            mid = widths.get(block, teacher_width)
            if stride != 1 or cin != out:
                total += 1 * 1 * cin * out + 2 * out
            if block not in removed:
                total += 3 * 3 * cin * mid + 2 * mid
                total += 3 * 3 * mid * out + 2 * out
            cin = out
    return total + cin * classes + classes


def random_widths(name: str, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    return {key: rng.randint(1, width) for key, width in teacher_width_keys(name).items()}


def set_filter_scales(conv: nn.Conv2d, scales: list[float], seed: int) -> None:
    """Every weight of filter i is ±scales[i]: filter i's L1 norm is scales[i]·(cin·k·k)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, conv.weight.shape, generator=gen).float() * 2 - 1
    with torch.no_grad():
        conv.weight.copy_(signs * torch.tensor(scales).view(-1, 1, 1, 1))


def scales_with_top(size: int, top: list[int], seed: int) -> list[float]:
    """Small distinct-ish scales in [0.1, 1), and 5.0 + something for the channels in `top`."""
    rng = random.Random(seed)
    return [5.0 + rng.random() if i in top else 0.1 + 0.9 * rng.random() for i in range(size)]


def assert_bn_is(student_bn: nn.BatchNorm2d, teacher_bn: nn.BatchNorm2d, index: list[int]) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(student_bn, attr), getattr(teacher_bn, attr)[index]), attr


def manual_forward(teacher: nn.Module, x: torch.Tensor, removed: set[str]) -> torch.Tensor:
    """The teacher's forward written out by hand, with the `removed` blocks replaced by their shortcut."""
    relu = torch.relu
    x = relu(teacher.stem[1](teacher.stem[0](x)))
    for name in teacher.arch.block_names():
        block = teacher.get_submodule(name)
        shortcut = x if isinstance(block.shortcut, nn.Identity) else block.shortcut[1](block.shortcut[0](x))
        if name in removed:
            x = shortcut
            continue
        y = relu(block.conv1[1](block.conv1[0](x)))
        y = block.conv2[1](block.conv2[0](y))
        x = relu(y + shortcut)
    return teacher.fc(x.mean(dim=(2, 3)))


# ---- width keys -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ZOO))
def test_width_keys_are_the_stage_streams_and_every_block_with_teacher_widths(name):
    assert width_keys(shared_teacher(name).arch) == teacher_width_keys(name)


def test_every_residual_zoo_model_is_covered_by_these_tests():
    # plain CNNs (simplenet_cifar) have no surgery of their own: thinning covers them (test_agp.py)
    assert {name for name in list_models() if is_residual(name)} == set(ZOO)


# ---- keep everything: the teacher, bit for bit ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ZOO))
def test_keep_all_widths_reproduce_the_teacher_bit_for_bit(name):
    teacher = shared_teacher(name)
    student = shrink(teacher)
    x = batch()
    with torch.no_grad():
        expected = teacher(x.clone())
        got = student(x.clone())
    assert not student.training
    assert n_params(student) == n_params(teacher)
    assert torch.equal(got, expected)


# ---- removals and widths: forward shape and parameter count ---------------------------------------------

REMOVALS = [(name, block) for name in ("tiny_cnn", "resnet20", "resnet56") for block in block_names(name)]


@pytest.mark.parametrize("name, block", REMOVALS, ids=[f"{n}-{b}" for n, b in REMOVALS])
def test_removing_one_block_gives_a_working_net_with_the_hand_counted_parameters(name, block):
    student = shrink(shared_teacher(name), removed=[block])
    with torch.no_grad():
        out = student(batch())
    assert out.shape == (BATCH, CLASSES)
    assert bool(torch.isfinite(out).all())
    assert n_params(student) == hand_params(name, removed={block})
    assert n_params(student) < n_params(shared_teacher(name))


WIDTH_CASES = [(name, seed) for name in ("tiny_cnn", "resnet20", "resnet56") for seed in range(4)]
WIDTH_CASES += [("resnet18_cifar", 0)]


@pytest.mark.parametrize("name, seed", WIDTH_CASES, ids=[f"{n}-seed{s}" for n, s in WIDTH_CASES])
def test_random_widths_give_a_working_net_with_the_hand_counted_parameters(name, seed):
    widths = random_widths(name, seed)
    student = shrink(shared_teacher(name), widths=widths)
    with torch.no_grad():
        out = student(batch())
    assert out.shape == (BATCH, CLASSES)
    assert bool(torch.isfinite(out).all())
    assert n_params(student) == hand_params(name, widths=widths)


COMBINED = [("tiny_cnn", 10), ("resnet20", 11), ("resnet56", 12), ("resnet18_cifar", 13)]


@pytest.mark.parametrize("name, seed", COMBINED, ids=[f"{n}-seed{s}" for n, s in COMBINED])
def test_random_removals_and_widths_together_give_the_hand_counted_parameters(name, seed):
    rng = random.Random(seed)
    removed = set(rng.sample(block_names(name), k=max(1, len(block_names(name)) // 3)))
    widths = random_widths(name, seed)
    student = shrink(shared_teacher(name), removed=sorted(removed), widths=widths)
    with torch.no_grad():
        assert student(batch()).shape == (BATCH, CLASSES)
    assert n_params(student) == hand_params(name, removed=removed, widths=widths)


@pytest.mark.parametrize("name, seed", WIDTH_CASES + COMBINED, ids=[f"{n}-seed{s}" for n, s in WIDTH_CASES + COMBINED])
def test_count_params_predicts_the_hand_count_without_building(name, seed):
    rng = random.Random(seed)
    removed = set(rng.sample(block_names(name), k=seed % 3))
    widths = random_widths(name, seed)
    arch = derive_arch(shared_teacher(name).arch, removed, widths)
    assert predicted_params(arch) == hand_params(name, removed=removed, widths=widths)


# ---- which channels are kept ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, block, keep_top", [
    ("tiny_cnn", "layer1.0", [6, 0, 3]),
    ("resnet20", "layer2.1", [30, 2, 17, 9, 11]),
])
def test_shrinking_a_block_keeps_the_conv1_filters_with_the_largest_l1_norm_in_index_order(name, block, keep_top):
    teacher = make_teacher(name)
    t_block = teacher.get_submodule(block)
    mid = t_block.conv1[0].out_channels
    set_filter_scales(t_block.conv1[0], scales_with_top(mid, keep_top, seed=1), seed=2)
    student = shrink(teacher, widths={block: len(keep_top)})
    s_block = student.get_submodule(block)
    kept = sorted(keep_top)
    assert torch.equal(s_block.conv1[0].weight, t_block.conv1[0].weight[kept])
    assert_bn_is(s_block.conv1[1], t_block.conv1[1], kept)
    assert torch.equal(s_block.conv2[0].weight, t_block.conv2[0].weight[:, kept])
    assert_bn_is(s_block.conv2[1], t_block.conv2[1], list(range(t_block.conv2[0].out_channels)))


def test_shrinking_a_stream_keeps_the_same_channels_in_conv2_projection_bn_and_fc():
    teacher = make_teacher("tiny_cnn")
    block = teacher.layer2[0]
    top = [14, 1, 9, 4, 15]
    set_filter_scales(block.conv2[0], scales_with_top(16, top, seed=3), seed=4)
    set_filter_scales(block.shortcut[0], scales_with_top(16, top, seed=5), seed=6)
    student = shrink(teacher, widths={"layer2": len(top)})
    kept = sorted(top)
    s_block = student.layer2[0]
    assert torch.equal(s_block.conv2[0].weight, block.conv2[0].weight[kept])
    assert_bn_is(s_block.conv2[1], block.conv2[1], kept)
    assert torch.equal(s_block.shortcut[0].weight, block.shortcut[0].weight[kept])
    assert_bn_is(s_block.shortcut[1], block.shortcut[1], kept)
    assert torch.equal(s_block.conv1[0].weight, block.conv1[0].weight)  # inner width untouched
    assert torch.equal(student.fc.weight, teacher.fc.weight[:, kept])
    assert torch.equal(student.fc.bias, teacher.fc.bias)


def test_shrinking_the_first_stream_slices_the_stem_every_reader_and_every_writer_alike():
    teacher = make_teacher("tiny_cnn")
    top = [7, 2, 5]
    set_filter_scales(teacher.stem[0], scales_with_top(8, top, seed=7), seed=8)
    set_filter_scales(teacher.layer1[0].conv2[0], scales_with_top(8, top, seed=9), seed=10)
    student = shrink(teacher, widths={"layer1": len(top)})
    kept = sorted(top)
    assert torch.equal(student.stem[0].weight, teacher.stem[0].weight[kept])
    assert_bn_is(student.stem[1], teacher.stem[1], kept)
    assert torch.equal(student.layer1[0].conv1[0].weight, teacher.layer1[0].conv1[0].weight[:, kept])
    assert torch.equal(student.layer1[0].conv2[0].weight, teacher.layer1[0].conv2[0].weight[kept])
    assert_bn_is(student.layer1[0].conv2[1], teacher.layer1[0].conv2[1], kept)
    assert torch.equal(student.layer2[0].conv1[0].weight, teacher.layer2[0].conv1[0].weight[:, kept])
    assert torch.equal(student.layer2[0].shortcut[0].weight, teacher.layer2[0].shortcut[0].weight[:, kept])


def test_stream_ranking_normalises_each_member_so_a_large_scale_conv_does_not_dominate():
    # conv2 prefers channels 0-3 (3x its mean level), the projection prefers 12-15 (1.5x) but is 1000x larger
    # in scale. Per-member normalisation: 0-3 score 2 + 0.89, 12-15 score 0.67 + 1.33, so 0-3 win;
    # a raw sum of L1 norms would pick 12-15 instead.
    teacher = make_teacher("tiny_cnn")
    block = teacher.layer2[0]
    set_filter_scales(block.conv2[0], [3.0 if i < 4 else 1.0 for i in range(16)], seed=11)
    set_filter_scales(block.shortcut[0], [1500.0 if i >= 12 else 1000.0 for i in range(16)], seed=12)
    student = shrink(teacher, widths={"layer2": 4})
    assert torch.equal(student.layer2[0].conv2[0].weight, block.conv2[0].weight[[0, 1, 2, 3]])
    assert torch.equal(student.fc.weight, teacher.fc.weight[:, [0, 1, 2, 3]])


def test_shrink_ranks_filters_with_the_importance_function_it_is_given():
    teacher = make_teacher("tiny_cnn")
    conv1 = teacher.layer1[0].conv1[0]
    set_filter_scales(conv1, [0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.5], seed=13)
    smallest_first = lambda weight: -weight.detach().abs().flatten(1).sum(1)  # noqa: E731
    student = shrink(teacher, widths={"layer1.0": 3}, importance=smallest_first)
    assert torch.equal(student.layer1[0].conv1[0].weight, conv1.weight[[1, 3, 5]])


def test_a_stream_over_several_blocks_keeps_one_channel_set_through_every_block_and_the_fc():
    teacher = make_teacher("resnet20")
    top = [60, 3, 33, 41, 8, 19]
    producers = [teacher.layer3[0].shortcut[0]] + [teacher.layer3[b].conv2[0] for b in range(3)]
    for i, conv in enumerate(producers):
        set_filter_scales(conv, scales_with_top(64, top, seed=20 + i), seed=30 + i)
    student = shrink(teacher, widths={"layer3": len(top)})
    kept = sorted(top)
    assert torch.equal(student.layer3[0].shortcut[0].weight, teacher.layer3[0].shortcut[0].weight[kept])
    for b in range(3):
        s, t = student.layer3[b], teacher.layer3[b]
        assert torch.equal(s.conv2[0].weight, t.conv2[0].weight[kept])
        assert_bn_is(s.conv2[1], t.conv2[1], kept)
        if b > 0:
            assert torch.equal(s.conv1[0].weight, t.conv1[0].weight[:, kept])
    assert torch.equal(student.fc.weight, teacher.fc.weight[:, kept])


# ---- removed blocks ---------------------------------------------------------------------------------------

def test_removed_block_with_identity_shortcut_is_exactly_identity():
    student = shrink(shared_teacher("resnet20"), removed=["layer1.1"])
    block = student.layer1[1]
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))  # negatives too: no ReLU
    with torch.no_grad():
        y = block(x.clone())
    assert torch.equal(y, x)
    assert n_params(block) == 0


def test_removed_strided_block_keeps_the_teachers_projection_exactly():
    teacher = shared_teacher("resnet20")
    student = shrink(teacher, removed=["layer2.0"])
    s_short, t_short = student.layer2[0].shortcut, teacher.layer2[0].shortcut
    assert torch.equal(s_short[0].weight, t_short[0].weight)
    assert_bn_is(s_short[1], t_short[1], list(range(32)))
    assert n_params(student.layer2[0]) == 16 * 32 + 2 * 32  # the 1x1 projection and its BN only
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(student.layer2[0](x.clone()), t_short(x.clone()))


@pytest.mark.parametrize("removed", [["layer1.0"], ["layer2.0"], ["layer1.0", "layer2.0"]])
def test_removal_alone_matches_the_teacher_with_those_blocks_replaced_by_their_shortcut(removed):
    teacher = shared_teacher("tiny_cnn")
    student = shrink(teacher, removed=removed)
    x = batch(7)
    with torch.no_grad():
        expected = manual_forward(teacher, x.clone(), set(removed))
        got = student(x.clone())
        intact = teacher(x.clone())
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, intact, rtol=1e-3, atol=1e-3)  # the removal really changed something


def test_manual_forward_without_removals_is_the_teacher():  # guards the reference used above
    teacher = shared_teacher("tiny_cnn")
    x = batch(8)
    with torch.no_grad():
        assert torch.allclose(manual_forward(teacher, x.clone(), set()), teacher(x.clone()), rtol=1e-5, atol=1e-5)


# ---- rounding -----------------------------------------------------------------------------------------------

def test_round_to_rounds_widths_up_to_the_multiple_or_its_half_in_narrower_groups():
    widths = {"layer1.0": 5, "layer1": 13, "layer2.1": 17, "layer3": 33}
    student = shrink(shared_teacher("resnet20"), widths=widths, round_to=8)
    rounded = {"layer1.0": 8, "layer1": 16, "layer2.1": 24, "layer3": 40}  # layer1 is 16 wide: multiples of 4
    assert student.layer1[0].conv1[0].out_channels == 8
    assert student.stem[0].out_channels == 16
    assert student.layer2[1].conv1[0].out_channels == 24
    assert [student.layer3[b].conv2[0].out_channels for b in range(3)] == [40, 40, 40]
    assert student.fc.in_features == 40
    assert n_params(student) == hand_params("resnet20", widths=rounded)


@pytest.mark.parametrize("name, widths, round_to, expected", [
    ("tiny_cnn", {"layer1": 7, "layer1.0": 3, "layer2": 15}, 4, {"layer1": 8, "layer1.0": 4, "layer2": 16}),
    ("tiny_cnn", {"layer1": 7, "layer1.0": 3, "layer2": 15}, 16, {"layer1": 7, "layer1.0": 3, "layer2": 15}),
    ("resnet20", {"layer2.0": 30, "layer3.2": 1, "layer3": 50}, 24, {"layer2.0": 32, "layer3.2": 24, "layer3": 64}),
])
def test_round_to_never_exceeds_the_teachers_width(name, widths, round_to, expected):
    arch = derive_arch(shared_teacher(name).arch, widths=widths, round_to=round_to)
    got = width_keys(arch)
    assert {key: got[key] for key in expected} == expected
    limits = teacher_width_keys(name)
    assert all(got[key] <= limits[key] for key in got)


# ---- invalid transforms -------------------------------------------------------------------------------------

@pytest.mark.parametrize("removed, widths", [
    (["layer9.0"], {}),
    (["layer1.3"], {}),  # resnet20 has three blocks per stage: 0, 1, 2
    ([], {"layer7": 4}),
    ([], {"layer1.9": 4}),
    ([], {"layer1.0": 0}),
    ([], {"layer1.0": -3}),
    ([], {"layer1.0": 17}),
    ([], {"layer3": 65}),
    ([], {"layer1.0": 8.0}),
    ([], {"layer2": "16"}),
], ids=["unknown-stage", "unknown-block", "unknown-stream-key", "unknown-block-key", "zero", "negative",
        "above-teacher", "stream-above-teacher", "float", "string"])
def test_bad_transforms_raise_invalid_transform(removed, widths):
    with pytest.raises(InvalidTransform):
        shrink(shared_teacher("resnet20"), removed=removed, widths=widths)


def test_boolean_width_is_refused_as_a_non_integer():
    with pytest.raises(InvalidTransform):
        derive_arch(shared_teacher("tiny_cnn").arch, widths={"layer1.0": True})


def test_invalid_transform_is_a_value_error():
    assert issubclass(InvalidTransform, ValueError)


# ---- the teacher is left alone; memory format does not matter ------------------------------------------------

def test_shrink_does_not_modify_the_teacher():
    teacher = make_teacher("resnet20").train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    shrink(teacher, removed=["layer2.1"], widths=random_widths("resnet20", 5))
    after = teacher.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert teacher.training


def test_keep_all_student_of_a_channels_last_teacher_matches_its_outputs():
    teacher = make_teacher("resnet20")
    x = batch(9)
    with torch.no_grad():
        expected = teacher(x.clone())
    teacher = teacher.to(memory_format=torch.channels_last)
    student = shrink(teacher)
    with torch.no_grad():
        got = student(x.clone())
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_channels_last_teacher_gives_the_same_shrunk_weights_as_a_contiguous_one():
    teacher = make_teacher("resnet20")
    widths = random_widths("resnet20", 6)
    from_contiguous = shrink(teacher, removed=["layer3.1"], widths=widths).state_dict()
    channels_last = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    assert channels_last.layer2[1].conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    from_channels_last = shrink(channels_last, removed=["layer3.1"], widths=widths).state_dict()
    assert from_channels_last.keys() == from_contiguous.keys()
    assert all(torch.equal(from_channels_last[k], from_contiguous[k]) for k in from_contiguous)
