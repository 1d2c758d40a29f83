"""Issue 37: your own task end to end — segmentation (the example's shapes and masks, a user's network returning
{"out": ...}, mean IoU from torchmetrics as the score) through grid, taylor and rigl, and text of token ids (the
example's sentences and BERT-style encoder, macro F1) through grid and taylor: the metric recorded on val and test,
the stored candidate reloaded in a fresh process giving the stored metric, its ONNX export matching, and the task's
mistakes as one line. The example's LR-ASPP network runs the same path (README: "Your own task")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from searchsvc.cli import main
from tests.test_user_data import _only_run, _rows

REPO = Path(__file__).resolve().parent.parent
TASK = {"metric": "torchmetrics.classification.MulticlassJaccardIndex", "metric_kwargs": {"num_classes": 4}}
DATA = {"name": "python", "factory": "examples.segmentation:shapes", "in_memory": True,
        "kwargs": {"train": 192, "val": 48, "test": 48, "size": 24}}
TEACHER = {"model": "tests.user_models.nets:tiny_segnet", "kwargs": {"num_classes": 4}, "epochs": 3,
           "batch_size": 32, "lr": 0.05, "augment": False}
SEARCH = {
    "grid": {"candidates": [{"scale": 0.5}]},
    "taylor": {"iterations": 2, "filters_per_iteration": 0.2, "importance_batches": 2, "stop": {"max_drop": 100},
               "tune": {"grace_period": 2}},
}


def _config(folder: Path, method: str) -> Path:
    base = yaml.safe_load((REPO / "configs" / f"{method}-smoke.yaml").read_text())
    base.update(dataset=DATA, teacher=TEACHER, task=TASK, search=SEARCH.get(method, base["search"]),
                train={**base.get("train", {}), "epochs": 1, "batch_size": 32, "augment": False})
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _reloaded_miou(store: Path, spec_hash: str) -> float:
    """The candidate's test mean IoU computed in a fresh process from the store alone (load_candidate, the
    dataset rebuilt from its factory)."""
    code = f"""
import torch, searchsvc
from storage import open_store
from torchmetrics.classification import MulticlassJaccardIndex
from workers.data.datasets import DatasetConfig, load_dataset, normalize
splits = load_dataset(DatasetConfig(name="python", factory={DATA["factory"]!r}, kwargs={DATA["kwargs"]!r}))
model = searchsvc.load_candidate({spec_hash!r}, store=open_store({str(store)!r})).eval()
images, masks = splits.test
with torch.no_grad():
    print(MulticlassJaccardIndex(num_classes=4)(model(normalize(images, splits.mean, splits.std))["out"], masks).item())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["grid", "taylor", "rigl"])
def test_segmentation_through_each_method_is_scored_by_its_metric(method, tmp_path, ray_session):
    store = tmp_path / "store"
    assert main(["run", str(_config(tmp_path, method)), "--store", str(store), "--no-progress"]) == 0
    run_id, record = _only_run(store)
    assert record["metric"] == "MulticlassJaccardIndex"
    rows = [r for r in _rows(store, run_id) if r["status"] == "ok"]
    assert rows
    row = rows[-1]
    assert 0 < row["val_accuracy"] <= 1 and 0 < row["accuracy"] <= 1
    assert row["accuracy"] == pytest.approx(_reloaded_miou(store, row["spec_hash"]), abs=2e-3)
    pages = {"report": tmp_path / "report.html", "compare": tmp_path / "compare.html"}
    assert main(["report", "--store", str(store), "--run", run_id, "-o", str(pages["report"])]) == 0
    assert main(["compare", "--store", str(store), "--run", run_id, "-o", str(pages["compare"])]) == 0
    for page in pages.values():  # the metric names the accuracy columns
        assert "val MulticlassJaccardIndex" in page.read_text()
    path = tmp_path / "model.onnx"
    assert main(["export", "--store", str(store), row["spec_hash"], "-o", str(path)]) == 0
    import onnxruntime

    import searchsvc
    from storage import open_store

    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = searchsvc.load_candidate(row["spec_hash"], store=open_store(str(store))).eval()(x)["out"].numpy()
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)


def test_a_loss_that_is_not_a_scalar_is_one_line(tmp_path, capsys):
    config = yaml.safe_load(_config(tmp_path, "grid").read_text())
    config["task"] = {**TASK, "loss": "tests.test_your_task:per_pixel_loss"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--store", str(tmp_path / "store"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "task.loss: tests.test_your_task:per_pixel_loss returned shape (" in err and "Traceback" not in err
    assert not list((tmp_path / "store").glob("teachers/*/meta.json"))  # no teacher stored


def per_pixel_loss(outputs: dict, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs["out"], targets, reduction="none")  # not reduced


def test_a_prediction_distillation_cannot_match_is_one_line(tmp_path, capsys):
    """A network whose named prediction is a mask of class ids (integers): nothing to match or score."""
    config = yaml.safe_load(_config(tmp_path, "grid").read_text())
    config["teacher"] = {**config["teacher"], "model": "tests.test_your_task:labelling_segnet"}
    config["task"] = {**TASK, "output": "labels"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--store", str(tmp_path / "store"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "task.output: the prediction is a torch.int64 tensor; distillation matches" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "store").glob("teachers/*/meta.json"))


class LabellingSegNet(torch.nn.Module):
    """The test segmentation network, also returning its argmax labels."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from tests.user_models.nets import tiny_segnet

        self.net = tiny_segnet(num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)["out"]
        return {"out": out, "labels": out.argmax(1)}


def labelling_segnet(num_classes: int = 4) -> LabellingSegNet:
    return LabellingSegNet(num_classes)


TEXT = {"dataset": {"name": "python", "factory": "examples.text:sentiment", "in_memory": True,
                    "kwargs": {"train": 256, "val": 64, "test": 64, "length": 16, "vocab": 64}},
        "teacher": {"model": "examples.text:encoder", "epochs": 2, "batch_size": 64, "lr": 0.02,
                    "kwargs": {"vocab": 64, "length": 16, "num_classes": 2, "dim": 32, "heads": 2, "layers": 2}},
        "task": {"metric": "torchmetrics.classification.MulticlassF1Score",
                 "metric_kwargs": {"num_classes": 2, "average": "macro"}}}
TEXT_SEARCH = {"grid": {"candidates": [{"scale": 0.5}, {"remove": ["blocks.1"]}]}, "taylor": SEARCH["taylor"]}


@pytest.mark.parametrize("method,masks", [("grid", True), ("taylor", False)])
def test_text_classification_of_token_ids_through_grid_and_taylor(method, masks, tmp_path, ray_session):
    """Token ids [16] (int64, 0 pads) into a small BERT-style encoder (examples/text.py), scored by macro F1: the
    inputs stay ids through training, MACs, latency, the rebuild check and ONNX export — given with their attention
    masks as a tokenizer does (a dict per example: the network called with both as keyword arguments, the ONNX file
    taking both by name), or alone."""
    base = yaml.safe_load((REPO / "configs" / f"{method}-smoke.yaml").read_text())
    base.update(TEXT, search=TEXT_SEARCH[method], train={**base.get("train", {}), "epochs": 1, "batch_size": 64})
    base["dataset"] = {**TEXT["dataset"], "kwargs": {**TEXT["dataset"]["kwargs"], "masks": masks}}
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump(base))
    store = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 0
    run_id, record = _only_run(store)
    assert record["metric"] == "MulticlassF1Score"
    rows = _rows(store, run_id)
    assert rows and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    (meta,) = store.glob("teachers/*/meta.json")
    assert json.loads(meta.read_text())["input_tokens"] == 64
    assert json.loads(meta.read_text()).get("input_parts") == (["input_ids", "attention_mask"] if masks else None)
    row = min(rows, key=lambda r: r["params"])
    import onnxruntime

    import searchsvc
    from storage import open_store

    path = tmp_path / "model.onnx"
    assert main(["export", "--store", str(store), row["spec_hash"], "-o", str(path)]) == 0
    ids = torch.randint(1, 64, (3, 16))
    ids[:, 10:] = 0  # padded sentences
    mask = (ids != 0).long()
    model = searchsvc.load_candidate(row["spec_hash"], store=open_store(str(store))).eval()
    with torch.no_grad():
        expected = (model(input_ids=ids, attention_mask=mask) if masks else model(ids)).numpy()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()} if masks else {"images": ids.numpy()}
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)


def test_a_metric_that_cannot_be_made_is_one_line_at_validate(tmp_path, capsys):
    base = yaml.safe_load((REPO / "configs" / "grid-smoke.yaml").read_text())
    base.update(TEXT, task={"metric": "torchmetrics.classification.BinaryF1Score", "metric_kwargs": {"classes": 2}})
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(base))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "task.metric: torchmetrics.classification.BinaryF1Score(**task.metric_kwargs) raised ValueError" in err


def test_a_teacher_whose_norms_average_slowly_is_judged_with_statistics_of_its_trained_weights(tmp_path):
    """Batch norms at momentum 0.01 (torchvision's MobileNetV3, the LR-ASPP example) still hold nearly their
    initial statistics after a short training; the teacher's are re-estimated before it is evaluated and stored."""
    from storage import open_store
    from workers.data.datasets import DatasetConfig, load_dataset, normalize
    from workers.training.task import TaskConfig
    from workers.training.teacher import TeacherConfig, load_or_train_teacher

    dataset = DatasetConfig(name="python", factory=DATA["factory"], kwargs=DATA["kwargs"], in_memory=True)
    splits = load_dataset(dataset)
    config = TeacherConfig(model=TEACHER["model"], kwargs={"num_classes": 4, "momentum": 0.01}, epochs=1,
                           batch_size=32, augment=False, task=TaskConfig(**TASK))
    teacher = load_or_train_teacher(open_store(str(tmp_path / "store")), config, dataset, splits,
                                    torch.device("cpu"), progress=False)
    first, norm = teacher.model.encode[0], teacher.model.encode[1]
    with torch.no_grad():
        activations = first(normalize(splits.train[0][:256], splits.mean, splits.std))
    # Six steps at momentum 0.01 leave the variance near its initial 1 (0.95 where the batches' is 0.2 to 0.9);
    # re-estimated, it is the batches'.
    assert torch.allclose(norm.running_var, activations.var((0, 2, 3)), rtol=0.1)


def test_a_hugging_face_bert_from_a_config_trains_with_adamw_and_is_cut_by_grid(tmp_path, ray_session):
    """transformers' BertForSequenceClassification (built from a BertConfig: nothing downloaded), trained with
    AdamW: grid's `scale` cuts it through the dependency graph into a smaller BERT that rebuilds and exports."""
    base = yaml.safe_load((REPO / "configs" / "your-task-text-hf.yaml").read_text())
    base["dataset"]["kwargs"] = {"train": 256, "val": 64, "test": 64, "length": 16, "vocab": 64}
    base["teacher"].update(epochs=2, kwargs={"vocab": 64, "length": 16, "num_classes": 2, "dim": 32, "heads": 2,
                                             "layers": 1})
    base["train"]["epochs"] = 1
    base["search"] = {"candidates": [{"scale": 0.5}]}
    config = tmp_path / "hf.yaml"
    config.write_text(yaml.safe_dump(base))
    store = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 0
    run_id, _ = _only_run(store)
    (row,) = _rows(store, run_id)
    assert row["status"] == "ok", row.get("error")
    assert row["compression"] > 1.5  # fewer parameters than the teacher
    import onnxruntime

    import searchsvc
    from storage import open_store

    path = tmp_path / "bert.onnx"
    assert main(["export", "--store", str(store), row["spec_hash"], "-o", str(path)]) == 0
    ids = torch.randint(1, 64, (3, 16))
    ids[:, 12:] = 0
    mask = (ids != 0).long()
    model = searchsvc.load_candidate(row["spec_hash"], store=open_store(str(store))).eval()
    with torch.no_grad():  # the stored BERT as Hugging Face's own class, called as transformers' users call it
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert type(model).__name__ == "BertForSequenceClassification"
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)


def test_adamw_is_a_recipe_setting_absent_from_hashes_at_its_default():
    from dataclasses import replace

    from core.records import canonical_json
    from workers.training.train import TrainConfig, _optimizer

    assert "optimizer" not in canonical_json(TrainConfig())
    assert '"optimizer":"adamw"' in canonical_json(TrainConfig(optimizer="adamw"))
    model = torch.nn.Linear(2, 2)
    assert isinstance(_optimizer(model, replace(TrainConfig(), optimizer="adamw"), 10, ())[0], torch.optim.AdamW)
    assert isinstance(_optimizer(model, TrainConfig(), 10, ())[0], torch.optim.SGD)
