"""`method: n2n` — network-to-network compression by reinforcement learning (Ashok et al., 2018).

Two stages, as in the paper: an agent first chooses which blocks of the teacher to remove, then how
much to shrink each block the best removal result kept. Every action is a candidate the actor pool
distills and scores; the reward trades compression against accuracy (`searchsvc.rewards`).

The agent is RLlib PPO on the new API stack (RLlib 2.x has no A3C) with a policy that reads one unit's
descriptor at a time (`policy.UnitPolicy`: transferable to a teacher of another depth, `search.policy_from`) or
RLlib's MLP over the flattened descriptors, or `random` as the baseline. The budget counts candidates trained
in this run: cache hits are free and still rewarded, so the agent can revisit good networks cheaply.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from core.errors import SearchsvcError
from searchsvc.methods.n2n import N2NSearch
from searchsvc.methods.n2n.env import (
    CompressionEnv,
    CompressionVectorEnv,
    Stage,
    observation_rows,
    removal_stage,
    shrink_stage,
)
from searchsvc.reporting.rows import ResultRow
from searchsvc.running.job import RunContext
from searchsvc.running.ray_start import ensure_ray
from searchsvc.running.recorder import Evaluator
from searchsvc.sweeps.logs import one_line_logs
from storage import layout
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import stored_metrics
from workers.models.structure import structure_of, widths_after

log = logging.getLogger(__name__)
ENV_NAME = "searchsvc-n2n"
STEP_CAP = 4  # total env steps (cache hits included) are capped at this many times the budget
RLLIB_LOGGERS = ("ray.rllib",)  # where RLlib's env runner logs a failed env step, with its traceback


@dataclass
class StageBudget:
    """One stage's budget, deadline and evaluator, shared by its environments (handed over in `LiveSession`)."""

    evaluator: Evaluator
    search: N2NSearch
    budget: int  # candidates this stage may train
    deadline: float  # time.monotonic() past which nothing new is trained
    stage: Stage
    observation: np.ndarray
    trained: int = 0
    steps: int = 0

    def exhausted(self) -> bool:
        """Budget spent, time up, target compression reached, or too many (cached) steps."""
        target = self.search.target_compression
        reached = target is not None and any(
            (r.compression or 0) >= target and r.ok for r in self.evaluator.rows.values())
        return (self.trained >= self.budget or time.monotonic() >= self.deadline or reached
                or self.steps >= STEP_CAP * self.budget)

    def evaluate(self, specs: list[CandidateSpec]) -> list[float | None]:
        """Rewards for `specs`; None for a spec that would need training past the budget."""
        self.steps += len(specs)
        allowed: dict[str, CandidateSpec] = {}  # a spec twice in one batch is trained (and counted) once
        for spec in specs:
            known = (spec.spec_hash in allowed or spec.spec_hash in self.evaluator.rows
                     or stored_metrics(self.evaluator.context.store, spec.spec_hash) is not None)
            if known or (self.trained < self.budget and time.monotonic() < self.deadline):
                allowed[spec.spec_hash] = spec
                self.trained += 0 if known else 1
        rows = {row.spec_hash: row for row in self.evaluator.evaluate(list(allowed.values()))}
        return [rows[s.spec_hash].reward if s.spec_hash in rows else None for s in specs]


class LiveSession:
    """The stage's `StageBudget`, handed to `make_env` through RLlib's env_config, by reference.

    RLlib deep-copies its config (`AlgorithmConfig.build_algo`, `.copy`): the copy keeps this very holder,
    so the environments step the driver's own budget and evaluator. `Algorithm.save_to_path` pickles the
    config into every checkpoint (class_and_ctor_args.pkl), and RLlib's logger into params.pkl: they hold an
    empty holder, never the session (its store client, actor pool and rows)."""

    def __init__(self, session: StageBudget | None) -> None:
        self.session = session

    def __deepcopy__(self, memo: dict[int, Any]) -> LiveSession:
        return self

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return (LiveSession, (None,))


def make_env(env_config: dict[str, Any]) -> CompressionEnv | CompressionVectorEnv:
    """RLlib's env creator: the vector env when it asks for `num_envs`, else a single env."""
    session = env_config["session"].session
    if session is None:  # a pickled config: only the driver's own env runner (num_env_runners=0) has the session
        raise SearchsvcError("the n2n environment runs only in the driver's process (num_env_runners=0)")
    if "num_envs" in env_config:
        return CompressionVectorEnv(session.observation, session.stage, session.evaluate, env_config["num_envs"])
    return CompressionEnv(session.observation, session.stage, session.evaluate)


def run_random(session: StageBudget, seed: int) -> None:
    """The baseline: uniform random actions, `num_envs` candidates at a time, until the budget is spent."""
    space = session.stage.action_space()
    space.seed(seed)
    while not session.exhausted():
        session.evaluate([session.stage.make_spec(space.sample()) for _ in range(session.search.num_envs)])


def _ppo_config(session: StageBudget, seed: int) -> Any:
    """RLlib PPO on the stage's vector env in this process, with the unit policy (searchsvc.methods.n2n.policy)
    or RLlib's default MLP."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.connectors.env_to_module import FlattenObservations
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from searchsvc.methods.n2n.policy import UnitPolicy

    register_env(ENV_NAME, make_env)
    search = session.search
    batch = max(search.iteration_evaluations, search.num_envs)
    config = (
        PPOConfig()
        .environment(ENV_NAME, env_config={"session": LiveSession(session)})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=search.num_envs,
                     gym_env_vectorize_mode="vector_entry_point", rollout_fragment_length="auto",
                     env_to_module_connector=lambda env, spaces=None, device=None: FlattenObservations())
        # Every sample is a distilled network, so each is reused hard: 10 passes of minibatches of 8 at lr 3e-3
        # (PPO's clip bounds each iteration's change). The former 4 passes at 3e-4 left the policy near uniform after
        # 128 evaluations (benchmarks/n2n_landscape.py: mean reward of the last quarter's proposals 0.451 against
        # 0.465 now and random search's 0.431, 20 seeds on ResNet-20's table).
        .training(train_batch_size_per_learner=batch, minibatch_size=min(batch, 8), num_epochs=10, lr=3e-3,
                  entropy_coeff=0.01)
        # The env runs in this process (num_env_runners=0: RLlib has no remote env runner to restart); the workers
        # that die are the pool's actors, and the pool retries their candidates on fresh ones (bounded). A step that
        # fails past that (RLlib raises a RuntimeError from the pool's error) ends the run: no sub-env restart.
        .fault_tolerance(restart_failed_env_runners=True, restart_failed_sub_environments=False)
        .debugging(seed=seed)
    )
    if search.policy == "units":
        config = config.rl_module(rl_module_spec=RLModuleSpec(module_class=UnitPolicy))
    return config


def run_ppo(session: StageBudget, seed: int, checkpoints: str, restore: bool, transfer: bytes | None = None,
            trained: str | None = None) -> list[dict[str, Any]]:
    """PPO on the vector env until the stage's budget is spent; returns per-iteration summaries.

    The algorithm is checkpointed to the store under `checkpoints` every `checkpoint_every`
    iterations; with `restore`, training continues from the last checkpoint there. `transfer`: another run's
    trained policy (policy.load_policy) to start from; `trained`: where this stage's policy is stored when done.
    """
    from searchsvc.methods.n2n.policy import load_policy, policy_weights

    search = session.search
    algo = _ppo_config(session, seed).build_algo()
    store = session.evaluator.context.store
    history: list[dict[str, Any]] = []
    try:
        if restore and store.exists(layout.file_in(checkpoints, layout.RLLIB_CHECKPOINT)):
            with tempfile.TemporaryDirectory() as folder:
                store.get_tree(checkpoints, folder)
                algo.restore_from_path(folder)
            log.info("n2n: PPO restored from %s", store.uri_for(checkpoints))
        elif transfer is not None:
            load_policy(algo, transfer, f"run {search.policy_from}", search.transfer_temperature)
            log.info("n2n: PPO starts from run %s's trained policy", search.policy_from)
        while not session.exhausted():
            with one_line_logs(RLLIB_LOGGERS):  # a failed env step: RLlib's own traceback in one line (--debug: all)
                result = algo.train()
            runners = result.get("env_runners", {})
            history.append({"iteration": len(history) + 1, "trained": session.trained,
                            "episode_return_mean": runners.get("episode_return_mean")})
            log.info("n2n PPO iteration %d: mean reward %s, %d/%d trained", len(history),
                     runners.get("episode_return_mean"), session.trained, session.budget)
            if len(history) % search.checkpoint_every == 0:
                with tempfile.TemporaryDirectory() as folder:
                    algo.save_to_path(folder)
                    store.put_tree(checkpoints, folder)
        if trained is not None:  # the stage is done: its policy, for other runs to start from
            raw = policy_weights(algo)
            store.put_bytes(layout.file_in(trained, layout.POLICY_WEIGHTS), raw)
            store.write_manifest(trained, {layout.POLICY_WEIGHTS: raw})
    finally:
        algo.stop()
    return history


def run_n2n(context: RunContext) -> None:
    """The n2n driver: removal stage, then shrink stage on the best removal result; resumable."""
    ensure_ray(context.address)
    search: N2NSearch = context.config.search
    teacher = context.teacher.model
    base = CandidateSpec(arch=context.config.teacher.base, teacher=context.teacher.teacher_hash,
                         dataset=context.config.dataset, train=context.config.train, method="n2n",
                         seed=context.config.seed)
    shrink_budget = math.floor(search.max_evaluations * search.shrink_share) if search.shrink else 0
    budgets = {"removal": search.max_evaluations - shrink_budget, "shrink": shrink_budget}
    deadline = time.monotonic() + (search.time_budget_s or math.inf)
    state_key = layout.run_state(context.run_id, layout.N2N_STATE)
    state = {"done": [], "history": {}}
    if context.resumed and context.store.exists(state_key):
        state = context.store.get_json(state_key)
    units = structure_of(teacher, context.splits.inputs)
    if not units.names:
        raise SearchsvcError(f"method n2n: {context.config.teacher.base} has no removable unit (a block whose input "
                             f"and output shapes match, with a skip connection, or a conv or linear layer whose "
                             f"removal leaves a network that runs): use method grid")
    source = search.policy_from
    if source is not None and not any(context.store.exists(layout.manifest(layout.trained_policy(source, stage)))
                                       for stage in ("removal", "shrink")):
        raise SearchsvcError(f"search.policy_from: run {source} in {context.store.uri} has no trained n2n policy (a "
                             f"finished PPO stage with policy: units)")
    evaluator = Evaluator(context, search.reward, total=search.max_evaluations, reward_size=search.reward_size,
                          penalise_over_budget=True)
    try:
        for name in ("removal", "shrink"):
            if name in state["done"] or budgets[name] == 0:
                continue
            if name == "removal":
                stage = removal_stage(units.names, base, units.members)
            else:
                continuous = search.min_ratio if search.shrink_ratios == "continuous" else None
                best = _best_removal(evaluator, base)
                inner = widths_after(teacher, context.splits.inputs, best.removed, units.inner)
                stage = shrink_stage(best, inner, search.width_scales, search.round_to, continuous,
                                     units.kernels if search.shrink_kernels else None)
                if not stage.blocks:  # the best removal kept no block: nothing left to shrink
                    log.info("n2n: the best removal result keeps no block; skipping the shrink stage")
                    continue
            session = StageBudget(evaluator, search, budgets[name], deadline, stage,
                                  observation_rows(units, stage.blocks), trained=_trained_in_stage(evaluator, name))
            state["history"][name] = _run_stage(session, context.config.seed + len(state["done"]), context.run_id,
                                                name, context.resumed)
            state["done"].append(name)
            context.store.put_json(state_key, state)
        if search.top_k and search.finetune_epochs:
            finetune_top(evaluator, search)
    finally:
        evaluator.close()


def finetune_top(evaluator: Evaluator, search: N2NSearch) -> list[ResultRow]:
    """Distill the top-k networks further (from their own weights) and measure them again.

    Each fine-tuned network is a new candidate (`init` = the parent's hash), so both accuracies are
    in the results: the fine-tuned row's `accuracy` and its `parent_accuracy`.
    """
    searched = [r for r in evaluator.rows.values() if r.ok and not r.finetuned_from]
    top = sorted(searched, key=lambda r: r.reward, reverse=True)[: search.top_k]
    store = evaluator.context.store
    specs = []
    for row in top:
        parent = CandidateSpec.from_json(store.get_bytes(layout.candidate_spec(row.spec_hash)).decode())
        recipe = replace(parent.train, epochs=search.finetune_epochs, max_images=None)  # full epochs
        specs.append(replace(parent, init=row.spec_hash, train=recipe))
    log.info("n2n: fine-tuning the top %d networks for %d epochs", len(specs), search.finetune_epochs)
    return evaluator.evaluate(specs)


def _trained_in_stage(evaluator: Evaluator, stage: str) -> int:
    """Candidates a resumed run already trained in `stage` (removal rows have no widths)."""
    return sum(1 for r in evaluator.rows.values() if not r.cached and not r.finetuned_from
               and (r.widths == "{}") == (stage == "removal"))


def _run_stage(session: StageBudget, seed: int, run_id: str, stage: str, restore: bool) -> list[dict[str, Any]]:
    if session.search.agent == "random":
        run_random(session, seed)
        return [{"trained": session.trained}]
    return run_ppo(session, seed, layout.ppo_checkpoint(run_id, stage), restore,
                   _transferred(session, stage), layout.trained_policy(run_id, stage))


def _transferred(session: StageBudget, stage: str) -> bytes | None:
    """The trained policy of `stage` in the run `search.policy_from` names (None: none is asked for, or that run
    has none for this stage — then this stage starts fresh, said in the log)."""
    source = session.search.policy_from
    if source is None:
        return None
    store = session.evaluator.context.store
    prefix = layout.trained_policy(source, stage)
    if not store.exists(layout.manifest(prefix)):
        log.info("n2n: run %s has no trained %s policy; this stage starts fresh", source, stage)
        return None
    return store.get_verified(prefix, layout.POLICY_WEIGHTS)


def _best_removal(evaluator: Evaluator, base: CandidateSpec) -> CandidateSpec:
    """The removal-stage candidate with the highest reward (the teacher's shape if none was valid)."""
    valid = [r for r in evaluator.rows.values() if r.ok and r.widths == "{}" and not r.finetuned_from]
    if not valid:
        return base
    best = max(valid, key=lambda r: r.reward)
    return replace(base, removed=tuple(json.loads(best.removed)))
