"""QAT+KD training-step cost relative to a plain FP32 training step (same network, same process).

Targets (issue 15): a W4A4 QAT+KD step of the seed's MNIST CNN costs at most 1.2x an FP32 step at
batch 64 with 2 threads with cached teacher logits, at most 1.6x with the teacher run live. Times
are medians over repeats, interleaved (order reversed every other repeat) so machine noise hits
all steps. Next to wall time, the process's CPU time per step is measured too: on a shared
machine wall time includes waiting for a core, CPU time much less so.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from qdistill import models
from qdistill.kd import Distiller, KDLoss
from qdistill.quant import prepare
from qdistill.recipe import QuantSpec

BATCH, REPEATS, STEPS = 64, 7, 20


def _timed_steps(step, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step."""
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps, (time.process_time() - cpu_started) / steps


def measure(threads: int = 2) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    teacher = models.create("mnist_cnn")
    float_model = models.create("mnist_cnn")
    student = prepare(teacher, QuantSpec(weight_bits=4, act_bits=4), calibration_data=[(x, y)])
    distiller = Distiller(teacher, student, KDLoss(4.0, 0.9)).train()
    float_opt = torch.optim.Adam(float_model.parameters(), 1e-3)
    student_opt = torch.optim.Adam(student.parameters(), 1e-3)

    def float_step():
        loss = F.cross_entropy(float_model(x), y)
        float_opt.zero_grad(set_to_none=True)
        loss.backward()
        float_opt.step()

    with torch.no_grad():
        cached_logits = teacher.eval()(x)  # what CachedTeacherLoader supplies for in-memory data

    def qat_kd_step():  # the step qdistill runs: teacher logits precomputed once per data set
        parts = distiller(x, y, cached_logits)
        student_opt.zero_grad(set_to_none=True)
        parts.total.backward()
        student_opt.step()

    def qat_kd_live_teacher_step():  # streaming data: the teacher runs inside every step
        parts = distiller(x, y)
        student_opt.zero_grad(set_to_none=True)
        parts.total.backward()
        student_opt.step()

    float_model.train()
    steps = {"fp32": float_step, "qat_kd": qat_kd_step, "qat_kd_live_teacher": qat_kd_live_teacher_step}
    for step in steps.values():
        _timed_steps(step, 5)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(REPEATS):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(_timed_steps(steps[name], STEPS))
    medians = {name: statistics.median(wall for wall, _ in values) * 1e3 for name, values in times.items()}
    cpu = {name: statistics.median(cpu for _, cpu in values) * 1e3 for name, values in times.items()}
    return {**{f"{name}_ms": value for name, value in medians.items()},
            **{f"{name}_cpu_ms": value for name, value in cpu.items()},
            "ratio": medians["qat_kd"] / medians["fp32"],
            "ratio_live_teacher": medians["qat_kd_live_teacher"] / medians["fp32"],
            "cpu_ratio": cpu["qat_kd"] / cpu["fp32"], "cpu_ratio_live_teacher": cpu["qat_kd_live_teacher"] / cpu["fp32"]}


if __name__ == "__main__":
    result = measure()
    print(f"[load average {' '.join(f'{value:.1f}' for value in os.getloadavg())}]")
    print(f"FP32 step {result['fp32_ms']:.2f} ms | W4A4 QAT+KD step {result['qat_kd_ms']:.2f} ms "
          f"(cached teacher logits) | ratio {result['ratio']:.2f}x (target <= 1.20x)")
    print(f"W4A4 QAT+KD step with the teacher run live in the step: {result['qat_kd_live_teacher_ms']:.2f} ms | "
          f"ratio {result['ratio_live_teacher']:.2f}x (target <= 1.60x)")
    print(f"CPU time per step: FP32 {result['fp32_cpu_ms']:.2f} ms | QAT+KD cached {result['qat_kd_cpu_ms']:.2f} ms "
          f"({result['cpu_ratio']:.2f}x) | live {result['qat_kd_live_teacher_cpu_ms']:.2f} ms "
          f"({result['cpu_ratio_live_teacher']:.2f}x)")
