"""The ``qdistill`` command: parses arguments, builds a Recipe, calls the library.

Exit codes: 0 success, 2 bad input (one-line error), 1 internal failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qdistill.errors import QdistillError
from qdistill.evaluate import evaluate
from qdistill.export import format_export_summary
from qdistill.recipe import Recipe
from qdistill.report import COLUMNS
from qdistill.report.runs_page import column_text
from qdistill.report.search_page import row_name
from qdistill.runs.demo import COMPARE_PAGE, ROW_KEYS, compare_runs, run_demo
from qdistill.runs.deploy import export_directory
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.rundir import RunDir, load_recipe, load_run
from qdistill.runs.search import run_search
from qdistill.runs.stages import prepare_data
from qdistill.runtime import serve_bench
from qdistill.train import distributed
from qdistill.train.allocator import keep_freed_memory

TRAINING_COMMANDS = ("run", "search", "demo")  # the commands whose steps reuse freed memory (train/allocator.py)

console = Console(width=None if sys.stdout.isatty() else 160)  # tables stay whole when piped to a file
errors = Console(stderr=True)


def _demo(args: argparse.Namespace) -> int:
    rows = run_demo(args.out, quick=args.quick, show_progress=not args.no_progress, echo=console.print)
    table = Table(title=f"qdistill demo ({'quick' if args.quick else 'full'}) - MNIST subset, metrics on its 1000 test images")
    for key in ROW_KEYS:
        table.add_column(key, justify="left" if key == "run" else "right")
    for row in rows:
        table.add_row(*[_cell(row[key]) for key in ROW_KEYS])
    console.print(table)
    run = RunDir(Path(args.out))
    console.print(f"wrote {run.demo_table} and {run.index}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    rows = compare_runs(args.directories, args.out)
    table = Table(title="runs (test split; size at the model's bit widths; latency: int8 ONNX, batch 1)")
    for key, title in COLUMNS.items():
        table.add_column(title, justify="left" if key == "run" else "right")
    for row in rows:
        table.add_row(*[column_text(row, key) for key in COLUMNS])
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _run(args: argparse.Namespace) -> int:
    overrides = args.overrides + (["train.tensorboard=true"] if args.tensorboard else [])
    recipe = Recipe.from_yaml(args.recipe).with_overrides(overrides)
    try:
        result = run_recipe(recipe, args.out, resume=args.resume, show_progress=not args.no_progress)
    except BaseException:
        distributed.teardown(wait=False)
        raise
    if distributed.is_main():  # under torchrun, rank 0 reports for all
        _print_metrics(result.report)
        console.print(f"wrote {Path(args.out) / 'report.json'}")
    distributed.teardown()
    return 0


def _print_metrics(report: dict[str, Any]) -> None:
    where = "validation" if report.get("evaluated_on") == "validation" else "test split"
    table = Table(title=f"teacher vs student ({where}; macro averages; size at the model's bit widths)")
    for column in ("model", "accuracy", "precision", "recall", "f1", "params", "size bytes"):
        table.add_column(column, justify="right")
    for name in ("teacher", "student"):
        if name in report:
            metrics = report[name]
            table.add_row(name, *[_cell(metrics.get(key)) for key in
                                  ("accuracy", "precision_macro", "recall_macro", "f1_macro", "params", "size_bytes")])
    console.print(table)
    if "agreement_with_teacher" in report.get("student", {}):
        console.print(f"agreement with teacher: {report['student']['agreement_with_teacher']:.4f}")
    student = report.get("student", {})
    if "mean_cosine" in student:  # an embedding model: how closely the student's embeddings follow the teacher's
        console.print(f"embeddings vs teacher: mean cosine {student['mean_cosine']:.4f} (min {student['min_cosine']:.4f}), "
                      f"agreement@1 {student['agreement_at_1']:.4f}, agreement@10 {student['agreement_at_10']:.4f} "
                      f"over {student['embedding_samples']} texts")


def _eval(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.directory)
    student = load_run(args.directory)
    data = prepare_data(recipe)
    metrics = evaluate(student, data.test, data.bundle.num_classes)
    _print_metrics({"student": metrics})
    return 0


def _export(args: argparse.Namespace) -> int:
    section = export_directory(args.directory, args.format)
    console.print(format_export_summary(section))
    return 0


def _serve_bench(args: argparse.Namespace) -> int:
    compare = args.compare
    if compare is None and (Path(args.path).parent / "model.onnx").is_file():
        compare = Path(args.path).parent / "model.onnx"  # the run folder's int8 file
    info = serve_bench(args.path, compare=compare, threads=args.threads)
    console.print(f"packed file {info['path']} ({info['file_bytes']:,} bytes), input {info['input_shape']}, "
                  f"threads: {info['threads']}")
    console.print(f"load (rebuild the int8 graph + ONNX Runtime session): first {info['load_ms']['first']:.1f} ms, "
                  f"best {info['load_ms']['best']:.1f} ms")
    console.print("latency µs/sample: " + ", ".join(f"{key} {value:.1f}" for key, value in info["latency_us_per_sample"].items()))
    if "outputs_equal" in info:
        verdict = "yes" if info["outputs_equal"] else "NO"
        console.print(f"outputs equal {info['compared_with']} bit for bit: {verdict}")
        return 0 if info["outputs_equal"] else 1
    return 0


def _search(args: argparse.Namespace) -> int:
    recipe = Recipe.from_yaml(args.recipe).with_overrides(args.overrides)
    section = run_search(recipe, args.out, show_progress=not args.no_progress, echo=console.print)
    console.print(search_table(section))
    chosen = section["chosen"]
    verdict = ("meets the target" if section.get("target_accuracy") is not None else "within the budget") \
        if section["target_met"] else "nothing met the target or budget; most accurate on validation kept"
    console.print(f"chosen {row_name(chosen)} ({chosen['size_bytes']} bytes, test accuracy {chosen['accuracy']:.4f}): "
                  f"{verdict}; wrote {args.out}")
    return 0


def search_table(section: dict) -> Table:
    """Every candidate of a search, the Pareto-optimal ones marked (front: no other is smaller, faster and as accurate)."""
    target = section.get("target_accuracy")
    table = Table(title=f"search ({section.get('mode', 'uniform')}): "
                        + (f"target validation accuracy {target:.4f} " if target is not None else "")
                        + f"(teacher {section['teacher_accuracy']:.4f}); * = Pareto front")
    columns = ("candidate", "front", "size bytes", "latency us", "val accuracy", "test accuracy", "weight bits",
               "act bits", "epochs", "seconds")
    for column in columns:
        table.add_column(column, justify="right")
    for row in section["candidates"]:
        widths = row.get("per_layer", {}).values()
        table.add_row(row_name(row), "*" if row.get("pareto") else "", str(row["size_bytes"]),
                      "-" if row.get("latency_us") is None else f"{row['latency_us']:.1f}",
                      f"{row['val_accuracy']:.4f}", f"{row['accuracy']:.4f}",
                      "/".join(str(w["weight_bits"]) for w in widths if w["weight_bits"] is not None),
                      "/".join(str(w["act_bits"]) for w in widths if w["act_bits"] is not None),
                      str(row["epochs"]), str(row["seconds"]))
    return table


def _recipe_command(commands, name: str, help_text: str, default_out: str, handler) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    command.add_argument("recipe", help="YAML recipe file")
    command.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3")
    command.add_argument("--out", default=default_out, help="output folder")
    command.add_argument("--no-progress", action="store_true", help="no progress bars")
    command.set_defaults(handler=handler)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every command's ``--help`` lists its options and defaults)."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="qdistill", description=__doc__.splitlines()[0], formatter_class=formatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="worked example on the embedded MNIST subset", formatter_class=formatter)
    demo.add_argument("--out", default="out/demo", help="output folder (the teacher is cached there)")
    demo.add_argument("--quick", action="store_true", help="fewer epochs and no ONNX export (about 2 minutes)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
    run = _recipe_command(commands, "run", "run one recipe", "out/run", _run)
    run.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    run.add_argument("--tensorboard", action="store_true",
                     help="write TensorBoard scalars under OUT/tb/ (train.tensorboard=true; needs qdistill[tensorboard])")
    _recipe_command(commands, "search", "find the fewest bits that meet the recipe's search target", "out/search",
                    _search)
    evaluate = commands.add_parser("eval", help="re-evaluate a saved student", formatter_class=formatter)
    evaluate.add_argument("directory", help="folder written by `qdistill run`")
    evaluate.set_defaults(handler=_eval)
    export = commands.add_parser("export", help="export a saved student (ONNX int8, packed)", formatter_class=formatter)
    export.add_argument("directory", help="folder written by `qdistill run`")
    export.add_argument("--format", choices=["onnx", "packed", "all"], default="all", help="what to write")
    export.set_defaults(handler=_export)
    bench = commands.add_parser("serve-bench", help="load a packed file as an int8 ONNX Runtime session and time it",
                                formatter_class=formatter)
    bench.add_argument("path", help="packed file (student.qpack.safetensors) written by `qdistill run`/`export`")
    bench.add_argument("--compare", default=None,
                       help="int8 ONNX file whose outputs must be equal bit for bit (default: model.onnx beside PATH, if any)")
    bench.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    bench.set_defaults(handler=_serve_bench)
    compare = commands.add_parser("compare", help="table and compare.html over run folders", formatter_class=formatter)
    compare.add_argument("directories", nargs="+", metavar="DIR", help="run folders (each with a report.json)")
    compare.add_argument("--out", default=COMPARE_PAGE, help="the HTML file to write")
    compare.set_defaults(handler=_compare)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    errors.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qdistill`` command; returns the exit code."""
    warnings.showwarning = _one_line_warning  # a user sees the message, not our source line
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    overrides = [extra for extra in extras if "=" in extra and not extra.startswith("-")]
    if extras and (args.command not in ("run", "search") or len(overrides) != len(extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command in ("run", "search"):
        args.overrides = args.overrides + overrides  # overrides may also come after --out
    if args.command in TRAINING_COMMANDS:
        keep_freed_memory()  # this process is ours: keep freed memory for the next step (train/allocator.py)
    try:
        return args.handler(args)
    except QdistillError as error:
        if args.debug:
            traceback.print_exc()
        errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted: finished files are complete; nothing was left half-written", markup=False)
        return 130
    except Exception as error:  # an internal failure: say so, show the traceback only on request
        if args.debug:
            traceback.print_exc()
        errors.print(f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
                     markup=False, highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
