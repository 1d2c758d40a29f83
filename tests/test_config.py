"""Config validation: every malformed config ends with exit 2 and one clear line naming the key or path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from searchsvc.cli import main
from searchsvc.config import ConfigError, config_to_yaml, load_config, parse_config
from searchsvc.methods.rigl import RigLSearch

REPO = Path(__file__).resolve().parent.parent
GOOD = """\
method: n2n
dataset: {name: synthetic}
teacher: {arch: tiny_cnn, epochs: 2}
train: {epochs: 1, batch_size: 64}
"""

# (name, config text or None for a missing file, a fragment the single error line must contain)
MALFORMED = [
    ("bad_yaml", "method: n2n\ndataset: {name: synthetic\n", "invalid YAML"),
    ("wrong_type", GOOD + "resources: {cpus_per_eval: lots}\n", "resources.cpus_per_eval: must be a positive number, got 'lots'"),
    ("negative_epochs", GOOD.replace("epochs: 1,", "epochs: -1,"), "train.epochs: must be a positive integer, got -1"),
    ("negative_sparsity", "method: rigl\ndataset: {name: synthetic}\nsearch: {dense_allocation: -0.2}\n",
     "search.dense_allocation: must be a number in (0, 1], got -0.2"),
    ("unknown_method", GOOD.replace("method: n2n", "method: n2m"), "method: unknown value 'n2m' (did you mean 'n2n'?)"),
    ("unknown_dataset", GOOD.replace("name: synthetic", "name: imagenet"), "dataset.name: must be one of cifar10"),
    ("unknown_key", GOOD + "trian: {epochs: 2}\n", "trian: unknown key (did you mean 'train'?)"),
    ("unknown_nested_key", GOOD.replace("epochs: 1,", "epoch: 1,"), "train.epoch: unknown key (did you mean 'epochs'?)"),
    ("missing_method", "dataset: {name: synthetic}\n", "method: missing required key"),
    ("unknown_arch", GOOD.replace("tiny_cnn", "resnet2O"), "teacher.arch: unknown value 'resnet2O' (did you mean 'resnet20'?)"),
    ("not_a_mapping", "- method: n2n\n", "the top level must be a mapping"),
    ("empty_file", "", "the file is empty"),
    ("bool_for_int", GOOD.replace("epochs: 2", "epochs: true"), "teacher.epochs: must be a positive integer, got true"),
    ("recalibration_negative", GOOD.replace("batch_size: 64}", "batch_size: 64, bn_recalibration_batches: -1}"),
     "train.bn_recalibration_batches: must be a non-negative integer, got -1"),
    ("recalibration_fraction", GOOD.replace("batch_size: 64}", "batch_size: 64, bn_recalibration_batches: 1.5}"),
     "train.bn_recalibration_batches: must be a non-negative integer, got 1.5"),
    ("recalibration_word", GOOD.replace("batch_size: 64}", "batch_size: 64, bn_recalibration_batches: many}"),
     "train.bn_recalibration_batches: must be a non-negative integer, got 'many'"),
    ("no_validation_split", GOOD.replace("{name: synthetic}", "{name: synthetic, val_fraction: 0}"),
     "dataset.val_fraction: must be above 0: validation accuracy decides every choice"),
    ("fraction_out_of_range", GOOD.replace("{name: synthetic}", "{name: synthetic, val_fraction: 1.5}"),
     "dataset.val_fraction: must be a number in [0, 1), got 1.5"),
    ("missing_file", None, "no such file"),
    # numbers that are not numbers, values inside typed mappings, YAML that hides what it says
    ("nan_lr", GOOD.replace("epochs: 2}", "epochs: 2, lr: .nan}"), "teacher.lr: must be a finite number, got nan"),
    ("inf_lr", GOOD.replace("batch_size: 64}", "batch_size: 64, lr: .inf}"),
     "train.lr: must be a finite number, got inf"),
    ("overflowing_lr", GOOD.replace("batch_size: 64}", "batch_size: 64, lr: 1e400}"),
     "train.lr: must be a finite number, got inf"),
    ("nan_fraction", GOOD.replace("{name: synthetic}", "{name: synthetic, val_fraction: .nan}"),
     "dataset.val_fraction: must be a finite number, got nan"),
    ("width_not_an_int", "method: grid\ndataset: {name: synthetic}\nteacher: {arch: tiny_cnn}\n"
     "search: {candidates: [{widths: {layer2: .nan}}]}\n", "search.candidates[0].widths.layer2: must be an integer"),
    ("duplicate_key", GOOD + "train: {epochs: 600}\n", ":5:1: invalid YAML: duplicate key 'train'"),
    ("recursive_alias", GOOD + "seed: &loop [*loop]\n", "invalid YAML: YAML aliases (*name) are not accepted"),
]


@pytest.mark.parametrize("path, expected", [("/etc/hostname/job.yaml", "cannot read (NotADirectoryError"),
                                            ("/tmp/" + "j" * 300 + ".yaml", "File name too long"),
                                            ("/tmp", "cannot read (IsADirectoryError")])
def test_config_paths_that_cannot_be_read_are_one_line(capsys, path, expected):
    """A path through a file, a name too long for the file system, a folder: exit 2 naming the path."""
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("name, text, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_gives_one_clear_line_and_exit_2(tmp_path, capsys, name, text, expected):
    path = tmp_path / f"{name}.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert expected in err[0]
    assert str(path) in err[0]
    assert "Traceback" not in err[0]


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    path = tmp_path / "many.yaml"
    path.write_text("method: n2n\ntrain: {epochs: 0, lr: -1}\nresources: {gpus_per_eval: -1}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for key in ("train.epochs", "train.lr", "resources.gpus_per_eval"):
        assert key in err


def test_yaml_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: n2n\ndataset:\n  name: [synthetic\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_config(path)


def test_valid_config_fills_defaults(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    assert main(["validate", str(path)]) == 0
    config = load_config(path)
    assert config.train.distill.temperature == 4.0
    assert config.teacher.arch == "tiny_cnn" and config.teacher.epochs == 2
    assert config.search.max_evaluations == 64


def test_set_overrides_any_key_with_yaml_typed_values(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    config = load_config(path, ["train.epochs=3", "dataset.subset=0.5", "search.shrink=false", "store=s3://b/p"])
    assert config.train.epochs == 3
    assert config.dataset.subset == 0.5
    assert config.search.shrink is False
    assert config.store == "s3://b/p"


def test_set_to_an_unknown_key_is_an_error(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    assert main(["validate", str(path), "--set", "train.epochz=3"]) == 2
    assert "train.epochz: unknown key (did you mean 'epochs'?)" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "novalue"]) == 2
    assert main(["validate", str(path), "--set", "method.x=1"]) == 2


def test_exponent_floats_are_read_as_numbers():
    """PyYAML reads `1e-3` as a string (YAML 1.1); a float field accepts it."""
    raw = yaml.safe_load("method: n2n\ntrain: {lr: 1e-3}\n")
    assert parse_config(raw).train.lr == pytest.approx(0.001)


def test_resolved_config_round_trips():
    config = parse_config(yaml.safe_load(GOOD))
    again = parse_config(yaml.safe_load(config_to_yaml(config)))
    assert again == config


def test_search_section_uses_the_methods_schema():
    raw = yaml.safe_load("method: rigl\nsearch: {dense_allocation: 0.2, distribution: erk}\n")
    search = parse_config(raw).search
    assert isinstance(search, RigLSearch)
    assert search.dense_allocation == 0.2 and search.distribution == "erk"


def test_shipped_configs_validate(capsys, tmp_path):
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    weights = tmp_path / "weights.pt"  # your-model-*.yaml name a file examples/train_your_model.py writes
    weights.write_bytes(b"")
    for path in configs:
        teacher = yaml.safe_load(path.read_text()).get("teacher") or {}
        given = ["--set", f"teacher.weights={weights}"] if "weights" in teacher else []
        assert main(["validate", str(path), *given]) == 0, capsys.readouterr().err


def test_cli_process_exits_2_without_traceback_and_debug_shows_one(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(GOOD).replace("epochs: 1,", "epochs: -1,"))
    plain = subprocess.run([sys.executable, "-m", "searchsvc", "validate", str(path)], capture_output=True, text=True)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"searchsvc: error: {path}: train.epochs: must be a positive "
                                                  f"integer, got -1"]
    debug = subprocess.run([sys.executable, "-m", "searchsvc", "validate", str(path), "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_every_flag_has_help():
    from searchsvc.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in [("searchsvc", parser), *subparsers.items()]:
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
