"""Issue 33: the architectures people bring, pruned as the field prunes them and rebuilt exactly.

Vision transformers (torchvision's ViT with nn.MultiheadAttention, Swin's shifted-window attention and patch
merging): the embedding stream is one channel group that loses the same positions from every head, each MLP
hidden width is a group, each transformer block is a removable unit. Every cut model rebuilds from its tensors
in a fresh constructor, and exports to ONNX with the same outputs.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from core.errors import SearchsvcError
from workers.measurement import ort
from workers.measurement.measure import count_macs
from workers.models.cutting import shrink_graph
from workers.models.depgraph import channel_groups, removable_units
from workers.models.inputs import InputSpec
from workers.models.rebuild import rebuild, rebuild_mismatch, remove_units
from workers.models.user_model import ModelSource, construct, constructor

REPO = Path(__file__).resolve().parent.parent


def vit() -> torch.nn.Module:
    """ViT-B/32 at 32 px; torchvision starts its head at zero, which would make every output 0 and every
    comparison of outputs vacuous, so it gets random weights (loaded over in a rebuild)."""
    model = torchvision.models.vit_b_32(num_classes=10, image_size=32).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def swin() -> torch.nn.Module:
    return torchvision.models.swin_t(num_classes=10).eval()


def _halved(teacher: torch.nn.Module, removed: tuple[str, ...] = (), size: int = 32) -> torch.nn.Module:
    example = InputSpec.image(3, size).example(teacher)
    groups = channel_groups(remove_units(copy.deepcopy(teacher), removed), example)
    return shrink_graph(teacher, example, removed, {g.key: g.channels // 2 for g in groups})


def test_a_vision_transformer_loses_head_width_mlp_width_and_blocks():
    torch.manual_seed(0)
    teacher = vit()
    example = InputSpec.image(3, 32).example(teacher)
    units = removable_units(teacher, example)
    assert units == tuple(f"encoder.layers.encoder_layer_{i}" for i in range(12))  # not the whole encoder
    groups = channel_groups(teacher, example)
    stream = [g for g in groups if g.slices > 1]
    assert len(stream) == 1 and stream[0].channels == 768 and stream[0].slices == 12  # one residual stream, 12 heads
    assert sorted(g.key for g in groups if g.slices == 1) == sorted(f"{u}.mlp.0" for u in units)  # MLP hidden widths
    small = _halved(teacher, units[-2:])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert small(images).abs().min() > 0  # outputs to compare
        assert torch.equal(shrink_graph(teacher, example)(images), teacher(images))  # identity: exact
    attention = small.encoder.layers.encoder_layer_0.self_attention
    assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (12, 32, 384)  # heads kept, narrower
    assert small.hidden_dim == 384 and small.class_token.shape == (1, 1, 384)
    assert small.encoder.pos_embedding.shape[-1] == 384
    assert small.encoder.layers.encoder_layer_0.mlp[0].out_features == 1536
    assert isinstance(small.encoder.layers.encoder_layer_11, torch.nn.Identity)
    assert count_macs(small, InputSpec.image(3, 32)) < 0.25 * count_macs(teacher, InputSpec.image(3, 32))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        again = rebuild(vit(), units[-2:], dict(small.state_dict()))
        assert torch.equal(again(images), small(images))


def test_heads_keep_their_own_channels_when_the_stream_narrows():
    """Keeping every channel of the stream but one position per head changes nothing else: a head's q, k and v
    positions are the stream's positions inside that head, so each narrowed head is a subset of the same head."""
    torch.manual_seed(0)
    teacher = vit()
    example = InputSpec.image(3, 32).example(teacher)
    stream = next(g for g in channel_groups(teacher, example) if g.slices > 1)
    scores = torch.arange(stream.channels, dtype=torch.float) % 64  # position 63 of each head scores lowest... last
    small = shrink_graph(teacher, example, widths={stream.key: stream.channels - stream.slices}, scores={
        stream.key: -scores})  # so the top-scored (least negative) positions 0..62 stay in every head
    kept = [h * 64 + p for h in range(12) for p in range(63)]
    before = teacher.encoder.layers.encoder_layer_0.self_attention.in_proj_weight
    after = small.encoder.layers.encoder_layer_0.self_attention.in_proj_weight
    rows = [part * 768 + i for part in range(3) for i in kept]
    assert torch.equal(after[len(kept):], before[rows][len(kept):, kept])  # k and v: the same weights
    scale = (63 / 64) ** 0.5  # q keeps q·k / sqrt(head width) as it was: keep_temperature
    assert torch.allclose(after[:len(kept)], scale * before[rows][:len(kept), kept])


def test_swin_is_analysed_in_bounded_memory_and_rebuilt_exactly():
    """Swin-T's graph used to take over 16 GB at 32 px (Torch-Pruning followed every window reshape); its
    attention and patch merging are now single nodes of the graph."""
    torch.manual_seed(0)
    teacher = swin()
    example = InputSpec.image(3, 32).example(teacher)
    units = removable_units(teacher, example)
    small = _halved(teacher, units[1:2])
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's (a test worker's ~4 GB), VmHWM with exec
    code = ("import torchvision; from workers.models.depgraph import channel_groups; "
            "from workers.models.inputs import InputSpec; "
            "m = torchvision.models.swin_t(num_classes=10).eval(); channel_groups(m, InputSpec.image(3, 32).example(m)); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert int(done.stdout.split()[-1]) < 2e6  # kB, in a process of its own: 0.9 GB measured (was over 16 GB)
    attention = small.features[1][0].attn
    assert attention.num_heads == 3 and attention.qkv.out_features == 3 * 48 and attention.proj.in_features == 48
    assert small.features[2].reduction.in_features == 4 * 48 and small.features[2].norm.normalized_shape == (192,)
    assert count_macs(small, InputSpec.image(3, 32)) < 0.3 * count_macs(teacher, InputSpec.image(3, 32))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuild(swin(), units[1:2], dict(small.state_dict()))(images), small(images))
        assert torch.equal(shrink_graph(teacher, example)(images), teacher(images))  # identity: exact


@pytest.mark.parametrize("build", [vit, swin], ids=["vit_b_32", "swin_t"])
def test_a_cut_transformer_exports_to_onnx_matching_pytorch(build):
    import onnxruntime

    torch.manual_seed(0)
    small = _halved(build())
    images = torch.randn(2, 3, 32, 32)
    session = onnxruntime.InferenceSession(ort.onnx_bytes(small, InputSpec.image(3, 32)), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {ort.INPUT: images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, small(images).numpy(), atol=1e-4, rtol=1e-4)


def test_shufflenet_prunes_inside_its_blocks_and_keeps_the_shuffled_streams():
    """Torch-Pruning cannot follow a channel shuffle (ZeroDivisionError); traced as a barrier, the groups that
    reach a shuffle keep their width and every branch's inner width is cut."""
    build = lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()  # noqa: E731
    torch.manual_seed(0)
    teacher = build()
    example = InputSpec.image(3, 32).example(teacher)
    groups = channel_groups(teacher, example)
    assert {"stage2.1.branch2.0", "stage3.0.branch2.0", "conv1.0", "conv5.0"} <= {o for g in groups for o in g.outputs}
    assert not any(o.endswith(("branch1.2", "branch2.5")) for g in groups for o in g.outputs)  # shuffled: kept
    small = _halved(teacher)
    assert count_macs(small, InputSpec.image(3, 32)) < 0.6 * count_macs(teacher, InputSpec.image(3, 32))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuild(build(), (), dict(small.state_dict()))(images), small(images))
        assert torch.equal(shrink_graph(teacher, example)(images), teacher(images))  # identity: exact


def test_maxvit_attention_and_partitions_are_single_nodes():
    build = lambda: torchvision.models.maxvit_t(num_classes=10, input_size=(224, 224)).eval()  # noqa: E731
    torch.manual_seed(0)
    teacher = build()
    small = _halved(teacher, size=224)
    attention = small.blocks[0].layers[0].layers.window_attention.attn_layer[1]
    assert (attention.n_heads, attention.head_dim) == (2, 16)  # heads kept, each half as wide
    assert count_macs(small, InputSpec.image(3, 224)) < 0.3 * count_macs(teacher, InputSpec.image(3, 224))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(rebuild(build(), (), dict(small.state_dict()))(images), small(images))


def test_a_model_that_would_not_come_back_from_its_tensors_is_named():
    """The check a user's candidate passes before it is recorded ok (workers.evaluation.evaluate._measured)."""
    torch.manual_seed(0)
    teacher = vit()
    small = _halved(teacher)
    example = torch.randn(2, 3, 32, 32)
    assert rebuild_mismatch(small, vit(), (), example) is None
    other = torchvision.models.vit_b_16(num_classes=10, image_size=32)  # a constructor of another model
    assert "cannot be rebuilt from its stored tensors" in rebuild_mismatch(small, other, (), example)
    small.encoder.layers.encoder_layer_0.mlp[1] = torch.nn.Tanh()  # behaviour the tensors do not carry
    assert "computes other outputs" in rebuild_mismatch(small, vit(), (), example)


def timm_vit() -> torch.nn.Module:
    model = constructor("timm:vit_tiny_patch16_224")(num_classes=10, img_size=32).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # timm starts its head at zero too
    return model


def test_a_timm_vision_transformer_narrows_every_head_of_q_k_and_v_alike():
    """timm's attention keeps its own inner width (qkv → num_heads x head_dim → proj), apart from the stream:
    its q/k/v outputs are one channel group in 3 x num_heads slices, so head_dim falls and num_heads stays."""
    torch.manual_seed(0)
    teacher = timm_vit()
    example = InputSpec.image(3, 32).example(teacher)
    groups = {g.key: g for g in channel_groups(teacher, example)}
    assert groups["blocks.0.attn.qkv"].slices == 3 * 3 and groups["blocks.0.attn.qkv"].channels == 3 * 192
    small = shrink_graph(teacher, example, widths={"blocks.0.attn.qkv": 3 * 96, "blocks.0.mlp.fc1": 384})
    attention = small.blocks[0].attn
    assert (attention.num_heads, attention.head_dim, attention.attn_dim) == (3, 32, 96)
    assert attention.qkv.out_features == 3 * 96 and attention.proj.in_features == 96
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert small(images).abs().min() > 0
        assert torch.equal(shrink_graph(teacher, example)(images), teacher(images))  # identity: exact
        again = rebuild(timm_vit(), (), dict(small.state_dict()))
        assert torch.equal(again(images), small(images))


def test_a_thinned_head_keeps_the_attention_it_had_with_zeros():
    """A head narrowed from 64 to 48 would divide q·k by sqrt(48), not sqrt(64), sharpening every softmax: the
    cut scales q by sqrt(48 / 64), so removing channels that were zero (a structured mask, thinned) leaves every
    output as it was — with timm's fused attention and without (its own `scale`)."""
    from workers.models.thinning import thin

    torch.manual_seed(0)
    teacher = timm_vit()
    example = InputSpec.image(3, 32).example(teacher)
    qkv = teacher.blocks[0].attn.qkv
    dead = [p for part in range(3 * 3) for p in range(part * 64, part * 64 + 16)]  # 16 of 64 in q, k, v of 3 heads
    with torch.no_grad():
        qkv.weight[dead] = 0
        qkv.bias[dead] = 0
    images = torch.randn(2, 3, 32, 32)
    for fused in (True, False):
        for block in teacher.blocks:
            block.attn.fused_attn = fused
        thinned, removed = thin(teacher, example)
        assert removed == {"blocks.0.attn.qkv": 3 * 3 * 16} and thinned.blocks[0].attn.head_dim == 48
        with torch.no_grad():
            assert torch.allclose(thinned(images), teacher(images), atol=1e-5)


def test_timm_names_are_checked_and_never_download():
    with pytest.raises(SearchsvcError, match="timm has no model 'vit_tiny_patch16_2240'.*vit_tiny_patch16_224"):
        constructor("timm:vit_tiny_patch16_2240")
    with pytest.raises(SearchsvcError, match="teacher.kwargs.pretrained: timm's weights are downloaded or read"):
        construct(ModelSource("timm:resnet18", {"pretrained": True}))
    with pytest.raises(SearchsvcError, match="teacher.kwargs.checkpoint_path: "):
        construct(ModelSource("timm:resnet18", {"checkpoint_path": "elsewhere.pth"}))


class _Scaled(torch.nn.Module):
    """A user's layer that keeps its channel count in a list (an int or a tuple of ints would follow the cut):
    cut, it still reshapes to the old count."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(channels))
        self.shape = [1, channels, 1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.reshape(self.shape)


def scaled_net(num_classes: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _Scaled(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, num_classes))


def test_a_network_that_cannot_be_cut_is_refused_at_validate_naming_the_layer(tmp_path, capsys):
    import yaml

    from searchsvc.cli import main

    data = {"name": "synthetic", "synthetic": {"num_classes": 4, "channels": 3, "image_size": 8, "train_size": 64,
                                               "test_size": 16}}
    config = {"method": "grid", "dataset": data, "resources": {"gpus_per_eval": 0},
              "teacher": {"model": "tests.test_architectures:scaled_net", "kwargs": {"num_classes": 4}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    for method in ("grid", "taylor", "n2n"):
        assert main(["validate", str(tmp_path / "job.yaml"), "--set", f"method={method}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "teacher.model: tests.test_architectures:scaled_net cannot be" in err, err
        assert "cut, 1 (_Scaled) fails (RuntimeError: shape '[1, 8, 1, 1]' is invalid" in err, err
    assert main(["validate", str(tmp_path / "job.yaml"), "--set", "method=rigl",  # cuts nothing: fine
                 "--set", "search={ignore_linear_layers: false}"]) == 0


def timm_swin(name: str) -> torch.nn.Module:
    """timm's Swin-T layout (V1 or V2), one block a stage, at 64 px (stages of 16, 8, 4 and 2 px: windows shrink)."""
    make = constructor(f"timm:{name}")
    return make(num_classes=10, img_size=64, depths=(2, 1, 1, 1), embed_dim=48, num_heads=(2, 4, 8, 16)).eval()


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_timm_swin_is_cut_through_its_window_attention_and_rebuilt_exactly(name):
    """timm's Swin windows its stream in the block, outside the attention: its WindowAttention and PatchMerging are
    single graph nodes with pruners of ours (traced into, a relative-position table was pruned like channels), so
    heads narrow with the stream, the tables stay whole and the merging keeps its 2x2 layout. V2 keeps q and v
    biases apart (and a zero k bias outside the state_dict), and normalises after merging."""
    torch.manual_seed(0)
    teacher = timm_swin(name)
    example = InputSpec.image(3, 64).example(teacher)
    removed = removable_units(teacher, example)[:1]
    groups = channel_groups(remove_units(copy.deepcopy(teacher), removed), example)
    assert {g.slices for g in groups} >= {2, 4, 8, 16}  # each stream in its stage's heads
    small = shrink_graph(teacher, example, removed, {g.key: max(g.slices, g.channels // 2) for g in groups})
    attention = small.layers[1].blocks[0].attn
    assert attention.qkv.out_features == 3 * 48 and attention.proj.in_features == 48
    heads = {key: value.shape for key, value in teacher.layers[1].blocks[0].attn.state_dict().items()
             if "relative_position" in key or "cpb_mlp.2" in key or "logit_scale" in key}
    assert heads and all(attention.state_dict()[key].shape == shape for key, shape in heads.items())  # all kept
    assert small.layers[1].downsample.reduction.in_features == 4 * 24
    assert count_macs(small, InputSpec.image(3, 64)) < 0.35 * count_macs(teacher, InputSpec.image(3, 64))
    assert rebuild_mismatch(small, timm_swin(name), removed, example) is None  # the same outputs, rebuilt


def test_a_shape_a_layer_views_by_follows_its_tensor():
    """timm's MetaFormer `Scale` views its vector by `self.shape`, (dim, 1, 1): the tuple follows a cut."""
    from timm.models.metaformer import Scale

    from workers.models.rebuild import follow_counts

    scale = Scale(dim=8, use_nchw=True)
    assert follow_counts(scale, {"scale": (8,)}, {"scale": (5,)}) and scale.shape == (5, 1, 1)


def test_timm_maxxvit_is_refused_before_torch_pruning_traces_it():
    """Traced, timm's MaxViT at 64 px passed 20 GB within minutes (its window partitions are functions): refused in
    one line before the graph is built, never left to the kernel's out-of-memory kill."""
    model = constructor("timm:maxvit_tiny_tf_224")(num_classes=10, img_size=64, depths=(1, 1, 1, 1)).eval()
    with pytest.raises(SearchsvcError, match="MaxxVit is not supported yet: timm's MaxxVit"):
        channel_groups(model, InputSpec.image(3, 64).example(model))
