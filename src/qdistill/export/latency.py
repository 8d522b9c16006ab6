"""Latency in microseconds per sample: ONNX Runtime (int8 and fp32 files) and PyTorch eager fp32.

Each number is the median of repeated runs after warm-up, divided by the batch size, measured
at batch 1 and batch 64, with one thread and with every CPU thread (``os.cpu_count()``, set
explicitly so that ONNX Runtime and PyTorch use the same count).

Example:
    >>> session = make_session("out/model.onnx", threads=1)
    >>> ort_latency_us(session, sample, batch=64)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

BATCHES = (1, 64)
WARMUP_RUNS = 3
MIN_REPEATS = 5
MAX_REPEATS = 200
BUDGET_SECONDS = 0.4  # per measurement; enough repeats for a stable median on small models

_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def all_threads() -> int:
    """The thread count used for the "all threads" measurements.

    Example:
        >>> all_threads()
        16
    """
    return os.cpu_count() or 1


def make_session(model: str | Path | bytes, threads: int | None = None, level: str = "all",
                 optimized_path: str | Path | None = None) -> ort.InferenceSession:
    """A CPU ``InferenceSession``; ``threads=None`` leaves ONNX Runtime's default.

    Example:
        >>> session = make_session("model.onnx", threads=1, level="extended", optimized_path="opt.onnx")
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[level]
    options.log_severity_level = 3  # ORT's notes about unused initializers are not the user's concern
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def median_us_per_sample(run: Callable[[], object], batch: int, budget_s: float = BUDGET_SECONDS) -> float:
    """Median wall time of ``run()`` after warm-up, in microseconds per sample.

    Example:
        >>> median_us_per_sample(lambda: session.run(None, feed), batch=64)
    """
    for _ in range(WARMUP_RUNS):
        run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < MAX_REPEATS and (len(times) < MIN_REPEATS or time.perf_counter() - started < budget_s):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) / batch * 1e6


def _batch_of(sample: torch.Tensor, batch: int) -> torch.Tensor:
    sample = sample[:1].detach().cpu().float()
    return sample.expand(batch, *sample.shape[1:]).contiguous()


def ort_latency_us(session: ort.InferenceSession, sample: torch.Tensor, batch: int,
                   budget_s: float = BUDGET_SECONDS) -> float:
    """Microseconds per sample of ``session`` on ``batch`` copies of ``sample``.

    Example:
        >>> ort_latency_us(make_session("model.onnx", threads=1), train_x[:1], batch=64)
    """
    feed = {session.get_inputs()[0].name: _batch_of(sample, batch).numpy().astype(np.float32)}
    return median_us_per_sample(lambda: session.run(None, feed), batch, budget_s)


def torch_latency_us(model: nn.Module, sample: torch.Tensor, batch: int, threads: int,
                     budget_s: float = BUDGET_SECONDS) -> float:
    """Microseconds per sample of PyTorch eager (CPU, ``no_grad``) with ``threads`` threads.

    Example:
        >>> torch_latency_us(teacher, train_x[:1], batch=64, threads=1)
    """
    model = model.cpu().eval()
    inputs = _batch_of(sample, batch)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return median_us_per_sample(lambda: model(inputs), batch, budget_s)
    finally:
        torch.set_num_threads(previous)


def _round(value: float) -> float:
    return round(value, 2)


def _one_round(files: dict[str, str | Path], torch_model: nn.Module | None, sample: torch.Tensor,
               batches: tuple[int, ...], budget_s: float) -> dict:
    results: dict = {}
    for label, threads in (("1", 1), ("all", all_threads())):
        table: dict[str, dict[str, float]] = {}
        for name, path in files.items():
            session = make_session(path, threads=threads)
            table[name] = {f"batch{b}": ort_latency_us(session, sample, b, budget_s) for b in batches}
        if torch_model is not None:
            table["torch_fp32"] = {f"batch{b}": torch_latency_us(torch_model, sample, b, threads, budget_s) for b in batches}
        results[label] = table
    return results


def measure_latency(files: dict[str, str | Path], torch_model: nn.Module | None, sample: torch.Tensor,
                    batches: tuple[int, ...] = BATCHES, budget_s: float = BUDGET_SECONDS, rounds: int = 1) -> dict:
    """``{"1": {name: {batch1, batch64}}, "all": {...}, "all_threads": N}`` for ONNX files and torch.

    ``files`` maps a label (e.g. ``"int8"``, ``"fp32"``) to an ONNX file; ``torch_model`` is
    measured as ``"torch_fp32"``. With ``rounds > 1`` every model is measured once per round, in
    turn, and each number is the median over rounds, so a burst of load from other processes
    does not land on one model only.

    Example:
        >>> measure_latency({"int8": "model.onnx", "fp32": "fp32.onnx"}, float_model, example_input)
    """
    measured = [_one_round(files, torch_model, sample, batches, budget_s) for _ in range(rounds)]
    results: dict = {"all_threads": all_threads()}
    for label in ("1", "all"):
        results[label] = {
            name: {key: _round(statistics.median(run[label][name][key] for run in measured)) for key in row}
            for name, row in measured[0][label].items()
        }
    return results
