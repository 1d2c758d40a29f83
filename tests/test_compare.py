"""`searchsvc compare`: two real runs on one teacher, side by side in one self-contained page (opened in
headless Chromium, as the report is); runs that do not compare, and bad input, are one line and exit 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from searchsvc.budget import Budget
from searchsvc.cli import main
from searchsvc.reporting.compare import chosen, load_run
from storage import LocalStore
from tests.conftest import REPO
from tests.test_report import Collect

GRID = REPO / "configs" / "grid-smoke.yaml"


@pytest.fixture(scope="module")
def two_runs(grid_report, tmp_path_factory):
    """The shared grid run, and a second run on its teacher (in a copy of its store) with other candidates and
    a MACs budget of its own."""
    _, shared, first = grid_report
    store_dir = tmp_path_factory.mktemp("compare") / "store"
    shutil.copytree(shared, store_dir)
    store = LocalStore(store_dir)
    macs = sorted(r["macs"] for r in (store.get_json(k) for k in store.list(f"runs/{first}/evals/")) if r["macs"])
    limit = macs[len(macs) // 2]
    assert main(["run", str(GRID), "--store", str(store_dir), "--no-progress",
                 "--set", "search.candidates=[{scale: 0.75}, {scale: 0.5}]",
                 "--set", f"search.budget={{macs: {limit}}}"]) == 0
    second = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    return store_dir, store, first, second, limit


def test_the_page_overlays_both_runs_and_chooses_each_runs_model_per_budget(two_runs, tmp_path, capsys):
    store_dir, store, first, second, limit = two_runs
    page_file = tmp_path / "compare.html"
    assert main(["compare", "--store", str(store_dir), "--run", first, "--run", second, "-o", str(page_file),
                 "--budget", f"params={10**9}"]) == 0
    text = page_file.read_text()
    page = Collect()
    page.feed(text)
    assert len(page.images) == 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not re.search(r"""(src|href)=['"]https?://""", text)  # nothing fetched from a network
    for run_id in (first, second):
        assert f"{run_id} (grid)" in page.cells  # each run named by its id and method
    # per budget (none, the second run's own, the --budget): each run's model chosen on validation accuracy
    budgets = {"no budget": None, f"macs <= {limit:,}": Budget(macs=limit), f"params <= {10**9:,}": Budget(params=10**9)}
    for label, budget in budgets.items():
        for run_id in (first, second):
            expected = chosen(load_run(store, run_id), budget)
            at = [i for i, cell in enumerate(page.cells) if cell == label and page.cells[i + 1] == f"{run_id} (grid)"]
            assert len(at) == 1, (label, run_id)
            assert page.cells[at[0] + 2] == (expected.spec_hash if expected else "-")
            if expected:
                assert expected.macs <= limit or budget is None or budget.macs is None
                assert page.cells[at[0] + 4] == f"{expected.accuracy:.2%}"  # the test accuracy, reported
    best_within = chosen(load_run(store, first), Budget(macs=limit))
    valid = [r for r in load_run(store, first).valid if r.macs <= limit]
    assert best_within.val_accuracy == max(r.val_accuracy for r in valid)  # validation decides


def test_the_page_opens_in_headless_chromium_with_both_runs_in_its_plots(two_runs, tmp_path):
    store_dir, _, first, second, _ = two_runs
    page_file = tmp_path / "compare.html"
    assert main(["compare", "--store", str(store_dir), "--run", first, "--run", second, "-o", str(page_file)]) == 0
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is missing: `make test` installs it (Debian package chromium)"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([*common, "--dump-dom", page_file.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.findall(r"<img alt=\"([^\"]*)\"", dom.stdout)
    assert len(images) == 3 and all(f"{first} (grid)" in alt and f"{second} (grid)" in alt for alt in images)
    # each plot draws both runs: with the second run's front left out, the picture differs
    from searchsvc.reporting.compare import load_run as view
    from searchsvc.reporting.plots import overlay_png
    runs = [(v.label, v.valid) for v in (view(LocalStore(store_dir), first), view(LocalStore(store_dir), second))]
    assert overlay_png(runs, "params", "parameters", {}) != overlay_png(runs[:1], "params", "parameters", {})
    shot = tmp_path / "compare.png"
    taken = subprocess.run([*common, "--window-size=1200,1600", f"--screenshot={shot}", page_file.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]


def test_runs_on_another_teacher_are_refused_unless_allowed(two_runs, tmp_path, capsys):
    store_dir, store, first, _, _ = two_runs
    mixed = tmp_path / "mixed"
    shutil.copytree(store_dir, mixed)
    assert main(["run", str(GRID), "--store", str(mixed), "--no-progress", "--set", "teacher.epochs=2",
                 "--set", "search.candidates=[{scale: 0.5}]"]) == 0
    other = sorted({k.split("/")[1] for k in LocalStore(mixed).list("runs/")})[-1]
    capsys.readouterr()
    assert main(["compare", "--store", str(mixed), "--run", first, "--run", other, "-o", str(tmp_path / "c.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different teachers" in err and "--allow-mixed" in err
    assert not (tmp_path / "c.html").exists()
    assert main(["compare", "--store", str(mixed), "--run", first, "--run", other, "-o", str(tmp_path / "c.html"),
                 "--allow-mixed"]) == 0


@pytest.mark.parametrize("args, fragment", [
    (["--run", "no-such-run"], "run 'no-such-run' does not exist"),
    (["--run", "../x"], "invalid run id"),
    (["--run", "{first}", "--budget", "macs=-5"], "--budget.macs: must be a positive integer"),
    (["--run", "{first}", "--budget", "watts=3"], "--budget.watts: unknown key"),
    (["--run", "{first}", "--budget", "latency_ms=2"], "--budget.latency_batch: a latency budget needs the batch size"),
    (["--run", "{first}", "--budget", "macs"], "--budget 'macs': expected KEY=VALUE"),
])
def test_bad_input_is_one_line_and_exit_2(two_runs, tmp_path, capsys, args, fragment):
    store_dir, _, first, _, _ = two_runs
    capsys.readouterr()
    argv = [a.replace("{first}", first) for a in args]
    assert main(["compare", "--store", str(store_dir), *argv, "-o", str(tmp_path / "c.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment in err, err
    assert not (tmp_path / "c.html").exists()


def test_a_run_judged_by_a_budget_it_did_not_have_uses_its_measured_columns(two_runs):
    _, store, first, _, limit = two_runs
    view = load_run(store, first)
    assert view.record["method"] == "grid" and "budget" not in json.dumps(view.config.get("search"))
    pick = chosen(view, Budget(macs=limit))
    assert pick is not None and pick.macs <= limit
    assert chosen(view, Budget(macs=1)) is None  # nothing that small: no model to hand over


def test_a_sparse_model_is_placed_by_its_non_zero_counts(make_row):
    from searchsvc.reporting.compare import sized

    sparse = make_row(spec_hash="s", params=1000, nonzero_params=100, macs=5000, nonzero_macs=600)
    dense = make_row(spec_hash="d", params=300, macs=2000)
    assert (sized(sparse).params, sized(sparse).macs) == (100, 600)
    assert sized(dense) == dense
