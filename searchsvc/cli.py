"""The `searchsvc` command. User errors end with exit code 2 and one line per problem; `--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from core.errors import SearchsvcError
from searchsvc.cli_args import Parser, add_set, add_store, id_arg, open_for, output_path
from searchsvc.cli_models import MODEL_COMMANDS, add_model_commands
from searchsvc.reporting.rows import ResultRow
from searchsvc.reporting.table import table_rows
from searchsvc.reporting.text_table import format_table
from searchsvc.running.faults import RunFailed
from searchsvc.running.stopping import Stopped

EXIT_USAGE = 2

DESCRIPTION = """\
searchsvc: find smaller, faster networks. A driver proposes candidate networks derived from a
teacher; workers build, distill and measure each one; every result lands in an artifact store.

Typical use:
  searchsvc config taylor                  # every config key of method taylor: type, default, limits, help
  searchsvc validate configs/quickstart.yaml
  searchsvc run configs/quickstart.yaml
  searchsvc results --store ./searchsvc-store
"""



def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with help for every flag."""
    parser = Parser(prog="searchsvc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # --debug is accepted after the command too (`searchsvc run x.yaml --debug`).
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and debug logs")

    _add_run_commands(commands, common)
    _add_config_command(commands, common)
    _add_inspect_commands(commands, common)
    add_model_commands(commands, common)
    return parser


def _add_run_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """validate, run, resume, sensitivity: the commands that check or start work."""
    validate = commands.add_parser("validate", parents=[common], help="check a job config against the schema",
                                   description="Check CONFIG; print every problem with its key path (exit 2).")
    validate.add_argument("config", metavar="CONFIG", help="job config YAML file")
    add_set(validate)

    run = commands.add_parser("run", parents=[common], help="run one search job",
                              description="Run the job in CONFIG: train or load the teacher, search, record "
                                          "everything in the store, print the ranked table.")
    run.add_argument("config", metavar="CONFIG", help="job config YAML file")
    add_store(run, from_config=True)
    run.add_argument("--address", help="Ray cluster address, e.g. ray://head:10001 or auto (default: RAY_ADDRESS, "
                                       "else a Ray started for this run on this machine, without Ray's dashboard: "
                                       "`ray start --head` and --address auto for one)")
    add_set(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    run.add_argument("--report", metavar="HTML", help="when the run ends, write its HTML report here")

    resume = commands.add_parser("resume", parents=[common], help="continue an interrupted run",
                                 description="Continue run ID from what the store holds: its resolved config, "
                                             "the evaluations it recorded (not trained again) and the driver's "
                                             "checkpoints.")
    add_store(resume)
    resume.add_argument("--run", required=True, type=id_arg("run id"), help="id of the run to continue")
    resume.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    resume.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    resume.add_argument("--report", metavar="HTML", help="when the run ends, write its HTML report here")

    sens = commands.add_parser("sensitivity", parents=[common], help="prune each layer alone; accuracy per level",
                               description="Sensitivity analysis of CONFIG's teacher: each weight pruned alone to "
                                           "each level and evaluated without fine-tuning, in parallel on the actor "
                                           "pool. Stores a CSV, a plot (accuracy vs sparsity, a line per layer) and "
                                           "a starting AGP schedule as a run; CONFIG's method and search are "
                                           "replaced by these flags (or CONFIG is a `method: sensitivity` config).")
    sens.add_argument("config", metavar="CONFIG", help="job config YAML file (dataset, teacher, resources)")
    sens.add_argument("--levels", help="comma-separated sparsity levels in [0, 1) (default 0,0.1,...,0.9)")
    sens.add_argument("--structure", choices=("element", "filter"),
                      help="element: smallest weights; filter: whole filters by L1 norm (default element)")
    sens.add_argument("--weights", help="comma-separated parameter names (default: every conv / linear weight)")
    sens.add_argument("--tolerance", type=float, metavar="POINTS",
                      help="validation accuracy points a layer may lose in the starting schedule (default 1.0)")
    sens.add_argument("--schedule-out", metavar="PATH", help="also write the starting schedule YAML to this file")
    add_store(sens, from_config=True)
    sens.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_set(sens)
    sens.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def _add_config_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """config: the reference of every config key, generated from the schemas."""
    config = commands.add_parser(
        "config", parents=[common], help="list every config key: type, default, limits, help",
        description="Print the config reference, generated from the schemas `validate` checks against: every key "
                    "(dotted, e.g. train.distill.alpha) with its type, default, limits and help. Without METHOD: "
                    "the sections every method shares; with METHOD: those and METHOD's search: keys; with --all: "
                    "every method's search: keys too (docs/config.md is `searchsvc config --all --markdown`).")
    config.add_argument("method", nargs="?", metavar="METHOD",
                        help="a search method, e.g. taylor: its search: keys too (a wrong name lists the methods)")
    config.add_argument("--all", action="store_true", help="the common sections, then each method's search: keys")
    config.add_argument("--markdown", action="store_true", help="Markdown tables instead of plain text")


def _add_inspect_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """results, report, compare: the commands that read what runs stored."""
    results = commands.add_parser("results", parents=[common], help="show a run's ranked results",
                                  description="Print the consolidated results of a run, best first.")
    add_store(results)
    results.add_argument("--run", type=id_arg("run id"), help="run id (default: the latest run that has results)")
    results.add_argument("--top", type=int, metavar="K", help="show only the best K rows")
    results.add_argument("--json", action="store_true", help="print a JSON list of row objects instead of a table")

    report = commands.add_parser("report", parents=[common], help="write a run's HTML report",
                                 description="Write one self-contained HTML file (plots inline) with the run's "
                                             "summary, Pareto fronts, best candidates and the method's plots.")
    add_store(report)
    report.add_argument("--run", type=id_arg("run id"), help="run id (default: the latest run that has results)")
    report.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    report.add_argument("--top", type=int, default=10, metavar="K", help="rows of the best-candidates table (10)")

    compare = commands.add_parser(
        "compare", parents=[common], help="several runs on one teacher side by side (HTML)",
        description="Write one self-contained HTML page: the runs' Pareto fronts overlaid (the teacher marked), the "
                    "model each run hands over per budget (chosen on validation accuracy, with its test accuracy), "
                    "wall time and GPU-hours per run.")
    compare.add_argument("--run", action="append", required=True, type=id_arg("run id"), dest="runs", metavar="ID",
                         help="a run to compare (repeatable: --run A --run B; the same teacher and data)")
    add_store(compare)
    compare.add_argument("-o", "--output", default="compare.html", help="HTML file to write (default compare.html)")
    compare.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE[,...]",
                         help="a budget to choose each run's model under, beside the runs' own search.budget, e.g. "
                              "macs=14000000 or latency_ms=2,latency_batch=1 (repeatable)")
    compare.add_argument("--allow-mixed", action="store_true",
                         help="compare runs on different teachers or datasets (refused by default)")



def _version_text() -> str:
    from searchsvc.version import code_version

    return f"searchsvc {code_version()}"


def cmd_validate(args: argparse.Namespace) -> int:
    from searchsvc.config import load_config

    config = load_config(args.config, args.overrides)
    print(f"{args.config}: ok (method {config.method}, dataset {config.dataset.name}, teacher {config.teacher.base})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from searchsvc.config_reference import render_reference

    if args.method is not None and args.all:
        raise SearchsvcError("config: give METHOD or --all, not both")
    print(render_reference(args.method, every_method=args.all, markdown=args.markdown), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from searchsvc.config import load_config
    from searchsvc.running.job import run

    config = load_config(args.config, args.overrides)
    report = output_path(args.report, "--report", store=args.store or config.store) if args.report else None
    result = run(config, store=args.store, endpoint=args.s3_endpoint, progress=not args.no_progress,
                 address=args.address)
    _print_run(result)
    if report is not None:
        _write_report(open_for(args, result.store_uri, create=True), result.run_id, report)
    return 0


def _write_report(store: Any, run_id: str, output: Path, top: int = 10) -> None:
    from searchsvc.reporting.report import build_report

    output.write_text(build_report(store, run_id, top=top))
    print(f"report of run {run_id}: {output.resolve()}")


def _print_run(result: Any) -> None:
    print(f"run {result.run_id}: {result.status}; teacher {result.teacher_hash} test {result.metric or 'accuracy'} "
          f"{result.teacher_accuracy:.4f}; {result.summary.get('evaluations', 0)} evaluations, "
          f"{result.summary.get('cache_hits', 0)} cache hits")
    print(format_table(table_rows(result.table), result.metric))
    print(f"store: {result.store_uri}   (searchsvc results --store {result.store_uri} --run {result.run_id})")


def cmd_resume(args: argparse.Namespace) -> int:
    from searchsvc.running.job import resume

    report = output_path(args.report, "--report", store=args.store) if args.report else None
    result = resume(args.store, args.run, endpoint=args.s3_endpoint, progress=not args.no_progress,
                    address=args.address)
    _print_run(result)
    if report is not None:
        _write_report(open_for(args, result.store_uri), result.run_id, report)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from searchsvc.reporting.table import read_results, stored_record

    if args.top is not None and args.top < 1:
        raise SearchsvcError(f"--top: must be a positive integer, got {args.top}")
    store = open_for(args, args.store)
    run_id, note = (args.run, "") if args.run else _latest_with_results(store)
    every = table_rows(read_results(store, run_id))
    rows = every[: args.top]
    if args.json:
        if note:  # stdout stays one JSON document
            print(f"run {run_id}{note}", file=sys.stderr)
        print(json.dumps([row.to_data() for row in rows], indent=2))
    else:
        print(f"run {run_id} in {store.uri}{note}")
        judged = [row for row in every if row.within_budget is not None]
        if judged:  # ranked first: the best model within the run's budget leads the table
            print(f"within budget (search.budget): {sum(bool(r.within_budget) for r in judged)} of {len(judged)}")
        print(format_table(rows, stored_record(store, run_id).get("metric")))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from storage import layout

    if args.top < 1:
        raise SearchsvcError(f"--top: must be a positive integer, got {args.top}")
    output = output_path(args.output, "--output", store=args.store)
    store = open_for(args, args.store)
    run_id, note = (args.run, "") if args.run else _latest_with_results(store)
    if not layout.run_exists(store, run_id):
        raise SearchsvcError(f"--run: run '{run_id}' does not exist in {store.uri}")
    if note:
        print(f"run {run_id}{note}")
    _write_report(store, run_id, output, args.top)
    return 0


def _latest_with_results(store: Any) -> tuple[str, str]:
    """The run `results` and `report` show without --run: the newest with results (a newer run that failed or
    stopped before its first result does not hide it), and a note saying so when newer runs were passed over."""
    from storage.layout import latest_run_with_results

    run_id, newer = latest_run_with_results(store)
    if not newer:
        return run_id, ""
    return run_id, f" (the latest with results; {newer} newer run{' has' if newer == 1 else 's have'} none)"


def cmd_compare(args: argparse.Namespace) -> int:
    from searchsvc.reporting.compare import build_compare, parse_budget

    budgets = [parse_budget(text) for text in args.budget]
    output = output_path(args.output, "--output", store=args.store)
    store = open_for(args, args.store)
    output.write_text(build_compare(store, args.runs, budgets, allow_mixed=args.allow_mixed))
    print(f"comparison of {len(dict.fromkeys(args.runs))} run(s): {output.resolve()}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from searchsvc.config import apply_overrides, parse_config, read_yaml
    from searchsvc.running.job import run
    from storage import layout

    raw = apply_overrides(read_yaml(args.config), args.overrides)
    search = dict(raw.get("search") or {}) if raw.get("method") == "sensitivity" else {}
    flags = {"levels": _floats(args.levels, "--levels"), "structure": args.structure,
             "weights": args.weights.split(",") if args.weights else None, "tolerance": args.tolerance}
    search.update({k: v for k, v in flags.items() if v is not None})
    config = parse_config({**raw, "method": "sensitivity", "search": search}, source=args.config)
    schedule_out = (output_path(args.schedule_out, "--schedule-out", store=args.store or config.store)
                    if args.schedule_out else None)
    result = run(config, store=args.store, endpoint=args.s3_endpoint, progress=not args.no_progress,
                 address=args.address)
    rows = table_rows(result.table)
    print(f"run {result.run_id}: {result.status}; teacher {result.teacher_hash} test accuracy "
          f"{result.teacher_accuracy:.4f}; {len(rows)} points")
    print(format_sensitivity(rows, config.search.levels))
    for key in ("sensitivity", "plot", "schedule"):
        print(f"{key}: {result.summary.get(key)}")
    if schedule_out is not None:
        store = open_for(args, result.store_uri)
        schedule_out.write_bytes(store.get_bytes(layout.sensitivity_schedule(result.run_id)))
        print(f"starting schedule written to {schedule_out}")
    return 0


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SearchsvcError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def format_sensitivity(rows: list[ResultRow], levels: Sequence[float]) -> str:
    """Validation accuracy (%) per weight (rows) and level (columns): what the starting schedule is chosen on."""
    accuracy = {(r.get("weight"), r.get("level")): r.val_accuracy for r in rows}
    weights = sorted({r.get("weight") for r in rows})
    width = max([len(w) for w in weights] + [6])
    lines = ["weight".ljust(width) + "".join(f"{level:>8.2f}" for level in levels)]
    for weight in weights:
        cells = (accuracy.get((weight, float(level))) for level in levels)
        lines.append(weight.ljust(width) + "".join("       -" if a is None else f"{100 * a:8.2f}" for a in cells))
    return "\n".join(lines)


COMMANDS = {"validate": cmd_validate, "config": cmd_config, "run": cmd_run, "resume": cmd_resume,
            "results": cmd_results, "report": cmd_report, "compare": cmd_compare, "sensitivity": cmd_sensitivity,
            **MODEL_COMMANDS}


def importable_from_here() -> None:
    """The folder the command runs in on the import path — of this process and (PYTHONPATH) of the Ray workers and
    processes it starts — as `python -m searchsvc` has it: a config's "package.module:function" (a model or a
    dataset factory of the user's, `examples.your_data:csv_images`) is found from where the user runs searchsvc."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *paths])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    importable_from_here()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except RunFailed as err:  # Ray lost a worker or a node: one line, the run recorded as failed and resumable
        if args.debug:
            raise
        print(f"searchsvc: error: {err}", file=sys.stderr)
        return err.exit_code
    except SearchsvcError as err:
        if args.debug:
            raise
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"searchsvc: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("searchsvc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `searchsvc results | head -1`: the reader left; what is left unwritten goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's flush fails again
        return 128 + signal.SIGPIPE
    except Stopped as err:  # SIGTERM: `ray job stop`; the run is recorded as stopped and can be resumed
        print(f"searchsvc: {err}; `searchsvc resume` continues the run", file=sys.stderr)
        return 128 + signal.SIGTERM
