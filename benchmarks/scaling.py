"""Does the driver or the store limit a search as nodes are added? (CPU, simulated.)

    python benchmarks/scaling.py [--nodes 1,2,4] [--per-node 8] [--cost-s 1.0] [--out benchmarks/results]

A `ray.cluster_utils.Cluster` on this machine: a head without CPUs (the driver only), then 1, 2, 4 worker
nodes of one CPU each. Every evaluation has a fixed cost (`--cost-s` of sleep: no CPU, so nodes on one
machine do not compete) and writes its metrics to the store like a real one; the driver records each
result row (write-once JSON) and rewrites results.parquet as the Recorder does. The same actor pool
(`workers.evaluation.pool.EvalPool`) runs them. Ideal throughput is nodes / cost; `efficiency` is measured over
ideal (at most 1), and `driver_ms_per_eval` is the time per evaluation the run took beyond the ideal. A
warm-up pool runs first, so the 1-node figure carries no first-run cost (it made 4 nodes look superlinear).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from common import write_result  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from searchsvc.reporting.rows import ResultRow  # noqa: E402
from searchsvc.reporting.table import write_results  # noqa: E402
from storage import LocalStore  # noqa: E402
from workers.data.datasets import DatasetConfig  # noqa: E402
from workers.evaluation.pool import EvalPool, EvalWorker  # noqa: E402
from workers.evaluation.resources import Resources  # noqa: E402
from workers.evaluation.spec import CandidateSpec  # noqa: E402
from workers.measurement.metrics import CandidateMetrics  # noqa: E402
from workers.training.train import TrainConfig  # noqa: E402

RESULTS_EVERY_S = 5.0  # as searchsvc.running.recorder: results.parquet rewritten at most this often


class FixedCostWorker(EvalWorker):
    """An evaluation of known cost: sleep, then store the candidate's metrics (no data, no teacher)."""

    cost_s = 1.0  # seconds; a subclass per measurement sets it

    def __init__(self, store, teacher_hash, dataset, resources, measures=None, builder=None) -> None:
        self.store = store

    def name(self) -> str:
        return ray.get_runtime_context().get_node_id()[:8]

    def evaluate(self, spec: CandidateSpec, takeover: bool = False) -> tuple[CandidateMetrics, bool]:
        time.sleep(self.cost_s)
        metrics = CandidateMetrics(spec.spec_hash, "ok", accuracy=0.5, params=1000, macs=10_000, latency_ms=1.0,
                                   wall_s=self.cost_s, worker=ray.get_runtime_context().get_node_id()[:8])
        self.store.put_json(f"candidates/{spec.spec_hash}/metrics.json", metrics.to_data(), write_once=True)
        return metrics, False  # stored already: nothing for `saved` to wait for


def measure(store: LocalStore, nodes: int, count: int, cost_s: float, tag: str) -> dict:
    """One pool over the cluster as it is now: `count` evaluations, each row recorded by the driver."""
    worker = type("Worker", (FixedCostWorker,), {"cost_s": cost_s})
    pool = EvalPool(store, "none", DatasetConfig(name="synthetic"), Resources(gpus_per_eval=0, cpus_per_eval=1),
                    worker_class=worker)
    ray.get([actor.name.remote() for actor in pool.actors])  # started: the clock measures evaluation only
    actors = pool.size  # before shutdown empties the pool
    specs = [CandidateSpec(arch="tiny_cnn", teacher=tag, dataset=DatasetConfig(name="synthetic"),
                           train=TrainConfig(), seed=i) for i in range(count)]
    rows, last_write = [], 0.0
    started = time.perf_counter()
    try:
        for outcome in pool.map_unordered(specs):
            m = outcome.metrics
            row = ResultRow(spec_hash=m.spec_hash, method="scaling", run_id=tag, code_version="scaling",
                            status=m.status, accuracy=m.accuracy, val_accuracy=m.val_accuracy, params=m.params,
                            reward=0.0, wall_s=m.wall_s, worker=m.worker, cached=outcome.cached, removed="[]",
                            widths="{}")
            store.put_json(f"runs/{tag}/evals/{outcome.spec.spec_hash}.json", row.to_data(), write_once=True)
            rows.append(row)
            if time.perf_counter() - last_write > RESULTS_EVERY_S:
                write_results(store, tag, rows)
                last_write = time.perf_counter()
        write_results(store, tag, rows)
    finally:
        pool.shutdown()
    wall = time.perf_counter() - started
    ideal = count * cost_s / nodes
    return {"nodes": nodes, "actors": actors, "evaluations": len(rows), "wall_s": wall,
            "evals_per_s": len(rows) / wall, "ideal_evals_per_s": nodes / cost_s, "efficiency": ideal / wall,
            "driver_ms_per_eval": 1000 * max(0.0, wall - ideal) / len(rows),
            "nodes_used": len({r.worker for r in rows})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,4", help="worker node counts to measure, ascending")
    parser.add_argument("--per-node", type=int, default=8, help="evaluations per node in each measurement")
    parser.add_argument("--cost-s", type=float, default=1.0, help="seconds each evaluation takes")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.nodes.split(","))
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    runs = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            store = LocalStore(folder)
            for nodes in counts:
                while len(cluster.worker_nodes) < nodes:
                    cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                while ray.cluster_resources().get("CPU", 0) < nodes:
                    time.sleep(0.2)
                if not runs:  # the first pool pays for imports and the store's first writes: not the 1-node figure
                    measure(store, nodes, nodes * 2, args.cost_s, "warmup")
                runs.append(measure(store, nodes, nodes * args.per_node, args.cost_s, f"n{nodes}"))
                print(f"{nodes} node(s): {runs[-1]['evals_per_s']:.2f} evals/s "
                      f"(ideal {runs[-1]['ideal_evals_per_s']:.2f}), efficiency {runs[-1]['efficiency']:.2f}, "
                      f"{runs[-1]['driver_ms_per_eval']:.1f} ms/eval beyond ideal", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    speedup = runs[-1]["evals_per_s"] / runs[0]["evals_per_s"]
    result = {"cost_s": args.cost_s, "per_node": args.per_node, "runs": runs, "warmup_before_first": True,
              "speedup_max_nodes": speedup,
              "scaling_efficiency_max_nodes": speedup * runs[0]["nodes"] / runs[-1]["nodes"],  # vs the 1-node rate
              "efficiency_max_nodes": runs[-1]["efficiency"]}  # vs the ideal nodes / cost_s: at most 1
    print(write_result(args.out, "scaling", result))


if __name__ == "__main__":
    main()
