"""The HTML report of a real grid run: self-contained (every image inline, nothing fetched), the numbers of
the run in it, and it opens in headless Chromium (Debian `chromium`, installed by `make test`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from html.parser import HTMLParser

from searchsvc.cli import main
from storage import LocalStore
from tests.conftest import REPO

GRID = REPO / "configs" / "grid-smoke.yaml"


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link", "script"):
            self.links.append(attrs.get("href") or attrs.get("src") or "")
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data.strip())


def test_report_is_self_contained_and_holds_the_runs_numbers(grid_report):
    report, store_dir, run_id = grid_report
    text = report.read_text()
    page = Collect()
    page.feed(text)
    assert len(page.images) >= 4  # three Pareto fronts and the progress plot
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not re.search(r"""(src|href)=['"]https?://""", text)  # nothing fetched from a network
    store = LocalStore(store_dir)
    rows = [store.get_json(k) for k in store.list(f"runs/{run_id}/evals/")]
    assert sorted(r["order"] for r in rows) == [1, 2, 3, 4, 5]  # the order of recording, for the progress plot
    model_links = [link for link in page.links if link.endswith("model.pt")]
    assert len(model_links) == sum(r["status"] == "ok" for r in rows)  # top-10 table: every valid candidate
    for row in rows:
        if row["status"] == "ok":
            assert row["spec_hash"] in page.cells
            assert f"{row['accuracy']:.2%}" in page.cells
    assert f"{len(rows)} trained, 0 from the store (cache hits)" in page.cells


def test_report_cli_errors_are_one_line(grid_report, tmp_path, capsys):
    _, store_dir, _ = grid_report
    assert main(["report", "--store", str(store_dir), "--run", "no-such-run", "-o", str(tmp_path / "r.html")]) == 2
    assert "run 'no-such-run' does not exist" in capsys.readouterr().err
    assert main(["report", "--store", str(store_dir), "-o", str(tmp_path / "missing" / "r.html")]) == 2
    assert "--output: folder" in capsys.readouterr().err



def test_unwritable_outputs_are_refused_before_any_work(grid_report, tmp_path, capsys):
    """A folder, a path through a file, a name too long: one line naming the flag, exit 2, nothing written."""
    _, store_dir, _ = grid_report
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [(["report", "-o", str(tmp_path)], f"--output: {tmp_path} is a folder"),
             (["report", "-o", str(a_file / "r.html")], f"--output: folder {a_file} is a file, not a folder"),
             (["report", "-o", str(tmp_path / ("r" * 300 + ".html"))], "--output: the file name is too long"),
             (["export", "0123456789abcdef", "-o", str(a_file / "deeper" / "m.onnx")],
              f"--output: folder {a_file} is a file, not a folder"),
             (["export", "0123456789abcdef", "-o", str(tmp_path)], "use a .onnx, .pt, .ts file name"),
             # os.access says yes to root everywhere: the write itself is tried first
             (["report", "-o", "/proc/r.html"], "--output: cannot write /proc/r.html"),
             (["export", "0123456789abcdef", "-o", "/proc/new/m.onnx"], "--output: cannot write /proc/new/m.onnx")]
    for args, expected in cases:
        started = time.perf_counter()
        assert main([*args, "--store", str(store_dir)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (args, err)
        assert time.perf_counter() - started < 5  # checked first: no report built, no model loaded
    assert a_file.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_report_opens_in_headless_chromium(grid_report, tmp_path):
    report, _, run_id = grid_report
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is missing: `make test` installs it (Debian package chromium)"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--user-data-dir="
              + str(tmp_path / "profile")]
    dom = subprocess.run([*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"searchsvc run {run_id}" in dom.stdout and dom.stdout.count("<img") >= 4
    shot = tmp_path / "report.png"
    taken = subprocess.run([*common, "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]


def test_gpu_hours_count_only_evaluations_that_ran_on_a_gpu(make_row):
    from searchsvc.reporting.report import run_summary

    rows = [make_row(status="ok", cached=False, wall_s=1800.0, device="cuda"),
            make_row(status="ok", cached=False, wall_s=3600.0, device="cpu"),  # no GPU on that node
            make_row(status="ok", cached=True, wall_s=3600.0, device="cuda")]  # a cache hit costs nothing
    assert dict(run_summary({}, rows, 0.5))["GPU-hours"] == "0.250 (0.5 GPU per evaluation)"
    assert dict(run_summary({}, rows[1:2], 0.5))["GPU-hours"] == "0 (evaluations ran on the CPU)"


def test_the_budget_summary_counts_the_rows_within_and_names_the_most_accurate_on_validation(make_row):
    from searchsvc.reporting.report import budget_summary

    rows = [make_row(spec_hash="a", status="ok", within_budget=True, val_accuracy=0.80, accuracy=0.95, params=10),
            make_row(spec_hash="b", status="ok", within_budget=True, val_accuracy=0.90, accuracy=0.85, params=20),
            make_row(spec_hash="c", status="ok", within_budget=False, val_accuracy=0.99, accuracy=0.99, params=90)]
    summary = dict(budget_summary({"macs": 1000, "params": None}, rows))
    assert summary["budget"] == "macs <= 1,000" and summary["within budget"] == "2 of 3 valid candidates"
    assert summary["most accurate within budget"] == "b: 90.00 % validation, 85.00 % test"  # not a's test 95 %
    assert budget_summary(None, rows) == []
