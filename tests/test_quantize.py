"""int8 post-training quantization (workers.compression.quantize, `searchsvc quantize`, the `quantize:` section): ONNX
Runtime's static quantizer on real trained models, the int8 model stored beside its candidate under a
manifest, and measured in a search."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision

import workers.evaluation.evaluate as evaluate_module
from searchsvc.cli import main
from storage import LocalStore, StoreUnreachableError
from workers.compression.quantize import (
    Int8Metrics,
    QuantizeConfig,
    Quantized,
    quantize_model,
    quantize_onnx,
    save_int8,
    stored_int8,
)
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.evaluation.evaluate import EvalContext, evaluate_candidate, save_candidate
from workers.evaluation.spec import CandidateSpec
from workers.measurement import ort
from workers.measurement.metrics import CandidateMetrics
from workers.measurement.run_measures import Measures
from workers.models.inputs import InputSpec
from workers.models.zoo import create_model
from workers.training.teacher import TeacherConfig, load_or_train_teacher, load_teacher
from workers.training.train import TrainConfig, evaluate, train_model

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
GREY = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=512, test_size=256))
RGB = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(channels=3, image_size=32, train_size=512,
                                                                 test_size=256))


@pytest.mark.parametrize("data, build", [
    (GREY, lambda: create_model("resnet20", in_channels=1, num_classes=4)),
    (RGB, lambda: torchvision.models.resnet18(num_classes=4)),
], ids=["zoo-resnet20", "torchvision-resnet18"])
def test_int8_keeps_top1_within_a_point_of_fp32_at_about_a_quarter_of_the_bytes(data, build):
    splits = load_dataset(data)
    torch.manual_seed(0)
    model = build()
    train_model(model, splits, TrainConfig(epochs=2, batch_size=64, augment=False), CPU, progress=False)
    fp32_test = evaluate(model, *splits.test, splits.mean, splits.std)
    fp32_val = evaluate(model, *splits.val, splits.mean, splits.std)
    assert fp32_test > 0.5  # a model that learned something: quantization has accuracy to lose
    int8 = quantize_model(model, splits, QuantizeConfig(calibration_batches=4), repeats=3).metrics
    assert abs(int8.int8_accuracy - fp32_test) <= 0.01 and abs(int8.int8_val_accuracy - fp32_val) <= 0.01
    assert int8.int8_model_bytes < int8.fp32_onnx_bytes / 3  # int8 weights: about 4x fewer bytes
    assert int8.int8_calibration_images == 4 * 64 and int8.int8_threads == 1


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A store holding one trained, kept candidate (and one invalid one, without a model)."""
    store_dir = tmp_path_factory.mktemp("int8") / "store"
    store, splits = LocalStore(store_dir), load_dataset(GREY)
    teacher = load_or_train_teacher(store, TeacherConfig(arch="tiny_cnn", epochs=2, batch_size=64), GREY, splits, CPU,
                                    progress=False)
    spec = CandidateSpec(arch="tiny_cnn", teacher=teacher.teacher_hash, dataset=GREY,
                         train=TrainConfig(epochs=2, batch_size=64, augment=False), widths=(("layer1.0", 4),))
    assert evaluate_candidate(spec, EvalContext(store, teacher, splits, CPU)).status == "ok"
    invalid = CandidateSpec(arch="tiny_cnn", teacher=teacher.teacher_hash, dataset=GREY, train=spec.train, seed=9)
    save_candidate(store, invalid, None, CandidateMetrics.invalid(invalid.spec_hash, "invalid transform: test"))
    return store_dir, store, spec.spec_hash, invalid.spec_hash


def test_quantize_stores_the_int8_model_beside_the_candidate_and_it_reloads_in_a_fresh_process(kept, tmp_path,
                                                                                              capsys):
    """`searchsvc quantize` stores model.onnx and int8.json under a manifest beside the candidate and writes
    -o; a fresh process that reads the stored model back (checked against the manifest) measures the
    recorded test accuracy exactly; asked again, the stored model is used, not quantized anew."""
    store_dir, store, spec_hash, _ = kept
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--store", str(store_dir), spec_hash, "-o", str(out), "--calibration-batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "test accuracy" in printed and str(out) in printed
    config = QuantizeConfig(calibration_batches=2)
    prefix = f"candidates/{spec_hash}/int8-{config.key()}"
    assert sorted(store.manifest_files(prefix)) == ["int8.json", "model.onnx"]
    assert out.read_bytes() == store.get_verified(prefix, "model.onnx")
    recorded = json.loads(store.get_verified(prefix, "int8.json"))
    assert recorded["config"]["calibration_batches"] == 2
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from storage import LocalStore\nfrom workers.data.datasets import load_dataset\nfrom workers.compression.quantize import accuracy\n"
            "from workers.evaluation.spec import CandidateSpec\n"
            f"store = LocalStore({str(store_dir)!r})\n"
            f"spec = CandidateSpec.from_json(store.get_verified('candidates/{spec_hash}', 'spec.json').decode())\n"
            "splits = load_dataset(spec.dataset)\n"
            f"print(accuracy(store.get_verified({prefix!r}, 'model.onnx'), splits.test, splits, threads=1))\n")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert float(fresh.stdout.strip().splitlines()[-1]) == recorded["metrics"]["int8_accuracy"]

    before = store.get_bytes(f"{prefix}/int8.json")
    assert main(["quantize", "--store", str(store_dir), spec_hash, "--calibration-batches", "2"]) == 0
    assert "stored already" in capsys.readouterr().out
    assert store.get_bytes(f"{prefix}/int8.json") == before


def test_an_edited_int8_record_is_refused_naming_the_file(kept, tmp_path, capsys):
    store_dir, store, spec_hash, _ = kept
    assert main(["quantize", "--store", str(store_dir), spec_hash, "--calibration-batches", "1"]) == 0
    path = store_dir / f"candidates/{spec_hash}/int8-{QuantizeConfig(calibration_batches=1).key()}/int8.json"
    path.write_text(path.read_text().replace('"int8_accuracy": ', '"int8_accuracy": 0.0001 + '))
    capsys.readouterr()
    assert main(["quantize", "--store", str(store_dir), spec_hash, "--calibration-batches", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "int8.json" in err and "Traceback" not in err


@pytest.mark.parametrize("case, needle", [
    ("missing", "is not in"),
    ("invalid", "has no kept model"),
    ("bits", "--bits: only 8 is supported"),
    ("calibration", "--calibration-batches: must be"),
    ("output", "-o"),
])
def test_bad_quantize_input_is_one_line_exit_2(kept, tmp_path, capsys, case, needle):
    store_dir, _, spec_hash, invalid_hash = kept
    args = {"missing": ["0123456789abcdef"], "invalid": [invalid_hash], "bits": [spec_hash, "--bits", "4"],
            "calibration": [spec_hash, "--calibration-batches", "0"],
            "output": [spec_hash, "-o", str(tmp_path / "model.txt")]}[case]
    capsys.readouterr()
    assert main(["quantize", "--store", str(store_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_quantize_refuses_a_backend_that_is_not_installed(kept, monkeypatch, capsys):
    store_dir, _, spec_hash, _ = kept
    monkeypatch.setattr(ort, "available", lambda: False)
    assert main(["quantize", "--store", str(store_dir), spec_hash]) == 2
    assert "onnxruntime is not installed" in capsys.readouterr().err


def test_a_search_with_a_quantize_section_measures_every_kept_candidate_in_int8(tmp_path, ray_session, capsys):
    """grid-smoke with `quantize:`: every valid row has its int8 figures, each candidate's int8 folder is
    stored (its manifest lists the model and the record, which hold the row's figures), the results table,
    the report and compare show them. Run again with an int8 budget: nothing is trained or quantized anew
    (the int8 records are read back, byte for byte the same), and within_budget follows int8_model_bytes."""
    store_dir = tmp_path / "store"
    grid = ["--store", str(store_dir), "--no-progress", "--set", "train.epochs=1",
            "--set", "dataset.synthetic.train_size=512", "--set", "quantize={calibration_batches: 2}"]
    assert main(["run", str(REPO / "configs/grid-smoke.yaml"), *grid]) == 0
    assert "int8 test acc" in capsys.readouterr().out
    store = LocalStore(store_dir)
    first = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    rows = [r for r in store.get_table(f"runs/{first}/results.parquet").to_pylist() if r["status"] == "ok"]
    assert len(rows) >= 3
    key = QuantizeConfig(calibration_batches=2).key()
    records = {}
    for row in rows:
        prefix = f"candidates/{row['spec_hash']}/int8-{key}"
        recorded = json.loads(store.get_verified(prefix, "int8.json"))["metrics"]
        assert row["int8_accuracy"] == recorded["int8_accuracy"] and row["int8_model_bytes"] == recorded["int8_model_bytes"]
        assert row["int8_latency_ms"] > 0 and row["int8_calibration_images"] == 2 * 64
        records[prefix] = store.get_bytes(f"{prefix}/int8.json")
    report, page = tmp_path / "r.html", tmp_path / "c.html"
    assert main(["report", "--store", str(store_dir), "--run", first, "-o", str(report)]) == 0
    assert "int8 test accuracy" in report.read_text()

    limit = sorted(r["int8_model_bytes"] for r in rows)[len(rows) // 2]
    assert main(["run", str(REPO / "configs/grid-smoke.yaml"), *grid,
                 "--set", f"search.budget={{int8_model_bytes: {limit}}}"]) == 0
    second = sorted({k.split("/")[1] for k in store.list("runs/")})[-1]
    assert store.get_json(f"runs/{second}/run.json")["evaluations"] == 0
    again = [r for r in store.get_table(f"runs/{second}/results.parquet").to_pylist() if r["status"] == "ok"]
    assert {r["spec_hash"] for r in again} == {r["spec_hash"] for r in rows}
    for row in again:
        assert row["within_budget"] == (row["int8_model_bytes"] <= limit)
    assert {p: store.get_bytes(f"{p}/int8.json") for p in records} == records
    assert main(["compare", "--store", str(store_dir), "--run", first, "--run", second, "-o", str(page)]) == 0
    assert "int8 test accuracy" in page.read_text()


def test_validate_names_int8_settings_it_cannot_honour(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    base = "method: grid\ndataset: {name: synthetic}\nteacher: {arch: tiny_cnn}\nsearch:\n  candidates: [{}]\n"
    cases = [("quantize: {bits: 4}\n", "quantize.bits: only 8 is supported"),
             ("  budget: {int8_model_bytes: 1000}\n", "search.budget.int8_model_bytes: limits the int8 model"),
             ("quantize: {calibration_batches: 0}\n", "quantize.calibration_batches: must be")]
    for extra, needle in cases:
        config.write_text(base + extra)
        capsys.readouterr()
        assert main(["validate", str(config)]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    config.write_text(base + "quantize: {calibration_batches: 2}\n")
    assert main(["validate", str(config)]) == 0
    monkeypatch.setattr(ort, "available", lambda: False)
    assert main(["validate", str(config)]) == 2
    assert "quantize.backend: onnxruntime is not installed" in capsys.readouterr().err


def test_a_model_that_cannot_be_quantized_stays_valid_without_int8_figures(kept, monkeypatch, caplog):
    """A quantizer failure costs the candidate its int8 figures (a warning), never its validity; a store
    failure is not swallowed."""
    _, store, spec_hash, _ = kept
    splits = load_dataset(GREY)
    teacher_hash = json.loads(store.get_verified(f"candidates/{spec_hash}", "spec.json"))["teacher"]
    ctx = EvalContext(store, load_teacher(store, teacher_hash), splits, CPU,
                      measures=Measures(quantize=QuantizeConfig(calibration_batches=3)))
    stored = evaluate_module.stored_metrics(store, spec_hash)

    def broken(*args, **kwargs):
        raise RuntimeError("the quantizer cannot take this graph")

    monkeypatch.setattr(evaluate_module, "quantize_model", broken)
    with caplog.at_level(logging.WARNING, logger="workers.compression.quantize"):
        completed = evaluate_module.complete(stored, ctx)
    assert completed.status == "ok" and completed.get("int8_accuracy") is None
    assert f"candidate {spec_hash}: no int8 model (RuntimeError: the quantizer cannot take this graph)" in caplog.text

    def unreachable(*args, **kwargs):
        raise StoreUnreachableError("the store went away")

    monkeypatch.setattr(evaluate_module, "quantize_model", unreachable)
    with pytest.raises(StoreUnreachableError):
        evaluate_module.complete(stored, ctx)


def _fp32_weighted(model: bytes) -> int:
    """Convolutions and matrix products of an ONNX model whose weights are not dequantized int8."""
    graph = onnx.load_from_string(model).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    return sum(made_by.get(node.input[1]) != "DequantizeLinear" for node in graph.node
               if node.op_type in ("Conv", "Gemm", "MatMul"))


@pytest.mark.parametrize("build, size, layers", [
    (lambda: create_model("resnet20", in_channels=1, num_classes=4), 16, ("layer1.0.conv1.0", "layer3.2.conv2.0")),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=4), 32, ("features.0.0", "features.1.block.1.fc1")),
], ids=["zoo", "torchvision"])
def test_layers_left_in_fp32_are_found_by_their_module_names(build, size, layers):
    """A layer an override keeps in fp32 (QAT) is excluded from the int8 model by its module name, however
    deep it sits in containers: exactly those layers read fp32 weights."""
    model = build().eval()
    channels = 1 if size == 16 else 3
    fp32 = ort.onnx_bytes(model, InputSpec.image(channels, size))
    calibration = np.random.default_rng(0).standard_normal((8, channels, size, size), dtype=np.float32)
    config = QuantizeConfig(calibration_batches=1, calibration_batch_size=8)
    assert _fp32_weighted(quantize_onnx(fp32, calibration, config)) == 0
    assert _fp32_weighted(quantize_onnx(fp32, calibration, config, fp32_layers=layers)) == len(layers)


def test_a_second_writer_of_the_same_int8_folder_gets_the_first_ones_figures(kept):
    """Two runs quantize one candidate at once and time it differently: the folder is written once, the
    second writer reports what the first stored, and the record still matches its manifest."""
    _, store, spec_hash, _ = kept
    config = QuantizeConfig(calibration_batches=5)
    first = Int8Metrics(int8_accuracy=0.5, int8_val_accuracy=0.5, int8_latency_ms=0.2, int8_latency_b256_ms=9.0,
                        int8_model_bytes=4, fp32_ort_latency_ms=0.3, fp32_ort_latency_b256_ms=12.0, fp32_onnx_bytes=16,
                        int8_threads=1, int8_calibration_images=320)
    second = replace(first, int8_latency_ms=0.25)
    assert save_int8(store, spec_hash, config, Quantized(b"onnx", first)) == first
    assert save_int8(store, spec_hash, config, Quantized(b"onnx", second)) == first
    assert stored_int8(store, spec_hash, config) == first  # read through the manifest: nothing was replaced
