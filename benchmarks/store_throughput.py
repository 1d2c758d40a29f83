"""Artifact-store throughput: MB/s for write-once puts and gets of model-sized files, and small-JSON ops/s.

    python benchmarks/store_throughput.py [--store DIR | s3://bucket/prefix --s3-endpoint URL] [--mb 64]

Default: a fresh temporary local folder. Pass an S3 store to measure MinIO / SeaweedFS / AWS.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from common import write_result

from storage import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="store URI (default: a temporary local folder)")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL for s3:// stores")
    parser.add_argument("--mb", type=int, default=64, help="size of the large file in MB (default 64)")
    parser.add_argument("--small", type=int, default=200, help="number of small JSON writes (default 200)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.store or str(Path(tmp) / "store"), endpoint=args.s3_endpoint)
        prefix = f"bench/{uuid.uuid4().hex[:8]}"
        source = Path(tmp) / "big.bin"
        source.write_bytes(os.urandom(args.mb * 1_000_000))
        started = time.perf_counter()
        store.put_file(f"{prefix}/model.pt", source, write_once=True)
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        store.get_file(f"{prefix}/model.pt", Path(tmp) / "back.bin")
        get_s = time.perf_counter() - started
        started = time.perf_counter()
        for index in range(args.small):
            store.put_json(f"{prefix}/evals/{index}.json", {"index": index, "accuracy": 0.5}, write_once=True)
        small_s = time.perf_counter() - started
    result = {"benchmark": "store_throughput", "store": "local" if not args.store else args.store.split(":")[0],
              "mb": args.mb, "put_mb_per_s": round(args.mb / put_s, 1), "get_mb_per_s": round(args.mb / get_s, 1),
              "small_json_writes_per_s": round(args.small / small_s, 1)}
    path = write_result(args.out, "store_throughput", result)
    print(f"{result['store']}: put {result['put_mb_per_s']} MB/s, get {result['get_mb_per_s']} MB/s, "
          f"{result['small_json_writes_per_s']} write-once JSON/s  → {path}")


if __name__ == "__main__":
    main()
