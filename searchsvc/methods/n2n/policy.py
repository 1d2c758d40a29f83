"""The n2n agent's policy network, one unit at a time — what makes a trained policy transferable.

The N2N paper's policies read the teacher layer by layer (a bidirectional LSTM over the layer descriptors) and
choose an action per layer; a policy trained on a small teacher then starts the search on a larger one (ResNet-18
→ ResNet-34). RLlib's default network is an MLP over the flattened descriptors: its weights are sized by the number
of layers, so it cannot move to a teacher of another depth. `UnitPolicy` applies one small network to every unit's
descriptor row (8 numbers), beside the mean of all rows' encodings as the whole network's context, and gives each
unit its own action logits (removal: keep / remove; shrink: a scale index, or a ratio's mean and log-std); the value
is read from the context. No weight depends on how many units there are: the same weights run on any teacher whose
descriptors have the same 8 columns (`env.observation_rows`, each scaled to [0, 1] by the teacher's largest).

`policy_weights` / `load_policy` move the weights between runs (`search.policy_from`).
"""

from __future__ import annotations

import io
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchMultiCategorical
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from core.errors import SearchsvcError

ROW = 8  # numbers per unit descriptor (workers.models.zoo.LayerDescriptor.as_row)
HIDDEN = 64  # width of the row encoder and heads
LAST = "head.2"  # the head's last layer: its outputs are the action distribution's inputs (UnitPolicy.setup)


class UnitPolicy(TorchRLModule, ValueFunctionAPI):
    """PPO's policy and value over units: a shared row encoder, per-unit heads, a pooled value (module docstring)."""

    def setup(self) -> None:
        units = self.observation_space.shape[0] // ROW
        space = self.action_space
        self.continuous = not isinstance(space, gym.spaces.MultiDiscrete)  # a ratio per unit (Box)
        if self.continuous:  # TorchDiagGaussian's inputs: a mean and a log-std per unit
            self.per_unit = 2
        else:
            self.per_unit = int(space.nvec[0])
            self.action_dist_cls = TorchMultiCategorical.get_partial_dist_cls(input_lens=[self.per_unit] * units)
        hidden = int(self.model_config.get("hidden", HIDDEN))
        self.rows = nn.Sequential(nn.Linear(ROW, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, self.per_unit))
        self.value = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def _encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each unit's encoding [B, n, hidden] and the network's context [B, hidden] (their mean)."""
        obs = batch[Columns.OBS]
        rows = self.rows(obs.reshape(obs.shape[0], -1, ROW))
        return rows, rows.mean(1)

    def _inputs(self, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.cat([rows, context.unsqueeze(1).expand_as(rows)], -1))  # [B, n, per_unit]
        if self.continuous:
            return torch.cat([out[..., 0], out[..., 1]], -1)  # all means, then all log-stds
        return out.flatten(1)  # unit by unit: the multi-categorical's input_lens

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        rows, context = self._encode(batch)
        return {Columns.ACTION_DIST_INPUTS: self._inputs(rows, context)}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        rows, context = self._encode(batch)
        return {Columns.ACTION_DIST_INPUTS: self._inputs(rows, context), Columns.EMBEDDINGS: context}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = self._encode(batch)[1]
        return self.value(embeddings).squeeze(-1)


def policy_weights(algo: Any) -> bytes:
    """The trained policy's weights (a state_dict of tensors, torch.save'd): what `search.policy_from` loads."""
    weights = algo.get_weights()["default_policy"]
    buffer = io.BytesIO()
    torch.save({key: torch.as_tensor(np.asarray(value)) for key, value in weights.items()}, buffer)
    return buffer.getvalue()


def load_policy(algo: Any, raw: bytes, where: str, temperature: float = 1.0) -> None:
    """Start `algo`'s policy from stored weights (`policy_weights`), softened by `temperature` (`temper`);
    SearchsvcError naming search.policy_from if they are not a policy of this kind (another network, or another
    number of choices per unit)."""
    try:
        stored = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — a damaged file: whatever torch raises
        raise SearchsvcError(f"search.policy_from: {where} is not a policy's weights ({err})") from None
    own = algo.get_weights()["default_policy"]
    shapes = {key: tuple(np.shape(value)) for key, value in own.items()}
    theirs = {key: tuple(value.shape) for key, value in stored.items()} if isinstance(stored, dict) else {}
    if shapes != theirs:
        differ = sorted(set(shapes) ^ set(theirs)) or [k for k in shapes if shapes[k] != theirs[k]]
        raise SearchsvcError(f"search.policy_from: {where} is not a policy of this search's kind (first "
                             f"difference: {differ[0]}); transfer needs search.policy: units and the same actions "
                             f"per unit (shrink_ratios, width_scales)")
    stored = temper(stored, temperature, algo.get_module().continuous)
    weights = {"default_policy": {key: value.numpy() for key, value in stored.items()}}
    # the learner's module, then synced to the env runner that proposes (Algorithm.set_weights is deprecated)
    algo.set_state({"learner_group": {"learner": {"rl_module": weights}}})


def temper(weights: dict[str, torch.Tensor], temperature: float, continuous: bool) -> dict[str, torch.Tensor]:
    """A trained policy made less sure of itself, so that on a new teacher it still explores: its action logits
    divided by `temperature` (the order of its preferences kept); for continuous ratios the means are kept and
    the log-stds divided likewise (std → std^(1/T), towards a fresh policy's 1). Without it, a policy trained to
    convergence on a small teacher proposes the same few networks on the large one."""
    if temperature == 1.0:
        return weights
    weight, bias = weights[f"{LAST}.weight"].clone(), weights[f"{LAST}.bias"].clone()
    rows = slice(1, 2) if continuous else slice(None)  # the head's outputs per unit: (mean, log-std) or logits
    weight[rows] /= temperature
    bias[rows] /= temperature
    return {**weights, f"{LAST}.weight": weight, f"{LAST}.bias": bias}
