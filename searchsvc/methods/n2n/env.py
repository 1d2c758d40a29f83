"""The N2N environment (Ashok et al., 2018): observe the teacher's layers, act on all of them at once.

An episode is one step. The observation is the teacher's layer descriptors, one row of 8 numbers per
removable unit — a block with a skip connection, or in a network without any (VGG, AlexNet) a single conv or
linear layer (start, end, type, filters, kernel, stride, padding, memory), each column scaled to
[0, 1]. The action is one choice per unit:
- removal stage: keep (0) or remove (1) each unit, `MultiDiscrete([2] * n)`;
- shrink stage:  an index into `width_scales` for each unit kept by the best removal result, or (the paper's
  continuous shrinkage, `shrink_ratios: continuous`) a ratio in [min_ratio, 1] for each, `Box(min_ratio, 1, n)`.
The reward comes from evaluating the candidate on the actor pool.

`CompressionVectorEnv` holds K such episodes and sends all K candidates to the pool in one call, so
they train concurrently (gymnasium's default vectorisation would step them one after another).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import gymnasium as gym
import numpy as np

from workers.evaluation.spec import CandidateSpec
from workers.models.structure import Units
from workers.models.surgery import round_width

# (specs) → one reward per spec, or None for a spec past the evaluation budget
EvaluateFn = Callable[[list[CandidateSpec]], list[float | None]]


def observation_rows(units: Units, blocks: tuple[str, ...]) -> np.ndarray:
    """Descriptor rows of `blocks` (n x 8), each column divided by its largest value, so 0..1."""
    rows = np.array([units.rows[name].as_row() for name in blocks], dtype=np.float32)
    scale = np.abs(rows).max(axis=0)
    return rows / np.where(scale > 0, scale, 1.0)


@dataclass(frozen=True)
class Stage:
    """What the actions mean: which blocks are acted on and how an action becomes a candidate."""

    blocks: tuple[str, ...]  # block names, one per action entry
    choices: int  # options per entry (2 for removal); 0: a continuous ratio in [low, 1] per entry
    make_spec: Callable[[np.ndarray], CandidateSpec]
    low: float = 0.0  # the smallest ratio of a continuous stage

    def action_space(self) -> gym.spaces.MultiDiscrete | gym.spaces.Box:
        if self.choices == 0:
            return gym.spaces.Box(self.low, 1.0, (len(self.blocks),), np.float32)
        return gym.spaces.MultiDiscrete([self.choices] * len(self.blocks))


def removal_stage(blocks: tuple[str, ...], base: CandidateSpec, members: Mapping[str, tuple[str, ...]] | None = None
                  ) -> Stage:
    """Remove (1) or keep (0) each unit of the teacher: a block by its name, a layer with its norm (`members`:
    Units.members)."""
    members = members or {}

    def make(action: np.ndarray) -> CandidateSpec:
        chosen = [name for name, a in zip(blocks, action) if int(a) == 1]
        return replace(base, removed=tuple(m for name in chosen for m in members.get(name, (name,))))

    return Stage(blocks, 2, make)


def shrink_stage(base: CandidateSpec, inner: dict[str, dict[str, int]], scales: tuple[float, ...],
                 round_to: int = 1, min_ratio: float | None = None, kernels: Mapping[str, int] | None = None) -> Stage:
    """Scale the inner widths of each unit the removal result kept (`inner`: unit → width key → the teacher's
    channels) by one of `scales` — or, with `min_ratio` (the paper's continuous shrinkage), by the action's own
    ratio, clipped to [min_ratio, 1] — rounded up to the group's step (surgery.round_width of the teacher's width
    and `round_to`). `kernels` (a conv layer unit → its kernel size): the kernel shrinks by the same ratio, rounded
    up to an odd size (a 3x3 becomes 1x1 at a third and below; a 5x5 3x3 at three fifths, 1x1 at a fifth)."""
    blocks = tuple(name for name, widths in inner.items() if name not in base.removed and widths)

    def ratio(a: float) -> float:
        return scales[int(a)] if min_ratio is None else float(np.clip(a, min_ratio, 1.0))

    def make(action: np.ndarray) -> CandidateSpec:
        widths, cut = {}, {}
        for name, a in zip(blocks, action):
            r = ratio(a)
            for key, channels in inner[name].items():
                width = round_width(max(1, round(channels * r)), round_to, channels)
                if width != channels:  # the teacher's own width is no transformation
                    widths[key] = width
            full = (kernels or {}).get(name)
            if full is not None and (size := odd_kernel(full, r)) != full:
                cut[name] = size
        return replace(base, widths=tuple(widths.items()), kernels=tuple(cut.items()))

    if min_ratio is not None:
        return Stage(blocks, 0, make, low=min_ratio)
    return Stage(blocks, len(scales), make)


def odd_kernel(full: int, ratio: float) -> int:
    """`full` × `ratio`, rounded up to an odd size (a kernel cut around its centre), at most `full`."""
    return min(full, max(1, 2 * math.ceil((full * ratio - 1) / 2) + 1))


class CompressionEnv(gym.Env):
    """One episode = one candidate. For tests and tools; the driver uses the vector form."""

    def __init__(self, observation: np.ndarray, stage: Stage, evaluate: EvaluateFn) -> None:
        self._obs = observation.astype(np.float32)
        self.observation_space = gym.spaces.Box(0.0, 1.0, self._obs.shape, np.float32)
        self.action_space = stage.action_space()
        self.stage, self.evaluate = stage, evaluate

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._obs.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        spec = self.stage.make_spec(np.asarray(action))
        (reward,) = self.evaluate([spec])
        if reward is None:  # past the budget: nothing was evaluated
            return self._obs.copy(), 0.0, False, True, {"spec_hash": spec.spec_hash}
        return self._obs.copy(), float(reward), True, False, {"spec_hash": spec.spec_hash}


class CompressionVectorEnv(gym.vector.VectorEnv):
    """K single-step episodes whose K candidates are evaluated together.

    Autoreset follows gymnasium's NEXT_STEP mode, which RLlib's env runner expects: the step after an
    episode ends returns the reset observation and evaluates nothing.
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, observation: np.ndarray, stage: Stage, evaluate: EvaluateFn, num_envs: int) -> None:
        self.num_envs = num_envs
        self._obs = observation.astype(np.float32)
        self.single_observation_space = gym.spaces.Box(0.0, 1.0, self._obs.shape, np.float32)
        self.single_action_space = stage.action_space()
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.stage, self.evaluate = stage, evaluate
        self._needs_reset = np.ones(num_envs, dtype=bool)

    def _batch_obs(self) -> np.ndarray:
        return np.repeat(self._obs[None], self.num_envs, axis=0)

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        self._needs_reset[:] = False
        return self._batch_obs(), {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        live = [i for i in range(self.num_envs) if not self._needs_reset[i]]
        specs = [self.stage.make_spec(np.asarray(actions[i])) for i in live]
        for i, reward in zip(live, self.evaluate(specs) if specs else []):
            if reward is None:
                truncated[i] = True
            else:
                rewards[i], terminated[i] = reward, True
        self._needs_reset = terminated | truncated  # ended now: reset on the next step
        return self._batch_obs(), rewards, terminated, truncated, {}
