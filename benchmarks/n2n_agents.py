"""Does the RL agent beat random search? PPO vs random on the same budget and seeds, best reward of each.

    python benchmarks/n2n_agents.py [--seeds 0 1 2 3 4] [--budget 64] [--teacher-store ./searchsvc-store]

The setup is `configs/quickstart.yaml` (Fashion-MNIST, the ResNet-20 teacher `make run` trains and
stores: 9 removable blocks, 512 removal actions), removal stage only, no fine-tuning. Each run gets its
own store, holding only a copy of the stored teacher, so no run profits from another's cached
evaluations. Rewards are validation-based; a seed where both agents reach the same best reward is a
tie, counted apart from wins.
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


def best_reward(agent: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Run one search; return the best valid candidate's reward, x-factor and accuracies."""
    overrides = [f"search.agent={agent}", f"seed={seed}", f"search.max_evaluations={args.budget}",
                 f"search.iteration_evaluations={args.iteration}", "search.shrink=false", "search.top_k=0",
                 *args.overrides]
    with tempfile.TemporaryDirectory() as store:
        teachers = Path(args.teacher_store) / "teachers"
        if teachers.is_dir():  # the stored teacher, not trained again (and no candidate cache)
            shutil.copytree(teachers, Path(store) / "teachers")
        result = searchsvc.run(searchsvc.load_config(args.config, overrides), store=store, progress=False)
        best = result.table.to_pylist()[0]
        return {"reward": best["reward"], "compression": best["compression"], "val_accuracy": best["val_accuracy"],
                "accuracy": best["accuracy"], "teacher_accuracy": result.teacher_accuracy,
                "evaluations": result.summary["evaluations"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0 1 2 3 4)")
    parser.add_argument("--budget", type=int, default=64, help="candidate evaluations per run (default 64)")
    parser.add_argument("--iteration", type=int, default=16, help="PPO candidates per iteration (default 16)")
    parser.add_argument("--config", default=str(CONFIG), help="n2n config (default configs/quickstart.yaml)")
    parser.add_argument("--teacher-store", default="./searchsvc-store",
                        help="store whose teachers/ are copied into every run's store (default ./searchsvc-store)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override (repeatable)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    runs = {agent: {seed: best_reward(agent, seed, args) for seed in args.seeds} for agent in ("ppo", "random")}
    wins = sum(runs["ppo"][s]["reward"] > runs["random"][s]["reward"] for s in args.seeds)
    ties = sum(runs["ppo"][s]["reward"] == runs["random"][s]["reward"] for s in args.seeds)
    result = {"benchmark": "n2n_agents", "config": args.config, "overrides": args.overrides, "budget": args.budget,
              "seeds": args.seeds, "runs": runs,
              "ppo_mean_best_reward": statistics.mean(r["reward"] for r in runs["ppo"].values()),
              "random_mean_best_reward": statistics.mean(r["reward"] for r in runs["random"].values()),
              "ppo_wins": wins, "ties": ties, "random_wins": len(args.seeds) - wins - ties}
    path = write_result(args.out, "n2n_agents", result)
    for seed in args.seeds:
        print(f"seed {seed}: best reward ppo {runs['ppo'][seed]['reward']:.4f}, "
              f"random {runs['random'][seed]['reward']:.4f}")
    print(f"PPO better on {wins}, tied on {ties}, random better on {len(args.seeds) - wins - ties} of "
          f"{len(args.seeds)} seeds  → {path}")


if __name__ == "__main__":
    main()
