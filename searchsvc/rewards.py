"""Rewards: how much a candidate is worth, trading compression against accuracy (N2N, Ashok et al. 2018).

With C = 1 − M_s / M (M: teacher parameters, M_s: the candidate's) and A_s / A the accuracy ratio:
- `c_2_minus_c`      R = C·(2 − C)·A_s / A        the form in the paper's released code (default)
- `c_over_2_minus_c` R = C·A_s / ((2 − C)·A)      the form in the paper's text
An invalid candidate gets −1.
"""

from __future__ import annotations

from typing import Literal

RewardForm = Literal["c_2_minus_c", "c_over_2_minus_c"]
INVALID_REWARD = -1.0


def compression_ratio(teacher_params: int, params: int) -> float:
    """The x-factor M / M_s (2.0 = half the parameters)."""
    return teacher_params / params if params > 0 else float("inf")


def reward(params: int, accuracy: float, teacher_params: int, teacher_accuracy: float,
           form: RewardForm = "c_2_minus_c") -> float:
    """The N2N reward of a valid candidate."""
    c = 1.0 - params / teacher_params
    ratio = accuracy / teacher_accuracy if teacher_accuracy > 0 else 0.0
    if form == "c_2_minus_c":
        return c * (2.0 - c) * ratio
    if form == "c_over_2_minus_c":
        return c * ratio / (2.0 - c)
    raise ValueError(f"unknown reward form {form!r}")
