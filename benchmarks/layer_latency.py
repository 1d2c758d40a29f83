"""What one convolution costs at each width, on each backend: why MACs misprice a thin layer, and what the
per-layer latency table a latency budget prunes by (workers/compression/latency_table.py) sees.

    python benchmarks/layer_latency.py [--batch 256] [--threads 1] [--out benchmarks/results]

The 3x3 convolutions of a ResNet-20 on Fashion-MNIST (28 px), each stage at four widths (in = out channels):
torch fp32, ONNX Runtime fp32 and ONNX Runtime int8 (QDQ, as `quantize:` makes it), timed alone at `batch` on
`threads` CPU threads, all in one process. JSON: benchmarks/results/layer_latency.json (per layer: MACs per
image, milliseconds per backend, and the MAC rate; int8's speedup over fp32 on ONNX Runtime for the thinnest
layer at 28 px and the widest at 7 px).
"""

from __future__ import annotations

import argparse
import json

import common  # noqa: F401 — puts the checkout on sys.path
import torch
from torch import nn

from workers.compression.latency_table import LayerTable
from workers.measurement.latency import LatencyCost, LatencyProbe

STAGES = {28: (4, 8, 12, 16), 14: (8, 16, 24, 32), 7: (16, 32, 48, 64)}  # side in px → widths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="images per timed pass")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch and ONNX Runtime)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for layer_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = {"torch": LayerTable(LatencyCost(LatencyProbe("torch", args.batch)), torch.device("cpu")),
              "ort_fp32": LayerTable(LatencyCost(LatencyProbe("onnxruntime", args.batch, args.threads)),
                                     torch.device("cpu")),
              "ort_int8": LayerTable(LatencyCost(LatencyProbe("onnxruntime", args.batch, args.threads), int8=True),
                                     torch.device("cpu"))}
    rows = []
    for side, widths in STAGES.items():
        for width in widths:
            torch.manual_seed(0)
            layer, shape = nn.Conv2d(width, width, 3, padding=1, bias=False), (width, side, side)
            macs = width * width * 9 * side * side
            row = {"side_px": side, "channels": width, "macs_per_image": macs}
            for name, table in tables.items():
                ms = table.layer_ms(layer, shape)
                row[f"{name}_ms"] = round(ms, 3)
                row[f"{name}_gmacs"] = round(macs * args.batch / ms / 1e6, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    speedup = lambda row: row["ort_fp32_ms"] / row["ort_int8_ms"]  # noqa: E731
    common.write_result(args.out, "layer_latency", {
        "benchmark": "layer_latency", "batch": args.batch, "threads": args.threads,
        "int8_speedup_thinnest": round(speedup(rows[0]), 2), "int8_speedup_widest": round(speedup(rows[-1]), 2),
        "layers": rows})


if __name__ == "__main__":
    main()
