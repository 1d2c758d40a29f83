"""N2N: the environment, the reward, the budget, and PPO / random search end to end on real Ray."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from searchsvc.cli import main
from searchsvc.methods.n2n.env import (
    CompressionEnv,
    CompressionVectorEnv,
    observation_rows,
    removal_stage,
    shrink_stage,
)
from searchsvc.rewards import reward
from storage import LocalStore
from tests.conftest import kill_run_when
from workers.data.datasets import DatasetConfig
from workers.evaluation.spec import CandidateSpec
from workers.measurement.measure import count_macs
from workers.models.inputs import InputSpec
from workers.models.structure import structure_of
from workers.models.zoo import create_model
from workers.training.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "n2n-smoke.yaml"
BASE = CandidateSpec(arch="resnet20", teacher="t" * 16, dataset=DatasetConfig(name="synthetic"), train=TrainConfig())


def test_reward_forms_match_hand_computed_values():
    # teacher 1000 params at 0.9; student 250 params at 0.8: C = 0.75, accuracy ratio 8/9
    assert reward(250, 0.8, 1000, 0.9, "c_2_minus_c") == pytest.approx(0.75 * 1.25 * 8 / 9)
    assert reward(250, 0.8, 1000, 0.9, "c_over_2_minus_c") == pytest.approx(0.75 * 8 / 9 / 1.25)
    assert reward(1000, 0.9, 1000, 0.9) == 0.0  # no compression, no reward


def test_observation_is_one_normalised_row_of_8_per_removable_block():
    teacher = create_model("resnet20", 1, 10)
    units = structure_of(teacher, InputSpec.image(1, 16))
    blocks = units.names
    assert blocks == tuple(f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3))
    obs = observation_rows(units, blocks)
    assert obs.shape == (9, 8) and obs.dtype == np.float32
    assert obs.min() >= 0 and obs.max() == 1.0
    # column 3 is filters: 16, 32, 64 per stage → 0.25, 0.5, 1.0 after scaling by the largest
    assert obs[:, 3].tolist() == [0.25] * 3 + [0.5] * 3 + [1.0] * 3
    # column 5 is stride: the first block of stages 2 and 3 has stride 2
    assert obs[:, 5].tolist() == [0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 0.5]


def test_removal_action_removes_the_marked_blocks():
    blocks = ("layer1.0", "layer1.1", "layer2.0")
    stage = removal_stage(blocks, BASE)
    assert stage.action_space().nvec.tolist() == [2, 2, 2]
    assert stage.make_spec(np.array([1, 0, 1])).removed == ("layer1.0", "layer2.0")
    assert stage.make_spec(np.array([0, 0, 0])) == BASE


def test_shrink_action_scales_the_kept_blocks_inner_widths():
    base = CandidateSpec(**{**BASE.__dict__, "removed": ("layer1.1",)})
    stage = shrink_stage(base, {"layer1.0": {"layer1.0": 16}, "layer1.1": {"layer1.1": 16},
                                "layer2.0": {"layer2.0": 32}}, (0.25, 0.5, 1.0))
    assert stage.blocks == ("layer1.0", "layer2.0")
    spec = stage.make_spec(np.array([0, 1]))
    assert dict(spec.widths) == {"layer1.0": 4, "layer2.0": 16}
    assert spec.removed == ("layer1.1",)
    assert stage.make_spec(np.array([2, 2])).widths == ()  # scale 1.0 everywhere: the base itself


def test_continuous_shrinkage_takes_any_ratio_per_unit_bounded_below_and_rounded():
    """The paper's shrinkage: a ratio of each kept unit's widths, not one of a few scales."""
    base = CandidateSpec(**{**BASE.__dict__, "removed": ("a.1",)})
    inner = {"a.0": {"a.0": 64}, "a.1": {"a.1": 64}, "b.0": {"b.0.conv": 128, "b.0.fc": 10}}
    stage = shrink_stage(base, inner, (), round_to=8, min_ratio=0.25)
    space = stage.action_space()
    assert stage.blocks == ("a.0", "b.0") and space.shape == (2,) and space.low.tolist() == [0.25, 0.25]
    assert dict(stage.make_spec(np.array([0.3, 0.61], np.float32)).widths) == {"a.0": 24, "b.0.conv": 80,
                                                                                 "b.0.fc": 8}  # 10 wide: steps of 4
    assert dict(stage.make_spec(np.array([-3.0, 2.0])).widths) == {"a.0": 16}  # clipped to [0.25, 1]
    assert stage.make_spec(np.array([1.0, 1.0])) == base


def test_single_env_episode_is_one_step():
    calls = []
    stage = removal_stage(("a", "b"), BASE)
    env = CompressionEnv(np.zeros((2, 8), np.float32), stage, lambda specs: calls.append(specs) or [0.5] * len(specs))
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    _, r, terminated, truncated, info = env.step(np.array([1, 0]))
    assert (r, terminated, truncated) == (0.5, True, False) and len(calls) == 1
    assert info["spec_hash"] == stage.make_spec(np.array([1, 0])).spec_hash


def test_vector_env_evaluates_all_candidates_in_one_call_then_resets():
    batches = []

    def evaluate(specs):
        batches.append(len(specs))
        return [float(len(s.removed)) for s in specs]

    env = CompressionVectorEnv(np.zeros((2, 8), np.float32), removal_stage(("a", "b"), BASE), evaluate, num_envs=3)
    env.reset()
    _, rewards, terminated, truncated, _ = env.step(np.array([[1, 1], [0, 1], [0, 0]]))
    assert batches == [3] and rewards.tolist() == [2.0, 1.0, 0.0]
    assert terminated.all() and not truncated.any()
    _, rewards, terminated, truncated, _ = env.step(np.array([[1, 1], [1, 1], [1, 1]]))  # autoreset step
    assert batches == [3] and not rewards.any() and not terminated.any() and not truncated.any()


def test_vector_env_truncates_candidates_past_the_budget():
    env = CompressionVectorEnv(np.zeros((2, 8), np.float32), removal_stage(("a", "b"), BASE),
                               lambda specs: [0.3, None], num_envs=2)
    env.reset()
    _, rewards, terminated, truncated, _ = env.step(np.array([[1, 0], [0, 1]]))
    assert terminated.tolist() == [True, False] and truncated.tolist() == [False, True]
    assert rewards.tolist() == pytest.approx([0.3, 0.0])


def _run(store: Path, *sets: str) -> dict:
    args = ["run", str(SMOKE), "--store", str(store), "--no-progress"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    local = LocalStore(store)
    run_id = sorted({k.split("/")[1] for k in local.list("runs/")})[-1]
    return {"store": local, "run_id": run_id, "record": local.get_json(f"runs/{run_id}/run.json")}


def test_ppo_smoke_run_trains_at_least_two_iterations_and_writes_results(tmp_path, ray_session):
    run = _run(tmp_path / "s", "teacher.arch=resnet20", "teacher.epochs=1", "dataset.synthetic.train_size=256",
               "search.max_evaluations=12", "search.iteration_evaluations=4", "search.shrink_share=0.34")
    store, run_id, record = run["store"], run["run_id"], run["record"]
    assert record["status"] == "finished"
    assert 1 <= record["evaluations"] <= 12
    state = store.get_json(f"runs/{run_id}/state/n2n.json")
    assert state["done"] == ["removal", "shrink"]
    assert len(state["history"]["removal"]) >= 2 and len(state["history"]["shrink"]) >= 1
    assert store.exists(f"runs/{run_id}/state/removal/checkpoint/rllib_checkpoint.json")
    with (store.root / f"runs/{run_id}/state/removal/checkpoint/class_and_ctor_args.pkl").open("rb") as pkl:
        saved_config = pickle.load(pkl)["ctor_args_and_kwargs"][0][0]
    assert saved_config["env_config"]["session"].session is None  # the checkpoint holds no live session
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    assert len(rows) == len(store.list(f"runs/{run_id}/evals/")) == record["evaluations"] + record["cache_hits"]
    assert {r["method"] for r in rows} == {"n2n"}
    assert any(json.loads(r["widths"]) for r in rows)  # the shrink stage produced candidates


def test_top_k_are_fine_tuned_from_their_own_weights_and_both_accuracies_kept(tmp_path, ray_session):
    run = _run(tmp_path / "s", "teacher.arch=resnet20", "teacher.epochs=1", "dataset.synthetic.train_size=256",
               "search.agent=random", "search.max_evaluations=4", "search.shrink=false", "search.top_k=2",
               "search.finetune_epochs=2")
    store, run_id = run["store"], run["run_id"]
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    tuned = [r for r in rows if r["finetuned_from"]]
    searched = {r["spec_hash"]: r for r in rows if not r["finetuned_from"]}
    best_two = sorted((r for r in searched.values() if r["status"] == "ok"), key=lambda r: -r["reward"])[:2]
    assert sorted(r["finetuned_from"] for r in tuned) == sorted(r["spec_hash"] for r in best_two)
    for row in tuned:
        parent = searched[row["finetuned_from"]]
        assert row["parent_accuracy"] == parent["accuracy"] and row["params"] == parent["params"]
        spec = json.loads(store.get_bytes(f"candidates/{row['spec_hash']}/spec.json"))
        assert spec["init"] == parent["spec_hash"] and spec["train"]["epochs"] == 2
    assert run["record"]["evaluations"] == 4 + 2  # fine-tuning is on top of the search budget


def test_random_agent_respects_the_evaluation_budget_and_rewards_macs_or_latency_under_a_budget(tmp_path, ray_session):
    """Six evaluations, no more; with `reward_size: macs` and a MACs budget, each reward is the paper's form on
    MACs compression, scaled by limit / MACs when over budget, and within_budget marks exactly those at most
    the limit."""
    teacher = create_model("resnet20", 1, 4)
    teacher_macs = count_macs(teacher, InputSpec.image(1, 16))
    limit = int(0.6 * teacher_macs)
    run = _run(tmp_path / "s", "teacher.arch=resnet20", "teacher.epochs=1", "dataset.synthetic.train_size=256",
               "search.agent=random", "search.max_evaluations=6", "search.shrink=false",
               "search.reward_size=macs", f"search.budget={{macs: {limit}}}")
    record = run["record"]
    assert record["evaluations"] == 6
    rows = [r for r in run["store"].get_table(f"runs/{run['run_id']}/results.parquet").to_pylist()
            if r["status"] == "ok"]
    assert rows and {r["within_budget"] for r in rows} <= {True, False}
    for row in rows:
        assert row["within_budget"] == (row["macs"] <= limit)
        c = 1 - row["macs"] / teacher_macs
        expected = c * (2 - c) * row["val_accuracy"] / record["teacher_val_accuracy"] * min(1.0, limit / row["macs"])
        assert row["reward"] == pytest.approx(expected, rel=1e-9)

    # The same search rewarding ONNX Runtime latency under a latency budget nothing meets: the six candidates
    # proposed again come from the store, timed again at the budget's setting (cache hits do not count against
    # the six evaluations: six more are trained, and timed as they are measured); each reward is the form on
    # latency compression against the teacher's latency (timed by the driver), scaled by limit / latency.
    ort_budget = "{latency_ms: 0.001, latency_batch: 1, latency_backend: onnxruntime}"
    again = _run(tmp_path / "s", "teacher.arch=resnet20", "teacher.epochs=1", "dataset.synthetic.train_size=256",
                 "search.agent=random", "search.max_evaluations=6", "search.shrink=false",
                 "search.reward_size=latency_ms", f"search.budget={ort_budget}")
    record = again["record"]
    assert record["evaluations"] == 6 and record["cache_hits"] >= 6
    teacher_ms = record["teacher_reward_latency_ms"]
    assert teacher_ms > 0.001
    rows = [r for r in again["store"].get_table(f"runs/{again['run_id']}/results.parquet").to_pylist()
            if r["status"] == "ok"]
    assert sum(r["cached"] for r in rows) >= 6 and sum(not r["cached"] for r in rows) >= 1
    for row in rows:
        latency = row["ort_latency_b1_t1_ms"]
        assert row["within_budget"] is False and latency > 0.001
        c = 1 - latency / teacher_ms
        expected = c * (2 - c) * row["val_accuracy"] / record["teacher_val_accuracy"] * (0.001 / latency)
        assert row["reward"] == pytest.approx(expected, rel=1e-9)


def test_resume_after_kill_9_reuses_every_stored_evaluation(tmp_path, ray_session):
    """A driver killed mid-run (SIGKILL, its Ray with it) is resumed; nothing is trained twice."""
    store_dir = tmp_path / "store"
    sets = ["teacher.arch=resnet20", "teacher.epochs=1", "dataset.synthetic.train_size=256",
            "search.max_evaluations=16", "search.iteration_evaluations=4", "search.shrink_share=0.25",
            "train.epochs=2"]

    def ready(store: LocalStore) -> bool:
        keys = store.list("runs/")
        return any(k.endswith("removal/checkpoint/rllib_checkpoint.json") for k in keys)

    store = kill_run_when(SMOKE, store_dir, sets, ready)
    run_id = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    assert store.get_json(f"runs/{run_id}/run.json")["status"] == "running"  # killed: nothing wrote an end
    before = {k: store.get_bytes(k) for k in store.list(f"runs/{run_id}/evals/")}
    assert before
    assert main(["resume", "--store", str(store_dir), "--run", run_id, "--no-progress"]) == 0
    record = store.get_json(f"runs/{run_id}/run.json")
    assert record["status"] == "finished" and record["resumes"] == 1
    for key, data in before.items():  # recorded evaluations are untouched
        assert store.get_bytes(key) == data
    evals = [store.get_json(k) for k in store.list(f"runs/{run_id}/evals/")]
    trained = [e["spec_hash"] for e in evals if not e["cached"]]
    assert len(trained) == len(set(trained)) == record["evaluations"] <= 16
    # every recorded evaluation is in the store (a candidate in flight at the kill may be stored
    # without a row: proposed again, it would be a cache hit)
    assert {e["spec_hash"] for e in evals} <= {k.split("/")[1] for k in store.list("candidates/")}


def test_resume_of_a_finished_or_unknown_run_is_a_clear_error(tmp_path, capsys):
    assert main(["resume", "--store", str(tmp_path / "none"), "--run", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["resume", "--store", str(tmp_path), "--run", "../x"]) == 2
    assert "invalid run id" in capsys.readouterr().err


def test_a_candidate_proposed_twice_in_one_batch_counts_once_against_the_budget(tmp_path):
    """The session's budget logic alone: a recording stand-in replaces the Ray-backed evaluator."""
    from types import SimpleNamespace

    from searchsvc.methods.n2n.driver import StageBudget
    from searchsvc.reporting.rows import ResultRow

    class FakeEvaluator:
        def __init__(self):
            self.rows, self.sent = {}, []
            self.context = SimpleNamespace(store=LocalStore(tmp_path / "store"))

        def evaluate(self, specs):
            self.sent.append([s.spec_hash for s in specs])
            return [ResultRow(spec_hash=s.spec_hash, method="n2n", run_id="r", code_version="test", status="ok",
                              accuracy=0.5, reward=0.5, wall_s=0.0, cached=False, removed="[]", widths="{}")
                    for s in specs]

    stage = removal_stage(("a", "b"), BASE)
    evaluator = FakeEvaluator()
    session = StageBudget(evaluator, None, budget=2, deadline=float("inf"), stage=stage, observation=np.zeros((2, 8)))
    one, two = stage.make_spec(np.array([1, 0])), stage.make_spec(np.array([0, 1]))
    three = stage.make_spec(np.array([1, 1]))
    assert session.evaluate([one, one, two, three]) == [0.5, 0.5, 0.5, None]  # budget 2: `three` is past it
    assert session.trained == 2 and evaluator.sent == [[one.spec_hash, two.spec_hash]]


def test_the_live_session_is_shared_by_config_copies_and_never_pickled():
    """RLlib deep-copies its config (the envs must step the driver's own budget) and pickles it into each
    checkpoint (which must not hold the evaluator, its store and pool)."""
    from core.errors import SearchsvcError
    from searchsvc.methods.n2n.driver import LiveSession, make_env

    session = object()
    config = {"session": LiveSession(session)}
    assert copy.deepcopy(config)["session"].session is session
    unpickled = pickle.loads(pickle.dumps(config))
    assert unpickled["session"].session is None
    with pytest.raises(SearchsvcError, match="only in the driver's process"):
        make_env(unpickled)


@pytest.mark.parametrize("stop", ["search.target_compression=1.01", "search.time_budget_s=0.001"])
def test_a_stop_rule_ends_the_search_before_the_budget(tmp_path, ray_session, stop):
    run = _run(tmp_path / "s", "teacher.arch=resnet20", "teacher.epochs=1", "dataset.synthetic.train_size=256",
               "search.agent=random", "search.max_evaluations=40", "search.num_envs=2", "search.shrink=false", stop)
    assert run["record"]["status"] == "finished"
    assert run["record"]["evaluations"] < 40
