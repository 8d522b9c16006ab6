"""Latency in microseconds per sample: ONNX Runtime (int8 and fp32 files) and PyTorch eager fp32.

How the numbers are taken, so that they can be compared (report.json ``latency_method``):

- **Interleaved rounds.** For each thread count and batch size the models are timed in turn,
  ``rounds`` times, the order reversed every other round (int8, fp32, torch, then torch, fp32,
  int8, ...), so a burst of load from other processes, or a CPU clock change, is spread over all
  models instead of landing on one of them.
- **Settling.** Before each model's turn in a round the process sleeps ``SETTLE_SECONDS`` and runs
  the model once untimed. ONNX Runtime's (and OpenMP's) worker threads keep spinning for a while
  after a run; without the pause, the previous model's spinning workers take CPU time from the
  next model's threads. On a 2-core machine that made the demo CNN's int8 file at 2 threads
  time at 0.99-1.07x fp32 where it is 1.5-1.7x when run alone: a cost of the measurement,
  not of the file, that a user running one model never pays.
- **Statistic.** Each round times a model for ``budget_s / rounds`` seconds (at least
  ``MIN_REPEATS`` runs, after ``WARMUP_RUNS`` untimed runs before the first round) and keeps the
  median run; the number reported is the best (smallest) of those medians, divided by the batch
  size.
- **Comparisons.** "Not slower than file B" is not "a smaller best time": two identical files time a
  few percent apart either way, and on a shared VM a run can sit in a state 1.5x slower for a second
  or two. ``compare_speed`` judges the paired rounds of ``interleaved_rounds`` instead (one ratio per
  round, the two timed back to back) with a one-sided paired t-test, Bonferroni-corrected over the
  cells of one claim; the benchmarks show the baseline's own file timed twice beside it (A/A).
- **Real batches.** A batch holds distinct samples: the first ``batch`` inputs given (validation
  data), cycled only when fewer were given; never one sample repeated.
- **Threads.** Once with one thread and once with every CPU this process may run on
  (``len(os.sched_getaffinity(0))`` where the OS has it, else ``os.cpu_count()``), set explicitly
  for ONNX Runtime (intra-op) and PyTorch.

Example (PyTorch only, a short budget; ``files`` adds ONNX models, e.g. ``{"int8": ..., "fp32": ...}``):
    >>> import torch
    >>> from torch import nn
    >>> latency = measure_latency({}, nn.Linear(4, 2), torch.rand(64, 4), budget_s=0.01)
    >>> sorted(latency), sorted(latency["1"]["torch_fp32"]), latency["method"]["statistic"]
    (['1', 'all', 'all_threads', 'method'], ['batch1', 'batch64'], "best of the rounds' median run time")
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from scipy import stats as scipy_stats
from torch import nn

from qdistill.batch import call_model, concat_inputs, cpu_inputs, input_rows, input_tensors, split_batch, take_rows
from qdistill.errors import ExportError
from qdistill.export.feeds import session_feed

BATCHES = (1, 64)
ROUNDS = 5
WARMUP_RUNS = 3
MIN_REPEATS = 3  # timed runs per model and round, at least
MAX_REPEATS = 200
BUDGET_SECONDS = 0.4  # per number (model, thread count, batch size), split over the rounds
SETTLE_SECONDS = 0.02  # pause before each model's turn, so the previous model's workers stop spinning
STATISTIC = "best of the rounds' median run time"
SIGNIFICANCE = 0.05  # compare_speed: one-sided p below this calls a difference real
ORDER = "interleaved: every model once per round, order reversed every other round"

_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def all_threads() -> int:
    """The thread count used for the "all threads" measurements: the CPUs this process may run on.

    Example:
        >>> all_threads() >= 1      # taskset -c 0-3 python ...  gives 4
        True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


EXACT_INT8_OPTION = "session.x64quantprecision"  # ONNX Runtime's u8s8 -> u8u8 weight conversion (x86)
_PROBE_DEPTH = 64  # products per sum in the probe: 32 saturating pairs where the kernels saturate


@functools.cache
def u8s8_sums_saturate() -> bool:
    """Whether this CPU's fast ONNX Runtime u8s8 kernels (uint8 activations x int8 weights) saturate their sums.

    On x86 CPUs without VNNI (AVX2; AVX-512 without VNNI) MLAS adds each pair of uint8 x int8 products
    in a saturating 16-bit step (``vpmaddubsw``): 255 x 127 x 2 = 64770 comes out as 32767. VNNI
    (``vpdpbusd``) and ARM's dot-product kernels sum in 32 bits. Measured, not read off CPU flags: one
    MatMulInteger with a constant int8 weight (prepacked, as QLinearConv's and QGemm's are), codes
    255 x 127, one row and eight rows, run without ``session.x64quantprecision`` and compared
    with numpy's exact int32 product. Cached per process (a few ms once).

    Example:
        >>> u8s8_sums_saturate() in (True, False)
        True
    """
    weight = np.full((_PROBE_DEPTH, 16), 127, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["codes", "weight"], ["sums"])], "u8s8_probe",
        [helper.make_tensor_value_info("codes", TensorProto.UINT8, [None, _PROBE_DEPTH])],
        [helper.make_tensor_value_info("sums", TensorProto.INT32, [None, 16])],
        initializer=[numpy_helper.from_array(weight, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # any ONNX Runtime of the supported range reads it
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an ONNX Runtime that cannot run the probe gets the safe answer: exact kernels
        return True
    for rows in (1, 8):  # one row and several: a single row may take another kernel path
        codes = np.full((rows, _PROBE_DEPTH), 255, np.uint8)
        if not np.array_equal(session.run(None, {"codes": codes})[0], codes.astype(np.int32) @ weight.astype(np.int32)):
            return True
    return False


def make_session(model: str | Path | bytes, threads: int | None = None, level: str = "all",
                 optimized_path: str | Path | None = None, spinning: bool | None = None,
                 exact_int8: bool = True) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` with the settings the int8 file is meant to run with (docs/deploy.md).

    - ``level="all"`` (``ORT_ENABLE_ALL``): ONNX Runtime's layout transformers run; they turn the
      int8 file's QLinearConv chains into NHWC kernels (NhwcTransformer, with NHWC MaxPool) and a
      narrow float-code first conv into an NCHWc Conv + MaxPool. ``"extended"`` keeps NCHW
      (what the kernel check reads); ``"basic"`` fuses nothing int8.
    - ``threads``: intra-op threads (None: ONNX Runtime's default, one per physical core); the
      inter-op pool is then 1 (the graphs are sequential).
    - ``exact_int8`` (on unless asked otherwise): exact int8 sums. On x86 CPUs without VNNI (AVX2, AVX-512
      without VNNI) ONNX Runtime's fast u8s8 kernels add two products in a saturating 16-bit step
      (``vpmaddubsw``), so an 8-bit weight beyond [-64, 63] times a large activation code comes out
      wrong (a single Linear 4->8 W8A8: 23 dB against the student). There (``u8s8_sums_saturate()``)
      the session sets ``session.x64quantprecision``, which runs those weights through ONNX Runtime's
      exact u8u8 kernels. Elsewhere it is left off: ONNX Runtime applies the conversion on every x86
      CPU, VNNI included, where it changes no output and halves the speed of 8-bit layers
      (ResNet-18 W8A8 at batch 32, one thread, AVX512-VNNI: 1054 against 477 µs/sample;
      docs/deploy.md). ``False`` (never set) only to read which kernels a graph gets
      (``integer_kernels``): the conversion retypes the weights of the same kernels.
    - ``spinning``: ``session.intra_op.allow_spinning`` (None: ONNX Runtime's default, on). Worker
      threads that spin between ops answer sooner; on a machine shared with other busy processes
      ``False`` keeps them from taking CPU time the others need.

    Example:
        >>> import tempfile, numpy as np
        >>> from qdistill.export.onnx import export_float_onnx
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = export_float_onnx(nn.Linear(4, 2), f"{folder}/fp32.onnx", torch.rand(1, 4))["path"]
        ...     session = make_session(path, threads=1, level="extended", optimized_path=f"{folder}/optimized.onnx", spinning=False)
        >>> session.run(None, {"input": np.zeros((3, 4), np.float32)})[0].shape
        (3, 2)
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[level]
    options.log_severity_level = 3  # ORT's notes about unused initializers are not the user's concern
    if exact_int8 and u8s8_sums_saturate():  # only where it is needed: elsewhere it costs speed (see above)
        options.add_session_config_entry(EXACT_INT8_OPTION, "1")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def first_samples(loader: Iterable[Any], count: int) -> Any:
    """The first ``count`` inputs of ``loader`` (fewer if it holds fewer), on the CPU, in the batches' form
    (``qdistill.batch``: a tensor, a tuple or a dict; float as float32, integer inputs kept).

    Example:
        >>> first_samples([(torch.zeros(4, 2), None), (torch.ones(4, 2), None)], 6).shape
        torch.Size([6, 2])
    """
    chunks, total = [], 0
    for batch in loader:
        inputs, _ = split_batch(batch)
        chunks.append(cpu_inputs(inputs))
        total += input_rows(inputs)
        if total >= count:
            break
    if not chunks:
        raise ExportError("data: the loader yielded no batches; at least one sample is needed")
    return take_rows(concat_inputs(chunks), slice(0, count))


def batch_of(samples: Any, batch: int) -> Any:
    """``batch`` inputs: the first ``batch`` of ``samples``, cycled only when there are fewer.

    Example:
        >>> batch_of(torch.arange(3.0).reshape(3, 1), 5).flatten().tolist()
        [0.0, 1.0, 2.0, 0.0, 1.0]
    """
    samples = cpu_inputs(samples)
    return take_rows(samples, torch.arange(batch) % input_rows(samples))


def _median_seconds(run: Callable[[], object], budget_s: float, clock: Callable[[], float]) -> float:
    times: list[float] = []
    started = clock()
    while len(times) < MAX_REPEATS and (len(times) < MIN_REPEATS or clock() - started < budget_s):
        begin = clock()
        run()
        times.append(clock() - begin)
    return statistics.median(times)


def _settle() -> None:
    time.sleep(SETTLE_SECONDS)


def interleaved_rounds(runs: dict[str, Callable[[], object]], batch: int, rounds: int = ROUNDS,
                       budget_s: float = BUDGET_SECONDS,
                       clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """``{name: [µs per sample in round 1, round 2, ...]}``: each ``run()`` (one batch of ``batch`` samples)
    timed in ``rounds`` interleaved rounds, the median run of each round (module docstring).

    The rounds of two models are paired: the same round saw the same machine (``compare_speed``).

    Example (a fake clock that reads one second later at each call: every run takes 1 s per 64 samples):
        >>> import itertools
        >>> interleaved_rounds({"a": lambda: None, "b": lambda: None}, 64, rounds=2, clock=itertools.count().__next__)
        {'a': [15625.0, 15625.0], 'b': [15625.0, 15625.0]}
    """
    for run in runs.values():
        for _ in range(WARMUP_RUNS):
            run()
    medians: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            _settle()
            runs[name]()  # untimed: wakes this model's workers and reloads its weights into the caches
            medians[name].append(_median_seconds(runs[name], budget_s / rounds, clock) / batch * 1e6)
    return medians


def interleaved_us_per_sample(runs: dict[str, Callable[[], object]], batch: int, rounds: int = ROUNDS,
                              budget_s: float = BUDGET_SECONDS,
                              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """``{name: µs per sample}`` of each ``run()``: the best of its ``interleaved_rounds``.

    Example (a fake clock that reads one second later at each call: every run takes 1 s per 64 samples):
        >>> import itertools
        >>> interleaved_us_per_sample({"a": lambda: None, "b": lambda: None}, 64, clock=itertools.count().__next__)
        {'a': 15625.0, 'b': 15625.0}
    """
    return {name: min(values) for name, values in interleaved_rounds(runs, batch, rounds, budget_s, clock).items()}


def compare_speed(candidate_us: list[float], baseline_us: list[float], alpha: float = SIGNIFICANCE,
                  comparisons: int = 1) -> dict[str, Any]:
    """Whether ``candidate`` is faster or slower than ``baseline``, from their paired ``interleaved_rounds``.

    Two files with the same kernels time a few percent apart in either direction from one round to the
    next on a shared machine, so "not slower" cannot mean "a smaller best time in this run": the same file
    loaded twice would fail that about half the time. Each round gives one paired ratio (the two were timed
    back to back); ``ratio`` is their geometric mean (baseline time / candidate time: > 1 when the
    candidate is faster), and a one-sided paired t-test on the log ratios gives ``p_slower`` (the chance
    of ratios this low if the candidate were not slower) and ``p_faster``. ``verdict`` is ``"slower"`` or
    ``"faster"`` when that p is below ``alpha / comparisons``, else ``"no significant difference"``
    (pyperf's ``compare_to`` draws the same line). ``comparisons``: how many such tests one claim rests on
    ("never slower" over 16 cells is 16): Bonferroni's correction keeps the chance that identical files
    fail any of them below ``alpha``.

    Example (a candidate 5% slower in every round, give or take 1%):
        >>> result = compare_speed([105.0, 106.0, 104.0, 105.0, 105.5], [100.0, 100.5, 99.5, 100.0, 100.0])
        >>> result["verdict"], round(result["ratio"], 3)
        ('slower', 0.951)
    """
    if not isinstance(comparisons, int) or comparisons < 1:
        raise ExportError(f"compare_speed: comparisons={comparisons!r} is not allowed; allowed: an integer >= 1")
    if len(candidate_us) != len(baseline_us) or len(candidate_us) < 3:
        raise ExportError(f"compare_speed: {len(candidate_us)} and {len(baseline_us)} rounds are not allowed; "
                          "allowed: the same number of paired rounds, at least 3")
    logs = np.log(np.asarray(baseline_us, dtype=np.float64) / np.asarray(candidate_us, dtype=np.float64))
    mean, spread = float(logs.mean()), float(logs.std(ddof=1))
    if spread == 0.0:  # every round gave the same ratio: its sign is the answer
        p_slower, p_faster = (0.0, 1.0) if mean < 0 else (1.0, 0.0) if mean > 0 else (1.0, 1.0)
    else:
        t = mean / (spread / np.sqrt(len(logs)))
        p_slower, p_faster = float(scipy_stats.t.cdf(t, len(logs) - 1)), float(scipy_stats.t.sf(t, len(logs) - 1))
    threshold = alpha / comparisons
    verdict = "slower" if p_slower < threshold else "faster" if p_faster < threshold else "no significant difference"
    return {"ratio": float(np.exp(mean)), "p_slower": p_slower, "p_faster": p_faster, "verdict": verdict,
            "rounds": len(logs), "alpha": threshold}


def describe_speed(comparison: dict[str, Any]) -> str:
    """``compare_speed``'s answer in a few words.

    Example:
        >>> describe_speed({"ratio": 1.031, "verdict": "no significant difference", "p_slower": 0.79, "rounds": 7})
        '1.03x, no significant difference (p slower 0.79, 7 rounds)'
    """
    return (f"{comparison['ratio']:.2f}x, {comparison['verdict']} "
            f"(p slower {comparison['p_slower']:.2f}, {comparison['rounds']} rounds)")


def _samples_note(samples: Any, batches: tuple[int, ...]) -> str:
    rows = input_rows(samples)
    flat = torch.cat([tensor.detach().cpu().double().reshape(rows, -1) for tensor in input_tensors(samples)], dim=1)
    distinct = len(torch.unique(flat, dim=0))
    if distinct >= max(batches):
        return "distinct"
    return f"{distinct} distinct, cycled to fill batch {max(batches)}"


def _session_run(session: ort.InferenceSession, inputs: Any) -> Callable[[], object]:
    feed = session_feed(session, inputs)
    return lambda: session.run(None, feed)


def _torch_run(model: nn.Module, inputs: Any) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return call_model(model, inputs)

    return run


def measure_latency(files: dict[str, str | Path], torch_model: nn.Module | None, samples: Any,
                    batches: tuple[int, ...] = BATCHES, budget_s: float = BUDGET_SECONDS, rounds: int = ROUNDS,
                    clock: Callable[[], float] = time.perf_counter, keep_rounds: bool = False) -> dict:
    """``{"1": {name: {batch1, batch64}}, "all": {...}, "all_threads": N, "method": {...}}``.

    ``files`` maps a label (e.g. ``"int8"``, ``"fp32"``) to an ONNX file; ``torch_model`` is
    measured as ``"torch_fp32"``; ``samples`` are real inputs (validation data), batched as
    ``batch_of`` says (any input form of ``qdistill.batch``; ONNX files are fed by input name).
    ``budget_s`` is the timing budget of one number, split over the rounds.
    ``method`` records how the numbers were taken (module docstring). Values are rounded to 0.01 µs.
    ``keep_rounds`` adds ``"rounds_us"``: every round's number (``{"1": {name: {batch1: [...]}}, "all": ...}``),
    the paired samples ``compare_speed`` needs.

    Example (a fake clock, one second per reading, so the numbers are known; 8 samples fill batch 64 by cycling):
        >>> import itertools
        >>> latency = measure_latency({}, nn.Linear(4, 2), torch.rand(8, 4), clock=itertools.count().__next__)
        >>> latency["1"], latency["method"]["samples"]
        ({'torch_fp32': {'batch1': 1000000.0, 'batch64': 15625.0}}, '8 distinct, cycled to fill batch 64')
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ExportError(f"latency rounds: {rounds!r} is not allowed; allowed: an integer >= 1")
    if input_rows(samples) < 1 or not batches:
        raise ExportError("latency: no samples or no batch sizes to time; give validation data (or an example input) "
                          "and at least one batch size")
    threads_all = all_threads()
    results: dict = {"all_threads": threads_all}
    per_round: dict = {}
    model = torch_model.cpu().eval() if torch_model is not None else None
    previous = torch.get_num_threads()
    try:
        for label, threads in (("1", 1), ("all", threads_all)):
            torch.set_num_threads(threads)
            sessions = {name: make_session(path, threads=threads) for name, path in files.items()}
            table: dict[str, dict[str, float]] = {name: {} for name in [*sessions, *(["torch_fp32"] if model else [])]}
            per_round[label] = {name: {} for name in table}
            for batch in batches:
                inputs = batch_of(samples, batch)
                runs = {name: _session_run(session, inputs) for name, session in sessions.items()}
                if model is not None:
                    runs["torch_fp32"] = _torch_run(model, inputs)
                for name, values in interleaved_rounds(runs, batch, rounds, budget_s, clock).items():
                    table[name][f"batch{batch}"] = round(min(values), 2)
                    per_round[label][name][f"batch{batch}"] = [round(value, 2) for value in values]
            results[label] = table
    finally:
        torch.set_num_threads(previous)
    results["method"] = {
        "rounds": rounds, "statistic": STATISTIC, "order": ORDER, "threads": {"1": 1, "all": threads_all},
        "batch_sizes": list(batches), "samples": _samples_note(samples, batches), "warmup_runs": WARMUP_RUNS,
        "budget_s_per_number": budget_s, "settle_s": SETTLE_SECONDS, "exact_int8_option": u8s8_sums_saturate(),
    }
    if keep_rounds:
        results["rounds_us"] = per_round
    return results
