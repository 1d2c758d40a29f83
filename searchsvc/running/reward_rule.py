"""How a run rewards its candidates: compression on one size measure against the teacher's, validation accuracy
against the teacher's (searchsvc.rewards has the formulas), and the budget's penalty where the method asks."""

from __future__ import annotations

import logging

from core.errors import SearchsvcError
from searchsvc.budget import Budget
from searchsvc.rewards import INVALID_REWARD, RewardForm, reward
from workers.data.datasets import Splits
from workers.measurement.latency import LatencyProbe, time_probe
from workers.measurement.measure import count_macs, count_parameters
from workers.measurement.metrics import CandidateMetrics
from workers.training.teacher import Teacher
from workers.training.train import resolve_device

log = logging.getLogger(__name__)


class RewardRule:
    """A run's reward: `size` ("params", "nonzero_params", "macs" or "latency_ms") counted against the teacher's
    (timed here for latency, at the budget's setting, else torch at batch 1)."""

    def __init__(self, teacher: Teacher, splits: Splits, device: str, form: RewardForm, size: str,
                 budget: Budget | None, penalise_over_budget: bool = False) -> None:
        self.form, self.size, self.budget = form, size, budget
        self.penalise = penalise_over_budget and budget is not None  # scaled by Budget.overshoot (N2N)
        self.teacher_val_accuracy = teacher.val_accuracy  # what rewards compare against
        self.teacher_size = self._teacher_size(teacher, splits, device)

    def _teacher_size(self, teacher: Teacher, splits: Splits, device_name: str) -> float:
        """The teacher's value of `size`: what a candidate's compression is counted against."""
        model = teacher.model
        if self.size in ("params", "nonzero_params"):
            return count_parameters(model)
        if self.size == "macs":
            return count_macs(model, splits.inputs)
        probe, device = self.latency_probe(), resolve_device(device_name)
        value = time_probe(model.to(device), probe, device, splits.inputs)
        if value is None:
            raise SearchsvcError(f"search.reward_size: latency_ms: the teacher cannot be timed ({probe.describe()})")
        log.info("teacher latency for the reward: %.3f ms (%s)", value, probe.describe())
        return value

    def latency_probe(self) -> LatencyProbe:
        """The latency setting `latency_ms` counts: the budget's, else torch at batch 1."""
        return (self.budget.probe() if self.budget is not None else None) or LatencyProbe()

    def of(self, m: CandidateMetrics) -> float:
        """A valid candidate's reward: compression on `size` against the teacher's, validation accuracy
        against the teacher's; scaled down by how far it is over budget when the method asks for it."""
        if self.size == "latency_ms":
            size = m.get(self.latency_probe().column)
        elif self.size == "macs":
            size = m.get("nonzero_macs", m.get("macs"))
        else:
            size = m.get(self.size)
        if size is None:  # a latency the worker could not take (the model did not export): nothing to reward
            return INVALID_REWARD
        value = reward(size, m.val_accuracy, self.teacher_size, self.teacher_val_accuracy, self.form)
        return value * self.budget.overshoot(m.get) if self.penalise else value
