"""Model zoo: models are data. A registry maps a name to an architecture; one module builds any of them.

    arch = model_arch("resnet20", in_channels=1, num_classes=10)   # a frozen ResNetArch
    model = build_model(arch)                                       # an nn.Module
    model.describe()                                                # layer descriptors (the RL state)

Two families:
- CIFAR-style residual networks (`ResNetArch`): a 3x3 stem, stages of basic blocks, global average
  pooling and a linear classifier. A pruned or compressed variant is just another `ResNetArch`
  (blocks removed, narrower widths), which is what surgery produces.
- plain CNNs (`PlainArch`): conv-relu-maxpool layers then fully-connected layers, e.g. Distiller's
  `simplenet_cifar` (conv1-conv2-fc1-fc2-fc3), whose parameter names Distiller schedules use.
"""

from __future__ import annotations

import enum
import io
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch
from torch import nn

from core.names import lookup
from core.records import from_data
from storage.errors import CorruptArtifactError


@dataclass(frozen=True)
class BlockArch:
    """One basic block: conv3x3(in→mid, stride) → conv3x3(mid→out); shortcut added to the output.

    A removed block keeps only its shortcut: identity when shapes match, else a 1x1 projection.
    """

    mid: int  # channels after the first conv
    out: int  # channels after the block (the residual stream width)
    stride: int = 1
    removed: bool = False

    def needs_projection(self, cin: int) -> bool:
        """Whether the shortcut is a 1x1 conv-bn (the block changes resolution or width) rather than identity."""
        return self.stride != 1 or cin != self.out


@dataclass(frozen=True)
class ResNetArch:
    """A whole network as data: stem width, stages of blocks, input channels, classes."""

    name: str
    in_channels: int
    num_classes: int
    stem: int  # channels after the stem conv
    stages: tuple[tuple[BlockArch, ...], ...]

    def block_names(self) -> list[str]:
        """Names as in the module tree, e.g. 'layer2.1'."""
        return [f"layer{s + 1}.{b}" for s, stage in enumerate(self.stages) for b in range(len(stage))]

    def blocks(self) -> list[tuple[str, BlockArch]]:
        """(name, block) pairs in forward order."""
        flat = [block for stage in self.stages for block in stage]
        return list(zip(self.block_names(), flat))

    def block_inputs(self) -> list[tuple[str, BlockArch, int]]:
        """(name, block, input channels) in forward order."""
        inputs, cin = [], self.stem
        for name, block in self.blocks():
            inputs.append((name, block, cin))
            cin = block.out
        return inputs

    def out_channels(self) -> int:
        """Channels reaching the classifier."""
        width = self.stem
        for _, block in self.blocks():
            width = block.out
        return width


class LayerType(enum.IntEnum):
    """Layer kinds in the descriptors (the RL observation encodes them as numbers)."""

    CONV = 0
    BLOCK = 1
    LINEAR = 2


@dataclass(frozen=True)
class LayerDescriptor:
    """One layer as the RL agent sees it (DESIGN §4): where it sits, what it is, how big it is."""

    name: str
    start: int  # index of the feature map the layer reads
    end: int  # index of the feature map it writes
    type: LayerType
    filters: int  # output channels (or features)
    kernel: int
    stride: int
    padding: int
    memory: int  # bytes of fp32 parameters
    removable: bool

    def as_row(self) -> list[float]:
        """The 8 numbers of the RL state row, unnormalised."""
        return [self.start, self.end, int(self.type), self.filters, self.kernel, self.stride, self.padding, self.memory]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus shortcut, then relu. A removed block is its shortcut alone."""

    def __init__(self, cin: int, arch: BlockArch) -> None:
        super().__init__()
        self.removed = arch.removed
        self.shortcut = _conv_bn(cin, arch.out, 1, arch.stride) if arch.needs_projection(cin) else nn.Identity()
        if not arch.removed:
            self.conv1 = _conv_bn(cin, arch.mid, 3, arch.stride)
            self.conv2 = _conv_bn(arch.mid, arch.out, 3, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.removed:
            return self.shortcut(x)
        y = self.conv2(self.act(self.conv1(x)))
        return self.act(y + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet built from a `ResNetArch`."""

    def __init__(self, arch: ResNetArch) -> None:
        super().__init__()
        self.arch = arch
        self.stem = _conv_bn(arch.in_channels, arch.stem, 3, 1)
        self.act = nn.ReLU(inplace=True)
        cin = arch.stem
        for index, stage in enumerate(arch.stages):
            blocks = []
            for block in stage:
                blocks.append(BasicBlock(cin, block))
                cin = block.out
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        for index in range(len(self.arch.stages)):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))

    def describe(self) -> list[LayerDescriptor]:
        """Layer descriptors in forward order: the stem, every block, the classifier."""
        rows = [LayerDescriptor("stem", 0, 1, LayerType.CONV, self.arch.stem, 3, 1, 1, _bytes(self.stem), False)]
        for index, (name, block) in enumerate(self.arch.blocks(), start=1):
            module = self.get_submodule(name)
            rows.append(LayerDescriptor(
                name, index, index + 1, LayerType.BLOCK, block.out, 3, block.stride, 1, _bytes(module),
                removable=not block.removed,
            ))
        last = len(rows)
        rows.append(LayerDescriptor("fc", last, last + 1, LayerType.LINEAR, self.arch.num_classes, 1, 1, 0,
                                    _bytes(self.fc), False))
        return rows


def _bytes(module: nn.Module) -> int:
    return 4 * sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class PlainArch:
    """A plain CNN as data: 5x5 valid convs (each followed by ReLU and 2x2 max-pooling; the last pool
    adapts to `pooled` x `pooled`, so any input from 14 px works), then ReLU'd linear layers. With no
    convs it is an MLP: the image itself is adapted to `pooled` x `pooled` (28: MNIST-shaped inputs pass
    unchanged) and flattened."""

    name: str
    in_channels: int
    num_classes: int
    convs: tuple[int, ...]  # output channels of conv1, conv2, ...
    fcs: tuple[int, ...]  # output features of fc1, fc2, ... (the classifier comes after them)
    kernel: int = 5
    pooled: int = 5  # spatial side after the last pool (32x32 CIFAR input: 5, as in Distiller)
    skipped: tuple[str, ...] = field(default=(), metadata={  # layers an n2n candidate removed: identity there
        "omit_default": True})
    kernels: tuple[int, ...] = field(default=(), metadata={  # each conv's kernel where a candidate cut one; () all
        "omit_default": True})                                # are `kernel`

    def layer_names(self) -> list[str]:
        """Module names in forward order, classifier last: conv1, conv2, fc1, fc2, fc3."""
        return [f"conv{i + 1}" for i in range(len(self.convs))] + [f"fc{i + 1}" for i in range(len(self.fcs) + 1)]


class PlainCNN(nn.Module):
    """A `PlainArch` network. Modules are named conv1.., fc1..: Distiller's names for simplenet."""

    def __init__(self, arch: PlainArch) -> None:
        super().__init__()
        self.arch = arch
        cin = arch.in_channels
        for index, width in enumerate(arch.convs, start=1):
            skipped = f"conv{index}" in arch.skipped  # removed: what it read passes on, pooled as before
            kernel = arch.kernels[index - 1] if arch.kernels else arch.kernel
            self.add_module(f"conv{index}", nn.Identity() if skipped else nn.Conv2d(cin, width, kernel))
            cin = cin if skipped else width
        self.pool = nn.MaxPool2d(2, 2)
        self.last_pool = nn.AdaptiveMaxPool2d(arch.pooled)
        features = cin * arch.pooled * arch.pooled
        for index, width in enumerate((*arch.fcs, arch.num_classes), start=1):
            skipped = f"fc{index}" in arch.skipped
            self.add_module(f"fc{index}", nn.Identity() if skipped else nn.Linear(features, width))
            features = features if skipped else width
        self.act = nn.ReLU()  # not in place: after a removed layer it would overwrite a tensor backward still needs

    def described(self) -> PlainArch:
        """The architecture this network has now: after a cut (workers.models.cutting), its widths and the layers
        it removed, read from its modules."""
        widths: list[int] = []
        flowing = self.arch.in_channels
        for name in self.arch.layer_names()[:-1]:
            if name == "fc1":  # the pooled maps (an MLP: the pooled image) flattened
                flowing = flowing * self.arch.pooled * self.arch.pooled
            module = getattr(self, name)
            flowing = module.out_channels if isinstance(module, nn.Conv2d) else \
                module.out_features if isinstance(module, nn.Linear) else flowing
            widths.append(flowing)
        skipped = tuple(n for n in self.arch.layer_names() if not isinstance(getattr(self, n), (nn.Conv2d, nn.Linear)))
        convs = len(self.arch.convs)
        layers = [getattr(self, f"conv{i + 1}") for i in range(convs)]
        kernels = tuple(m.kernel_size[0] if isinstance(m, nn.Conv2d) else self.arch.kernel for m in layers)
        return replace(self.arch, convs=tuple(widths[:convs]), fcs=tuple(widths[convs:]), skipped=skipped,
                       kernels=kernels if any(k != self.arch.kernel for k in kernels) else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = len(self.arch.convs)
        if count == 0:  # an MLP: the pixels are the features
            x = self.last_pool(x)
        for index in range(1, count + 1):
            pool = self.last_pool if index == count else self.pool
            x = pool(self.act(getattr(self, f"conv{index}")(x)))
        x = torch.flatten(x, 1)
        for index in range(1, len(self.arch.fcs) + 1):
            x = self.act(getattr(self, f"fc{index}")(x))
        return getattr(self, f"fc{len(self.arch.fcs) + 1}")(x)


Arch = ResNetArch | PlainArch
Model = ResNet | PlainCNN


# ---- the registry --------------------------------------------------------------------------------
ArchFactory = Callable[[int, int], Arch]
_MODELS: dict[str, ArchFactory] = {}


def register_model(name: str) -> Callable[[ArchFactory], ArchFactory]:
    """Decorator: register an architecture factory `(in_channels, num_classes) -> ResNetArch | PlainArch`."""

    def add(factory: ArchFactory) -> ArchFactory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    """Registered model names."""
    return sorted(_MODELS)


def model_arch(name: str, in_channels: int = 3, num_classes: int = 10) -> Arch:
    """The architecture registered as `name`, for this input and number of classes."""
    return lookup(_MODELS, name, "model")(in_channels, num_classes)


def create_model(name: str, in_channels: int = 3, num_classes: int = 10) -> Model:
    """Build the registered model `name` with fresh weights."""
    return build_model(model_arch(name, in_channels, num_classes))


def build_model(arch: Arch) -> Model:
    """Build any architecture, registered or derived."""
    return PlainCNN(arch) if isinstance(arch, PlainArch) else ResNet(arch)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer, in module order: what pruning and summaries see."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def arch_from_data(data: dict, source: str) -> Arch:
    """An architecture from its stored JSON (teacher meta.json, candidate metrics.json), either family."""
    return from_data(PlainArch if "convs" in data else ResNetArch, data, source=source)


def is_residual(name: str) -> bool:
    """Whether the registered model `name` is a residual network (what surgery-based methods need)."""
    return isinstance(model_arch(name), ResNetArch)


def state_dict_bytes(model: nn.Module) -> bytes:
    """The model's weights as a torch.save'd plain dict of contiguous CPU tensors (what model.pt holds)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def read_state_bytes(raw: bytes, where: str) -> dict[str, torch.Tensor]:
    """`state_dict_bytes` output as tensors (weights_only=True); CorruptArtifactError naming `where`."""
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — a damaged checkpoint, whatever torch raises
        raise CorruptArtifactError(f"{where} is not a loadable checkpoint: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptArtifactError(f"{where} is not a state_dict of tensors")
    return state


def load_tensors(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state, strict=True)` for tensors read back from a file. Tensors alone (model.pt,
    safetensors) carry no per-module version metadata; each module then gets its own class's, as a state_dict
    of the same code has it (torchvision's MNASNet refuses a state_dict without its version)."""
    if getattr(state, "_metadata", None) is None:
        own = model.state_dict()
        state = OrderedDict(state)
        state._metadata = own._metadata  # type: ignore[attr-defined]  # what Module.load_state_dict reads
    model.load_state_dict(state, strict=True)


def load_state_bytes(model: nn.Module, raw: bytes, where: str) -> nn.Module:
    """Load `state_dict_bytes` output into `model` (weights_only=True); CorruptArtifactError naming `where`."""
    state = read_state_bytes(raw, where)
    try:
        load_tensors(model, state)
    except Exception as err:  # noqa: BLE001 — a mismatched checkpoint, whatever torch raises
        raise CorruptArtifactError(f"{where} is not a loadable checkpoint: {err}") from None
    return model


def _stages(widths: tuple[int, ...], depth: int, first_stride: int = 1) -> tuple[tuple[BlockArch, ...], ...]:
    """Stages of `depth` blocks each; every stage after the first halves the resolution."""
    return tuple(
        tuple(BlockArch(w, w, (first_stride if s == 0 else 2) if b == 0 else 1) for b in range(depth))
        for s, w in enumerate(widths)
    )


@register_model("resnet18_cifar")
def resnet18_cifar(in_channels: int, num_classes: int) -> ResNetArch:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool): the teacher of the N2N paper. 11.2 M params."""
    return ResNetArch("resnet18_cifar", in_channels, num_classes, 64, _stages((64, 128, 256, 512), 2))


@register_model("resnet20")
def resnet20(in_channels: int, num_classes: int) -> ResNetArch:
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 blocks, 16/32/64 channels, projection shortcuts)."""
    return ResNetArch("resnet20", in_channels, num_classes, 16, _stages((16, 32, 64), 3))


@register_model("resnet56")
def resnet56(in_channels: int, num_classes: int) -> ResNetArch:
    """He et al.'s CIFAR ResNet-56 (3 stages x 9 blocks)."""
    return ResNetArch("resnet56", in_channels, num_classes, 16, _stages((16, 32, 64), 9))


@register_model("tiny_cnn")
def tiny_cnn(in_channels: int, num_classes: int) -> ResNetArch:
    """A few thousand parameters for tests: stem 8, one block at 8, one strided block at 16."""
    return ResNetArch("tiny_cnn", in_channels, num_classes, 8, _stages((8, 16), 1))


@register_model("simplenet_cifar")
def simplenet_cifar(in_channels: int, num_classes: int) -> PlainArch:
    """Distiller's simplenet_cifar (LeNet-5 style): conv1 6, conv2 16 (5x5), fc1 120, fc2 84, fc3. 62 k params."""
    return PlainArch("simplenet_cifar", in_channels, num_classes, convs=(6, 16), fcs=(120, 84))


@register_model("lenet_300_100")
def lenet_300_100(in_channels: int, num_classes: int) -> PlainArch:
    """LeCun et al.'s MLP for 28x28 images, fc1 300, fc2 100, fc3: the classic pruning benchmark. 266 k params."""
    return PlainArch("lenet_300_100", in_channels, num_classes, convs=(), fcs=(300, 100), pooled=28)


@register_model("mlp_32")
def mlp_32(in_channels: int, num_classes: int) -> PlainArch:
    """One hidden layer of 32 units on 28x28 pixels: 25 k params, small enough that a 10 % weight budget
    costs accuracy (where sparse training methods differ)."""
    return PlainArch("mlp_32", in_channels, num_classes, convs=(), fcs=(32,), pooled=28)


def with_blocks(arch: ResNetArch, change: Callable[[str, BlockArch], BlockArch]) -> ResNetArch:
    """A copy of `arch` with every block replaced by `change(name, block)`: the hook surgery uses."""
    names = iter(arch.block_names())
    stages = tuple(tuple(change(next(names), block) for block in stage) for stage in arch.stages)
    return replace(arch, stages=stages)
