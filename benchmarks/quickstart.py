"""The quickstart from an empty store, timed: what `make run` does, with its figures written to a JSON.

    python benchmarks/quickstart.py [--config configs/quickstart.yaml] [--set key=value ...]

Writes quickstart_<config>.json: wall time, the teacher (seconds, validation and test accuracy), the
evaluations and their rate, and the best candidate by reward (chosen on validation) with its test
accuracy, x-factor, params and MACs. Nothing is downloaded: Fashion-MNIST comes from Debian's
dataset-fashion-mnist, as `make setup` installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from common import write_result  # noqa: E402

import searchsvc  # noqa: E402
from storage import LocalStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override (repeatable)")
    parser.add_argument("--store", help="an empty folder to keep the store in (its teacher serves other benchmarks); "
                                        "default: a temporary one")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    config = searchsvc.load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="quickstart-") as folder:
        store = LocalStore(args.store or Path(folder) / "store")
        if store.list("runs/") or store.list("teachers/"):
            raise SystemExit(f"quickstart: {args.store} is not empty: the figures are from an empty store")
        started = time.perf_counter()
        result = searchsvc.run(config, store=store, progress=False)
        wall = time.perf_counter() - started
        record = store.get_json(f"runs/{result.run_id}/run.json")
        teacher = json.loads(store.get_verified(f"teachers/{result.teacher_hash}", "meta.json"))
    rows = result.table.to_pylist()
    trained = [r for r in rows if not r.get("cached")]
    search_s = sum(r["wall_s"] or 0.0 for r in trained)
    best = next((r for r in rows if r["status"] == "ok"), None)
    keys = ("spec_hash", "reward", "compression", "val_accuracy", "accuracy", "params", "macs", "latency_ms",
            "finetuned_from")
    name = Path(args.config).stem
    path = write_result(args.out, f"quickstart_{name}", {
        "config": args.config, "overrides": args.overrides, "wall_s": round(wall, 1),
        "teacher_train_s": round(teacher["train_seconds"], 1), "teacher_val_accuracy": record["teacher_val_accuracy"],
        "teacher_test_accuracy": record["teacher_accuracy"], "evaluations": len(trained),
        "evaluation_s_total": round(search_s, 1), "best": {k: best.get(k) for k in keys} if best else None,
        "status": result.status})
    print(f"{name}: {wall / 60:.1f} min; teacher {teacher['train_seconds']:.0f} s "
          f"({100 * record['teacher_accuracy']:.2f} % test); {len(trained)} evaluations; best "
          f"{best['compression']:.2f}x at {100 * best['accuracy']:.2f} % test ({100 * best['val_accuracy']:.2f} % val)"
          f"  → {path}" if best else f"{name}: no valid candidate  → {path}")


if __name__ == "__main__":
    main()
