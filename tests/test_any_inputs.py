"""Issue 36: inputs of any shape — the example input that tracing, MACs, latency and export run on comes from the
data (workers.models.inputs.InputSpec): feature vectors with a user's network, images that are not square with a
zoo network, and what cannot work (a zoo network on feature vectors) as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import searchsvc
from searchsvc.cli import main
from storage import open_store
from tests.test_user_data import FACTORIES, _config, _only_run, _python, _rows
from workers.data.datasets import load_dataset
from workers.measurement.measure import count_macs
from workers.models.inputs import InputSpec, in_layout
from workers.training.train import Recipe, augment, augments

MLP = "tests.user_models.nets:feature_mlp"


def _teacher_meta(store: Path) -> dict:
    (meta,) = (store / "teachers").glob("*/meta.json")
    return json.loads(meta.read_text())


def _onnx_matches(store: Path, spec_hash: str, inputs: torch.Tensor, tmp_path: Path) -> None:
    """`searchsvc export` of the candidate runs in ONNX Runtime on `inputs` as the stored model does in torch."""
    import onnxruntime

    path = tmp_path / f"{spec_hash}.onnx"
    assert main(["export", "--store", str(store), spec_hash, "-o", str(path)]) == 0
    with torch.no_grad():
        expected = searchsvc.load_candidate(spec_hash, store=open_store(str(store))).eval()(inputs).numpy()
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": inputs.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_inputs_are_the_datas_shape():
    assert load_dataset(_python("features", train=32, val=8, test=8)).inputs == InputSpec((16,))
    assert load_dataset(_python("wide_images", train=16, test=8)).inputs == InputSpec((3, 12, 20))


def test_a_teacher_stored_before_input_shapes_were_recorded_reads_as_a_square_image():
    assert InputSpec.from_meta({"in_channels": 1, "image_size": 28}) == InputSpec((1, 28, 28))
    assert InputSpec.from_meta({}, channels=3) == InputSpec((3, 32, 32))  # the zoo arch's channels, 32 px
    wide = InputSpec((3, 12, 20))
    assert InputSpec.from_meta(wide.meta()) == wide and "image_size" not in wide.meta()
    assert InputSpec.from_meta(InputSpec((16,)).meta()) == InputSpec((16,))


def test_only_image_batches_are_augmented_and_laid_out_channels_last():
    vectors, images = torch.randn(4, 16), torch.rand(4, 3, 12, 20)
    assert torch.equal(augment(vectors, torch.Generator().manual_seed(0)), vectors)
    assert augment(images, torch.Generator().manual_seed(0)).shape == images.shape  # crops keep H and W apart
    assert not augments(Recipe(augment=True), InputSpec((16,))) and augments(Recipe(), InputSpec((3, 12, 20)))
    assert in_layout(images).is_contiguous(memory_format=torch.channels_last) and in_layout(vectors).is_contiguous()


def test_feature_vectors_with_a_users_network_through_grid(tmp_path, ray_session):
    """Grid cuts the MLP's hidden layers; MACs are counted on a [16] vector and the candidate exports."""
    dataset = {"name": "python", "factory": f"{FACTORIES}:features"}
    config = _config(tmp_path, "grid", dataset, teacher={"model": MLP, "epochs": 3, "batch_size": 64},
                     search={"round_to": 1, "candidates": [{"scale": 0.5}]})
    store = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 0
    run_id, record = _only_run(store)
    assert _teacher_meta(store)["input_shape"] == [16] and record["teacher_accuracy"] > 0.5  # it learnt
    (row,) = _rows(store, run_id)
    assert row["status"] == "ok" and row["params"] < 16 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4, row
    model = searchsvc.load_candidate(row["spec_hash"], store=open_store(str(store)))
    assert row["macs"] == count_macs(model, InputSpec((16,))) == sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert row["latency_ms"] > 0
    _onnx_matches(store, row["spec_hash"], torch.randn(5, 16), tmp_path)


def test_images_that_are_not_square_with_a_zoo_network_through_taylor(tmp_path, ray_session):
    dataset = {"name": "python", "factory": f"{FACTORIES}:wide_images"}
    config = _config(tmp_path, "taylor", dataset, teacher={"arch": "tiny_cnn", "epochs": 2, "batch_size": 64},
                     search={"iterations": 2, "filters_per_iteration": 0.1, "importance_batches": 2,
                             "stop": {"max_drop": 100}, "tune": {"grace_period": 2}})
    store = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 0
    run_id, _ = _only_run(store)
    assert _teacher_meta(store)["input_shape"] == [3, 12, 20]
    rows = _rows(store, run_id)
    assert rows and all(r["status"] == "ok" for r in rows), rows
    last = max(rows, key=lambda r: r["iter"] if "iter" in r else 0)
    model = searchsvc.load_candidate(last["spec_hash"], store=open_store(str(store)))
    assert last["macs"] == count_macs(model, InputSpec((3, 12, 20))) < count_macs(model, InputSpec((3, 20, 20)))
    _onnx_matches(store, last["spec_hash"], torch.randn(2, 3, 12, 20), tmp_path)


@pytest.mark.parametrize("section, says", [
    ({"teacher": {"arch": "tiny_cnn", "epochs": 1}}, "teacher.arch: the zoo's networks take images [C, H, W]; "
                                                     "this data's inputs are 16"),
    ({"dataset": {"name": "python", "factory": f"{FACTORIES}:features", "image_size": 8}},
     "dataset.image_size: the inputs are of shape 16, not images"),
])
def test_what_cannot_take_feature_vectors_is_one_line(section, says, tmp_path, capsys):
    config = _config(tmp_path, "grid", section.pop("dataset", {"name": "python", "factory": f"{FACTORIES}:features"}),
                     search={"candidates": [{"scale": 0.5}]}, **section)
    capsys.readouterr()
    assert main(["run", str(config), "--store", str(tmp_path / "store"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "store" / "teachers").exists()
