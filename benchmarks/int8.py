"""fp32 against int8 on the CPU: accuracy, bytes and latency at batch 1 and 256, for a teacher and kept candidates.

    python benchmarks/int8.py --store /tmp/budget-store --teacher 82d9194c238045dd \
        --candidates a4a00ba2985e3f80,105d9197d1ea77f4 [--threads 1,2]

Each model is quantized by ONNX Runtime's static quantizer (workers.compression.quantize, the path searchsvc uses) and,
where `torchao` imports, by PyTorch's export-based quantization (PT2E, X86InductorQuantizer): the two paths
the choice in docs/quantization.md is made between. Every latency is the median of one process's passes, all models and
backends in one run, so the ratios compare like with like. JSON: benchmarks/results/int8_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from searchsvc.version import code_version  # noqa: E402
from storage import open_store  # noqa: E402
from workers.compression.quantize import QuantizeConfig, accuracy, calibration_images, quantize_onnx  # noqa: E402
from workers.data.datasets import Splits, load_dataset  # noqa: E402
from workers.evaluation.evaluate import load_candidate_model  # noqa: E402
from workers.evaluation.spec import CandidateSpec  # noqa: E402
from workers.measurement import ort  # noqa: E402
from workers.measurement.measure import latency_ms, model_bytes  # noqa: E402
from workers.training.teacher import load_teacher  # noqa: E402
from workers.training.train import evaluate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def ort_figures(model: torch.nn.Module, splits: Splits, config: QuantizeConfig, threads: list[int],
                repeats: int) -> dict[str, Any]:
    """fp32 and int8 through ONNX Runtime: bytes, accuracy, latency per thread count."""
    fp32 = ort.onnx_bytes(model, splits.inputs)
    started = time.perf_counter()
    int8 = quantize_onnx(fp32, calibration_images(splits, config), config)
    figures: dict[str, Any] = {"quantize_s": time.perf_counter() - started, "fp32_onnx_bytes": len(fp32),
                               "int8_onnx_bytes": len(int8),
                               "int8_test_accuracy": accuracy(int8, splits.test, splits, max(threads)),
                               "int8_val_accuracy": accuracy(int8, splits.val, splits, max(threads))}
    for t in threads:
        for batch in (1, 256):
            n = repeats if batch == 1 else max(3, repeats // 5)
            figures[f"fp32_ort_b{batch}_t{t}_ms"] = ort.latency_ms(fp32, splits.inputs, batch, t, n)
            figures[f"int8_ort_b{batch}_t{t}_ms"] = ort.latency_ms(int8, splits.inputs, batch, t, n)
    return figures


def pt2e_figures(model: torch.nn.Module, splits: Splits, config: QuantizeConfig, threads: list[int],
                 repeats: int) -> dict[str, Any]:
    """PyTorch's export-based int8 (torchao's PT2E with the x86 quantizer), run eagerly: its accuracy and
    latency, or the error that stopped it."""
    try:
        import torchao  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as err:
        return {"error": f"not installed: {err}"}
    try:
        example = torch.zeros(1, *splits.inputs.shape)
        exported = torch.export.export(model.eval(), (example,)).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        calibration = torch.from_numpy(calibration_images(splits, config))
        with torch.no_grad():
            for start in range(0, len(calibration), config.calibration_batch_size):
                prepared(calibration[start:start + config.calibration_batch_size])
        converted = convert_pt2e(prepared)
    except Exception as err:  # noqa: BLE001 — what stops this path is the finding
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    figures: dict[str, Any] = {"int8_test_accuracy": evaluate(converted, *splits.test, splits.mean, splits.std)}
    for t in threads:
        torch.set_num_threads(t)
        for batch in (1, 256):
            figures[f"int8_eager_b{batch}_t{t}_ms"] = latency_ms(converted, torch.device("cpu"), splits.inputs,
                                                                 batch, repeats)
    return figures


def torch_figures(model: torch.nn.Module, splits: Splits, threads: list[int], repeats: int) -> dict[str, Any]:
    """The fp32 model in torch on the CPU: accuracy, state_dict bytes, latency per thread count."""
    figures: dict[str, Any] = {"fp32_test_accuracy": evaluate(model, *splits.test, splits.mean, splits.std),
                               "fp32_val_accuracy": evaluate(model, *splits.val, splits.mean, splits.std),
                               "fp32_state_dict_bytes": model_bytes(model)}
    for t in threads:
        torch.set_num_threads(t)
        for batch in (1, 256):
            n = repeats if batch == 1 else max(3, repeats // 5)
            figures[f"fp32_torch_b{batch}_t{t}_ms"] = latency_ms(model, torch.device("cpu"), splits.inputs,
                                                                 batch, n)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--teacher", required=True, help="teacher hash")
    parser.add_argument("--candidates", required=True, help="spec hashes, comma-separated (their dataset is used)")
    parser.add_argument("--threads", default="1,2", help="CPU thread counts to time at")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50, help="passes per batch-1 median (batch 256: a fifth)")
    parser.add_argument("--name", default="fashion_resnet20")
    parser.add_argument("--code-version", help="the commit measured (default: this checkout's)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    store = open_store(args.store, create=False)
    teacher = load_teacher(store, args.teacher)
    models = {"teacher": teacher.model}
    for spec_hash in filter(None, args.candidates.split(",")):
        models[spec_hash] = load_candidate_model(store, spec_hash)
        dataset = CandidateSpec.from_json(store.get_verified(f"candidates/{spec_hash}", "spec.json").decode()).dataset
    splits = load_dataset(dataset)
    config = QuantizeConfig(calibration_batches=args.calibration_batches)
    results = {}
    for name, model in models.items():
        model = model.cpu().eval()
        print(f"{name}: torch", flush=True)
        row = {"params": sum(p.numel() for p in model.parameters()), **torch_figures(model, splits, threads, args.repeats)}
        print(f"{name}: onnxruntime", flush=True)
        row["onnxruntime"] = ort_figures(model, splits, config, threads, args.repeats)
        print(f"{name}: pt2e", flush=True)
        row["pt2e"] = pt2e_figures(model, splits, config, threads, max(3, args.repeats // 5))
        results[name] = row
        print(json.dumps(row, indent=1), flush=True)
    out = {"benchmark": "int8", "store": args.store, "teacher": args.teacher, "quantize": config.__dict__,
           "models": results, "threads": threads, "machine": platform.node(), "cpu": os.cpu_count(),
           "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "code_version": args.code_version or code_version()}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"int8_{args.name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
