"""Issue 13 benchmark: what KD gains over QAT alone (KD minus QAT test accuracy), mean and spread over 3 seeds.

Scenarios (W4A4, first and last layers at 8 bits, as the demo):
  * half-width student (mnist_cnn_small) of the demo CNN, all 3200 training labels;
  * 10% of the training labels, the other 90% unlabeled (KD learns from them, QAT cannot), same architecture;
  * the same on scikit-learn's digits with the MLP.
Each scenario runs with the default student initialisation (from the teacher: a copy, or its most important
channels for the half-width student) and from scratch. The teacher is trained once per data set on all
training labels. A KD run and its QAT twin differ only in distill.alpha (0.9 vs 0): same seeds, epochs,
learning rate and labelled batches. Seeds vary train.seed (initialisation from scratch, dropout); the split,
the labelled 10% and the batch order are fixed by data.seed 0. Accuracies are on each data set's test split.
Targets: KD - QAT >= 1 pp (mean) in both MNIST scenarios; half-width W4A4 KD within 0.5 pp of the teacher.
The "augmented" scenarios train a strong teacher (data.augment=standard, 30 epochs at 2e-3, cosine: 98.3% test)
and both twins on the same augmentation, KD with the teacher live on each augmented batch.
Run with OMP_NUM_THREADS=1 (about 13 minutes per from-scratch MNIST scenario on a busy 2-core machine); arguments
pick scenarios by name, e.g. `python bench/kd_gain_bench.py scratch`; `--seeds 0` runs one seed (a probe, or one
process per seed), `--cache DIR` keeps trained teachers there, so those processes train each teacher once, and
`--set KEY=VALUE` (repeatable) overrides the students' recipe of both twins, e.g. `--set distill.temperature=1`,
and `--kd-alpha A` the KD twin's distill.alpha (default 0.9; 1 is pure distillation).
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

from qdistill import models
from qdistill.evaluate import evaluate
from qdistill.recipe import Recipe
from qdistill.runs.stages import RunData, initial_student, prepare_data
from qdistill.runs.student import distill
from qdistill.train import Supervised, fit

SEEDS = (0, 1, 2)
# from scratch: higher lr and 25 epochs (10 left the half-width QAT student 0.7 pp short of its 25-epoch accuracy)
SCRATCH = ["distill.student_init=scratch", "train.lr=0.002", "train.epochs=25"]
SCARCE = ["data.label_fraction=0.1", "data.unlabeled_ratio=9"]  # each epoch passes once over labelled + unlabeled
SCARCE_SCRATCH = [*SCARCE, *SCRATCH]  # 125 steps, each with 64 labelled + 576 unlabeled samples
MNIST = Recipe(model={"name": "mnist_cnn"}, data={"name": "mnist5k", "batch_size": 64, "seed": 0},
               quant={"weight_bits": 4, "act_bits": 4, "first_last_bits": 8},
               train={"epochs": 5, "lr": 5e-4, "schedule": "cosine"},
               teacher_train={"epochs": 10, "lr": 1e-3, "schedule": "constant"})
# the strong teacher (issue 13's half-width target): the same CNN trained patiently on augmented images
# (data.augment=standard: shifts of up to 2 pixels, rotations of up to 10 degrees, zoom 0.9-1.1), 30 epochs at 2e-3
# with a cosine schedule; its students train on the same augmentation, KD with the teacher's outputs on the same
# augmented batch (a live teacher: consistent teaching, Beyer et al. 2022)
AUGMENTED = MNIST.with_overrides(["data.augment=standard", "teacher_train.epochs=30", "teacher_train.lr=0.002",
                                  "teacher_train.schedule=cosine"])
PATIENT = ["train.epochs=10"]  # from the teacher's channels: twice the demo's 5 epochs at 5e-4, cosine
DIGITS = MNIST.with_overrides(["model={name: mlp}", "data={name: digits, batch_size: 32, seed: 0}",
                               "teacher_train.epochs=30"])
SCENARIOS = [  # (name, base recipe, overrides, checked against the targets)
    ("MNIST half-width, init teacher", MNIST, ["student={name: mnist_cnn_small}"], True),
    ("MNIST half-width, scratch", MNIST, ["student={name: mnist_cnn_small}", *SCRATCH], True),
    ("MNIST half-width, augmented, init teacher", AUGMENTED, ["student={name: mnist_cnn_small}", *PATIENT], True),
    ("MNIST half-width, augmented, scratch", AUGMENTED,
     ["student={name: mnist_cnn_small}", "distill.student_init=scratch", "train.lr=0.002", "train.epochs=20"], True),
    ("MNIST 10% labels, init teacher", MNIST, SCARCE, False),
    ("MNIST 10% labels, scratch", MNIST, ["student={name: mnist_cnn}", *SCARCE_SCRATCH], True),
    ("digits MLP 10% labels, init teacher", DIGITS, SCARCE, False),
    ("digits MLP 10% labels, scratch", DIGITS, ["student={name: mlp}", *SCARCE_SCRATCH], False),
]


def train_teacher(recipe: Recipe, data: RunData, cache: Path | None = None) -> tuple[torch.nn.Module, float]:
    """The teacher on all training labels (augmented as the recipe says), and its test accuracy.

    With ``cache`` (``--cache DIR``) a teacher trained by an earlier run of the same teacher recipe is
    loaded instead, so that scenarios and seeds can run in separate processes.
    """
    torch.manual_seed(0)
    teacher = models.create(recipe.model.name, **data.model_kwargs)
    key = hashlib.sha256(yaml_of(recipe).encode()).hexdigest()[:16]
    path = None if cache is None else cache / f"teacher-{key}.pt"
    if path is not None and path.is_file():
        teacher.load_state_dict(torch.load(path))
    else:
        fit(Supervised(teacher), data.train, recipe.teacher_train, phase="teacher", show_progress=False)
        if path is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(teacher.state_dict(), path)
    return teacher, evaluate(teacher, data.test, data.bundle.num_classes)["accuracy"]


def yaml_of(recipe: Recipe) -> str:
    """What the teacher depends on: the model, the data and the teacher's training."""
    return repr((recipe.model.model_dump(), recipe.data.model_dump(), recipe.teacher_train.model_dump()))


def student_accuracy(recipe: Recipe, data: RunData, teacher: torch.nn.Module) -> float:
    student, _ = initial_student(recipe, data, teacher)
    result = distill(teacher, data.train, data.val, recipe, test=data.test, student=student, show_progress=False,
                     unlabeled=data.unlabeled)
    return result.report["student"]["accuracy"]


def spread(values: list[float]) -> str:
    deviation = f"{100 * statistics.stdev(values):4.2f}" if len(values) > 1 else " n/a"  # a single-seed probe
    return f"{100 * statistics.mean(values):6.2f} +- {deviation}"


def main(only: list[str], seeds: tuple[int, ...] = SEEDS, cache: Path | None = None,
         settings: tuple[str, ...] = (), kd_alpha: float = 0.9) -> None:
    """Every scenario, or those whose name contains one of ``only``; ``seeds``, a teacher ``cache`` folder and
    student recipe ``settings`` (``KEY=VALUE`` overrides applied to both twins, never to the teacher) and the KD
    twin's ``kd_alpha``."""
    teachers: dict[str, tuple[torch.nn.Module, float]] = {}
    if settings or kd_alpha != 0.9:
        print("students (both twins) with", " ".join(settings) or "the defaults", f"; KD twin alpha {kd_alpha}")
    print(f"{'scenario':<38}{'KD (seeds)':>22}{'QAT (seeds)':>22}{'KD mean':>16}{'QAT mean':>16}{'KD-QAT pp':>16}"
          f"{'teacher':>9}  verdict")
    for name, base, overrides, checked in SCENARIOS:
        if only and not any(part in name for part in only):
            continue
        started = time.perf_counter()
        recipe = base.with_overrides([*overrides, *settings])
        if yaml_of(base) not in teachers:
            teachers[yaml_of(base)] = train_teacher(base, prepare_data(base), cache)
        teacher, teacher_accuracy = teachers[yaml_of(base)]
        data = prepare_data(recipe)
        kd, qat = [], []
        for seed in seeds:
            kd.append(student_accuracy(recipe.with_overrides([f"train.seed={seed}", f"distill.alpha={kd_alpha}"]), data, teacher))
            qat.append(student_accuracy(recipe.with_overrides([f"train.seed={seed}", "distill.alpha=0.0"]), data, teacher))
        gains = [a - b for a, b in zip(kd, qat, strict=True)]
        verdict = "-"
        if checked:
            verdict = "PASS" if statistics.mean(gains) >= 0.01 else "FAIL"
            verdict += " (gain >= 1 pp)"
            if "half-width" in name:
                close = statistics.mean(kd) >= teacher_accuracy - 0.005
                verdict += f"; KD within 0.5 pp of teacher: {'PASS' if close else 'FAIL'}"
        print(f"{name:<38}{' '.join(f'{100 * a:.1f}' for a in kd):>22}{' '.join(f'{100 * a:.1f}' for a in qat):>22}"
              f"{spread(kd):>16}{spread(qat):>16}{spread(gains):>16}{100 * teacher_accuracy:>8.2f}%  {verdict}"
              f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def parse(args: list[str]) -> tuple[list[str], tuple[int, ...], Path | None, tuple[str, ...], float]:
    """``[--seeds 0,1,2] [--cache DIR] [--set KEY=VALUE ...] [--kd-alpha A] [scenario name parts...]``."""
    only, seeds, cache, settings, kd_alpha = [], SEEDS, None, (), 0.9
    while args:
        arg, *args = args
        if arg == "--seeds":
            seeds, args = tuple(int(seed) for seed in args[0].split(",")), args[1:]
        elif arg == "--cache":
            cache, args = Path(args[0]), args[1:]
        elif arg == "--set":
            settings, args = (*settings, args[0]), args[1:]
        elif arg == "--kd-alpha":
            kd_alpha, args = float(args[0]), args[1:]
        else:
            only.append(arg)
    return only, seeds, cache, settings, kd_alpha


if __name__ == "__main__":
    main(*parse(sys.argv[1:]))
