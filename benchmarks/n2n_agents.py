"""Does the RL agent beat random search? PPO vs random on the same budget and seeds, best reward of each.

    python benchmarks/n2n_agents.py [--seeds 0 1 2] [--budget 64] [--out benchmarks/results]

Each run gets its own store, so no run profits from another's cached evaluations. The setup is
`configs/n2n-smoke.yaml` with a ResNet-20 teacher (9 removable blocks, 512 removal actions) on the
synthetic data, removal stage only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from common import write_result  # noqa: E402

import searchsvc  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "n2n-smoke.yaml"


def best_reward(agent: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Run one search; return the best valid candidate's reward, x-factor and accuracy."""
    overrides = [f"search.agent={agent}", f"seed={seed}", f"search.max_evaluations={args.budget}",
                 f"search.iteration_evaluations={args.iteration}", "search.shrink=false",
                 "teacher.arch=resnet20", f"teacher.epochs={args.teacher_epochs}",
                 f"dataset.synthetic.train_size={args.train_size}"]
    with tempfile.TemporaryDirectory() as store:
        result = searchsvc.run(searchsvc.load_config(CONFIG, overrides), store=store, progress=False)
        best = result.table.to_pylist()[0]
        return {"reward": best["reward"], "compression": best["compression"], "accuracy": best["accuracy"],
                "teacher_accuracy": result.teacher_accuracy, "evaluations": result.summary["evaluations"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--budget", type=int, default=64, help="candidate evaluations per run (default 64)")
    parser.add_argument("--iteration", type=int, default=16, help="PPO candidates per iteration (default 16)")
    parser.add_argument("--teacher-epochs", type=int, default=8, help="teacher epochs (default 8)")
    parser.add_argument("--train-size", type=int, default=1024, help="synthetic training images (default 1024)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    runs = {agent: {seed: best_reward(agent, seed, args) for seed in args.seeds} for agent in ("ppo", "random")}
    wins = sum(runs["ppo"][s]["reward"] >= runs["random"][s]["reward"] for s in args.seeds)
    result = {"benchmark": "n2n_agents", "budget": args.budget, "seeds": args.seeds, "runs": runs,
              "ppo_mean_best_reward": statistics.mean(r["reward"] for r in runs["ppo"].values()),
              "random_mean_best_reward": statistics.mean(r["reward"] for r in runs["random"].values()),
              "ppo_at_least_random": f"{wins}/{len(args.seeds)}"}
    path = write_result(args.out, "n2n_agents", result)
    for seed in args.seeds:
        print(f"seed {seed}: best reward ppo {runs['ppo'][seed]['reward']:.4f}, "
              f"random {runs['random'][seed]['reward']:.4f}")
    print(f"PPO ≥ random on {wins}/{len(args.seeds)} seeds  → {path}")


if __name__ == "__main__":
    main()
