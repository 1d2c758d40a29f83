"""The store's keys: built in one module (storage/layout.py), each the same string stored stores hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from storage import InvalidKeyError, LocalStore, layout

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "storage", "workers", "searchsvc")
HOME = Path("storage/layout.py")  # the one module that may spell a key

# A key's folders, as they appear joined to something ("runs/", "/evals/"), and every stored file's name the
# layout defines (run.json, config.yaml, model.pt, ...: its upper-case constants with a dot).
FOLDERS = ("runs", "candidates", "teachers", "schedules", "summaries", "evals", "plots", "state", "reports", "logits",
           "validation")
FILES = sorted({value for name, value in vars(layout).items() if name.isupper() and isinstance(value, str)
                and "." in value})
_FOLDER, _FILE = "|".join(FOLDERS), "|".join(re.escape(name) for name in FILES)
FRAGMENT = re.compile(rf"(?<![\w.-])(?:(?:{_FOLDER})/|int8-|(?:{_FILE})(?!\w))")  # not inside a longer name
# A folder's name alone is a key's segment too ("reports" joined by hand). "runs", "candidates", "teachers" and
# "logits" are left out here: they are ordinary words elsewhere (an argparse dest, a progress bar's label, the
# exported ONNX graph's output, a distillation loss) and are caught in paths, or as an argument to layout.
SEGMENTS = {"evals", "plots", "state", "reports", "summaries", "schedules", "validation", "tune"}
# Text about keys is not a key: docstrings, and the help a user reads (argparse, config field metadata).
HELP_KEYWORDS = {"help", "description", "epilog"}
# The only literals allowed outside layout.py, each for its reason.
ALLOWED = {
    # The manifest is ArtifactStore's own mechanism (write_manifest, get_verified on any folder), one layer
    # below layout.py, which imports it from there (layout imports storage.base: it cannot be the other way).
    ("storage/base.py", "manifest.json"),
    # An example in check_key's error message, not a key anything reads or writes.
    ("storage/base.py", ": must be a relative path like 'runs/x/config.yaml'"),
}


def _text_nodes(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are text: docstrings, help keywords, `"help":` values of field metadata."""
    text: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            text.add(id(body[0].value))
        elif isinstance(node, ast.keyword) and node.arg in HELP_KEYWORDS:
            text.update(id(n) for n in ast.walk(node.value))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "help":
                    text.update(id(n) for n in ast.walk(value))
    return text


def _layout_arguments(tree: ast.AST) -> set[int]:
    """ids of the strings handed to a layout function (`layout.run_file(run_id, "run.json")`): a name typed
    by hand, whatever it is."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "layout":
            for argument in [*node.args, *(k.value for k in node.keywords)]:
                parts = argument.values if isinstance(argument, ast.JoinedStr) else [argument]
                found.update(id(part) for part in parts if isinstance(part, ast.Constant))
    return found


def key_literals() -> list[str]:
    """Every string constant (f-strings' literal parts included) outside storage/layout.py that spells a store
    key or part of one, as 'path:line: text'."""
    found = []
    for path in sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py")):
        where = path.relative_to(REPO)
        if where == HOME:
            continue
        tree = ast.parse(path.read_text(), filename=str(where))
        text, handed = _text_nodes(tree), _layout_arguments(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in text:
                continue
            if (FRAGMENT.search(node.value) or node.value in SEGMENTS or id(node) in handed) \
                    and (where.as_posix(), node.value) not in ALLOWED:
                found.append(f"{where}:{node.lineno}: {node.value!r}")
    return found


def test_no_store_key_is_typed_outside_the_layout_module():
    found = key_literals()
    assert not found, f"{len(found)} store key literal(s) outside storage/layout.py:\n" + "\n".join(found)


RUN = "20261126-000000.000-abc123"
HASH = "0123456789abcdef"


def test_a_runs_keys_are_the_strings_stored_stores_hold():
    run = f"runs/{RUN}"
    assert layout.run_config(RUN) == f"{run}/config.yaml"
    assert layout.run_record(RUN) == f"{run}/run.json"
    assert layout.run_results(RUN) == f"{run}/results.parquet"
    assert (layout.evals_prefix(RUN), layout.eval_row(RUN, HASH)) == (f"{run}/evals/", f"{run}/evals/{HASH}.json")
    assert layout.plots_prefix(RUN) == f"{run}/plots/"
    assert layout.run_plot(RUN, layout.TRAJECTORY_PLOT) == f"{run}/plots/trajectory.png"
    assert layout.run_plot(RUN, layout.SENSITIVITY_PLOT) == f"{run}/plots/sensitivity.png"
    assert layout.run_state(RUN, layout.N2N_STATE) == f"{run}/state/n2n.json"
    assert layout.run_state(RUN, layout.TUNE_EXPERIMENT) == f"{run}/state/tune"
    assert layout.ppo_checkpoint(RUN, "removal") == f"{run}/state/removal/checkpoint"
    assert layout.file_in(layout.ppo_checkpoint(RUN, "shrink"), layout.RLLIB_CHECKPOINT) == \
        f"{run}/state/shrink/checkpoint/rllib_checkpoint.json"
    assert layout.reports_prefix(RUN) == f"{run}/reports/"
    assert layout.trial_report(RUN, "a1b2c3d4_00001", HASH) == f"{run}/reports/a1b2c3d4_00001-{HASH}.json"
    assert layout.run_trials(RUN) == f"{run}/trials.json"
    assert layout.summaries_prefix(RUN) == f"{run}/summaries/"
    assert layout.run_summary(RUN, HASH, "layers") == f"{run}/summaries/{HASH}-layers.csv"
    assert layout.sensitivity_table(RUN) == f"{run}/sensitivity.csv"
    assert layout.sensitivity_schedule(RUN) == f"{run}/sensitivity.agp.yaml"


def test_candidate_teacher_and_store_wide_keys_are_the_strings_stored_stores_hold():
    assert layout.candidate_spec(HASH) == f"candidates/{HASH}/spec.json"
    assert layout.candidate_model(HASH) == f"candidates/{HASH}/model.pt"
    assert layout.candidate_metrics(HASH) == f"candidates/{HASH}/metrics.json"
    assert layout.manifest(layout.candidate(HASH)) == f"candidates/{HASH}/manifest.json"
    assert layout.int8_folder(HASH, "qat") == f"candidates/{HASH}/int8-qat"
    assert layout.file_in(layout.int8_folder(HASH, "fedcba9876543210"), layout.INT8_MODEL) == \
        f"candidates/{HASH}/int8-fedcba9876543210/model.onnx"
    assert layout.file_in(layout.int8_folder(HASH, "qat"), layout.INT8_RECORD) == \
        f"candidates/{HASH}/int8-qat/int8.json"
    assert layout.teacher_meta(HASH) == f"teachers/{HASH}/meta.json"
    assert layout.teacher_model(HASH) == f"teachers/{HASH}/model.pt"
    assert layout.teacher_validation(HASH) == f"teachers/{HASH}/validation"
    assert layout.teacher_val_record(HASH) == f"teachers/{HASH}/validation/val.json"
    assert layout.teacher_logits(HASH) == f"teachers/{HASH}/logits"
    assert layout.teacher_train_logits(HASH) == f"teachers/{HASH}/logits/train.pt"
    assert layout.schedule(HASH) == f"schedules/{HASH}.yaml"
    assert layout.store_summary(HASH, "graph") == f"summaries/{HASH}-graph.csv"


@pytest.mark.parametrize("build, what", [
    (lambda bad: layout.eval_row(RUN, bad), "spec hash"),
    (lambda bad: layout.run_record(bad), "run id"),
    (lambda bad: layout.run_state(RUN, bad), "state name"),
    (lambda bad: layout.trial_report(RUN, bad, HASH), "trial id"),
    (lambda bad: layout.run_summary(RUN, HASH, bad), "summary kind"),
    (lambda bad: layout.int8_folder(HASH, bad), "quantize setting"),
    (lambda bad: layout.teacher_train_logits(bad), "teacher hash"),
    (lambda bad: layout.schedule(bad), "schedule hash"),
    (lambda bad: layout.store_summary(bad, "layers"), "model hash"),
])
def test_every_id_in_a_key_is_checked(build, what):
    for bad in ("..", "a/b", "", "x y"):
        with pytest.raises(InvalidKeyError, match=what):
            build(bad)


def test_a_run_exists_once_its_config_is_written(tmp_path):
    store = LocalStore(tmp_path)
    assert not layout.run_exists(store, RUN)
    store.put_bytes(f"runs/{RUN}/run.json", b"{}")  # a record alone (no config) is not a run
    assert not layout.run_exists(store, RUN)
    store.put_bytes(f"runs/{RUN}/config.yaml", b"method: grid\n")
    assert layout.run_exists(store, RUN)
    assert not layout.run_exists(store, "20261126-000000.000-other1")


def test_a_run_stopped_before_its_record_is_listed_and_said_so_in_one_line(tmp_path, capsys):
    """Killed between config.yaml (written first) and run.json: `results` shows no rows; `report` and
    `compare`, which need the record, say so in one line (exit 2), naming the file and how to continue."""
    from searchsvc.cli import main

    store = tmp_path / "store"
    LocalStore(store).put_bytes(f"runs/{RUN}/config.yaml", b"method: grid\n")
    assert main(["results", "--store", str(store), "--run", RUN, "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    for argv in (["report", "--run", RUN, "-o", str(tmp_path / "r.html")],
                 ["compare", "--run", RUN, "-o", str(tmp_path / "c.html")]):
        assert main([argv[0], "--store", str(store), *argv[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"run '{RUN}' has no record yet" in err and "run.json" in err, err
        assert "searchsvc resume" in err
