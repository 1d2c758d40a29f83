"""Issue 38: policy transfer — the n2n policy reads one unit at a time (searchsvc.methods.n2n.policy.UnitPolicy), so
its weights fit a teacher of any depth: a policy trained on a ResNet-18's units starts a ResNet-34's search
(`search.policy_from`), proposing from the transferred weights."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from ray.rllib.core.columns import Columns
from torchvision.models import resnet18, resnet34

from searchsvc.cli import main
from searchsvc.methods.n2n.env import observation_rows
from searchsvc.methods.n2n.policy import UnitPolicy, temper
from workers.models.inputs import InputSpec
from workers.models.structure import structure_of


def _policy(units: int, action_space: gym.Space) -> UnitPolicy:
    space = gym.spaces.Box(0.0, 1.0, (units * 8,), np.float32)  # the flattened descriptors RLlib feeds
    return UnitPolicy(observation_space=space, action_space=action_space, model_config={})


def test_a_resnet18_policy_loads_into_a_resnet34_search_and_proposes_from_its_weights():
    inputs = InputSpec.image(3, 32)
    small, large = structure_of(resnet18(num_classes=10), inputs), structure_of(resnet34(num_classes=10), inputs)
    assert len(small.names) < len(large.names)  # 6 and 13 blocks whose shapes match
    trained = _policy(len(small.names), gym.spaces.MultiDiscrete([2] * len(small.names)))
    fresh = _policy(len(large.names), gym.spaces.MultiDiscrete([2] * len(large.names)))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()  # "trained": anything but the fresh initialisation
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}
    fresh.load_state_dict(trained.state_dict())
    obs = torch.from_numpy(observation_rows(large, large.names).reshape(1, -1))
    logits = fresh.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    assert logits.shape == (1, 2 * len(large.names))
    rows = obs.reshape(1, -1, 8)
    encoded = trained.rows(rows)
    by_hand = trained.head(torch.cat([encoded, encoded.mean(1, keepdim=True).expand_as(encoded)], -1)).flatten(1)
    torch.testing.assert_close(logits, by_hand)  # the proposals come from the transferred weights
    ratios = _policy(len(large.names), gym.spaces.Box(0.1, 1.0, (len(large.names),), np.float32))
    assert ratios.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS].shape == (1, 2 * len(large.names))



@pytest.mark.parametrize("continuous", [False, True])
def test_a_tempered_policy_keeps_its_preferences_and_explores_more(continuous):
    """search.transfer_temperature: logits (a ratio's log-std) divided by T, the order of preferences kept."""
    units = 5
    space = gym.spaces.Box(0.1, 1.0, (units,), np.float32) if continuous else gym.spaces.MultiDiscrete([2] * units)
    trained = _policy(units, space)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    obs = {Columns.OBS: torch.rand(1, units * 8)}
    sure = trained.forward_inference(obs)[Columns.ACTION_DIST_INPUTS]
    tempered = _policy(units, space)
    tempered.load_state_dict(temper(trained.state_dict(), 4.0, continuous))
    soft = tempered.forward_inference(obs)[Columns.ACTION_DIST_INPUTS]
    if continuous:  # means, then log-stds
        torch.testing.assert_close(soft[:, :units], sure[:, :units])
        torch.testing.assert_close(soft[:, units:], sure[:, units:] / 4)
    else:
        dist = trained.action_dist_cls.from_logits
        assert (dist(soft).entropy() > dist(sure).entropy()).all()
        torch.testing.assert_close(soft, sure / 4)  # the same preferences, less sure of them
    as_trained = temper(trained.state_dict(), 1.0, continuous)
    assert all(torch.equal(as_trained[k], v) for k, v in trained.state_dict().items())


SMOKE = {"dataset": {"name": "synthetic", "synthetic": {"num_classes": 4, "channels": 1, "image_size": 16,
                                                        "train_size": 256, "test_size": 64}},
         "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "augment": False},
         "resources": {"gpus_per_eval": 0, "cpus_per_eval": 1}}
SEARCH = {"agent": "ppo", "max_evaluations": 4, "num_envs": 2, "iteration_evaluations": 2, "shrink": False,
          "top_k": 0}


def test_policy_from_starts_a_deeper_teachers_search_from_a_finished_run(tmp_path, ray_session, caplog):
    """tiny_cnn (2 blocks) → resnet20 (9 blocks), in one store; a run with no policy is one line."""
    store = tmp_path / "store"
    first = tmp_path / "tiny.yaml"
    first.write_text(yaml.safe_dump({**SMOKE, "method": "n2n", "search": SEARCH,
                                     "teacher": {"arch": "tiny_cnn", "epochs": 1, "batch_size": 128}}))
    assert main(["run", str(first), "--store", str(store), "--no-progress"]) == 0
    (run_id,) = [p.name for p in (store / "runs").iterdir()]
    assert (store / "runs" / run_id / "state" / "removal" / "policy" / "manifest.json").exists()
    second = tmp_path / "deep.yaml"
    second.write_text(yaml.safe_dump({**SMOKE, "method": "n2n", "search": {**SEARCH, "policy_from": run_id},
                                      "teacher": {"arch": "resnet20", "epochs": 1, "batch_size": 128}}))
    with caplog.at_level("INFO", logger="searchsvc.methods.n2n.driver"):
        assert main(["run", str(second), "--store", str(store), "--no-progress"]) == 0
    assert f"PPO starts from run {run_id}'s trained policy" in caplog.text


def test_policy_from_a_run_without_a_policy_is_one_line(tmp_path, capsys):
    config = tmp_path / "deep.yaml"
    config.write_text(yaml.safe_dump({**SMOKE, "method": "n2n", "search": {**SEARCH, "policy_from": "nowhere-run"},
                                      "teacher": {"arch": "tiny_cnn", "epochs": 1, "batch_size": 128}}))
    assert main(["run", str(config), "--store", str(tmp_path / "store"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "search.policy_from: run nowhere-run in" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("search,says", [({"policy_from": "x", "policy": "mlp"}, "policy_from: a policy transfers"),
                                         ({"policy_from": "x", "agent": "random"}, "policy_from: a policy transfers")])
def test_transfer_needs_the_unit_policy_and_ppo(search, says, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**SMOKE, "method": "n2n", "search": {**SEARCH, **search},
                                      "teacher": {"arch": "tiny_cnn"}}))
    assert main(["validate", str(config)]) == 2
    assert says in capsys.readouterr().err
