"""Quantization-aware training from a Distiller schedule's `quantizers:` section, through PyTorch's QAT path
(`torch.ao.quantization.FakeQuantize`), and the int8 model it ends in.

    quantizers:
      linear_quantizer:
        class: QuantAwareTrainRangeLinearQuantizer   # alias LinearQuantAwareTraining
        bits_activations: 8
        bits_weights: 8
        mode: ASYMMETRIC_UNSIGNED
        ema_decay: 0.999              # activation ranges: exponential moving average of each batch's min / max
        per_channel_wts: true
        overrides:                    # module-name patterns (regular expressions, matched in order)
          conv1: {bits_weights: null, bits_activations: null}    # the first layer stays fp32
    policies:
      - quantizer: {instance_name: linear_quantizer}
        starting_epoch: 0
        ending_epoch: 10

From the policy's first epoch to the end of training every quantized conv and linear layer computes with
fake-quantized weights (int8, symmetric; per output channel with `per_channel_wts`) on a fake-quantized
input (uint8, its range tracked in training only): the network learns weights that survive int8. The
stored model is the float network so trained (its architecture unchanged); its int8 model is made by ONNX
Runtime (workers.compression.quantize): batch norm folded into the convolutions, which per-channel symmetric weight
quantization commutes with, and activation ranges calibrated on training batches. Layers the overrides
leave in fp32 stay fp32 there too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver


@dataclass(frozen=True)
class LinearQuantAwareTraining:
    """Distiller's QuantAwareTrainRangeLinearQuantizer: its keys, and the values searchsvc runs."""

    bits_activations: int | None = field(default=8, metadata={"help": "8, or null: fp32 inputs"})
    bits_weights: int | None = field(default=8, metadata={"help": "8, or null: fp32 weights"})
    bits_bias: int | None = field(default=None, metadata={
        "choices": [None, 32], "help": "null or 32: biases stay 32-bit (ONNX Runtime's int32 bias)"})
    mode: Literal["ASYMMETRIC_UNSIGNED"] = field(default="ASYMMETRIC_UNSIGNED", metadata={
        "help": "activations uint8 with a zero point, weights int8 symmetric (what ONNX Runtime runs)"})
    ema_decay: float = field(default=0.999, metadata={"gt": 0, "lt": 1, "help": "activation-range averaging"})
    per_channel_wts: bool = field(default=False, metadata={"help": "a weight scale per output channel"})
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "module-name pattern → {bits_weights, bits_activations}: 8 or null"})

    def __post_init__(self) -> None:
        for key in ("bits_activations", "bits_weights"):
            if getattr(self, key) not in (None, 8):
                raise ValueError(f"{key}: 8 or null (lower bit widths are not supported yet), got "
                                 f"{getattr(self, key)!r}")
        for pattern, settings in self.overrides.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"overrides.{pattern}: not a regular expression ({err})") from None
            if not isinstance(settings, dict):
                raise ValueError(f"overrides.{pattern}: expected {{bits_weights: .., bits_activations: ..}}")
            for key, value in settings.items():
                if key not in ("bits_weights", "bits_activations", "bits_bias"):
                    raise ValueError(f"overrides.{pattern}.{key}: unknown key (bits_weights, bits_activations)")
                if value not in ((None, 32) if key == "bits_bias" else (None, 8)):
                    raise ValueError(f"overrides.{pattern}.{key}: 8 or null (lower bit widths: not yet), "
                                     f"got {value!r}")

    def plan(self, model: nn.Module) -> dict[str, tuple[bool, bool]]:
        """Each conv and linear layer's name → (weights quantized, input quantized): the first override
        pattern that matches its whole name decides, else the defaults."""
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                settings = next((s for p, s in self.overrides.items() if re.fullmatch(p, name)), {})
                layers[name] = (settings.get("bits_weights", self.bits_weights) is not None,
                                settings.get("bits_activations", self.bits_activations) is not None)
        return layers

    def fp32_layers(self, model: nn.Module) -> tuple[str, ...]:
        """Conv and linear layers left entirely in fp32 (neither weights nor input quantized)."""
        return tuple(name for name, (weights, inputs) in self.plan(model).items() if not weights and not inputs)

    def unmatched(self, model: nn.Module) -> list[str]:
        """Override patterns that match no module of `model` (a misspelt name)."""
        names = [name for name, _ in model.named_modules()]
        return [p for p in self.overrides if not any(re.fullmatch(p, name) for name in names)]


class FakeQuantized:
    """The fake quantization of a model's layers while it trains; `detach` restores their float forward.

    The fake-quantize modules are kept here, not registered in the model: its state_dict, and so the stored
    model and its checkpoints' model part, keep the architecture's keys. Their state travels in the
    scheduler's own state_dict."""

    def __init__(self, model: nn.Module, config: LinearQuantAwareTraining) -> None:
        self.model = model
        modules = dict(model.named_modules())
        self.fakes: dict[str, tuple[FakeQuantize | None, FakeQuantize | None]] = {}
        for name, (weights, inputs) in config.plan(model).items():
            layer = modules[name]
            device = layer.weight.device
            fake_input = _activation_fake(config.ema_decay).to(device) if inputs else None
            fake_weight = _weight_fake(config.per_channel_wts).to(device) if weights else None
            if fake_input is None and fake_weight is None:
                continue
            self.fakes[name] = (fake_input, fake_weight)
            layer.forward = functools.partial(_fake_forward, layer, fake_input, fake_weight)

    def detach(self) -> None:
        """Every layer back to its own forward (float)."""
        modules = dict(self.model.named_modules())
        for name in self.fakes:
            modules[name].__dict__.pop("forward", None)
        self.fakes = {}

    def state_dict(self) -> dict[str, Any]:
        return {name: [None if fq is None else fq.state_dict() for fq in pair] for name, pair in self.fakes.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, pair in self.fakes.items():
            for fq, saved in zip(pair, state.get(name, (None, None))):
                if fq is not None and saved is not None:
                    fq.load_state_dict(saved)


# Distiller's class names a schedule's `quantizers:` may give (8-bit quantization-aware training).
QUANTIZERS: dict[str, type] = {"QuantAwareTrainRangeLinearQuantizer": LinearQuantAwareTraining,
                               "LinearQuantAwareTraining": LinearQuantAwareTraining}


def _activation_fake(ema_decay: float) -> FakeQuantize:
    """uint8 with a zero point; its range an exponential moving average of each training batch's."""
    return FakeQuantize(observer=MovingAverageMinMaxObserver, averaging_constant=1.0 - ema_decay, quant_min=0,
                        quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine)


def _weight_fake(per_channel: bool) -> FakeQuantize:
    """int8, symmetric: the current weights' range (per output channel, or for the whole tensor)."""
    if per_channel:
        return FakeQuantize(observer=PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                            qscheme=torch.per_channel_symmetric, ch_axis=0)
    return FakeQuantize(observer=MinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                        qscheme=torch.per_tensor_symmetric)


def _fake_forward(layer: nn.Module, fake_input: FakeQuantize | None, fake_weight: FakeQuantize | None,
                  x: torch.Tensor) -> torch.Tensor:
    """The layer's forward on fake-quantized input and weights; ranges are observed in training mode only
    (evaluation must not move them)."""
    if fake_input is not None:
        fake_input.enable_observer(layer.training)
        x = fake_input(x)
    weight = layer.weight
    if fake_weight is not None:
        fake_weight.enable_observer(True)  # the weights' own current range: no data in it
        weight = fake_weight(weight)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)
