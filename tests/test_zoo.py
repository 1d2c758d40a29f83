"""The model zoo (architectures as data, the ResNet builder, layer descriptors) and candidate specs.

Parameter counts are checked against hand formulas for CIFAR ResNets with basic blocks:
conv3x3 = 9·cin·cout, BatchNorm = 2·c, projection shortcut (stride ≠ 1 or cin ≠ cout) = cin·cout + 2·cout,
classifier = c·classes + classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import replace

import pytest
import torch

from core.errors import SearchsvcError
from workers.data.datasets import DatasetConfig
from workers.evaluation.spec import CandidateSpec
from workers.models.zoo import BlockArch, LayerType, build_model, create_model, list_models, model_arch, with_blocks
from workers.training.train import TrainConfig

# ---- hand formulas ----------------------------------------------------------------------------------------


def conv3x3_bn(cin: int, cout: int) -> int:
    return 9 * cin * cout + 2 * cout


def projection(cin: int, cout: int) -> int:
    return cin * cout + 2 * cout


def basic_block(cin: int, cout: int, stride: int) -> int:
    shortcut = projection(cin, cout) if stride != 1 or cin != cout else 0
    return conv3x3_bn(cin, cout) + conv3x3_bn(cout, cout) + shortcut


def fc(features: int, classes: int) -> int:
    return features * classes + classes


def resnet_layers(in_channels: int, stem: int, widths: list[int], depth: int, classes: int) -> list[tuple]:
    """(name, params, stride) per described layer: stem, each block (first of stage 2+ strided), fc."""
    rows = [("stem", conv3x3_bn(in_channels, stem), 1)]
    cin = stem
    for s, width in enumerate(widths):
        for b in range(depth):
            stride = 2 if (s > 0 and b == 0) else 1
            rows.append((f"layer{s + 1}.{b}", basic_block(cin, width, stride), stride))
            cin = width
    rows.append(("fc", fc(cin, classes), 1))
    return rows


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


RESNET20 = dict(stem=16, widths=[16, 32, 64], depth=3)
TINY = dict(stem=8, widths=[8, 16], depth=1)


# ---- registry and forward ---------------------------------------------------------------------------------

def test_registry_lists_the_built_in_models():
    assert {"resnet18_cifar", "resnet20", "resnet56", "tiny_cnn"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["grey28", "rgb32"])
def test_every_registered_model_maps_a_batch_to_class_logits(name, shape):
    torch.manual_seed(0)
    model = create_model(name, in_channels=shape[0], num_classes=7)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert bool(torch.isfinite(out).all())


def test_model_arch_records_input_channels_and_classes():
    arch = model_arch("resnet56", in_channels=1, num_classes=100)
    assert (arch.name, arch.in_channels, arch.num_classes) == ("resnet56", 1, 100)
    assert [len(stage) for stage in arch.stages] == [9, 9, 9]
    assert arch.out_channels() == 64


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(SearchsvcError) as info:
        model_arch("resnet2O")
    assert "did you mean 'resnet20'" in str(info.value)


def test_registering_a_name_twice_is_refused():
    from workers.models.zoo import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(lambda c, k: model_arch("tiny_cnn", c, k))


# ---- parameter counts -------------------------------------------------------------------------------------

def test_resnet20_grey_10_classes_parameter_count_matches_hand_formula():
    expected = sum(p for _, p, _ in resnet_layers(1, classes=10, **RESNET20))
    assert expected == 272_186  # 176 + 14 016 + 51 648 + 205 696 + 650, worked out by hand
    assert n_params(create_model("resnet20", in_channels=1, num_classes=10)) == expected


def test_tiny_cnn_parameter_count_matches_hand_formula():
    expected = sum(p for _, p, _ in resnet_layers(1, classes=10, **TINY))
    assert expected == 5_122  # 88 + 1 184 + 3 680 + 170
    assert n_params(create_model("tiny_cnn", in_channels=1, num_classes=10)) == expected


def test_tiny_cnn_rgb_100_classes_parameter_count_matches_hand_formula():
    expected = sum(p for _, p, _ in resnet_layers(3, classes=100, **TINY))
    assert n_params(create_model("tiny_cnn", in_channels=3, num_classes=100)) == expected


@pytest.mark.parametrize("name, hidden", [("lenet_300_100", (300, 100)), ("mlp_32", (32,))])
def test_mlp_parameter_counts_match_hand_formula(name, hidden):
    widths = (28 * 28, *hidden, 10)  # an MLP sees the image as 28 x 28 pixels
    expected = sum(a * b + b for a, b in zip(widths, widths[1:]))
    assert n_params(create_model(name, in_channels=1, num_classes=10)) == expected
    assert expected == {"lenet_300_100": 266_610, "mlp_32": 25_450}[name]


@pytest.mark.parametrize("name, millions", [("resnet20", 0.27), ("resnet18_cifar", 11.2), ("resnet56", 0.85)])
def test_published_parameter_counts_within_two_percent(name, millions):
    count = n_params(create_model(name, in_channels=3, num_classes=10))
    assert count == pytest.approx(millions * 1e6, rel=0.02)


def test_resnet18_cifar_parameter_count_matches_hand_formula():
    expected = sum(p for _, p, _ in resnet_layers(3, stem=64, widths=[64, 128, 256, 512], depth=2, classes=10))
    assert n_params(create_model("resnet18_cifar", in_channels=3, num_classes=10)) == expected


# ---- layer descriptors ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet20_rows():
    return create_model("resnet20", in_channels=1, num_classes=10).describe()


def test_describe_has_stem_then_every_block_then_fc(resnet20_rows):
    names = [row.name for row in resnet20_rows]
    assert names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["fc"]
    assert [row.type for row in resnet20_rows] == [LayerType.CONV] + [LayerType.BLOCK] * 9 + [LayerType.LINEAR]


def test_describe_marks_only_blocks_removable(resnet20_rows):
    assert [row.removable for row in resnet20_rows] == [False] + [True] * 9 + [False]


def test_describe_rows_are_chained_start_to_end(resnet20_rows):
    assert resnet20_rows[0].start == 0
    for row in resnet20_rows:
        assert row.end == row.start + 1
    for before, after in zip(resnet20_rows, resnet20_rows[1:]):
        assert before.end == after.start


def test_describe_block_strides_follow_the_architecture(resnet20_rows):
    expected = [stride for _, _, stride in resnet_layers(1, classes=10, **RESNET20)]
    assert [row.stride for row in resnet20_rows] == expected
    assert [row.stride for row in resnet20_rows[1:-1]] == [1, 1, 1, 2, 1, 1, 2, 1, 1]


def test_describe_filters_are_output_channels(resnet20_rows):
    assert [row.filters for row in resnet20_rows] == [16] + [16] * 3 + [32] * 3 + [64] * 3 + [10]


def test_describe_memory_is_four_bytes_per_parameter(resnet20_rows):
    expected = [4 * params for _, params, _ in resnet_layers(1, classes=10, **RESNET20)]
    assert [row.memory for row in resnet20_rows] == expected


def test_describe_row_is_eight_numbers(resnet20_rows):
    for row in resnet20_rows:
        numbers = row.as_row()
        assert len(numbers) == 8
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
    stem = resnet20_rows[0].as_row()
    assert stem == [0, 1, int(LayerType.CONV), 16, 3, 1, 1, 4 * conv3x3_bn(1, 16)]


def test_describe_marks_removed_block_not_removable():
    arch = with_blocks(model_arch("tiny_cnn", 1, 10), lambda n, b: replace(b, removed=True) if n == "layer1.0" else b)
    rows = build_model(arch).describe()
    assert [(row.name, row.removable) for row in rows] == [
        ("stem", False), ("layer1.0", False), ("layer2.0", True), ("fc", False)]
    assert rows[1].memory == 0  # 8 → 8 at stride 1: identity shortcut, no parameters


# ---- removed blocks ---------------------------------------------------------------------------------------

def remove(*names: str):
    return lambda name, block: replace(block, removed=True) if name in names else block


def test_with_blocks_changes_only_the_named_blocks():
    base = model_arch("resnet20", 3, 10)
    arch = with_blocks(base, remove("layer1.1", "layer2.0"))
    flags = {name: block.removed for name, block in arch.blocks()}
    assert {n for n, removed in flags.items() if removed} == {"layer1.1", "layer2.0"}
    assert not any(block.removed for _, block in base.blocks())  # the original is untouched
    assert arch.block_names() == base.block_names()


def test_removed_block_with_matching_shapes_is_exact_identity():
    torch.manual_seed(0)
    model = build_model(with_blocks(model_arch("resnet20", 3, 10), remove("layer1.1")))
    block = model.get_submodule("layer1.1")
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = block(x.clone())
    assert torch.equal(y, x)  # negative values survive too: no ReLU after a removed block
    assert n_params(block) == 0


def test_removed_strided_block_becomes_a_1x1_projection():
    torch.manual_seed(0)
    model = build_model(with_blocks(model_arch("resnet20", 3, 10), remove("layer2.0")))
    block = model.get_submodule("layer2.0").eval()
    with torch.no_grad():
        y = block(torch.randn(2, 16, 8, 8))
    assert y.shape == (2, 32, 4, 4)
    assert n_params(block) == projection(16, 32)
    kernels = [m.kernel_size for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kernels == [(1, 1)]


def test_model_with_removed_blocks_still_classifies():
    arch = with_blocks(model_arch("resnet20", 1, 10), remove("layer1.0", "layer2.0", "layer3.2"))
    model = build_model(arch)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    removed = {"layer1.0": basic_block(16, 16, 1), "layer2.0": basic_block(16, 32, 2) - projection(16, 32),
               "layer3.2": basic_block(64, 64, 1)}
    full = sum(p for _, p, _ in resnet_layers(1, classes=10, **RESNET20))
    assert n_params(model) == full - sum(removed.values())


def test_removed_block_output_channels_drive_the_next_block():
    # A removed block that changes width at stride 1 projects to its own `out` channels.
    arch = with_blocks(model_arch("tiny_cnn", 1, 10),
                       lambda n, b: BlockArch(b.mid, 12, b.stride, removed=True) if n == "layer1.0" else b)
    model = build_model(arch)
    with torch.no_grad():
        y = model.get_submodule("layer1.0")(torch.randn(2, 8, 6, 6))
        assert y.shape == (2, 12, 6, 6)
        assert model(torch.randn(2, 1, 12, 12)).shape == (2, 10)


# ---- candidate specs ---------------------------------------------------------------------------------------

def make_spec(**overrides) -> CandidateSpec:
    fields = dict(arch="resnet20", teacher="0123456789abcdef", dataset=DatasetConfig(name="synthetic"),
                  train=TrainConfig())
    fields.update(overrides)
    return CandidateSpec(**fields)


def reference_data(spec: CandidateSpec) -> dict:
    """asdict, less the dataset fields added after stores existed while they hold their default (they are
    left out of the canonical form so that stored hashes stay: core.records `omit_default`)."""
    data = dataclasses.asdict(spec)
    for key in ("mean", "std", "channels", "factory", "fingerprint"):
        if data["dataset"][key] is None:
            del data["dataset"][key]
    for key, default in (("kwargs", {}), ("in_memory", "auto"), ("memory_share", 0.25), ("workers", 2),
                         ("bad_files", "stop")):
        if data["dataset"][key] == default:
            del data["dataset"][key]
    if data["train"]["task"] is None:  # the task (issue 37) travels in the recipe, absent for classification
        del data["train"]["task"]
    if data["train"]["optimizer"] == "sgd":  # added with issue 37: absent at its default
        del data["train"]["optimizer"]
    if not data["kernels"]:  # added with issue 38 (kernel shrinkage): absent when no kernel is cut
        del data["kernels"]
    return data


def reference_hash(spec: CandidateSpec) -> str:
    text = json.dumps(reference_data(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_spec_hash_is_16_hex_digits():
    value = make_spec().spec_hash
    assert len(value) == 16
    assert all(c in "0123456789abcdef" for c in value)


def test_spec_hash_is_sha256_of_sorted_compact_json():
    spec = make_spec(removed=("layer2.1",), widths=(("layer1.0", 8),), params=(("lr", 0.1), ("steps", 3)))
    text = json.dumps(reference_data(spec), sort_keys=True, separators=(",", ":"))
    assert spec.canonical_json() == text
    assert spec.spec_hash == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_spec_hash_ignores_the_order_of_removed_widths_and_params():
    a = make_spec(removed=("layer2.1", "layer1.0"), widths=(("layer3.0", 32), ("layer1.2", 8)),
                  params=(("steps", 3), ("alpha", 0.5), ("flag", True)))
    b = make_spec(removed=("layer1.0", "layer2.1"), widths=(("layer1.2", 8), ("layer3.0", 32)),
                  params=(("alpha", 0.5), ("flag", True), ("steps", 3)))
    assert a == b
    assert a.spec_hash == b.spec_hash == reference_hash(b)


CHANGES = {
    "arch": "resnet56",
    "teacher": "fedcba9876543210",
    "dataset": DatasetConfig(name="synthetic", split_seed=1),
    "train": TrainConfig(epochs=2),
    "method": "n2n",
    "removed": ("layer1.0",),
    "widths": (("layer1.0", 8),),
    "init": "fedcba9876543210",
    "masks": "candidates/abc/masks.pt",
    "schedule": "0011223344556677",
    "seed": 1,
    "params": (("lr", 0.1),),
    "kernels": (("layer1.0.conv1", 1),),
}


def test_every_spec_field_is_covered_by_the_change_table():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(CandidateSpec)}


@pytest.mark.parametrize("field", list(CHANGES))
def test_spec_hash_changes_when_a_field_changes(field):
    base = make_spec()
    changed = replace(base, **{field: CHANGES[field]})
    assert changed != base
    assert changed.spec_hash != base.spec_hash
    assert changed.spec_hash == reference_hash(changed)


def test_spec_hash_changes_with_a_nested_train_setting():
    base = make_spec()
    changed = make_spec(train=replace(TrainConfig(), distill=replace(TrainConfig().distill, temperature=2.0)))
    assert changed.spec_hash != base.spec_hash


def test_spec_round_trips_through_json_with_the_same_hash():
    spec = make_spec(removed=("layer2.1",), widths=(("layer1.0", 8),), masks="m/k", schedule="abcd",
                     seed=4, method="n2n", dataset=DatasetConfig(name="synthetic", subset=100, split_seed=2),
                     params=(("steps", 3), ("alpha", 0.5), ("ratio", 2.0), ("flag", True), ("mode", "kl")))
    back = CandidateSpec.from_json(spec.canonical_json())
    assert back == spec
    assert back.spec_hash == spec.spec_hash
    assert back.canonical_json() == spec.canonical_json()


def test_spec_round_trip_keeps_int_float_and_bool_params_apart():
    spec = make_spec(params=(("steps", 3), ("ratio", 2.0), ("flag", True), ("name", "x")))
    back = dict(CandidateSpec.from_json(spec.canonical_json()).params)
    assert type(back["steps"]) is int and back["steps"] == 3
    assert type(back["ratio"]) is float and back["ratio"] == 2.0
    assert type(back["flag"]) is bool and back["flag"] is True
    assert back["name"] == "x"


def test_spec_round_trip_keeps_int_subset_an_int():
    spec = make_spec(dataset=DatasetConfig(name="synthetic", subset=100))
    back = CandidateSpec.from_json(spec.canonical_json())
    assert type(back.dataset.subset) is int
    assert back.dataset == spec.dataset


def test_spec_is_hashable_and_usable_as_a_dict_key():
    a = make_spec(removed=("layer2.1", "layer1.0"), params=(("steps", 3),))
    b = make_spec(removed=("layer1.0", "layer2.1"), params=(("steps", 3),))
    table = {a: "trained"}
    assert table[b] == "trained"
    assert hash(a) == hash(b)
    assert len({a, b, make_spec()}) == 2


def test_spec_is_frozen():
    spec = make_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3  # type: ignore[misc]


def test_spec_hash_does_not_depend_on_where_the_data_files_are():
    here = make_spec(dataset=DatasetConfig(name="fashion_mnist", root="/data/a", download=False))
    there = make_spec(dataset=DatasetConfig(name="fashion_mnist", root="/mnt/b", download=True))
    assert here.spec_hash == there.spec_hash
    assert here.spec_hash != make_spec(dataset=DatasetConfig(name="fashion_mnist", subset=100)).spec_hash
