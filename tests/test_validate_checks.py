"""Issue 34: `validate` catches what `run` would fail on — grid removals and widths against the teacher's real
structure, numbers that overflow in training, fractions and image sizes out of range, a network whose data picks
its branch — each one line naming its key; resources no node has are refused by `run` before anything is
recorded; `results` shows the latest run that has results, saying which newer runs it passed over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from searchsvc.cli import main
from searchsvc.reporting.table import write_results
from storage import LocalStore, layout
from tests.conftest import REPO

GRID = REPO / "configs" / "grid-smoke.yaml"  # tiny_cnn: stem 8, layer1 (8, block layer1.0), layer2 (16, layer2.0)


def refusal(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI, require exit 2 with exactly one `searchsvc: error:` line and no traceback; return that line."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("searchsvc: error: ") and "Traceback" not in err, err
    return err


ZOO_REFUSALS = {
    "a negative width": ("search.candidates=[{widths: {layer2: -3}}]",
                         "search.candidates[0].widths.layer2: must be an integer in [1, 16]"),
    "a width above the teacher's": ("search.candidates=[{scale: 0.5}, {widths: {layer1.0: 9}}]",
                                    "search.candidates[1].widths.layer1.0: must be an integer in [1, 8]"),
    "a width naming no layer": ("search.candidates=[{widths: {layer9: 3}}]",
                                "search.candidates[0].widths.layer9: no width key 'layer9'"),
    "a removal naming no block": ("search.candidates=[{remove: [layer1.0, layer3.0]}]",
                                  "search.candidates[0].remove[1]: 'layer3.0' is not a block of tiny_cnn"),
    "an overflowing lr": ("train.lr=1e308", "train.lr: must be a number in (0, 10.0], got 1e+308"),
    "an overflowing teacher lr": ("teacher.lr=1e300", "teacher.lr: must be a number in (0, 10.0]"),
    "a huge weight decay": ("train.weight_decay=1e9", "train.weight_decay: must be a number in [0, 1.0]"),
    "a vanishing temperature": ("train.distill.temperature=1e-300",
                                "train.distill.temperature: must be a number in [0.01, 100.0]"),
    "a fraction above one": ("dataset.subset=1.5", "dataset.subset: a fraction (a float) must be in (0, 1]"),
    "an image of 100,000 px": ("dataset.image_size=100000", "dataset.image_size: must be an integer in [4, 4096]"),
    "a std that overflows": ("dataset={name: synthetic, mean: [0.5], std: [1e-300]}",
                             "dataset.std[0]: must be in [0.001, 1000]"),
    "a seed beyond torch's": ("seed=100000000000000000000", "seed: must be an integer in [0, 4294967295]"),
}


@pytest.mark.parametrize("case", sorted(ZOO_REFUSALS))
def test_validate_refuses_what_the_run_would_fail_on_in_one_line_naming_the_key(case, capsys):
    override, expected = ZOO_REFUSALS[case]
    err = refusal(capsys, "validate", str(GRID), "--set", override)
    assert expected in err, err


def test_one_image_with_too_many_values_is_refused_by_the_key_that_sets_its_channels(capsys):
    err = refusal(capsys, "validate", str(GRID), "--set", "dataset.synthetic.image_size=4096",
                  "--set", "dataset.synthetic.channels=4")
    assert f"dataset.synthetic.channels: 4 channels of 4096 x 4096 px make one image of {4 * 4096 * 4096} values" in err


def test_sweep_and_shrink_numbers_are_bounded_too(capsys):
    err = refusal(capsys, "validate", str(REPO / "configs" / "taylor-smoke.yaml"), "--set",
                  "search.tune.lr={low: 0.01, high: 1e300}")
    assert "search.tune.lr.high: must be a number in (0, 10.0]" in err, err
    err = refusal(capsys, "validate", str(REPO / "configs" / "n2n-smoke.yaml"),
                  "--set", "search.width_scales=[0.5, 1.5]")
    assert "search.width_scales[1]: a width multiplier must be in (0, 1], got 1.5" in err, err


def test_the_largest_values_within_the_bounds_still_validate(capsys):
    sets = ["train.lr=10", "teacher.lr=10", "train.weight_decay=1", "train.distill.temperature=100",
            "dataset.subset=1.0", "dataset.synthetic.image_size=4096", "dataset.synthetic.channels=3",
            "seed=4294967295", "search.candidates=[{remove: [layer1.0, layer2.0], widths: {layer2: 16, layer1: 1}}]"]
    capsys.readouterr()
    assert main(["validate", str(GRID), *[arg for s in sets for arg in ("--set", s)]]) == 0, capsys.readouterr().err


def test_config_reference_states_the_bounds(capsys):
    main(["config"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "(0, 10.0]" in lines["train.lr"] and "(0, 10.0]" in lines["teacher.lr"]
    assert "[0.01, 100.0]" in lines["train.distill.temperature"] and "[0, 1.0]" in lines["train.weight_decay"]
    assert "[4, 4096]" in lines["dataset.image_size"] and "3 x 4096 x 4096" in lines["dataset.image_size"]
    assert "(0, 1]" in lines["dataset.subset"]


def test_a_failing_config_records_nothing(tmp_path, capsys):
    store_dir = tmp_path / "store"
    refusal(capsys, "run", str(GRID), "--store", str(store_dir), "--set", "dataset.subset=1.5")
    assert not store_dir.exists()  # the config failed before the store was opened


@pytest.fixture
def user_config(tmp_path: Path) -> Path:
    """A grid config on the user's small residual network (tests/user_models/nets.py: width 8, blocks.0-3, blocks.2
    projects to 16 channels at stride 2) and synthetic 16 px gray images."""
    config = {"method": "grid", "dataset": {"name": "synthetic"}, "resources": {"gpus_per_eval": 0},
              "teacher": {"model": "tests.user_models.nets:small_resnet", "kwargs": {"num_classes": 4}},
              "search": {"candidates": [{"scale": 0.5}]}}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_grid_removals_and_widths_are_checked_against_a_user_models_traced_structure(user_config, capsys):
    candidates = ("[{remove: [blocks.2]}, {widths: {stem.0: 9}}, {remove: [blocks.1], widths: {blocks.1.body.0: 4}},"
                  " {remove: [blocks.1], widths: {blocks.0.body.0: 4}}]")  # the last one is fine
    capsys.readouterr()
    assert main(["validate", str(user_config), "--set", f"search.candidates={candidates}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("searchsvc: error: ") for line in lines), lines
    assert "search.candidates[0].remove[0]: 'blocks.2' is not a removable unit" in lines[0]  # it changes shape
    assert "units: blocks.0, blocks.1, blocks.3" in lines[0], lines[0]
    assert "search.candidates[1].widths.stem.0: must be an integer in [1, 8]" in lines[1], lines[1]
    assert "search.candidates[2].widths.blocks.1.body.0: no channel group" in lines[2], lines[2]  # gone with blocks.1


@pytest.mark.parametrize("method", ["grid", "taylor"])
def test_a_network_whose_data_picks_its_branch_is_refused_with_the_tracers_error(user_config, method, capsys):
    err = refusal(capsys, "validate", str(user_config), "--set", "teacher.model=tests.user_models.branchy:input_gate",
                  "--set", f"method={method}", "--set", "search={}")
    model = "tests.user_models.branchy:input_gate"
    assert f"teacher.model: {model} cannot be cut: torch.fx cannot trace it (TraceError:" in err, err
    assert "these layers do not run: a" in err, err  # the all-zero example is dark: branch b


def test_structured_agp_refuses_it_too_and_element_wise_agp_takes_it(user_config, capsys):
    schedule = ("{version: 1, pruners: {p: {class: StructuredAGP, initial_sparsity: 0.0, final_sparsity: 0.5, "
                "weights: [stem.weight]}}, policies: [{pruner: {instance_name: p}, starting_epoch: 0, ending_epoch: 1, "
                "frequency: 1}]}")
    args = ["validate", str(user_config), "--set", "teacher.model=tests.user_models.branchy:input_gate",
            "--set", "method=agp"]
    err = refusal(capsys, *args, "--set", f"search={{schedule: {schedule}}}")
    assert "cannot be cut: torch.fx cannot trace it" in err, err
    element = schedule.replace("StructuredAGP", "AutomatedGradualPruner")
    assert main([*args, "--set", f"search={{schedule: {element}}}"]) == 0  # masks only: nothing is cut


def test_a_network_fx_cannot_trace_whose_layers_all_run_is_still_cut(user_config, capsys):
    assert main(["validate", str(user_config), "--set", "teacher.model=tests.user_models.branchy:shape_checked"]) == 0


def test_resources_beyond_every_node_end_the_run_before_anything_is_recorded(tmp_path, ray_session, capsys):
    import ray

    largest = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    store_dir = tmp_path / "store"
    err = refusal(capsys, "run", str(GRID), "--store", str(store_dir), "--no-progress",
                  "--set", f"resources.cpus_per_eval={largest + 1:g}")
    assert f"resources.cpus_per_eval: one evaluation asks for {largest + 1:g} CPU" in err, err
    assert f"the largest has {largest:g} CPU" in err, err
    assert not store_dir.exists() or not LocalStore(store_dir).list("runs/")


def test_resources_that_fit_the_largest_node_pass_the_preflight(ray_session):
    import ray

    from searchsvc.running.preflight import check_resources
    from workers.evaluation.resources import Resources

    largest = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    check_resources(Resources(cpus_per_eval=largest, gpus_per_eval=0.25), None)  # no GPU in the cluster: CPU only


def _fake_run(store: LocalStore, make_row, rows: int | None) -> str:
    """A run folder: its config and record, and a results table of `rows` rows (None: no table, as a run that
    failed before its first result)."""
    run_id = f"20260101-0000{len(layout.list_runs(store)):02d}.000-0a0b0c"  # oldest first, as new_run_id's
    store.put_bytes(layout.run_config(run_id), b"method: grid\n")
    store.put_json(layout.run_record(run_id), {"run_id": run_id, "status": "failed" if rows is None else "finished"})
    if rows is not None:
        write_results(store, run_id, [make_row(spec_hash=f"{i:016x}", run_id=run_id) for i in range(rows)])
    return run_id


def test_results_shows_the_latest_run_with_results_and_says_what_it_passed_over(tmp_path, make_row, capsys):
    store = LocalStore(tmp_path / "store")
    older = _fake_run(store, make_row, 1)
    good = _fake_run(store, make_row, 2)
    assert layout.latest_run_with_results(store) == (good, 0)
    _fake_run(store, make_row, None)
    assert layout.latest_run_with_results(store) == (good, 1)
    _fake_run(store, make_row, None)
    capsys.readouterr()
    assert main(["results", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run {good} in {store.uri} (the latest with results; 2 newer runs have none)", out[0]
    assert main(["results", "--store", str(tmp_path / "store"), "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["spec_hash"] for row in json.loads(captured.out)] == [f"{i:016x}" for i in range(2)]
    assert "2 newer runs have none" in captured.err
    assert main(["results", "--store", str(tmp_path / "store"), "--run", older]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"run {older} in {store.uri}"  # --run: as asked, no note


def test_without_any_results_the_newest_run_is_the_one_shown(tmp_path, make_row):
    store = LocalStore(tmp_path / "store")
    _fake_run(store, make_row, None)
    newest = _fake_run(store, make_row, None)
    assert layout.latest_run_with_results(store) == (newest, 0)


def test_an_attention_weight_read_without_calling_its_module_counts_as_run():
    """MultiheadAttention uses out_proj.weight without calling out_proj: fx cannot trace this network (an input
    check), yet nothing in it is a branch the data decides, so it is not refused."""
    import torch
    from torch import nn

    from workers.models.branches import branch_problem, layers_not_run

    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.att, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.MultiheadAttention(8, 2), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != 16:  # fx cannot trace a check on the input
                raise ValueError("16 px images only")
            y = self.conv(x).flatten(2).permute(2, 0, 1)
            return self.fc(self.att(y, y, y)[0].mean(0))

    example = torch.rand(1, 1, 16, 16)
    assert layers_not_run(Checked(), example) == [] and branch_problem(Checked(), example) is None
