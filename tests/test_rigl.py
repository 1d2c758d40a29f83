"""RigL: exact non-zero budgets, ERK densities, drop/grow by hand, the cosine schedule, the optimizer
gate, static topology, and state that resumes training exactly."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workers.compression.rigl import RigLCallback, RigLScheduler, drop_and_grow, erk_densities, sparse_footprint
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset, normalize
from workers.evaluation.evaluate import load_candidate_model
from workers.models.inputs import InputSpec
from workers.models.zoo import create_model
from workers.training.train import Recipe, train_model

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    splits = load_dataset(DatasetConfig(name="synthetic", synthetic=SyntheticConfig(
        num_classes=4, channels=3, image_size=16, train_size=512, test_size=64)))
    return normalize(splits.train[0], splits.mean, splits.std), splits.train[1]


def _setup(seed: int = 0, **options):
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", 3, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, RigLScheduler(model, optimizer, **options)


def _steps(model, optimizer, scheduler, data, count: int, start: int = 0, check=None, amp: bool = False) -> list[float]:
    """The seed's loop over fixed batches (batch i is the same for every caller); `amp`: bf16 autocast."""
    x, y = data
    losses = []
    for i in range(start, start + count):
        index = torch.arange(i * 32, i * 32 + 32) % len(y)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x[index]), y[index])
        loss.backward()
        if scheduler():
            optimizer.step()
        scheduler.apply_masks()
        losses.append(loss.item())
        if check:
            check(scheduler)
    return losses


@pytest.mark.parametrize("distribution, amp", [("uniform", False), ("erk", False), ("erk", True)],
                         ids=["uniform", "erk", "erk-bf16-autocast"])
def test_non_zero_count_equals_the_target_after_every_step(data, distribution, amp):
    model, optimizer, scheduler = _setup(dense_allocation=0.2, T_end=150, delta=10, alpha=0.3,
                                         sparsity_distribution=distribution)
    target = scheduler.target_nonzeros()
    seen = []

    def check(s: RigLScheduler) -> None:
        assert [int(m.sum()) for m in s.masks] == target
        for w, m in zip(s.W, s.masks):
            assert bool((w[~m] == 0).all())  # nothing outside the mask is non-zero
        seen.append([m.clone() for m in s.masks])

    losses = _steps(model, optimizer, scheduler, data, 200, check=check, amp=amp)
    assert all(math.isfinite(v) for v in losses)
    assert scheduler.rigl_steps == 14  # steps 10, 20, ..., 140 (< T_end = 150)
    assert any(not torch.equal(a, b) for a, b in zip(seen[0], seen[-1]))  # the topology moved
    weights = sum(w.numel() for w in scheduler.W)
    assert sum(target) == pytest.approx(0.2 * weights, rel=0.02 if distribution == "erk" else 1.0)


def test_uniform_keeps_the_first_layer_and_linear_layers_dense():
    _, _, scheduler = _setup(dense_allocation=0.1, T_end=100)
    assert scheduler.densities[0] == 1.0 and scheduler.densities[-1] == 1.0  # stem conv, fc
    assert set(scheduler.densities[1:-1]) == {0.1}


def test_erk_densities_follow_the_formula_and_the_total():
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    densities = erk_densities(shapes, 0.1)
    sizes = [math.prod(s) for s in shapes]
    assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx(0.1 * sum(sizes))
    scale = densities[1] / (sum(shapes[1]) / sizes[1])  # the common ε
    for shape, size, density in zip(shapes, sizes, densities):
        assert density == pytest.approx(min(1.0, scale * sum(shape) / size))
    # a density above 1 makes that layer dense and re-spreads the rest
    tight = erk_densities([(4, 3, 3, 3), (512, 512, 3, 3)], 0.5)
    assert tight[0] == 1.0 and tight[1] == pytest.approx((0.5 * (108 + 2359296) - 108) / 2359296)


def test_drop_and_grow_by_hand():
    weight = torch.tensor([[0.9, -0.1, 0.0, 0.5], [0.0, 0.05, -0.7, 0.0]])
    mask = weight != 0  # 5 active
    grad = torch.tensor([[0.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    new = drop_and_grow(weight, mask, grad, fraction=0.5)  # k = int(0.5 * 5) = 2
    assert int(new.sum()) == 5
    dropped = mask & ~new
    grown = new & ~mask
    assert dropped.nonzero().tolist() == [[0, 1], [1, 1]]  # |w| 0.1 and 0.05: the two smallest active
    assert grown.nonzero().tolist() == [[0, 2], [1, 0]]  # |g| 3 and 2: the two largest inactive


def test_update_steps_skip_the_optimizer_and_the_fraction_decays_by_cosine(data):
    model, optimizer, scheduler = _setup(dense_allocation=0.3, T_end=60, delta=20, alpha=0.4)
    x, y = data
    answers = []
    for _ in range(80):
        optimizer.zero_grad()
        F.cross_entropy(model(x[:32]), y[:32]).backward()
        answers.append(scheduler())
    assert [i + 1 for i, a in enumerate(answers) if not a] == [20, 40]  # 60 = T_end: no update
    assert scheduler.update_fraction(0) == pytest.approx(0.4)
    assert scheduler.update_fraction(30) == pytest.approx(0.2)
    assert scheduler.update_fraction(45) == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.75)))
    assert scheduler.next_update() is None


def test_static_topology_never_changes_a_mask(data):
    model, optimizer, scheduler = _setup(dense_allocation=0.2, T_end=100, delta=5, static_topo=True)
    first = [m.clone() for m in scheduler.masks]
    _steps(model, optimizer, scheduler, data, 60)
    assert all(torch.equal(a, b) for a, b in zip(first, scheduler.masks)) and scheduler.rigl_steps == 0


def test_state_round_trip_reproduces_masks_and_losses(data):
    model, optimizer, scheduler = _setup(dense_allocation=0.2, T_end=200, delta=10, grad_accumulation_n=3)
    _steps(model, optimizer, scheduler, data, 47)  # mid-way through an accumulation window
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rigl": scheduler.state_dict()},
               buffer)
    reference = _steps(model, optimizer, scheduler, data, 50, start=47)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    clone = create_model("tiny_cnn", 3, 4)
    clone.load_state_dict(saved["model"])
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    clone_opt.load_state_dict(saved["optimizer"])
    restored = RigLScheduler(clone, clone_opt, dense_allocation=0.2, T_end=200, delta=10, grad_accumulation_n=3,
                             state_dict=saved["rigl"])
    assert _steps(clone, clone_opt, restored, data, 50, start=47) == reference
    assert all(torch.equal(a, b) for a, b in zip(restored.masks, scheduler.masks))
    assert restored.step == scheduler.step == 97 and restored.rigl_steps == scheduler.rigl_steps


def test_momentum_of_changed_weights_is_reset_and_regrown_weights_start_at_zero(data):
    model, optimizer, scheduler = _setup(dense_allocation=0.2, T_end=100, delta=10, alpha=0.5)
    _steps(model, optimizer, scheduler, data, 9)
    before = [m.clone() for m in scheduler.masks]
    x, y = data
    optimizer.zero_grad()
    F.cross_entropy(model(x[:32]), y[:32]).backward()
    assert scheduler() is False  # step 10: an update
    for w, old, new in zip(scheduler.W, before, scheduler.masks):
        grown = new & ~old
        momentum = optimizer.state[w]["momentum_buffer"]
        assert bool((w[grown] == 0).all()) and bool((momentum[new != old] == 0).all())


def test_rigl_in_train_model_with_a_resnet(data):
    splits = load_dataset(DatasetConfig(name="synthetic", synthetic=SyntheticConfig(
        num_classes=4, channels=3, image_size=16, train_size=512, test_size=64)))
    model = create_model("tiny_cnn", 3, 4)
    callback = RigLCallback(dense_allocation=0.25, delta=4, sparsity_distribution="erk")
    history = train_model(model, splits, Recipe(epochs=2, batch_size=64, lr=0.05), torch.device("cpu"),
                          progress=False, callbacks=[callback])
    scheduler = callback.scheduler
    total = 2 * (len(splits.train[1]) // 64)  # 14 steps: 461 training images after the validation split
    assert scheduler.step == total and scheduler.T_end == int(0.75 * total)
    assert scheduler.rigl_steps == len(range(4, scheduler.T_end, 4))
    weights = sum(w.numel() for w in scheduler.W)
    assert history[-1]["density"] == pytest.approx(sum(scheduler.target_nonzeros()) / weights)
    assert history[0]["moved"] > 0  # the update at step 4 moved weights; the share is what the report plots
    static = RigLCallback(dense_allocation=0.25, delta=4, static_topo=True)
    history = train_model(create_model("tiny_cnn", 3, 4), splits, Recipe(epochs=1, batch_size=64, lr=0.05),
                          torch.device("cpu"), progress=False, callbacks=[static])
    assert history[0]["moved"] == 0
    assert "next update: None" in repr(scheduler) and "layer1.0.conv1.0.weight" in repr(scheduler)


def test_bad_settings_name_the_argument():
    model = create_model("tiny_cnn", 3, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, key in [({"dense_allocation": 0}, "dense_allocation"), ({"T_end": None}, "T_end"),
                        ({"sparsity_distribution": "er"}, "sparsity_distribution"), ({"alpha": 1.5}, "alpha"),
                        ({"grad_accumulation_n": 100}, "grad_accumulation_n")]:
        with pytest.raises(ValueError, match=key):
            RigLScheduler(copy.deepcopy(model), optimizer, **{"T_end": 10, **kwargs})


def test_an_mlp_is_sparse_only_with_its_linear_layers_and_erk_thins_the_input_layer(data, capsys):
    from searchsvc.cli import main

    model = create_model("mlp_32", 3, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match="dense_allocation: no layer is left sparse"):
        RigLScheduler(model, optimizer, dense_allocation=0.1, T_end=50)
    scheduler = RigLScheduler(model, optimizer, dense_allocation=0.1, T_end=50, delta=5,
                              sparsity_distribution="erk", ignore_linear_layers=False)
    fc1, fc2 = scheduler.densities  # ERK: (784·3 + 32) / (784·3 · 32) vs (32 + 4) / (32 · 4)
    assert fc2 / fc1 == pytest.approx((36 / 128) / (2384 / (2352 * 32)))
    target = scheduler.target_nonzeros()
    assert sum(target) == pytest.approx(0.1 * sum(w.numel() for w in scheduler.W), abs=1)
    counts = []
    _steps(model, optimizer, scheduler, data, 40, check=lambda s: counts.append([int(m.sum()) for m in s.masks]))
    assert counts == [target] * 40
    assert scheduler.rigl_steps == 8
    # the job's check refuses the config that would train nothing sparse, naming the key
    assert main(["validate", str(REPO / "configs" / "rigl-smoke.yaml"), "--set", "teacher.arch=mlp_32"]) == 2
    assert "search.ignore_linear_layers: mlp_32 has no conv layer beyond its first" in capsys.readouterr().err


def test_the_sweep_can_put_rigl_and_the_static_baseline_side_by_side():
    from searchsvc.config import load_config
    from searchsvc.methods.rigl.driver import RigLJob, param_space, trial_spec

    config = load_config(REPO / "configs" / "fashion-mlp-rigl.yaml")
    space = param_space(config.search, config.train)
    assert space["static_topo"] == {"grid_search": [False, True]}
    job = RigLJob(store=None, arch="mlp_32", teacher_hash="0" * 16, dataset=config.dataset, train=config.train,
                  resources=config.resources, seed=0, search=config.search)
    sample = {k: v for k, v in space.items() if k != "static_topo"}
    specs = [trial_spec(job, {**sample, "static_topo": static}) for static in (False, True)]
    assert [dict(s.params)["static_topo"] for s in specs] == [False, True]
    assert specs[0].spec_hash != specs[1].spec_hash  # two candidates, stored apart
    assert dict(specs[0].params)["ignore_linear_layers"] is False


def test_rigl_sweep_records_density_and_non_zero_params(tmp_path, ray_session):
    from searchsvc.cli import main
    from storage import open_store

    store_dir = tmp_path / "s"
    assert main(["run", str(REPO / "configs" / "rigl-smoke.yaml"), "--store", str(store_dir), "--no-progress",
                 "--set", "train.epochs=2", "--set", "teacher.epochs=1"]) == 0
    store = open_store(str(store_dir))
    run_id = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    rows = store.get_table(f"runs/{run_id}/results.parquet").to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert {json.loads(r["sample"])["distribution"] for r in rows} == {"uniform", "erk"}
    teacher_params = sum(p.numel() for p in create_model("tiny_cnn", 1, 4).parameters())
    for row in rows:
        assert row["rigl_updates"] >= 1 and 0.2 < row["density"] < 0.35  # 25 % of the sparse layers, dense ends
        assert row["nonzero_params"] < 0.5 * row["params"]
        assert row["compression"] == pytest.approx(teacher_params / row["nonzero_params"])
        model = load_candidate_model(store, row["spec_hash"])
        nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
        assert nonzero == row["nonzero_params"]  # what was stored is as sparse as recorded
        assert store.exists(f"runs/{run_id}/summaries/{row['spec_hash']}-sparsity.csv")
    from searchsvc.cli import format_table
    from searchsvc.reporting.report import build_report
    from searchsvc.reporting.table import table_rows

    header = format_table(table_rows(store.get_table(f"runs/{run_id}/results.parquet"))).splitlines()[0].split()
    assert header[header.index("sparsity") + 1] == "updates"  # 0 would mark a static baseline
    assert "<h2>Sparsity schedule</h2><img" in build_report(store, run_id)
    # A budget: a setting's size is fixed from the first step (sparse_footprint gives the trained model's
    # counts), the setting over it is skipped, and a budget nothing meets is one line, exit 2, before any trial.
    for row in rows:
        footprint = sparse_footprint(create_model("tiny_cnn", 1, 4), InputSpec.image(1, 16), dense_allocation=0.25,
                                     sparsity_distribution=json.loads(row["sample"])["distribution"])
        assert (footprint["nonzero_params"], footprint["nonzero_macs"]) == (row["nonzero_params"], row["nonzero_macs"])
    small = min(rows, key=lambda r: r["nonzero_macs"])
    assert small["nonzero_macs"] < max(r["nonzero_macs"] for r in rows)
    run = ["run", str(REPO / "configs" / "rigl-smoke.yaml"), "--store", str(store_dir), "--no-progress",
           "--set", "train.epochs=2", "--set", "teacher.epochs=1"]
    assert main([*run, "--set", f"search.budget={{macs: {small['nonzero_macs']}}}"]) == 0
    budget_run = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    kept = store.get_table(f"runs/{budget_run}/results.parquet").to_pylist()
    assert [(r["spec_hash"], r["within_budget"]) for r in kept] == [(small["spec_hash"], True)]
    assert main([*run, "--set", f"search.budget={{macs: {small['nonzero_macs'] - 1}}}"]) == 2
