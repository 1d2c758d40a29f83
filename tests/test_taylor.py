"""Taylor pruning: the importance against brute force, exact surgery per iteration, the stop rule,
and the Tune sweep end to end (local and S3 stores, kill -9 and resume)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from searchsvc.cli import main
from searchsvc.config import ConfigError, load_config
from searchsvc.methods.taylor import TaylorStop
from searchsvc.methods.taylor.driver import prune_count, stop_reason
from searchsvc.reporting.rows import pareto_front
from searchsvc.reporting.table import table_rows
from storage import LocalStore, open_store
from tests.conftest import kill_run_when
from workers.compression.ranking import plan_removal
from workers.compression.taylor import (
    count_filters,
    prunable_channels,
    prune_groups,
    taylor_prune,
    taylor_scores,
)
from workers.data.datasets import DatasetConfig, load_dataset, normalize
from workers.measurement.measure import count_macs, count_parameters
from workers.models.inputs import InputSpec
from workers.models.surgery import predicted_params, width_keys
from workers.models.zoo import create_model
from workers.training.train import TrainConfig, train_model

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "taylor-smoke.yaml"
BATCH = 256

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def splits():
    return load_dataset(DatasetConfig(name="synthetic"))


def _batch_loss(model, splits, batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch `taylor_scores(batches=1, seed=seed)` sees, normalised."""
    order = torch.randperm(len(splits.train[1]), generator=torch.Generator().manual_seed(seed))[:batch]
    return normalize(splits.train[0][order], splits.mean, splits.std), splits.train[1][order]


def _loss_without(model, group, channel: int, x, y) -> float:
    """Batch loss with `channel` of `group` zeroed in every member (what removing it does)."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in group.members:
            bn = pruned.get_submodule(name)[1]
            bn.weight[channel] = 0
            bn.bias[channel] = 0
        return F.cross_entropy(pruned(x), y).item()


@pytest.mark.parametrize("seed,epochs,tolerance", [(0, 0, 0.05), (1, 0, 0.05), (2, 0, 0.05), (1, 1, 0.1)])
def test_lowest_taylor_score_is_the_channel_whose_removal_changes_the_loss_least(splits, seed, epochs, tolerance):
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", splits.inputs.channels, splits.num_classes)
    if epochs:
        # BN statistics as the training steps leave them (no recalibration): the model these tolerances were
        # set on; the test is about the importance estimate of a given model, whichever its statistics.
        recipe = TrainConfig(epochs=epochs, batch_size=64, augment=False, bn_recalibration_batches=0)
        train_model(model, splits, recipe, torch.device("cpu"), seed=seed, progress=False)
    model.eval()
    scores = taylor_scores(model, splits, batches=1, batch_size=BATCH, seed=0)
    x, y = _batch_loss(model, splits)
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
    for group in prune_groups(model.arch):
        change = torch.tensor([abs(_loss_without(model, group, k, x, y) - base)
                               for k in range(width_keys(model.arch)[group.key])])
        lowest = int(scores[group.key].argmin())
        gap = (change[lowest] - change.min()) / (change.max() - change.min())
        assert gap <= tolerance, f"{group.key}: Taylor's lowest channel {lowest} changes the loss by {change[lowest]:.4f}, " \
                                 f"the least any channel does is {change.min():.4f}"
        assert (scores[group.key] >= 0).all()  # raw |a·g| means: the ranking normalises them


def test_a_dead_channel_scores_zero_and_the_model_is_left_unchanged(splits):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", splits.inputs.channels, splits.num_classes).eval()
    with torch.no_grad():
        bn = model.get_submodule("layer2.0.conv1")[1]
        bn.weight[5] = 0
        bn.bias[5] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = taylor_scores(model, splits, batches=2, batch_size=64)
    assert scores["layer2.0"][5] == 0 and int(scores["layer2.0"].argmin()) == 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["tiny_cnn", "resnet20", "resnet18_cifar"])
def test_groups_cover_every_conv_exactly_once(arch):
    model = create_model(arch, 3, 10)
    members = [m for g in prune_groups(model.arch) for m in g.members]
    convs = [name.removesuffix(".0") for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(members) == sorted(convs)
    assert count_filters(model) == sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    streams = [g for g in prune_groups(model.arch) if "." not in g.key]
    assert all(len(g.members) >= 2 for g in streams)  # residual-coupled layers are one group


def test_plan_removes_the_lowest_scores_across_groups_and_keeps_one_channel_each():
    scores = {"a": torch.tensor([0.1, 0.9, 0.05]), "b": torch.tensor([0.2, 0.01]), "c": torch.tensor([0.0])}
    assert plan_removal(scores, 2) == {"a": 1, "b": 1}  # 0.01 (b) and 0.05 (a); c's only channel stays
    assert plan_removal(scores, 3) == {"a": 2, "b": 1}
    assert plan_removal(scores, 100) == {"a": 2, "b": 1}  # every group keeps its last channel


def test_each_iteration_removes_exactly_the_planned_filters_and_parameters(splits):
    torch.manual_seed(0)
    model = create_model("resnet20", splits.inputs.channels, splits.num_classes)
    count = prune_count(0.1, prunable_channels(model, InputSpec.image(1, 16)))
    assert count == round(0.1 * (16 + 32 + 64 + 3 * (16 + 32 + 64)))
    for _ in range(3):
        scores = taylor_scores(model, splits, batches=1, batch_size=64)
        student, plan = taylor_prune(model, splits, count, batches=1, batch_size=64)
        assert sum(plan.values()) == count
        members = {g.key: len(g.members) for g in prune_groups(model.arch)}
        assert count_filters(student) == count_filters(model) - sum(n * members[k] for k, n in plan.items())
        before, after = width_keys(model.arch), width_keys(student.arch)
        assert all(after[k] == before[k] - plan.get(k, 0) for k in before)
        # the channels removed are the lowest scored: every kept one scores at least as high
        for key, n in plan.items():
            ordered = scores[key].sort().values
            assert ordered[n - 1] <= ordered[n]
        assert count_parameters(student) == predicted_params(student.arch) < count_parameters(model)
        out = student(splits.inputs.batch(2))
        assert out.shape == (2, splits.num_classes)
        model = student


def test_stop_rule_bounds():
    assert stop_reason(0.90, 0.91, TaylorStop(max_drop=2.0)) is None
    assert "points below" in stop_reason(0.885, 0.91, TaylorStop(max_drop=2.0))
    assert "min_accuracy" in stop_reason(0.80, 0.81, TaylorStop(min_accuracy=0.85, max_drop=50))


def test_bad_taylor_settings_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"search.filters_per_iteration: a fraction must be in \(0, 1\)"):
        load_config(SMOKE, ["search.filters_per_iteration=1.5"])
    with pytest.raises(ConfigError, match=r"search.tune.lr.high: must be at least low"):
        load_config(SMOKE, ["search.tune.lr={low: 0.1, high: 0.01}"])
    assert main(["validate", str(SMOKE), "--set", "search.tune.epochs=[0]"]) == 2
    assert "search.tune.epochs[0]" in capsys.readouterr().err


def test_pareto_front_keeps_only_undominated_rows(make_row):
    rows = [make_row(spec_hash=h, status="ok", params=p, val_accuracy=a, accuracy=1 - a)
            for h, p, a in [("a", 100, 0.9), ("b", 50, 0.85), ("c", 60, 0.80), ("d", 50, 0.84), ("e", 10, 0.5)]]
    rows.append(make_row(spec_hash="x", status="invalid", params=None, val_accuracy=None, accuracy=0.0))
    assert pareto_front(rows) == {"a", "b", "e"}  # chosen on validation accuracy: test accuracy plays no part
    assert pareto_front(rows, accuracy="accuracy") == {"e"}


# ---- the Tune sweep end to end ----------------------------------------------------------------------------

def _run(store: str, *sets: str, endpoint: str | None = None) -> dict:
    args = ["run", str(SMOKE), "--store", store, "--no-progress"]
    if endpoint:
        args += ["--s3-endpoint", endpoint]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    opened = open_store(store, endpoint=endpoint)
    run_id = sorted({k.split("/")[1] for k in opened.list("runs/")})[-1]
    return {"store": opened, "run_id": run_id, "record": opened.get_json(f"runs/{run_id}/run.json")}


def test_a_huge_prune_step_fires_the_stop_rule_after_one_iteration(tmp_path, ray_session):
    run = _run(str(tmp_path / "s"), "search.tune.num_samples=1", "search.tune.filters_per_iteration=[]",
               "search.tune.distill=[]", "search.filters_per_iteration=1000", "search.stop.max_drop=2",
               "search.round_to=1")  # any width: every group may go down to one channel
    store, run_id = run["store"], run["run_id"]
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["iteration"] == 1
    assert "points below the teacher's" in rows[0]["stop_reason"]
    arch = json.loads(store.get_bytes(f"candidates/{rows[0]['spec_hash']}/metrics.json"))["arch"]
    assert {s[0]["mid"] for s in arch["stages"]} == {1} and arch["stem"] == 1  # every group down to one channel
    trials = store.get_json(f"runs/{run_id}/trials.json")
    assert [t["best"] for t in trials.values()] == [None]  # nothing within the rule


def test_pruning_stops_at_the_first_iteration_within_budget_and_the_rest_fine_tune_it(tmp_path, ray_session):
    """A MACs budget 10 % under the teacher's, which a step of 15 % of the channels passes: iteration 1 stops at
    the fewest ranked channels within it (landing just under it, not a whole step past), so iterations 2 and 3
    fine-tune that model (same MACs and parameters, each built from the one before) instead of pruning further."""
    teacher_macs = count_macs(create_model("tiny_cnn", 1, 4), InputSpec.image(1, 16))
    limit = int(0.9 * teacher_macs)
    run = _run(str(tmp_path / "s"), "search.tune.num_samples=1", "search.tune.filters_per_iteration=[]",
               "search.filters_per_iteration=0.15", "search.stop.max_drop=100",
               f"search.budget={{macs: {limit}}}")
    store, run_id = run["store"], run["run_id"]
    rows = sorted(store.get_table(f"runs/{run_id}/results.parquet").to_pylist(), key=lambda r: r["iteration"])
    assert [r["iteration"] for r in rows] == [1, 2, 3] and all(r["status"] == "ok" for r in rows)
    assert [r["within_budget"] for r in rows] == [True, True, True]
    assert [r["phase"] for r in rows] == ["prune", "fine-tune", "fine-tune"]
    assert 0.85 * limit <= rows[0]["macs"] <= limit  # one channel of this tiny network is up to 4 % of its MACs
    for parent, child in zip(rows, rows[1:]):
        assert child["finetuned_from"] == parent["spec_hash"]
        assert (child["macs"], child["params"], child["filters"]) == (parent["macs"], parent["params"], parent["filters"])

    # The same sweep with an ONNX Runtime latency limit beside the MACs one, and int8 quantization: the same
    # trajectory, every candidate from the store, timed again and quantized inside its trial, and judged by it.
    budget = f"{{macs: {limit}, latency_ms: 1000, latency_batch: 2, latency_backend: onnxruntime}}"
    again = _run(str(tmp_path / "s"), "search.tune.num_samples=1", "search.tune.filters_per_iteration=[]",
                 "search.filters_per_iteration=0.15", "search.stop.max_drop=100", f"search.budget={budget}",
                 "quantize={calibration_batches: 1}")
    assert again["record"]["evaluations"] == 0
    timed = sorted(again["store"].get_table(f"runs/{again['run_id']}/results.parquet").to_pylist(),
                   key=lambda r: r["iteration"])
    assert [r["spec_hash"] for r in timed] == [r["spec_hash"] for r in rows]
    assert all(r["cached"] and r["ort_latency_b2_t1_ms"] > 0 and r["within_budget"] for r in timed)
    assert all(0 <= r["int8_accuracy"] <= 1 and r["int8_model_bytes"] > 0 for r in timed)


@pytest.mark.s3
def test_tune_sweep_of_two_trials_by_three_iterations_on_the_s3_store(s3_server, s3_env, ray_session):
    """The smoke config as shipped (its 10-point stop rule live): with batch-norm statistics re-estimated after
    each fine-tune both trials go past iteration 1 (without, the lagging statistics fired the rule at once)."""
    store_uri = f"s3://{s3_server.shared_bucket}/taylor-{time.time_ns()}"
    run = _run(store_uri, "search.tune.grace_period=3", endpoint=s3_server.endpoint)
    store, run_id, record = run["store"], run["run_id"], run["record"]
    assert record["status"] == "finished" and record["trials"] == 2 and record["evaluations"] >= 4
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    by_trial: dict[str, list[dict]] = {}
    for row in rows:
        by_trial.setdefault(row["trial"], []).append(row)
    assert len(by_trial) == 2
    for trial_rows in by_trial.values():
        trial_rows.sort(key=lambda r: r["iteration"])
        assert [r["iteration"] for r in trial_rows] in ([1, 2], [1, 2, 3]), trial_rows
        assert trial_rows[0]["finetuned_from"] is None  # iteration 1 prunes the teacher
        for parent, child in zip(trial_rows, trial_rows[1:]):
            assert child["finetuned_from"] == parent["spec_hash"]  # each prunes the one before
            assert child["params"] < parent["params"] and child["filters"] < parent["filters"]
        assert all(r["macs"] > 0 and r["status"] == "ok" for r in trial_rows)
    assert {r["spec_hash"] for r in rows if r["pareto"]} == pareto_front(table_rows(store.get_table(
        f"runs/{run_id}/results.parquet")))
    png = store.get_bytes(f"runs/{run_id}/plots/trajectory.png")
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # Tune's own experiment is on the S3 store, beside the run
    assert store.exists(f"runs/{run_id}/state/tune/tuner.pkl")
    assert any("checkpoint_" in k for k in store.list(f"runs/{run_id}/state/tune/"))
    # the best model of a trial loads from the store
    trials = store.get_json(f"runs/{run_id}/trials.json")
    best = next(t["best"] for t in trials.values() if t["best"])
    assert main(["export", "--store", store_uri, "--s3-endpoint", s3_server.endpoint, best["spec_hash"],
                 "-o", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"{best['spec_hash']}.pt")]) == 0


def test_a_tune_run_killed_mid_way_resumes_its_trials_without_retraining(tmp_path, ray_session):
    store_dir = tmp_path / "store"
    sets = ["search.iterations=3", "search.stop.max_drop=100", "search.tune.grace_period=3", "train.epochs=2",
            "resources.max_concurrent=1"]

    def ready(store: LocalStore) -> bool:
        keys = store.list("runs/")
        return sum("/evals/" in k for k in keys) >= 2 and any("experiment_state" in k for k in keys)

    store = kill_run_when(SMOKE, store_dir, sets, ready)
    run_id = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    assert store.get_json(f"runs/{run_id}/run.json")["status"] == "running"
    stored_before = {k.split("/")[1] for k in store.list("candidates/") if k.endswith("manifest.json")}
    recorded = [json.loads(store.get_bytes(k)) for k in store.list(f"runs/{run_id}/evals/")]
    trials_before = {row["trial"] for row in recorded}
    recorded_before = {row["spec_hash"] for row in recorded}
    assert main(["resume", "--store", str(store_dir), "--run", run_id, "--no-progress"]) == 0
    record = store.get_json(f"runs/{run_id}/run.json")
    assert record["status"] == "finished" and record["resumes"] == 1
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    assert trials_before <= {r["trial"] for r in rows}  # the same trials, restored, not a new sweep
    assert len({r["trial"] for r in rows}) == 2
    assert sorted(r["iteration"] for r in rows) == [1, 1, 2, 2, 3, 3]
    assert len({r["spec_hash"] for r in rows}) == len(rows) == 6
    assert len(recorded_before) < len(rows)  # the restored Tuner's reports reached the run's recorder too
    for row in rows:  # what the store held at the kill and the run had not recorded was looked up, not trained
        if row["spec_hash"] in stored_before and row["spec_hash"] not in recorded_before:
            assert row["cached"], row


def test_importance_keeps_no_activation_alive(splits):
    """A gradient hook that holds its own tensor is a cycle through autograd that Python cannot collect:
    every batch's activations would stay in memory (1.5 GB per call for resnet20 on Fashion-MNIST)."""
    import gc
    import weakref

    model = create_model("tiny_cnn", splits.inputs.channels, splits.num_classes)
    outputs: list[weakref.ref] = []
    probe = model.get_submodule("layer1.0.conv1").register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    taylor_scores(model, splits, batches=2, batch_size=64)
    probe.remove()
    gc.collect()
    assert len(outputs) == 2 and all(ref() is None for ref in outputs)


def test_choice_lists_are_a_grid_and_an_lr_range_is_sampled_per_combination():
    from searchsvc.methods.taylor.driver import param_space, trial_count

    config = load_config(SMOKE, ["search.tune.distill=[true, false]"])
    space = param_space(config.search, config.train)
    assert space["filters_per_iteration"] == {"grid_search": [0.05, 0.15]}
    assert space["distill"] == {"grid_search": [True, False]}
    assert space["lr"] == config.train.lr and space["epochs"] == config.train.epochs  # fixed
    assert trial_count(config.search) == 4
    ranged = load_config(SMOKE, ["search.tune.lr={low: 0.001, high: 0.1}", "search.tune.num_samples=3"])
    assert trial_count(ranged.search) == 2 * 3
