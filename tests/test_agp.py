"""Distiller-style gradual pruning: the AGP formula, masks that hold through training, scheduler state,
exact thinning, summaries, malformed schedules, sensitivity through the pool, and the Tune sweep."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from searchsvc.cli import main
from searchsvc.reporting.report import build_report
from storage import open_store
from workers.compression.agp import final_footprint, get_schedule
from workers.compression.pruners import PolicyStep, agp_sparsity
from workers.compression.schedule import CompressionScheduler, ScheduleError, load_schedule, parse_schedule
from workers.measurement.measure import count_macs
from workers.measurement.summary import compute_summary, sparsity_summary
from workers.models.inputs import InputSpec
from workers.models.thinning import alive_channels, thin
from workers.models.zoo import create_model
from workers.training.teacher import load_teacher
from workers.training.train import Recipe, TrainCallback, train_model

REPO = Path(__file__).resolve().parent.parent
SEED_SCHEDULE = REPO / "configs" / "schedules" / "simplenet_cifar.agp.yaml"
SMOKE = REPO / "configs" / "agp-smoke.yaml"
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zeros(tensor: torch.Tensor) -> float:
    return int((tensor == 0).sum()) / tensor.numel()


# ---- the AGP schedule ------------------------------------------------------------------------------------

def _seed_target(initial: float, final: float, epoch: int) -> float:
    """The seed's schedule by hand: pruning at epochs 1, 3, ..., 99; the cubic over span 98; held between."""
    if epoch < 1:
        return 0.0
    last = min(epoch if epoch % 2 == 1 else epoch - 1, 99)  # the latest pruning epoch so far
    return final + (initial - final) * (1 - (last - 1) / 98) ** 3


def test_seed_schedule_sparsity_matches_the_formula_at_every_epoch():
    model = create_model("simplenet_cifar", 3, 10)
    scheduler = CompressionScheduler(load_schedule(str(SEED_SCHEDULE), model), model)
    targets = {"conv1.weight": (0.15, 0.3), "conv2.weight": (0.15, 0.5), "fc1.weight": (0.15, 0.8),
               "fc2.weight": (0.15, 0.8), "fc3.weight": (0.15, 0.8)}
    params = dict(model.named_parameters())
    for epoch in range(0, 106):
        scheduler.on_epoch_begin(epoch)
        for name, (initial, final) in targets.items():
            expected = round(_seed_target(initial, final, epoch) * params[name].numel())  # weights zeroed
            assert int((params[name] == 0).sum()) == expected, (name, epoch)
    assert _zeros(params["fc1.weight"]) == pytest.approx(0.8)  # reached at epoch 99, then held
    assert _zeros(params["conv1.bias"]) == 0  # biases are never pruned


def test_agp_formula_reaches_both_ends_and_is_one_shot_without_span():
    step = lambda t: PolicyStep(t, 0, 10, 2)  # noqa: E731 — pruning epochs 0, 2, 4, 6, 8; span 8
    assert agp_sparsity(0.1, 0.9, step(0)) == pytest.approx(0.1)
    assert agp_sparsity(0.1, 0.9, step(8)) == pytest.approx(0.9)
    assert agp_sparsity(0.1, 0.9, step(4)) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    assert agp_sparsity(0.0, 0.6, PolicyStep(3, 3, 4, 1)) == 0.6  # a single epoch: the final level at once


class _ZeroWatch(TrainCallback):
    """After the scheduler, at every step: every masked weight is still exactly zero."""

    def __init__(self, scheduler: CompressionScheduler) -> None:
        self.scheduler, self.checks = scheduler, 0

    def on_minibatch_end(self, epoch: int, step: int, steps: int) -> None:
        params = dict(self.scheduler.model.named_parameters())
        for name, mask in self.scheduler.masks.items():
            assert bool((params[name][mask == 0] == 0).all()), (name, epoch, step)
            self.checks += 1


def test_seed_schedule_runs_two_epochs_and_pruned_weights_stay_exactly_zero(rgb32):
    model = create_model("simplenet_cifar", 3, rgb32.num_classes)
    scheduler = CompressionScheduler(load_schedule(str(SEED_SCHEDULE), model), model)
    watch = _ZeroWatch(scheduler)
    history = train_model(model, rgb32, Recipe(epochs=2, batch_size=64, lr=0.05, weight_decay=5e-4), CPU,
                          progress=False, callbacks=[scheduler, watch])
    assert [h["sparsity"] for h in history][0] == 0.0  # epoch 0: no policy acts yet
    assert history[1]["sparsity"] == pytest.approx(0.15, abs=0.002)  # epoch 1: every pruner at 15 %
    assert watch.checks > 0
    # momentum and weight decay would revive a masked weight if masks were applied only at epoch begin
    assert _zeros(model.fc1.weight) == pytest.approx(0.15, abs=1e-4)
    # StepLR stepped at the end of epoch 1 (policy epochs 1..99): 30 steps to the first decay
    assert scheduler.lr["pruning_lr"].last_epoch == 1


def test_scheduler_state_round_trips_through_torch_save(rgb32):
    model = create_model("simplenet_cifar", 3, rgb32.num_classes)
    scheduler = CompressionScheduler(load_schedule(str(SEED_SCHEDULE), model), model)
    train_model(model, rgb32, Recipe(epochs=2, batch_size=64, lr=0.05), CPU, progress=False, callbacks=[scheduler])
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    clone = copy.deepcopy(model)
    restored = CompressionScheduler(load_schedule(str(SEED_SCHEDULE), clone), clone)
    restored.on_train_begin(clone, torch.optim.SGD(clone.parameters(), lr=0.05))
    restored.load_state_dict(state)
    assert set(restored.masks) == set(scheduler.masks)
    assert all(torch.equal(restored.masks[k].bool(), scheduler.masks[k].bool()) for k in scheduler.masks)
    assert restored.lr["pruning_lr"].state_dict() == scheduler.lr["pruning_lr"].state_dict()
    assert restored.sparsity() == scheduler.sparsity()


def test_level_and_threshold_pruners_take_names_and_a_star_default():
    model = create_model("simplenet_cifar", 3, 10)
    raw = {"version": 1, "pruners": {
        "levels": {"class": "SparsityLevelParameterPruner", "levels": {"*": 0.5, "module.fc1.weight": 0.9}},
        "small": {"class": "MagnitudeParameterPruner", "thresholds": {"conv1.weight": 0.05}}},
        "policies": [{"pruner": {"instance_name": "levels"}, "epochs": [0]},
                     {"pruner": {"instance_name": "small"}, "epochs": [1]}]}
    scheduler = CompressionScheduler(parse_schedule(raw, model), model)
    small_before = int((model.conv1.weight.abs() <= 0.05).sum())
    scheduler.on_epoch_begin(0)
    assert _zeros(model.fc1.weight) == pytest.approx(0.9) and _zeros(model.fc3.weight) == pytest.approx(0.5)
    assert _zeros(model.conv1.bias) == 0  # '*' means every conv / linear weight, never a bias
    scheduler.on_epoch_begin(1)  # the threshold pruner replaces conv1's mask: |w| <= 0.05 only
    assert int((model.conv1.weight == 0).sum()) >= small_before


# ---- thinning and summaries ---------------------------------------------------------------------------------

def _structured(model, weights, final=0.5):
    raw = {"version": 1, "pruners": {"f": {"class": "StructuredAGP", "initial_sparsity": 0.2, "final_sparsity": final,
                                           "weights": weights}},
           "policies": [{"pruner": {"instance_name": "f"}, "starting_epoch": 0, "ending_epoch": 2}]}
    return CompressionScheduler(parse_schedule(raw, model), model)


def test_thinning_a_plain_cnn_keeps_outputs_and_drops_the_expected_macs(rgb32):
    model = create_model("simplenet_cifar", 3, rgb32.num_classes)
    scheduler = _structured(model, ["module.conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"])
    train_model(model, rgb32, Recipe(epochs=2, batch_size=64, lr=0.05), CPU, progress=False, callbacks=[scheduler])
    model.eval()
    alive = {k: int(v.sum()) for k, v in alive_channels(model).items()}
    assert alive == {"conv1": 3, "conv2": 8, "fc1": 60, "fc2": 42}  # half of 6, 16, 120, 84
    small, removed = thin(model)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    # MACs per image by hand: out x in x k² x output pixels, with the live channels only
    expected = 3 * 3 * 25 * 28 * 28 + 8 * 3 * 25 * 10 * 10 + 60 * (8 * 25) + 42 * 60 + rgb32.num_classes * 42
    assert count_macs(small, InputSpec.image(3, 32)) == expected
    assert removed == {"conv1": 3, "conv2": 8, "fc1": 60, "fc2": 42}
    assert compute_summary(small, InputSpec.image(3, 32))[-1]["macs"] == expected


def test_thinning_an_mlp_keeps_outputs_and_drops_the_expected_macs(rgb32):
    model = create_model("lenet_300_100", 3, rgb32.num_classes)
    scheduler = _structured(model, ["fc1.weight", "fc2.weight"])
    train_model(model, rgb32, Recipe(epochs=2, batch_size=64, lr=0.05), CPU, progress=False, callbacks=[scheduler])
    model.eval()
    small, removed = thin(model)
    assert removed == {"fc1": 150, "fc2": 50}
    assert (small.fc1.weight.shape, small.fc2.weight.shape, small.fc3.weight.shape) == ((150, 3 * 28 * 28), (50, 150),
                                                                                        (rgb32.num_classes, 50))
    x = torch.randn(8, 3, 32, 32)  # 32 px: max-pooled to the 28 x 28 it was built for
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert count_macs(small, InputSpec.image(3, 32)) == 150 * 3 * 28 * 28 + 50 * 150 + rgb32.num_classes * 50


def test_thinning_a_resnet_is_residual_aware_and_exact(rgb32):
    model = create_model("tiny_cnn", 3, rgb32.num_classes)
    before = compute_summary(model, InputSpec.image(3, 32))
    # an inner width, and a residual stream (naming one member prunes every layer adding into it)
    scheduler = _structured(model, ["layer1.0.conv1.0.weight", "layer2.0.conv2.0.weight"])
    train_model(model, rgb32, Recipe(epochs=2, batch_size=64, lr=0.05), CPU, progress=False, callbacks=[scheduler])
    model.eval()
    params = dict(model.named_parameters())
    dead = ~alive_channels(model)["layer2"]
    for member in ("layer2.0.conv2", "layer2.0.shortcut"):  # the whole stream is zero at the dead channels
        assert bool((params[f"{member}.0.weight"][dead] == 0).all() and (params[f"{member}.1.bias"][dead] == 0).all())
    small, removed = thin(model)
    assert removed == {"layer1.0": 4, "layer2": 8}
    assert small.arch.stages[0][0].mid == 4 and small.arch.stages[1][0].out == 8
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    macs = {r["name"]: r["macs"] for r in before}
    # halving layer1.0's inner width halves its two convs; halving layer2's stream halves the outputs
    # of its conv2 and shortcut and the inputs of the classifier
    expected_drop = (macs["layer1.0.conv1.0"] + macs["layer1.0.conv2.0"] + macs["layer2.0.conv2.0"]
                     + macs["layer2.0.shortcut.0"] + macs["fc"]) // 2
    assert count_macs(small, InputSpec.image(3, 32)) == count_macs(model, InputSpec.image(3, 32)) - expected_drop


def test_sparsity_summary_counts_zeros_and_totals():
    model = create_model("simplenet_cifar", 3, 10)
    with torch.no_grad():
        model.fc1.weight[:30] = 0  # 30 of 120 rows
    rows = sparsity_summary(model)
    fc1 = next(r for r in rows if r["name"] == "fc1.weight")
    assert (fc1["params"], fc1["nnz"], fc1["sparsity_pct"], fc1["zero_filters_pct"]) == (48000, 36000, 25.0, 25.0)
    total = rows[-1]
    assert total["name"] == "Total sparsity" and total["params"] == sum(r["params"] for r in rows[:-1])
    assert total["sparsity_pct"] == pytest.approx(100 * 12000 / total["params"])


# ---- malformed schedules --------------------------------------------------------------------------------

def _good() -> dict:
    return yaml.safe_load(SEED_SCHEDULE.read_text())


def _bad(change):
    raw = _good()
    change(raw)
    return raw


MALFORMED = {
    "unknown pruner class": (lambda r: r["pruners"]["conv1_pruner"].update({"class": "AutomaticGradualPruner"}),
                             "pruners.conv1_pruner.class: unknown pruner 'AutomaticGradualPruner' (did you mean "
                             "'AutomatedGradualPruner'?)"),
    "unknown parameter": (lambda r: r["pruners"]["fc_pruner"].update({"weights": ["module.fc4.weight"]}),
                          "pruners.fc_pruner.weights[0]: 'fc4.weight' is not a conv or linear weight"),
    "sparsity of 1": (lambda r: r["pruners"]["conv2_pruner"].update({"final_sparsity": 1.0}),
                      "pruners.conv2_pruner.final_sparsity"),
    "negative sparsity": (lambda r: r["pruners"]["conv2_pruner"].update({"initial_sparsity": -0.1}),
                          "pruners.conv2_pruner.initial_sparsity"),
    "final below initial": (lambda r: r["pruners"]["conv1_pruner"].update({"final_sparsity": 0.1}),
                            "pruners.conv1_pruner.final_sparsity: must be at least initial_sparsity"),
    "ending before starting": (lambda r: r["policies"][0].update({"ending_epoch": 1}),
                               "policies[0].ending_epoch: must be after starting_epoch (1), got 1"),
    "negative epoch list": (lambda r: r["policies"][1].update({"epochs": [3, -1]}), "policies[1].epochs"),
    "unknown instance": (lambda r: r["policies"][2]["pruner"].update({"instance_name": "fc_prunr"}),
                         "policies[2].pruner.instance_name: no pruner named 'fc_prunr'"),
    "unknown lr scheduler": (lambda r: r["lr_schedulers"]["pruning_lr"].update({"class": "StepLr"}),
                             "lr_schedulers.pruning_lr.class: must be one of"),
    "bad lr argument": (lambda r: r["lr_schedulers"]["pruning_lr"].update({"step": 30}),
                        "lr_schedulers.pruning_lr.step: StepLR has no such argument"),
    "wrong version": (lambda r: r.update({"version": 2}), "version: must be 1, got 2"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_schedule_names_its_key(case):
    change, message = MALFORMED[case]
    with pytest.raises(ScheduleError) as info:
        parse_schedule(_bad(change), create_model("simplenet_cifar", 3, 10))
    assert len(info.value.problems) == 1, info.value.problems
    assert message in info.value.problems[0]


def test_a_malformed_schedule_fails_validate_with_exit_2_and_one_line(tmp_path, capsys):
    schedule = tmp_path / "bad.yaml"
    schedule.write_text(yaml.safe_dump(_bad(MALFORMED["ending before starting"][0])))
    assert main(["validate", str(SMOKE), "--set", f"search.schedule={schedule}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "policies[0].ending_epoch" in err[0] and "Traceback" not in err[0]


def test_a_plain_cnn_is_refused_by_surgery_methods(capsys):
    assert main(["validate", str(REPO / "configs" / "taylor-smoke.yaml"), "--set", "teacher.arch=simplenet_cifar"]) == 2
    assert "teacher.arch: method taylor needs a residual network" in capsys.readouterr().err


# ---- through Ray: sensitivity and the Tune sweep ---------------------------------------------------------

def test_sensitivity_runs_each_layer_level_on_the_pool(tmp_path, ray_session, capsys):
    out = tmp_path / "start.agp.yaml"
    store_dir = tmp_path / "s"
    assert main(["sensitivity", str(SMOKE), "--store", str(store_dir), "--no-progress", "--levels", "0,0.5,0.9",
                 "--weights", "conv1.weight,fc1.weight", "--tolerance", "100", "--schedule-out", str(out)]) == 0
    store = open_store(str(store_dir))
    run_id = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    assert len(rows) == 6 and {r["method"] for r in rows} == {"sensitivity"}
    teacher = store.get_json(f"runs/{run_id}/run.json")["teacher_accuracy"]
    by_point = {(r["weight"], r["level"]): r for r in rows}
    assert by_point[("conv1.weight", 0.0)]["accuracy"] == pytest.approx(teacher)  # level 0 is the teacher
    weights = sum(m.weight.numel() for m in create_model("simplenet_cifar", 3, 4).modules() if hasattr(m, "weight"))
    assert by_point[("fc1.weight", 0.9)]["sparsity"] == pytest.approx(0.9 * 48000 / weights)
    assert all(r["artifact"] is None for r in rows)  # points are measured, not kept
    csv_lines = store.get_bytes(f"runs/{run_id}/sensitivity.csv").decode().strip().splitlines()
    assert csv_lines[0].startswith("weight,level,val_accuracy,accuracy,drop") and len(csv_lines) == 7
    val_teacher = store.get_json(f"runs/{run_id}/run.json")["teacher_val_accuracy"]
    point = by_point[("fc1.weight", 0.9)]  # the drop that picks the schedule is in validation points
    drop = 100 * (val_teacher - point["val_accuracy"])
    expected = f"fc1.weight,0.9,{point['val_accuracy']},{point['accuracy']},{drop},"
    assert any(line.startswith(expected) for line in csv_lines), csv_lines
    assert store.get_bytes(f"runs/{run_id}/plots/sensitivity.png")[:4] == b"\x89PNG"
    schedule = parse_schedule(yaml.safe_load(out.read_text()), create_model("simplenet_cifar", 3, 4))
    assert {p.final_sparsity for p in schedule.pruners.values()} == {0.9}  # tolerance 100: every layer at 0.9
    assert "conv1.weight" in capsys.readouterr().out


def test_agp_sweep_thins_records_and_summarises(tmp_path, ray_session, capsys):
    store_dir = tmp_path / "s"
    assert main(["run", str(SMOKE), "--store", str(store_dir), "--no-progress"]) == 0
    store = open_store(str(store_dir))
    run_id = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    teacher_params = sum(p.numel() for p in create_model("simplenet_cifar", 3, 4).parameters())
    for row in rows:
        metrics = store.get_json(f"candidates/{row['spec_hash']}/metrics.json")
        assert row["macs"] < row["macs_before_thinning"]  # structured filters removed: compute fell
        assert metrics["thinned"]["conv1"] >= 3 and row["sparsity"] > 0.3
        assert row["nonzero_params"] < row["params"] < teacher_params - 1000
        assert row["compression"] == pytest.approx(teacher_params / row["nonzero_params"])  # sparse size counts
        for kind in ("sparsity", "compute"):
            assert store.exists(f"runs/{run_id}/summaries/{row['spec_hash']}-{kind}.csv")
    assert {json.loads(r["sample"])["variant"]["final_sparsity"]["filters"] for r in rows} == {0.5, 0.7}
    assert capsys.readouterr().out.count("agp") >= 2
    assert "<h2>Sparsity schedule</h2><img" in build_report(store, run_id)
    # the summary command on a kept candidate: the table, and its CSV in the store
    best = rows[0]["spec_hash"]
    assert main(["summary", "--store", str(store_dir), best, "--kind", "compute"]) == 0
    printed = capsys.readouterr().out
    assert "Total" in printed and f"{rows[0]['macs']:,}" in printed
    assert store.exists(f"summaries/{best}-compute.csv")
    assert main(["summary", "--store", str(store_dir), "0123456789abcdef"]) == 2
    # A budget: each variant's smallest model is known before training (final_footprint, exact here: the
    # trials train past the schedule's end), the variant over it is skipped, and a budget nothing meets is
    # one line, exit 2, before any trial.
    teacher = load_teacher(store, store.get_json(f"runs/{run_id}/run.json")["teacher_hash"])
    example = InputSpec.image(3, 32).example(teacher.model)
    for row in rows:
        key = store.get_json(f"candidates/{row['spec_hash']}/spec.json")["schedule"]
        schedule = get_schedule(store, key, teacher.model, example)
        footprint = final_footprint(teacher.model, schedule, example, InputSpec.image(3, 32))
        assert (footprint["macs"], footprint["params"]) == (row["macs"], row["params"])
        # A budget judges a sparse model by its non-zero MACs: the trained model's zeros fall a little apart
        # from those of the teacher's pruned weights (11 of 147,733 here)
        assert footprint["nonzero_macs"] == pytest.approx(row["nonzero_macs"], rel=1e-3)
        row["footprint"] = footprint["nonzero_macs"]
    small = min(rows, key=lambda r: r["nonzero_macs"])
    reach = max(small["nonzero_macs"], small["footprint"])
    assert reach < min(r["footprint"] for r in rows if r is not small)
    assert main(["run", str(SMOKE), "--store", str(store_dir), "--no-progress",
                 "--set", f"search.budget={{macs: {reach}}}"]) == 0
    budget_run = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    kept = store.get_table(f"runs/{budget_run}/results.parquet").to_pylist()
    assert [(r["spec_hash"], r["within_budget"]) for r in kept] == [(small["spec_hash"], True)]
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--store", str(store_dir), "--no-progress",
                 "--set", f"search.budget={{macs: {min(r['footprint'] for r in rows) - 1}}}"]) == 2
    assert "search.budget: no setting of the sweep can meet it" in capsys.readouterr().err
