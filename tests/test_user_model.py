"""Issue 20: the user's own network — torchvision or a factory of theirs, from their weights file.

The structure engine (workers/models/depgraph.py) on real torchvision models, then a grid run on Ray from a user's
trained factory network, the stored teacher, the candidates rebuilt in a fresh process, ONNX export, and
every bad input as one line with exit 2.
"""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

import searchsvc
from core.records import to_data
from searchsvc.cli import main
from searchsvc.config import load_config
from storage import LocalStore
from tests.user_models.nets import plain_cnn, scaled_cnn, small_resnet
from workers.compression.pruners import channel_keep
from workers.compression.ranking import plan_removal
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset
from workers.measurement.measure import count_macs, count_parameters
from workers.models.cutting import shrink_graph
from workers.models.depgraph import channel_groups, removable_units, slice_positions
from workers.models.inputs import InputSpec
from workers.models.rebuild import rebuild, remove_units
from workers.models.surgery import InvalidTransform
from workers.models.user_model import ModelSource
from workers.training.teacher import TeacherConfig, load_or_train_teacher, teacher_hash
from workers.training.train import Recipe, train_model

REPO = Path(__file__).resolve().parent.parent
FACTORY = "tests.user_models.nets:small_resnet"
MODELS = {"resnet18": lambda: torchvision.models.resnet18(num_classes=10),
          "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
          "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
          "mnasnet0_5": lambda: torchvision.models.mnasnet0_5(num_classes=10),  # checks its state_dict version
          "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),  # a layer scale per block
          "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),  # grouped convolutions
          "factory": lambda: small_resnet(in_channels=3, num_classes=10)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_traced_structure_cuts_real_smaller_models_and_rebuilds_them(name):
    torch.manual_seed(0)
    teacher = MODELS[name]().eval()
    images = torch.randn(3, 3, 32, 32)
    example = InputSpec.image(3, 32).example(teacher)
    with torch.no_grad():
        expected = teacher(images)
        assert torch.equal(shrink_graph(teacher, example)(images), expected)  # identity: exact
    units = removable_units(teacher, example)
    assert units, "every one of these networks has blocks with a skip"
    removed = units[:1]
    groups = channel_groups(remove_units(copy.deepcopy(teacher), removed), example)
    small = shrink_graph(teacher, example, removed, {g.key: max(1, g.channels // 2) for g in groups})
    assert count_parameters(small) < count_parameters(teacher) / 2
    assert count_macs(small, InputSpec.image(3, 32)) < count_macs(teacher, InputSpec.image(3, 32)) / 2
    tensors = dict(small.state_dict())  # tensors only, as model.pt holds them: no per-module version metadata
    again = rebuild(MODELS[name](), removed, tensors)  # a fresh constructor
    with torch.no_grad():
        assert torch.equal(again(images), small(images))


@pytest.mark.parametrize("name", ["regnet_x_400mf", "resnext50_32x4d"])
def test_grouped_convolutions_are_pruned_within_their_groups(name):
    """RegNet's and ResNeXt's grouped (not depthwise) 3x3 convs keep `groups`; the same positions leave every
    group, so halving every channel group cuts ~4x as in any other network, and the result rebuilds exactly."""
    build = getattr(torchvision.models, name)
    torch.manual_seed(0)
    teacher = build(num_classes=10).eval()
    example = InputSpec.image(3, 32).example(teacher)
    groups = channel_groups(teacher, example)
    grouped = {n: m.groups for n, m in teacher.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    assert grouped and {g.slices for g in groups if set(g.outputs) & set(grouped)} == set(grouped.values()) - {1}
    with pytest.raises(InvalidTransform, match="width of"):
        shrink_graph(teacher, example, widths={groups[0].key: 0})
    small = shrink_graph(teacher, example, widths={g.key: g.channels // 2 for g in groups})
    assert count_macs(small, InputSpec.image(3, 32)) < 0.3 * count_macs(teacher, InputSpec.image(3, 32))
    for conv_name, count in grouped.items():
        conv = small.get_submodule(conv_name)
        assert conv.groups == count and conv.out_channels % count == 0 and conv.in_channels % count == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuild(build(num_classes=10), (), dict(small.state_dict()))(images), small(images))


def test_a_grouped_channel_group_loses_the_same_positions_from_every_slice():
    scores = torch.tensor([1.0, 9.0, 2.0, 8.0,   3.0, 7.0, 0.0, 6.0])  # two slices of four channels
    assert slice_positions(scores, 4, slices=2) == [1, 3, 5, 7]  # positions 1 and 3 have the top mean scores
    assert plan_removal({"g": scores, "h": torch.tensor([5.0, 5.0])}, 3, {"g": 2}) == {"g": 4}
    assert channel_keep(scores, 0.5, slices=2).tolist() == [False, True, False, True] * 2


def test_units_are_found_by_tracing_not_by_class_names():
    teacher = small_resnet(in_channels=1, num_classes=4)
    # blocks.2 changes width and stride (its skip is a projection): not removable; the others are.
    assert removable_units(teacher, InputSpec.image(1, 16).example(teacher)) == ("blocks.0", "blocks.1", "blocks.3")


def test_fields_added_for_user_models_leave_stored_identities_alone():
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert "model" not in to_data(config.teacher) and "mean" not in to_data(config.dataset)
    assert teacher_hash(config.teacher, config.dataset) == "82d9194c238045dd"  # the stored quickstart teacher


DATA = {"name": "synthetic", "synthetic": {"num_classes": 4, "channels": 1, "image_size": 16, "train_size": 512,
                                            "test_size": 128}}


@pytest.fixture(scope="module")
def user_weights(tmp_path_factory) -> Path:
    """The user's trained network: a factory of theirs, trained elsewhere, saved as a state_dict."""
    folder = tmp_path_factory.mktemp("user")
    splits = load_dataset(DatasetConfig(name="synthetic", synthetic=SyntheticConfig(**DATA["synthetic"])))
    model = small_resnet(in_channels=1, num_classes=4)
    torch.manual_seed(0)
    train_model(model, splits, Recipe(epochs=3, batch_size=64, lr=0.05, augment=False), torch.device("cpu"),
                progress=False)
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder


def write_config(folder: Path, teacher: dict, candidates: list | None = None, name: str = "job.yaml") -> Path:
    config = {"method": "grid", "dataset": DATA, "teacher": teacher, "resources": {"gpus_per_eval": 0},
              "train": {"epochs": 1, "batch_size": 64, "augment": False},
              "search": {"candidates": candidates or [{"scale": 0.5}]}}
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def user_run(user_weights, tmp_path_factory, ray_session):
    store_dir = tmp_path_factory.mktemp("user-run") / "store"
    candidates = [{"scale": 0.5}, {"remove": ["blocks.1"]}, {"remove": ["blocks.0", "blocks.3"], "scale": 0.75}]
    config = write_config(user_weights, {"model": FACTORY, "kwargs": {"num_classes": 4}, "weights": "weights.pt"},
                          candidates)  # a weights path relative to the config file's folder
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress"]) == 0
    store = LocalStore(store_dir)
    run_id = store.list("runs/")[0].split("/")[1]
    return store_dir, store, run_id


def test_given_weights_are_stored_as_given_and_never_trained(user_run, user_weights):
    _, store, run_id = user_run
    record = store.get_json(f"runs/{run_id}/run.json")
    key = record["teacher_hash"]
    meta = store.get_json(f"teachers/{key}/meta.json")
    raw = (user_weights / "weights.pt").read_bytes()
    assert meta["source"] == {"model": FACTORY, "kwargs": {"num_classes": 4},
                              "weights_sha256": hashlib.sha256(raw).hexdigest()}
    assert meta["history"] == [] and meta["train_seconds"] == 0
    given = torch.load(user_weights / "weights.pt", weights_only=True)
    stored = searchsvc.load_candidate  # noqa: F841 — candidates below; the teacher's file is compared here
    from workers.training.teacher import load_teacher
    teacher_state = load_teacher(store, key).model.state_dict()
    assert given.keys() == teacher_state.keys()
    assert all(torch.equal(given[k], teacher_state[k]) for k in given)


def test_grid_on_a_user_model_gives_real_smaller_models(user_run):
    _, store, run_id = user_run
    teacher_params = count_parameters(small_resnet(1, 4))
    rows = searchsvc.results(store, run_id).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["params"] < teacher_params for r in rows)
    assert len({r["macs"] for r in rows}) == 3


def test_a_user_candidate_loads_in_a_fresh_process_with_its_stored_accuracy(user_run):
    store_dir, store, run_id = user_run
    row = searchsvc.results(store, run_id).to_pylist()[0]
    code = (f"import searchsvc, torch; from workers.data.datasets import *; from workers.training.train import evaluate;"
            f"m = searchsvc.load_candidate({row['spec_hash']!r}, store={str(store_dir)!r});"
            f"s = load_dataset(DatasetConfig(name='synthetic', synthetic=SyntheticConfig(**{DATA['synthetic']!r})));"
            f"print(evaluate(m, *s.test, s.mean, s.std))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert float(out.split()[-1]) == pytest.approx(row["accuracy"], abs=1e-9)


def test_a_user_candidate_exports_to_onnx_matching_pytorch(user_run, tmp_path):
    import onnxruntime

    store_dir, store, run_id = user_run
    spec_hash = searchsvc.results(store, run_id)["spec_hash"][-1].as_py()
    path = tmp_path / "m.onnx"
    assert main(["export", "--store", str(store_dir), spec_hash, "-o", str(path)]) == 0
    images = torch.randn(4, 1, 16, 16)
    expected = searchsvc.load_candidate(spec_hash, store=store)(images).detach().numpy()
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_safetensors_weights_and_the_input_contract(tmp_path):
    from safetensors.torch import save_file

    model = small_resnet(in_channels=3, num_classes=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dataset = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(**DATA["synthetic"]), channels=3,
                            image_size=20, mean=(0.5,), std=(0.25,))
    splits = load_dataset(dataset)
    assert splits.inputs.shape == (3, 20, 20) and splits.mean == (0.5,) * 3
    config = TeacherConfig(model=FACTORY, kwargs={"in_channels": 3, "num_classes": 4},
                           weights=str(tmp_path / "w.safetensors"))
    store = LocalStore(tmp_path / "store")
    teacher = load_or_train_teacher(store, config, dataset, splits, torch.device("cpu"), progress=False)
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert load_or_train_teacher(store, config, dataset, splits, torch.device("cpu")).cached


@pytest.mark.s3
def test_weights_from_s3_are_read_through_the_stores_endpoint(user_weights, s3_env):
    """An s3:// weights URI on the store's own S3 server: the endpoint given for the store (--s3-endpoint) is
    the one the weights are read from (the environment names none)."""
    from storage import S3Store

    raw = (user_weights / "weights.pt").read_bytes()
    bucket = s3_env.new_bucket()
    s3_env.client().put_object(Bucket=bucket, Key="models/mine.pt", Body=raw)
    store = S3Store(bucket, "store", endpoint=s3_env.endpoint)
    dataset = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(**DATA["synthetic"]))
    config = TeacherConfig(model=FACTORY, kwargs={"num_classes": 4}, weights=f"s3://{bucket}/models/mine.pt")
    teacher = load_or_train_teacher(store, config, dataset, load_dataset(dataset), torch.device("cpu"),
                                    progress=False)
    assert teacher.meta["source"]["weights_sha256"] == hashlib.sha256(raw).hexdigest()


BAD = {
    "unknown torchvision model": ({"model": "torchvision:resnet19"}, "validate", "resnet18"),
    "arch and model": ({"arch": "resnet20", "model": "torchvision:resnet18"}, "validate", "teacher.arch"),
    "missing weights": ({"model": FACTORY, "weights": "nowhere.pt"}, "validate", "nowhere.pt"),
    "kwargs without model": ({"kwargs": {"num_classes": 4}}, "validate", "teacher.kwargs"),
    "factory that raises": ({"model": "tests.user_models.nets:broken"}, "run", "cannot build anything"),
    "no such module": ({"model": "tests.user_models.nowhere:net"}, "validate", "tests.user_models.nowhere"),
    "weights of another shape": ({"model": FACTORY, "kwargs": {"num_classes": 7}, "weights": "weights.pt"}, "run",
                                 "head.weight has shape (4, 16) in the file but (7, 16)"),
    "logits for other classes": ({"model": FACTORY, "kwargs": {"num_classes": 3}}, "run", "4 classes"),
    "a pickled model": ({"model": FACTORY, "kwargs": {"num_classes": 4}, "weights": "pickled.pt"}, "run",
                        "weights_only"),
    "another model's weights": ({"model": "tests.user_models.nets:plain_cnn", "weights": "weights.pt"}, "run",
                                "has no tensor"),
}


def test_n2n_on_a_network_with_nothing_removable_is_refused_at_validate(user_weights, capsys):
    """An MLP whose one hidden layer reads the image itself: without it the classifier would read 256 values
    where it reads 32, and the image cannot be cut."""
    config = write_config(user_weights, {"model": "tests.user_models.nets:mlp"}, name="mlp.yaml")
    capsys.readouterr()
    assert main(["validate", str(config), "--set", "method=n2n", "--set", "search={max_evaluations: 4}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has none that can go" in err, err
    assert main(["validate", str(config)]) == 0  # grid takes it


def test_n2n_removes_and_shrinks_the_layers_of_a_plain_network(user_weights, tmp_path, ray_session):
    """No skip connection anywhere: the agent acts on its single layers (issue 38)."""
    from workers.models.structure import structure_of

    units = structure_of(plain_cnn(4), InputSpec.image(1, 16))
    assert units.names == ("0", "2") and units.inner == {"0": {"0": 8}, "2": {"2": 8}}
    config = write_config(user_weights, {"model": "tests.user_models.nets:plain_cnn"}, name="plain.yaml")
    store_dir = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress", "--set", "method=n2n",
                 "--set", "search={agent: random, max_evaluations: 6, num_envs: 2, shrink_share: 0.5, top_k: 0}"]) == 0
    rows = searchsvc.results(LocalStore(store_dir)).to_pylist()
    assert rows and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    teacher_params = count_parameters(plain_cnn(4))
    removed = [r for r in rows if r["removed"] != "[]"]
    assert removed and all(r["params"] < teacher_params for r in removed)
    # the shrink stage on a removal result that kept a layer (which one the random agent found best varies)
    from dataclasses import replace

    from searchsvc.methods.n2n.env import shrink_stage
    from workers.evaluation.spec import CandidateSpec

    spec = CandidateSpec.from_json((next(store_dir.glob("candidates/*/spec.json"))).read_text())
    shrunk = shrink_stage(replace(spec, removed=("0",), widths=()), units.inner, (0.5,)).make_spec(np.array([0]))
    assert shrunk.removed == ("0",) and dict(shrunk.widths) == {"2": 4}
    example = InputSpec.image(1, 16).example(plain_cnn(4))
    model = shrink_graph(plain_cnn(4), example, shrunk.removed, shrunk.widths)
    assert model[2].out_channels == 4 and count_parameters(model) < count_parameters(
        shrink_graph(plain_cnn(4), example, ("0",)))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_user_models_are_one_line_and_exit_2(case, user_weights, tmp_path, capsys):
    teacher, command, expected = BAD[case]
    torch.save(small_resnet(1, 4), user_weights / "pickled.pt")  # the whole module pickled, not a state_dict
    config = write_config(user_weights, teacher, name=f"bad-{case.replace(' ', '-')}.yaml")
    store = tmp_path / "store"
    args = ["validate", str(config)] if command == "validate" else \
        ["run", str(config), "--store", str(store), "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (store / "teachers").exists() or not any((store / "teachers").iterdir())  # nothing stored


def test_a_fine_tuned_teacher_is_a_new_teacher_beside_the_given_one(user_weights, tmp_path):
    dataset = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(**DATA["synthetic"]))
    splits = load_dataset(dataset)
    given = TeacherConfig(model=FACTORY, kwargs={"num_classes": 4}, weights=str(user_weights / "weights.pt"))
    tuned = TeacherConfig(model=FACTORY, kwargs={"num_classes": 4}, weights=given.weights, finetune_epochs=1,
                          lr=0.01, batch_size=64, augment=False)
    store = LocalStore(tmp_path / "store")
    first = load_or_train_teacher(store, given, dataset, splits, torch.device("cpu"), progress=False)
    second = load_or_train_teacher(store, tuned, dataset, splits, torch.device("cpu"), progress=False)
    assert first.teacher_hash != second.teacher_hash and len(second.meta["history"]) == 1
    assert second.meta["source"] == first.meta["source"]  # the same constructor and weights it started from
    weights = first.model.state_dict()
    assert any(not torch.equal(v, second.model.state_dict()[k]) for k, v in weights.items())


def test_n2n_removes_and_shrinks_a_user_models_traced_blocks(user_weights, tmp_path, ray_session):
    from workers.models.structure import structure_of

    units = structure_of(small_resnet(1, 4), InputSpec.image(1, 16))
    assert units.names == ("blocks.0", "blocks.1", "blocks.3")
    assert units.inner["blocks.0"] == {"blocks.0.body.0": 8} and units.rows["blocks.3"].filters == 16
    config = write_config(user_weights, {"model": FACTORY, "kwargs": {"num_classes": 4}, "weights": "weights.pt"},
                          name="n2n.yaml")
    store_dir = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress", "--set", "method=n2n",
                 "--set", "search={agent: random, max_evaluations: 4, num_envs: 2, shrink_share: 0.5, top_k: 0}"]) == 0
    store = LocalStore(store_dir)
    rows = searchsvc.results(store).to_pylist()
    teacher_params = count_parameters(small_resnet(1, 4))
    assert len(rows) == 4 and all(r["params"] < teacher_params for r in rows if r["status"] == "ok" and
                                  (r["removed"] != "[]" or r["widths"] != "{}"))
    assert any(r["widths"] != "{}" for r in rows), "the shrink stage cut inner widths of kept blocks"


def test_taylor_prunes_a_user_model_over_its_dependency_graph(user_weights, tmp_path, ray_session):
    from workers.compression.ranking import plan_removal
    from workers.compression.taylor import graph_taylor_scores

    dataset = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(**DATA["synthetic"]))
    model = small_resnet(1, 4)
    model.load_state_dict(torch.load(user_weights / "weights.pt", weights_only=True))
    scores = graph_taylor_scores(model, load_dataset(dataset), batches=2, batch_size=64)
    example = InputSpec.image(1, 16).example(model)
    assert {g.key: g.channels for g in channel_groups(model, example)} == {k: len(v) for k, v in scores.items()}
    assert all(bool((v >= 0).all()) and v.sum() > 0 for v in scores.values())  # Σ|w·∂L/∂w|: raw, for the ranking
    assert sum(plan_removal(scores, 10).values()) == 10
    config = write_config(user_weights, {"model": FACTORY, "kwargs": {"num_classes": 4}, "weights": "weights.pt"},
                          name="taylor.yaml")
    store_dir = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress", "--set", "method=taylor",
                 "--set", "search={iterations: 2, filters_per_iteration: 0.15, importance_batches: 2, "
                          "stop: {max_drop: 100}}"]) == 0
    rows = sorted(searchsvc.results(LocalStore(store_dir)).to_pylist(), key=lambda r: r["iteration"])
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["status"] == "ok" for r in rows)
    teacher_params = count_parameters(small_resnet(1, 4))
    assert teacher_params > rows[0]["params"] > rows[1]["params"]  # real smaller layers, falling each round
    again = searchsvc.load_candidate(rows[1]["spec_hash"], store=str(store_dir))  # rebuilt through its parent
    assert count_parameters(again) == rows[1]["params"]


def test_taylor_on_torchvision_mobilenet_v2_from_its_weights(tmp_path, ray_session):
    """A torchvision network end to end: given weights (not trained), 1-channel data fed as RGB at 32 px,
    Taylor pruning through its depthwise couplings, a smaller model rebuilt from the constructor."""
    torch.manual_seed(0)
    teacher = torchvision.models.mobilenet_v2(num_classes=4)
    torch.save(teacher.state_dict(), tmp_path / "mobilenet.pt")
    data = {**DATA, "channels": 3, "image_size": 32}
    config = {"method": "taylor", "dataset": data, "resources": {"gpus_per_eval": 0},
              "teacher": {"model": "torchvision:mobilenet_v2", "kwargs": {"num_classes": 4},
                          "weights": "mobilenet.pt"},
              "train": {"epochs": 1, "batch_size": 64, "augment": False, "max_images": 128},
              "search": {"iterations": 1, "filters_per_iteration": 0.2, "importance_batches": 1,
                         "stop": {"max_drop": 100}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    store_dir = tmp_path / "store"
    assert main(["run", str(tmp_path / "job.yaml"), "--store", str(store_dir), "--no-progress"]) == 0
    rows = searchsvc.results(LocalStore(store_dir)).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert rows[0]["params"] < count_parameters(teacher) and rows[0]["macs"] < count_macs(teacher, InputSpec.image(3, 32))
    again = searchsvc.load_candidate(rows[0]["spec_hash"], store=str(store_dir))
    assert count_parameters(again) == rows[0]["params"]


def test_both_engines_agree_on_a_zoo_model_where_both_apply():
    """Why the zoo keeps its own surgery (README, "Your own model"): on ResNet-20 the traced engine finds the
    seven identity-shortcut blocks (the zoo also removes the two with a projection, keeping the 1x1 conv) and
    cuts the same parameter count at half width; only which channels survive differs (group score)."""
    from workers.models.surgery import removable_blocks, shrink, width_keys
    from workers.models.zoo import create_model

    teacher = create_model("resnet20", 1, 10).eval()
    example = InputSpec.image(1, 28).example(teacher)
    traced = removable_units(teacher, example)
    assert set(traced) < set(removable_blocks(teacher))
    assert set(removable_blocks(teacher)) - set(traced) == {"layer2.0", "layer3.0"}  # the projection blocks
    half_zoo = shrink(teacher, widths={k: v // 2 for k, v in width_keys(teacher.arch).items()})
    half_graph = shrink_graph(teacher, example, widths={g.key: g.channels // 2 for g in channel_groups(teacher, example)})
    assert count_parameters(half_zoo) == count_parameters(half_graph) < count_parameters(teacher)


def test_rigl_trains_a_user_model_sparse_from_fresh_weights(user_weights, tmp_path, ray_session):
    from workers.compression.rigl import fresh_weights

    model = small_resnet(1, 4)
    torch.manual_seed(1)
    fresh = fresh_weights(model)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(fresh.stem[0].weight, model.stem[0].weight)  # re-initialised by its own layers
    trained = scaled_cnn()
    with torch.no_grad():
        trained.gamma.fill_(0.5)  # a layer scale, which no reset_parameters reaches: only the constructor does
    source = ModelSource("tests.user_models.nets:scaled_cnn", {})
    assert torch.equal(fresh_weights(trained, source).gamma, torch.full((8, 1, 1), 1e-6))
    config = write_config(user_weights, {"model": FACTORY, "kwargs": {"num_classes": 4}, "weights": "weights.pt"},
                          name="rigl.yaml")
    store_dir = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress", "--set", "method=rigl",
                 "--set", "search={dense_allocation: 0.3, delta: 4, distribution: erk, init: scratch}"]) == 0
    rows = searchsvc.results(LocalStore(store_dir)).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["rigl_updates"] > 0
    assert rows[0]["nonzero_params"] < 0.5 * count_parameters(small_resnet(1, 4))
    again = searchsvc.load_candidate(rows[0]["spec_hash"], store=str(store_dir))
    assert sum(int(p.count_nonzero()) for p in again.parameters()) == rows[0]["nonzero_params"]


@pytest.mark.parametrize("model", ["tests.user_models.nets:mlp",
                                   "torchvision.models.vision_transformer:VisionTransformer"])
def test_rigl_on_a_model_of_linear_layers_is_refused_while_they_are_ignored(model, user_weights, capsys):
    """An MLP, or a vision transformer (one patch-embedding conv, kept dense as the first layer, then linear
    layers): nothing would be sparse, which `validate` says rather than a trial that fails."""
    kwargs = {"num_classes": 4} if model.endswith("mlp") else {"image_size": 16, "patch_size": 4, "num_layers": 1,
                                                                "num_heads": 2, "hidden_dim": 8, "mlp_dim": 8,
                                                                "num_classes": 4}
    config = write_config(user_weights, {"model": model, "kwargs": kwargs}, name="rigl-linear.yaml")
    assert main(["validate", str(config), "--set", "method=rigl", "--set", "search={dense_allocation: 0.3}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{model} has no conv layer beyond its first" in err, err
    assert main(["validate", str(config), "--set", "method=rigl",
                 "--set", "search={dense_allocation: 0.3, ignore_linear_layers: false}"]) == 0


AGP_ELEMENT = ("{version: 1, pruners: {all: {class: AutomatedGradualPruner, initial_sparsity: 0.2, final_sparsity: 0.6, "
               "weights: [blocks.0.body.0.weight, blocks.0.body.3.weight, blocks.1.body.0.weight, "
               "blocks.1.body.3.weight]}}, policies: [{pruner: {instance_name: all}, starting_epoch: 0, "
               "ending_epoch: 1, frequency: 1}]}")


def test_agp_prunes_a_user_model_element_wise_and_checks_structured_schedules(user_weights, tmp_path, capsys,
                                                                             ray_session):
    config = write_config(user_weights, {"model": FACTORY, "kwargs": {"num_classes": 4}, "weights": "weights.pt"},
                          name="agp.yaml")
    store_dir = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress", "--set", "method=agp",
                 "--set", "train.epochs=2", "--set", f"search={{schedule: {AGP_ELEMENT}}}"]) == 0
    rows = searchsvc.results(LocalStore(store_dir)).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["sparsity"] > 0.1  # 60 % of 4 of its convs
    again = searchsvc.load_candidate(rows[0]["spec_hash"], store=str(store_dir))
    assert sum(int(p.count_nonzero()) for p in again.parameters()) == rows[0]["nonzero_params"]
    structured = AGP_ELEMENT.replace("AutomatedGradualPruner", "StructuredAGP")
    assert main(["validate", str(config), "--set", "method=agp", "--set", f"search={{schedule: {structured}}}"]) == 0
    capsys.readouterr()
    not_a_filter = structured.replace("blocks.1.body.3.weight", "blocks.1.body.1.weight")  # a batch-norm scale
    assert main(["validate", str(config), "--set", "method=agp", "--set", f"search={{schedule: {not_a_filter}}}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'blocks.1.body.1.weight' is not a prunable filter weight" in err, err


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "regnet_x_400mf", "factory"])
def test_structured_agp_on_a_user_model_thins_to_the_same_outputs(name):
    """StructuredAGP over traced channel groups (residual streams, depthwise couplings, grouped convolutions'
    slices): the masked network and the thinned one compute the same function, with far fewer MACs."""
    from workers.compression.schedule import CompressionScheduler, parse_schedule
    from workers.models.thinning import group_of_weight, thin

    torch.manual_seed(0)
    model = MODELS[name]().eval()
    example = InputSpec.image(3, 32).example(model)
    weights = sorted({group.weights[0] for group in group_of_weight(model, example).values()})  # every group
    raw = {"version": 1, "pruners": {"filters": {"class": "StructuredAGP", "initial_sparsity": 0.5,
                                                 "final_sparsity": 0.5, "weights": weights}},
           "policies": [{"pruner": {"instance_name": "filters"}, "starting_epoch": 0, "ending_epoch": 1,
                         "frequency": 1}]}
    scheduler = CompressionScheduler(parse_schedule(raw, model, example=example), model, example)
    scheduler.on_epoch_begin(0)
    thinned, removed = thin(model, example)
    assert len(removed) == len(weights) and all(n > 0 for n in removed.values())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(thinned(images), model(images), atol=1e-4)
    assert count_macs(thinned, InputSpec.image(3, 32)) < 0.5 * count_macs(model, InputSpec.image(3, 32))


def test_thinning_a_user_model_removes_exactly_its_dead_channels():
    from workers.models.thinning import thin

    model = small_resnet(1, 4).eval()
    example = InputSpec.image(1, 16).example(model)
    with torch.no_grad():  # kill 3 inner channels of blocks.1: every parameter of their group zeroed
        for module in (model.blocks[1].body[0], model.blocks[1].body[1]):
            for p in module.parameters():
                p[:3] = 0
    thinned, removed = thin(model, example)
    assert removed == {"blocks.1.body.0": 3}
    images = torch.randn(4, 1, 16, 16)
    assert torch.allclose(thinned(images), model(images), atol=1e-5)
    assert count_parameters(thinned) < count_parameters(model)


def test_sensitivity_of_a_user_model_element_wise_and_by_filter(user_weights, tmp_path, capsys, ray_session):
    config = write_config(user_weights, {"model": FACTORY, "kwargs": {"num_classes": 4}, "weights": "weights.pt"},
                          name="sensitivity.yaml")
    store_dir = tmp_path / "store"
    weights = "[blocks.0.body.0.weight, head.weight]"
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress", "--set", "method=sensitivity",
                 "--set", f"search={{levels: [0.0, 0.9], weights: {weights}}}"]) == 0
    rows = searchsvc.results(LocalStore(store_dir)).to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    by_point = {(r["weight"], r["level"]): r for r in rows}
    assert by_point[("blocks.0.body.0.weight", 0.9)]["nonzero_params"] < by_point[("blocks.0.body.0.weight", 0.0)][
        "nonzero_params"]
    assert main(["run", str(config), "--store", str(store_dir), "--no-progress", "--set", "method=sensitivity",
                 "--set", "search={structure: filter, levels: [0.5], weights: [blocks.1.body.0.weight]}"]) == 0
    filters = searchsvc.results(LocalStore(store_dir)).to_pylist()
    assert len(filters) == 1 and filters[0]["status"] == "ok" and filters[0]["structure"] == "filter"
    assert filters[0]["nonzero_params"] < by_point[("blocks.0.body.0.weight", 0.0)]["nonzero_params"]
    capsys.readouterr()
    assert main(["validate", str(config), "--set", "method=sensitivity",
                 "--set", "search={structure: filter, weights: [blocks.1.body.1.weight]}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'blocks.1.body.1.weight' is not a prunable weight" in err, err


def test_an_edited_constructor_in_a_stored_teacher_is_refused_before_it_runs(user_weights, tmp_path):
    """A stored meta.json names code to import and call: it must hash to its teacher's key first."""
    import json

    from storage import CorruptArtifactError
    from storage.base import json_bytes
    from workers.training.teacher import load_teacher

    dataset = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(**DATA["synthetic"]))
    config = TeacherConfig(model=FACTORY, kwargs={"num_classes": 4}, weights=str(user_weights / "weights.pt"))
    store = LocalStore(tmp_path / "store")
    key = load_or_train_teacher(store, config, dataset, load_dataset(dataset), torch.device("cpu")).teacher_hash
    assert load_teacher(store, key).teacher_hash == key  # as stored: loads
    meta_key = f"teachers/{key}/meta.json"
    meta = json.loads(store.get_bytes(meta_key))
    meta["source"]["model"] = meta["config"]["model"] = "tests.user_models.nets:broken"  # would raise if called
    (tmp_path / "store" / meta_key).write_bytes(json_bytes(meta))
    manifest = json.loads(store.get_bytes(f"teachers/{key}/manifest.json"))  # the manifest re-signed as well
    manifest["files"]["meta.json"]["sha256"] = hashlib.sha256(json_bytes(meta)).hexdigest()
    (tmp_path / "store" / f"teachers/{key}/manifest.json").write_bytes(json_bytes(manifest))
    with pytest.raises(CorruptArtifactError, match="do not hash to the teacher"):
        load_teacher(store, key)


def test_resizing_a_fixed_size_dataset_is_new_data_to_the_teacher_hash():
    from workers.training.teacher import data_identity

    plain = DatasetConfig(name="fashion_mnist")
    assert "resized" not in data_identity(plain)
    assert data_identity(DatasetConfig(name="fashion_mnist", image_size=32))["resized"] is True
    assert "resized" not in data_identity(DatasetConfig(name="imagefolder", image_size=32))
