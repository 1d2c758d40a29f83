"""The `searchsvc` commands on one stored model: export, summary, quantize."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from core.errors import SearchsvcError
from searchsvc.cli_args import add_store, open_for, output_path
from storage import StoreAccessError, StoreWriteError, check_id, layout


def add_model_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """export, summary, quantize: a kept candidate (or a teacher) as a file, a table, an int8 model."""
    export = commands.add_parser("export", parents=[common], help="export a kept candidate to ONNX or TorchScript",
                                 description="Rebuild a kept candidate (spec + weights, sha256-checked) and write "
                                             "it as ONNX (.onnx) or TorchScript (.pt / .ts).")
    export.add_argument("candidate", metavar="SPEC_HASH", help="spec hash, or a candidates/<hash> URI in a store")
    export.add_argument("-o", "--output", required=True, help="output file: model.onnx, model.pt or model.ts")
    add_store(export)

    summary = commands.add_parser("summary", parents=[common], help="per-layer sparsity or compute table of a model",
                                  description="Print Distiller's summary of a kept candidate or a teacher: per "
                                              "weight shape, params, non-zeros and sparsity (--kind sparsity), or per "
                                              "layer feature maps, weights and MACs (--kind compute), with totals. "
                                              "The table is also stored as summaries/<HASH>-<kind>.csv.")
    summary.add_argument("model", metavar="HASH", help="spec hash of a kept candidate, or a teacher hash")
    summary.add_argument("--kind", choices=("sparsity", "compute"), default="sparsity",
                         help="sparsity: zeros per weight and 'Total sparsity'; compute: MACs per layer "
                              "(default sparsity)")
    add_store(summary)

    quantize = commands.add_parser(
        "quantize", parents=[common], help="int8 post-training quantization of a kept candidate",
        description="Quantize a kept candidate to int8 with ONNX Runtime's static quantizer: its stored model "
                    "(sha256-checked) exported to ONNX, activations calibrated on training batches of its own "
                    "dataset, then accuracy (validation, test) and CPU latency measured beside the fp32 model's. "
                    "The int8 model is stored beside the candidate (candidates/<hash>/int8-<key>/, under a "
                    "manifest) and, with -o, written as an ONNX file. Asked again with the same settings, the "
                    "stored int8 model is used.")
    quantize.add_argument("candidate", metavar="SPEC_HASH", help="spec hash of a kept candidate")
    quantize.add_argument("-o", "--output", help="also write the int8 model to this .onnx file")
    # Defaults (None here) are the `quantize:` config section's, so a run's int8 models and this command's agree.
    quantize.add_argument("--bits", type=int, help="bit width of weights and activations (8; lower: not yet)")
    quantize.add_argument("--calibration-batches", type=int,
                          help="training batches that calibrate activation ranges (default 8)")
    quantize.add_argument("--calibration-batch-size", type=int, help="images per calibration batch (default 64)")
    quantize.add_argument("--method", choices=("minmax", "entropy", "percentile"),
                          help="how activation ranges are taken from the calibration batches (default minmax)")
    quantize.add_argument("--threads", type=int, help="CPU threads the latencies are measured on (default 1)")
    add_store(quantize)


def cmd_export(args: argparse.Namespace) -> int:
    from searchsvc.candidates import candidate_input, export_model, load_candidate, split_candidate_uri

    store_uri, spec_hash = split_candidate_uri(args.candidate)
    output = output_path(args.output, "--output", (".onnx", ".pt", ".ts"), create_folders=True,
                         store=store_uri or args.store)
    store = open_for(args, store_uri or args.store)
    model = load_candidate(spec_hash, store=store)
    path = export_model(model, output, candidate_input(store, spec_hash, model))
    params = sum(p.numel() for p in model.parameters())
    print(f"candidate {spec_hash} ({params:,} parameters) written to {path}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from searchsvc.candidates import stored_model
    from workers.measurement.summary import format_summary, summary, to_csv

    store = open_for(args, args.store)
    model, inputs = stored_model(store, check_id(args.model, "model hash"))
    rows = summary(model, args.kind, inputs)
    name = model.arch.name if hasattr(model, "arch") else type(model).__name__
    print(f"{args.kind} summary of {args.model} ({name}, {inputs} input)")
    print(format_summary(rows))
    key = layout.store_summary(args.model, args.kind)
    try:
        store.put_bytes(key, to_csv(rows))
    except (StoreWriteError, StoreAccessError) as err:  # a read-only store: the table above is the answer
        print(f"searchsvc: warning: not stored: {err}", file=sys.stderr)
        return 0
    print(f"stored: {store.uri_for(key)}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from searchsvc.quantized import comparison_rows, quantize_candidate
    from searchsvc.reporting.text_table import plain_table
    from workers.compression.quantize import stored_int8_model
    from workers.measurement import ort

    config = quantize_config(args)
    if not ort.available():
        raise SearchsvcError(f"quantize: {ort.NOT_INSTALLED}")
    output = output_path(args.output, "-o", (".onnx",), create_folders=True, store=args.store) if args.output else None
    store = open_for(args, args.store)
    spec_hash = check_id(args.candidate, "spec hash")
    outcome = quantize_candidate(store, spec_hash, config)
    said = "stored already, not quantized again" if outcome.stored_already else "quantized"
    print(f"candidate {spec_hash}: int8 model {said} (setting {config.key()})")
    print(plain_table(["", "fp32", "int8"], comparison_rows(outcome)))
    print(f"stored: {outcome.uri}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(stored_int8_model(store, spec_hash, config))
        print(f"written to {output}")
    return 0


def quantize_config(args: argparse.Namespace) -> Any:
    """The flags as a QuantizeConfig; each bad value named by its flag."""
    from core.records import RecordError, from_data
    from workers.compression.quantize import QuantizeConfig

    flags = {"bits": "--bits", "calibration_batches": "--calibration-batches",
             "calibration_batch_size": "--calibration-batch-size", "threads": "--threads", "method": "--method"}
    try:
        given = {key: getattr(args, key) for key in flags if getattr(args, key) is not None}
        return from_data(QuantizeConfig, given, path="quantize")
    except RecordError as err:
        problem = err.problems[0]
        for key, flag in flags.items():
            problem = problem.replace(f"quantize.{key}", flag)
        raise SearchsvcError(problem) from None


MODEL_COMMANDS = {"export": cmd_export, "summary": cmd_summary, "quantize": cmd_quantize}
