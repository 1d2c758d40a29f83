"""RigL vs a static sparse network at the same density, steps and seed (Fashion-MNIST, a zoo model from
scratch, CPU). The static baseline is RigL with `static_topo=True`: the same random initial masks,
never updated. Writes benchmarks/results/rigl_fashion_<arch><tag>[_erk][_static|_rigl].json.

    python benchmarks/rigl_fashion.py --arch mlp_32 --distribution erk --include-linear --epochs 20 \
        --images 60000 --delta 100 --mode rigl      # and --mode static, in a second process

That run (3 seeds x 20 epochs of the 54 k training split, 16,860 steps each) takes about 2.5 minutes per
mode on one core (45 s a seed); lenet_300_100 about 5 minutes, simplenet_cifar about 10.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401 — puts the checkout on sys.path
import torch

from workers.compression.rigl import RigLCallback
from workers.data.datasets import DatasetConfig, load_dataset
from workers.models.zoo import create_model
from workers.training.train import Recipe, train_model


def rigl_callback(args: argparse.Namespace, static: bool, seed: int) -> RigLCallback:
    """RigL with the command line's settings; `static`: the same initial masks, never updated."""
    return RigLCallback(dense_allocation=args.density, sparsity_distribution=args.distribution, delta=args.delta,
                        alpha=0.3, static_topo=static, seed=seed, grad_accumulation_n=args.grad_accumulation,
                        ignore_linear_layers=not args.include_linear)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("rigl", "static", "dense", "both"),
                        default="both", help="both: rigl, then static; dense: no masks at all (the reference)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed, first-seed + 1, ...")
    parser.add_argument("--density", type=float, default=0.1, help="dense_allocation")
    parser.add_argument("--distribution", choices=("uniform", "erk"), default="uniform")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=12000, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--delta", type=int, default=75, help="steps between RigL updates")
    parser.add_argument("--grad-accumulation", type=int, default=1, help="grad_accumulation_n")
    parser.add_argument("--arch", default="resnet20", help="zoo model, e.g. resnet20 or simplenet_cifar")
    parser.add_argument("--include-linear", action="store_true",
                        help="sparsify linear layers too (ignore_linear_layers=False)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    parser.add_argument("--tag", default="", help="appended to the JSON file's name (e.g. _40ep), so runs coexist")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_dataset(DatasetConfig(name="fashion_mnist"))
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch, lr=0.1, augment=False, max_images=args.images)
    steps_per_epoch = min(len(splits.train[1]), args.images) // args.batch
    modes = ("rigl", "static") if args.mode == "both" else (args.mode,)
    results = {"density": args.density, "distribution": args.distribution, "recipe": vars(recipe) | {},
               "delta": args.delta, "grad_accumulation_n": args.grad_accumulation,
               "arch": args.arch, "ignore_linear_layers": not args.include_linear, "runs": {m: [] for m in modes}}
    for mode in modes:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            torch.manual_seed(seed)
            model = create_model(args.arch, splits.inputs.channels, splits.num_classes)
            callbacks = [] if mode == "dense" else [rigl_callback(args, static=mode == "static", seed=seed)]
            started = time.perf_counter()
            history = train_model(model, splits, recipe, torch.device("cpu"), seed=seed, progress=False,
                                  callbacks=callbacks)
            scheduler = callbacks[0].scheduler if callbacks else None
            run = {"seed": seed, "test_accuracy": history[-1]["test_accuracy"], "train_loss": history[-1]["loss"],
                   "density": history[-1].get("density", 1.0), "rigl_updates": scheduler.rigl_steps if scheduler else 0,
                   "steps": scheduler.step if scheduler else steps_per_epoch * len(history),
                   "wall_s": time.perf_counter() - started}
            results["runs"][mode].append(run)
            print(mode, run, flush=True)
        accuracies = [r["test_accuracy"] for r in results["runs"][mode]]
        results[f"{mode}_mean_accuracy"] = statistics.mean(accuracies)
    suffix = ("" if args.distribution == "uniform" else f"_{args.distribution}") + \
        ("" if args.mode == "both" else f"_{args.mode}")
    print(common.write_result(args.out, f"rigl_fashion_{args.arch}{args.tag}{suffix}", results))


if __name__ == "__main__":
    main()
