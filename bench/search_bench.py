"""Issue 14 benchmark: mixed precision under a size budget against uniform bit widths of the same or larger size.

For each model (the demo CNN on the MNIST subset, recipes/mnist_search_size.yaml; the built-in
tiny ResNet on scikit-learn digits, recipes/resnet_search_latency.yaml with a size budget instead of
its latency budget, so the two are compared at known sizes):

1. ``qdistill search`` (mixed) with ``size_bytes`` = 80% of uniform W4A4's size, ``points: 3``,
   timed end to end, teacher training included (target for the demo CNN: <= 300 s on 2 cores).
2. Uniform W4A4 and W4A8 (same size as W4A4: activation widths cost no stored bytes) with the same
   teacher and training settings, through ``run_recipe``.
3. ``qdistill search`` (mixed) with ``size_bytes`` = W4A4's size, ``points: 1``, same teacher.

Targets (accuracy on the test split, which no choice saw; one seed): mixed at <= W4A4's size >= W4A4,
and mixed at 80% of W4A4's size >= W4A4 - 0.3 pp. The best uniform configuration of the same or larger
size than each mixed student is printed beside it.

Run: ``PYTHONPATH=src python bench/search_bench.py [out_folder]`` (default out/search_bench).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from qdistill.evaluate import evaluate, theoretical_size_bytes
from qdistill.models import build_model
from qdistill.quant import prepare
from qdistill.recipe import Recipe
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.rundir import RunDir
from qdistill.runs.search import run_search
from qdistill.runs.stages import obtain_teacher, prepare_data

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"demo CNN (mnist_cnn, mnist5k)": ("mnist_search_size.yaml", 300.0),
          "tiny ResNet (tiny_resnet, digits)": ("resnet_search_latency.yaml", None)}
UNIFORM = ((4, 4), (4, 8))
WITHIN_PP = 0.3


def uniform_size(recipe: Recipe, weight_bits: int, act_bits: int) -> int:
    """Theoretical size of the uniform student (first and last layer at first_last_bits), from the architecture."""
    data = prepare_data(recipe)
    model = build_model(recipe.model, data.model_kwargs)
    spec = recipe.with_overrides([f"quant.weight_bits={weight_bits}", f"quant.act_bits={act_bits}"]).quant
    return theoretical_size_bytes(prepare(model, spec))


def mixed(recipe: Recipe, budget: int, points: int, out: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    recipe = recipe.with_overrides([f"search.budget={{size_bytes: {budget}}}", f"search.points={points}",
                                    "export.onnx=false", "export.packed=false"])
    section = run_search(recipe, out, show_progress=False, echo=lambda *_: None)
    return section, time.perf_counter() - started


def bench_model(label: str, recipe_file: str, time_target: float | None, out: Path) -> list[str]:
    recipe = Recipe.from_yaml(ROOT / "recipes" / recipe_file)
    w4a4 = uniform_size(recipe, 4, 4)
    small = int(0.8 * w4a4)
    front, seconds = mixed(recipe, small, 3, out / "mixed_80")
    data = prepare_data(recipe)
    teacher, _ = obtain_teacher(recipe, data, RunDir(out / "mixed_80"), resume=False, show_progress=False,
                                reuse_cached=True)
    uniform = {}
    for w, a in UNIFORM:
        result = run_recipe(recipe.with_overrides([f"quant.weight_bits={w}", f"quant.act_bits={a}"]),
                            out / f"w{w}a{a}", data=data, teacher=teacher, show_progress=False, export=False)
        uniform[f"W{w}A{a}"] = {**result.report["student"],
                                "val_accuracy": evaluate(result.student, data.val)["accuracy"]}
    (out / "mixed_100").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "mixed_80" / "teacher.safetensors", out / "mixed_100" / "teacher.safetensors")
    equal, _ = mixed(recipe, w4a4, 1, out / "mixed_100")
    lines = [f"== {label}: W4A4 size {w4a4} bytes; 80% = {small} bytes",
             f"search at 80%: {seconds:.1f} s end to end (teacher, sensitivity "
             f"{front['sensitivity']['seconds']} s, {len(front['candidates'])} candidates)"
             + ("" if time_target is None else f" target <= {time_target:.0f} s: "
                f"{'PASS' if seconds <= time_target else 'FAIL'}")]
    lines.append(f"{'student':<16}{'size bytes':>11}{'val acc':>9}{'test acc':>9}  per-layer weight/act bits")
    for name, row in uniform.items():
        lines.append(f"{name:<16}{row['size_bytes']:>11}{row['val_accuracy'] * 100:>8.2f}%{row['accuracy'] * 100:>8.2f}%  "
                     + " ".join(f"{w['weight_bits']}/{w['act_bits']}" for w in row["per_layer"].values()))
    for tag, section in (("80%", front), ("100%", equal)):
        for row in section["candidates"]:
            chosen = "  <- chosen" if row["name"] == section["chosen"]["name"] else ""
            lines.append(f"{'mixed ' + tag + ' ' + row['name']:<16}{row['size_bytes']:>11}{row['val_accuracy'] * 100:>8.2f}%"
                         f"{row['accuracy'] * 100:>8.2f}%  "
                         + " ".join(f"{w['weight_bits']}/{w['act_bits']}" for w in row["per_layer"].values()) + chosen)
    lines.extend(_verdicts(uniform, front["chosen"], equal["chosen"]))
    return lines


def _verdicts(uniform: dict, at_80: dict, at_100: dict) -> list[str]:
    base = uniform["W4A4"]["accuracy"]
    lines = []
    for tag, row in (("<= W4A4 size", at_100), ("80% of W4A4", at_80)):
        larger = {name: u for name, u in uniform.items() if u["size_bytes"] >= row["size_bytes"]}
        best_name = max(larger, key=lambda name: larger[name]["accuracy"])
        allowed = 0.0 if tag.startswith("<=") else WITHIN_PP
        delta = (row["accuracy"] - base) * 100
        lines.append(f"mixed {tag} ({row['size_bytes']} bytes): test {row['accuracy'] * 100:.2f}% vs W4A4 "
                     f"{base * 100:.2f}% ({delta:+.2f} pp, target >= -{allowed} pp: {'PASS' if delta >= -allowed else 'FAIL'}); "
                     f"best uniform of same or larger size: {best_name} {larger[best_name]['accuracy'] * 100:.2f}%")
    return lines


def main() -> None:
    torch.set_num_threads(2)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/search_bench")
    if out.exists():
        shutil.rmtree(out)
    print(f"torch threads 2; cores {os.cpu_count()}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    for label, (recipe_file, time_target) in MODELS.items():
        for line in bench_model(label, recipe_file, time_target, out / Path(recipe_file).stem):
            print(line, flush=True)


if __name__ == "__main__":
    main()
