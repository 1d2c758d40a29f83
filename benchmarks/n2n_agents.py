"""Does the RL agent beat random search? PPO, PPO started from a transferred policy, and random search on the same
budget and seeds: the best reward of each, and how many evaluations each needs to reach random search's best.

    python benchmarks/n2n_agents.py [--seeds 0 1 2 3 4] [--budgets 128 256] [--teacher-store ./searchsvc-store]
                                    [--transfer-set teacher.arch=tiny_cnn]

The setup is `configs/quickstart.yaml` (Fashion-MNIST, the ResNet-20 teacher `make run` trains and stores: 9
removable blocks, 512 removal actions), removal stage only, no fine-tuning. Each run gets its own store, holding
only a copy of the stored teacher (and, for `ppo_transfer`, the transferred policy), so no run profits from
another's cached evaluations. `ppo_transfer` starts from the policy of one PPO search of the same budget on the
teacher `--transfer-set` names (default `tiny_cnn`, 2 blocks: another depth, as the N2N paper moves a ResNet-18
policy to a ResNet-34; `search.policy_from`). Rewards are validation-based; a seed where two agents reach the same
best reward is a tie, counted apart from wins.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from common import write_result  # noqa: E402

import searchsvc  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
AGENTS = ("ppo", "ppo_transfer", "random")


def search(agent: str, seed: int, budget: int, args: argparse.Namespace, policy: Path | None = None,
           extra: tuple[str, ...] = (), keep: Path | None = None) -> dict:
    """Run one removal search in a fresh store; its best valid candidate, and the best reward after each
    evaluation (in the order they were trained). `policy`: a run's folder whose trained policy is copied in;
    `keep`: a folder the run's own folder is copied to (the source of a transfer)."""
    overrides = [f"search.agent={'ppo' if agent == 'ppo_transfer' else agent}", f"seed={seed}",
                 f"search.max_evaluations={budget}", f"search.iteration_evaluations={args.iteration}",
                 "search.shrink=false", "search.top_k=0", *args.overrides, *extra]
    with tempfile.TemporaryDirectory() as store:
        teachers = Path(args.teacher_store) / "teachers"
        if teachers.is_dir():  # the stored teacher, not trained again (and no candidate cache)
            shutil.copytree(teachers, Path(store) / "teachers")
        if policy is not None:
            shutil.copytree(policy, Path(store) / "runs" / policy.name)
            overrides.append(f"search.policy_from={policy.name}")
        result = searchsvc.run(searchsvc.load_config(args.config, overrides), store=store, progress=False)
        rows = sorted(result.table.to_pylist(), key=lambda r: r.get("order") or 0)  # as the run recorded them
        curve, best = [], 0.0
        for row in rows:
            best = max(best, row["reward"] if row["status"] == "ok" else 0.0)
            curve.append(best)
        top = max(rows, key=lambda r: r["reward"] if r["status"] == "ok" else -1.0)
        if keep is not None:
            shutil.copytree(Path(store) / "runs" / result.run_id, keep / result.run_id)
        return {"reward": top["reward"], "compression": top["compression"], "val_accuracy": top["val_accuracy"],
                "accuracy": top["accuracy"], "teacher_accuracy": result.teacher_accuracy,
                "evaluations": result.summary["evaluations"], "best_after_each": curve}


def to_reach(curve: list[float], target: float) -> int | None:
    """Evaluations a run needed to reach `target` (None: it never did)."""
    return next((i + 1 for i, value in enumerate(curve) if value >= target), None)


def compare(runs: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    """Mean best rewards, wins / ties / losses of each PPO variant against random, evaluations to random's best."""
    summary: dict = {f"{agent}_mean_best_reward": statistics.mean(runs[agent][s]["reward"] for s in seeds)
                     for agent in runs}
    for agent in (a for a in runs if a != "random"):
        rewards = [(runs[agent][s]["reward"], runs["random"][s]["reward"]) for s in seeds]
        summary[f"{agent}_vs_random"] = {"wins": sum(a > b for a, b in rewards),
                                         "ties": sum(a == b for a, b in rewards),
                                         "losses": sum(a < b for a, b in rewards)}
        summary[f"{agent}_evaluations_to_random_best"] = {
            s: to_reach(runs[agent][s]["best_after_each"], runs["random"][s]["reward"]) for s in seeds}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0 1 2 3 4)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256], help="evaluations per run")
    parser.add_argument("--iteration", type=int, default=16, help="PPO candidates per iteration (default 16)")
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS, help="agents to compare")
    parser.add_argument("--config", default=str(CONFIG), help="n2n config (default configs/quickstart.yaml)")
    parser.add_argument("--teacher-store", default="./searchsvc-store",
                        help="store whose teachers/ are copied into every run's store (default ./searchsvc-store)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override (repeatable)")
    parser.add_argument("--transfer-set", action="append", default=None,
                        help="overrides of the search the transferred policy is trained in (default "
                             "teacher.arch=tiny_cnn)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as sources:
        for budget in args.budgets:
            policy = None
            if "ppo_transfer" in args.agents:  # one PPO search on the other teacher: its trained policy
                keep = Path(sources) / str(budget)
                search("ppo", 1000, budget, args, extra=tuple(args.transfer_set or ["teacher.arch=tiny_cnn"]),
                       keep=keep)
                (policy,) = keep.iterdir()
            runs = {agent: {seed: search(agent, seed, budget, args, policy if agent == "ppo_transfer" else None)
                            for seed in args.seeds} for agent in args.agents}
            results[budget] = {"runs": runs, **(compare(runs, args.seeds) if "random" in runs else {})}
            for seed in args.seeds:
                print(f"budget {budget}, seed {seed}: " + ", ".join(f"{a} {runs[a][seed]['reward']:.4f}"
                                                                     for a in runs))
    path = write_result(args.out, "n2n_agents", {
        "benchmark": "n2n_agents", "config": args.config, "overrides": args.overrides, "budgets": args.budgets,
        "budget": max(args.budgets), "seeds": args.seeds, "agents": args.agents,
        "transfer_overrides": args.transfer_set or ["teacher.arch=tiny_cnn"], "results": results})
    print(f"→ {path}")


if __name__ == "__main__":
    main()
