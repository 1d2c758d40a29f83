"""Does the N2N agent beat random search — at many seeds, cheaply? Every removal of a teacher is distilled and scored
once (a real searchsvc n2n run that enumerates the removal stage's whole action space), then PPO, PPO started from
a transferred policy, and random search run on that table (NAS-Bench style): the agents are searchsvc's own
(`driver.run_ppo`, `driver.run_random`, the same environment, policy and budget rules), only the reward of a
candidate is looked up instead of trained again. A candidate's reward is deterministic given its spec (its seed is
the config's), so a lookup is what a cache hit would give; the budget counts distinct candidates, as a live run's
does. What a table cannot show: noise between two trainings of the same spec (one training seed per table).

    python benchmarks/n2n_landscape.py fill --name resnet20 [--set teacher.arch=resnet20 ...]
    python benchmarks/n2n_landscape.py compare --name resnet20 --source resnet14 [--budgets 128 256] [--seeds ...]

`fill` writes `results/n2n_landscape_<name>.json` (every removal's reward, compression and accuracies, the unit
descriptors the agent observes); `compare` writes `results/n2n_agents_table_<name>.json`: per agent and budget
the best reward of each seed, mean, wins / ties / losses against random search, and the evaluations each needed
to reach random search's best. `--source`: the table whose PPO-trained policy `ppo_transfer` starts from (a
smaller teacher of the same family, as the paper moves ResNet-18 to ResNet-34).

The models this file defines (`resnet14`, `plain_vgg`) are user models (`teacher.model: n2n_landscape:...`), not
zoo entries.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
HERE = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))  # Ray workers

import numpy as np  # noqa: E402
from common import write_result  # noqa: E402
from n2n_agents import compare as compare_agents  # noqa: E402
from n2n_agents import to_reach  # noqa: E402
from torch import nn  # noqa: E402

CONFIG = HERE.parent / "configs" / "quickstart.yaml"
CURVE_AT = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # where the JSON samples the mean best-reward curve
BASE = ("dataset.subset=0.1", "train.max_images=1000", "search.num_envs=4", "search.shrink=false", "search.top_k=0")


def resnet14(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """He et al.'s CIFAR ResNet at depth 14 (3 stages x 2 blocks): ResNet-20's smaller sibling, a user model."""
    from workers.models.zoo import ResNetArch, _stages, build_model

    return build_model(ResNetArch("resnet14", in_channels, num_classes, 16, _stages((16, 32, 64), 2)))


def plain_vgg(in_channels: int = 1, num_classes: int = 10, convs: tuple[int, ...] = (16, 16, 32, 32, 32, 64, 64, 64),
              pool_after: tuple[int, ...] = (1, 4), hidden: int = 64) -> nn.Module:
    """A VGG-style user network without skips: 3x3 conv-BN-ReLU layers (max-pool after the indexed ones), global
    average pool, one hidden linear layer, the classifier."""
    layers: list[nn.Module] = []
    width = in_channels
    for i, out in enumerate(convs):
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i in pool_after else []
        width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden,
                                                                                                     num_classes)]
    return nn.Sequential(*layers)


def _enumerate(session, seed: int) -> None:  # noqa: ANN001 — driver.StageBudget; replaces driver.run_random
    """Every action of the removal stage, 32 candidates per call to the pool; records what `compare` needs."""
    stage = session.stage
    actions = [np.array(a) for a in itertools.product((0, 1), repeat=len(stage.blocks))]
    for start in range(0, len(actions), 32):
        session.evaluate([stage.make_spec(a) for a in actions[start:start + 32]])
    one_hot = np.eye(len(stage.blocks), dtype=int)
    _enumerate.seen = {"blocks": list(stage.blocks), "observation": session.observation.tolist(),
                       "members": {b: list(stage.make_spec(one_hot[i]).removed) for i, b in enumerate(stage.blocks)},
                       "base": stage.make_spec(np.zeros(len(stage.blocks), dtype=int)).canonical_json()}


def fill(args: argparse.Namespace) -> Path:
    import searchsvc
    from searchsvc.methods.n2n import driver

    driver.run_random = _enumerate
    overrides = [*BASE, "search.agent=random", "search.max_evaluations=100000", *args.overrides]
    with tempfile.TemporaryDirectory() as store:
        result = searchsvc.run(searchsvc.load_config(args.config, overrides), store=store, progress=True)
    table = {"|".join(json.loads(row["removed"])): {k: row[k] for k in ("status", "reward", "compression",
                                                                          "val_accuracy", "accuracy")}
             for row in result.table.to_pylist()}
    return write_result(args.out, f"n2n_landscape_{args.name}", {
        "benchmark": "n2n_landscape", "name": args.name, "config": str(args.config), "overrides": overrides,
        "teacher_accuracy": result.teacher_accuracy, "candidates": len(table), **_enumerate.seen, "table": table})


class TableEvaluator:
    """What `driver.StageBudget` needs of an Evaluator, with rewards from a filled table: rows by spec hash, a
    (real, empty) store, and the order in which distinct candidates were first asked for."""

    def __init__(self, table: dict[str, dict], store) -> None:  # noqa: ANN001 — storage.LocalStore
        self.table, self.rows, self.order = table, {}, []
        self.context = SimpleNamespace(store=store)

    def evaluate(self, specs: list) -> list:
        rows = []
        for spec in specs:
            entry = self.table["|".join(spec.removed)]
            if spec.spec_hash not in self.rows:
                self.order.append(entry)
                self.rows[spec.spec_hash] = SimpleNamespace(spec_hash=spec.spec_hash, reward=entry["reward"],
                                                            ok=entry["status"] == "ok",
                                                            compression=entry["compression"])
            rows.append(self.rows[spec.spec_hash])
        return rows


def replay(landscape: dict, agent: str, seed: int, budget: int, args: argparse.Namespace,
           transfer: bytes | None = None) -> tuple[dict, bytes | None]:
    """One search on the table; its best valid reward, curve of best-after-each distinct candidate, and (PPO) its
    trained policy's weights."""
    from searchsvc.methods.n2n import N2NSearch, driver
    from searchsvc.methods.n2n.env import removal_stage
    from storage import layout
    from storage.local import LocalStore
    from workers.evaluation.spec import CandidateSpec

    search = replace(N2NSearch(), agent="ppo" if agent.startswith("ppo") else "random", max_evaluations=budget,
                     iteration_evaluations=args.iteration, num_envs=4, shrink=False, top_k=0, checkpoint_every=10**6,
                     policy_from="source" if transfer is not None else None)
    if args.temperature is not None:
        search = replace(search, transfer_temperature=args.temperature)
    stage = removal_stage(tuple(landscape["blocks"]), CandidateSpec.from_json(landscape["base"]),
                          {b: tuple(m) for b, m in landscape["members"].items()})
    with tempfile.TemporaryDirectory() as folder:
        store = LocalStore(folder)
        evaluator = TableEvaluator(landscape["table"], store)
        session = driver.StageBudget(evaluator, search, budget, math.inf, stage,
                                     np.asarray(landscape["observation"], dtype=np.float32))
        policy = None
        if agent == "random":
            driver.run_random(session, seed)
        else:
            trained = layout.trained_policy("replay", "removal")
            driver.run_ppo(session, seed, layout.ppo_checkpoint("replay", "removal"), False, transfer, trained)
            policy = store.get_bytes(layout.file_in(trained, layout.POLICY_WEIGHTS))
    rewards = [entry["reward"] if entry["status"] == "ok" else 0.0 for entry in evaluator.order]
    curve = list(itertools.accumulate(rewards, max))
    last = rewards[-max(1, len(rewards) // 4):]  # what the agent proposes once it has learnt what it can
    return {"reward": max(rewards), "evaluations": len(curve), "steps": session.steps,
            "last_quarter_mean_reward": sum(last) / len(last), "best_after_each": curve}, policy


def summarise(runs: dict[str, dict[int, dict]], seeds: list[int], optimum: float) -> dict:
    """n2n_agents' comparison (mean best rewards, wins / ties / losses against random, evaluations to random's
    best), plus what a table can tell: who found its best, how good the late proposals were, the mean curve."""
    out = compare_agents(runs, seeds)
    for agent, by_seed in runs.items():
        curves = [by_seed[s]["best_after_each"] for s in seeds]
        out[f"{agent}_found_optimum"] = sum(by_seed[s]["reward"] >= optimum for s in seeds)
        out[f"{agent}_last_quarter_mean_reward"] = statistics.mean(by_seed[s]["last_quarter_mean_reward"]
                                                                   for s in seeds)
        # the curve: mean best reward after k distinct candidates (a run's final best once it has stopped)
        out[f"{agent}_mean_best_after"] = {k: statistics.mean(c[min(k, len(c)) - 1] for c in curves)
                                           for k in CURVE_AT if k <= max(map(len, curves))}
        # how fast each gets to the table's best: evaluations, None where it never did
        out[f"{agent}_evaluations_to_optimum"] = {s: to_reach(c, optimum) for s, c in zip(seeds, curves)}
    return out


def compare(args: argparse.Namespace) -> Path:
    import ray

    from searchsvc.methods.n2n import N2NSearch

    landscape = json.loads((Path(args.out) / f"n2n_landscape_{args.name}.json").read_text())
    source = json.loads((Path(args.out) / f"n2n_landscape_{args.source}.json").read_text()) if args.source else None
    optimum = max(e["reward"] for e in landscape["table"].values() if e["status"] == "ok")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    for budget in args.budgets:
        runs: dict[str, dict[int, dict]] = {agent: {} for agent in args.agents}
        for seed in args.seeds:
            transfer = None
            if "ppo_transfer" in args.agents and source is not None:  # trained on the smaller teacher's table
                _, transfer = replay(source, "ppo", 1000 + seed, min(budget, source["candidates"]), args)
            for agent in args.agents:
                runs[agent][seed], _ = replay(landscape, agent, seed, budget, args,
                                              transfer if agent == "ppo_transfer" else None)
            print(f"budget {budget}, seed {seed}: " + ", ".join(f"{a} {runs[a][seed]['reward']:.4f} "
                                                                 f"({runs[a][seed]['evaluations']})" for a in runs),
                  flush=True)
        results[budget] = {"runs": runs, **summarise(runs, args.seeds, optimum)}
    return write_result(args.out, f"n2n_agents_table_{args.name}", {
        "benchmark": "n2n_agents_table", "landscape": args.name, "source": args.source, "budgets": args.budgets,
        "seeds": args.seeds, "agents": args.agents, "iteration": args.iteration, "candidates": landscape["candidates"],
        "transfer_temperature": args.temperature or N2NSearch().transfer_temperature,
        "optimum": optimum, "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("fill", "compare"), help="fill a table, or compare agents on one")
    parser.add_argument("--name", required=True, help="the table's name (results/n2n_landscape_<name>.json)")
    parser.add_argument("--config", default=str(CONFIG), help="fill: n2n config (default configs/quickstart.yaml)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="fill: config override")
    parser.add_argument("--source", help="compare: the table ppo_transfer's policy is trained on")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="compare: seeds (0..9)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256], help="compare: distinct candidates")
    parser.add_argument("--iteration", type=int, default=16, help="compare: PPO candidates per iteration")
    parser.add_argument("--temperature", type=float, help="compare: search.transfer_temperature (default: n2n's)")
    parser.add_argument("--agents", nargs="+", default=["ppo", "ppo_transfer", "random"], help="compare: agents")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder of the tables and results")
    args = parser.parse_args()
    for name in [args.name, args.source] if args.mode == "compare" else []:
        table = Path(args.out) / f"n2n_landscape_{name}.json"
        if name and not table.is_file():
            parser.error(f"no table {table}: fill it first (n2n_landscape.py fill --name {name})")
    print(f"→ {fill(args) if args.mode == 'fill' else compare(args)}")


if __name__ == "__main__":
    main()
