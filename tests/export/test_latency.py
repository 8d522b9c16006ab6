"""Issue 9 item 10: latency numbers that compare: interleaved rounds, real batches, affinity threads.

No timing is asserted: ONNX Runtime sessions and the clock are replaced by recording stubs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from qdistill.errors import ExportError
from qdistill.export import latency
from qdistill.export.latency import MIN_REPEATS, WARMUP_RUNS, all_threads, measure_latency

ROUNDS = 4
BATCHES = (4, 16)


class _Log:
    """What ran, in order: ``("tick", None)`` for each clock read, ``("settle", None)`` for each settling
    pause, ``(model, inputs)`` for each run."""

    def __init__(self) -> None:
        self.events: list[tuple[str, np.ndarray | None]] = []
        self.threads: dict[str, list[int]] = {}
        self.now = itertools.count()

    def clock(self) -> float:
        self.events.append(("tick", None))
        return float(next(self.now)) * 1000.0  # every read is far past any budget: each round runs MIN_REPEATS times

    def runs(self) -> list[tuple[str, np.ndarray]]:
        return [event for event in self.events if event[0] not in ("tick", "settle")]

    def timed_runs(self) -> list[tuple[str, np.ndarray]]:
        """The runs with a clock read right before and after them (warm-up runs come in untimed rows)."""
        return [event for previous, event, following in zip(self.events, self.events[1:], self.events[2:], strict=False)
                if previous[0] == "tick" and event[0] != "tick" and following[0] == "tick"]


class _Session:
    def __init__(self, name: str, log: _Log) -> None:
        self.name, self.log = name, log

    def get_inputs(self):
        return [type("Input", (), {"name": "input"})()]

    def run(self, outputs, feed):
        self.log.events.append((self.name, feed["input"].copy()))
        return [np.zeros((len(feed["input"]), 10), np.float32)]


class _TorchModel(nn.Module):
    def __init__(self, log: _Log) -> None:
        super().__init__()
        self.log = log
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.log.events.append(("torch_fp32", x.numpy().copy()))
        return x.flatten(1)[:, :10]


@pytest.fixture
def recorded(monkeypatch):
    log = _Log()

    def make_session(path, threads=None, **_):
        log.threads.setdefault(str(path), []).append(threads)
        return _Session(str(path), log)

    monkeypatch.setattr(latency, "make_session", make_session)
    monkeypatch.setattr(latency, "_settle", lambda: log.events.append(("settle", None)))
    monkeypatch.setattr(latency.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    return log


def _samples(count: int) -> torch.Tensor:
    return torch.arange(count * 64, dtype=torch.float32).reshape(count, 1, 8, 8)  # every sample different


def _measure(log: _Log, samples: torch.Tensor) -> dict:
    return measure_latency({"int8": "int8", "fp32": "fp32"}, _TorchModel(log), samples, batches=BATCHES,
                           budget_s=0.01, rounds=ROUNDS, clock=log.clock)


def test_models_are_timed_in_interleaved_rounds_alternating_their_order(recorded):
    _measure(recorded, _samples(20))
    names = [name for name, _ in recorded.timed_runs()]
    # each (thread count, batch) block: ROUNDS rounds of one measurement (MIN_REPEATS runs) per model
    measurements = [names[i:i + MIN_REPEATS] for i in range(0, len(names), MIN_REPEATS)]
    assert all(len(set(chunk)) == 1 for chunk in measurements)
    order = [chunk[0] for chunk in measurements]
    forward, backward = ["int8", "fp32", "torch_fp32"], ["torch_fp32", "fp32", "int8"]
    one_block = [name for index in range(ROUNDS) for name in (forward if index % 2 == 0 else backward)]
    assert order == one_block * (2 * len(BATCHES))  # 1 thread and all threads, each batch size
    # before the rounds of each block every model ran WARMUP_RUNS times untimed, and once more
    # (untimed, after the settling pause) right before each of its measurements
    assert len(recorded.runs()) - len(names) == 3 * (WARMUP_RUNS + ROUNDS) * 2 * len(BATCHES)
    events = [event[0] for event in recorded.events]
    settled = [events[index + 1] for index, event in enumerate(events) if event == "settle"]
    first_timed = [events[index + 4] for index, event in enumerate(events) if event == "settle"]  # run, started, begin
    assert settled == first_timed == order


def test_each_batch_holds_distinct_samples_from_the_data_given(recorded):
    samples = _samples(20)
    result = _measure(recorded, samples)
    for name, fed in recorded.timed_runs():
        rows = fed.reshape(len(fed), -1)
        assert len({row.tobytes() for row in rows}) == len(rows), name  # no sample repeated in a batch
        np.testing.assert_array_equal(fed, samples[: len(fed)].numpy())  # the first inputs given, in order
    assert result["method"]["samples"] == "distinct"


def test_too_few_samples_are_cycled_and_the_report_says_so(recorded):
    samples = _samples(6)
    result = _measure(recorded, samples)
    batch16 = [fed for _, fed in recorded.timed_runs() if len(fed) == 16]
    assert batch16
    for fed in batch16:
        np.testing.assert_array_equal(fed, samples[np.arange(16) % 6].numpy())
    assert result["method"]["samples"] == "6 distinct, cycled to fill batch 16"


def test_threads_come_from_the_cpu_affinity_and_the_method_is_recorded(recorded):
    assert all_threads() == 3  # sched_getaffinity: CPUs {0, 2, 5}
    result = _measure(recorded, _samples(20))
    assert recorded.threads == {"int8": [1, 3], "fp32": [1, 3]}
    assert result["all_threads"] == 3
    assert result["method"] == {
        "rounds": ROUNDS, "statistic": latency.STATISTIC, "order": latency.ORDER, "threads": {"1": 1, "all": 3},
        "batch_sizes": list(BATCHES), "samples": "distinct", "warmup_runs": WARMUP_RUNS, "budget_s_per_number": 0.01,
        "settle_s": latency.SETTLE_SECONDS, "exact_int8_option": latency.u8s8_sums_saturate(),
    }
    for label in ("1", "all"):
        assert set(result[label]) == {"int8", "fp32", "torch_fp32"}
        assert all(set(row) == {"batch4", "batch16"} for row in result[label].values())


def test_without_sched_getaffinity_all_cpus_count(monkeypatch):
    monkeypatch.delattr(latency.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(latency.os, "cpu_count", lambda: 7)
    assert all_threads() == 7


def test_bad_latency_settings_are_one_line_errors(recorded):
    with pytest.raises(ExportError, match=r"latency rounds: 0 is not allowed; allowed: an integer >= 1"):
        measure_latency({"int8": "int8"}, None, _samples(2), rounds=0)
    with pytest.raises(ExportError, match=r"latency: no samples or no batch sizes to time"):
        measure_latency({"int8": "int8"}, None, _samples(0))


# ---- session.x64quantprecision only where the CPU's u8s8 kernels saturate ----------------------------------------

def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), the independent reference for the probe."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_the_saturation_probe_agrees_with_the_cpu_flags():
    """x86 without VNNI (vpmaddubsw sums pairs in 16 bits) saturates; with AVX512-VNNI or AVX-VNNI it does not."""
    flags = _cpu_flags()
    if flags is None or "avx2" not in flags:
        pytest.skip("needs an x86 CPU with AVX2 and /proc/cpuinfo")
    has_vnni = bool(flags & {"avx512_vnni", "avx_vnni"})
    assert latency.u8s8_sums_saturate() is (not has_vnni)


@pytest.mark.parametrize("saturates", [True, False])
def test_make_session_sets_the_exact_option_only_where_the_kernels_saturate(monkeypatch, tmp_path, saturates):
    monkeypatch.setattr(latency, "u8s8_sums_saturate", lambda: saturates)
    path = tmp_path / "fp32.onnx"
    torch.onnx.export(nn.Linear(4, 2), (torch.rand(1, 4),), str(path), dynamo=False)

    def option(session) -> str:  # ONNX Runtime raises RuntimeError for a key that was never set
        try:
            return session.get_session_options().get_session_config_entry(latency.EXACT_INT8_OPTION)
        except RuntimeError:
            return ""

    assert option(latency.make_session(path)) == ("1" if saturates else "")
    assert option(latency.make_session(path, exact_int8=False)) == ""


def test_kept_rounds_are_the_numbers_whose_best_is_reported(recorded):
    result = measure_latency({"int8": "int8", "fp32": "fp32"}, None, _samples(16), batches=BATCHES, budget_s=0.01,
                             rounds=ROUNDS, clock=recorded.clock, keep_rounds=True)
    for label in ("1", "all"):
        for name in ("int8", "fp32"):
            for batch in BATCHES:
                rounds = result["rounds_us"][label][name][f"batch{batch}"]
                assert len(rounds) == ROUNDS
                assert result[label][name][f"batch{batch}"] == min(rounds)
    assert "rounds_us" not in _measure(recorded, _samples(16))  # only when asked: report.json stays as it was


def _paired_t_reference(candidate, baseline):
    """scipy's own paired t-test on the log times, one-sided both ways: the independent reference."""
    from scipy import stats

    logs_candidate, logs_baseline = np.log(candidate), np.log(baseline)
    slower = stats.ttest_rel(logs_baseline, logs_candidate, alternative="less").pvalue
    faster = stats.ttest_rel(logs_baseline, logs_candidate, alternative="greater").pvalue
    return slower, faster


@pytest.mark.parametrize("seed", range(6))
def test_compare_speed_matches_scipys_paired_t_test(seed):
    generator = np.random.default_rng(seed)
    baseline = 100.0 * np.exp(generator.normal(0.0, 0.03, 7))
    candidate = baseline * np.exp(generator.normal(0.02 * (seed - 3), 0.02, 7))  # from 6% faster to 4% slower
    result = latency.compare_speed(candidate.tolist(), baseline.tolist())
    slower, faster = _paired_t_reference(candidate, baseline)
    assert result["p_slower"] == pytest.approx(slower, rel=1e-9)
    assert result["p_faster"] == pytest.approx(faster, rel=1e-9)
    assert result["ratio"] == pytest.approx(float(np.exp(np.mean(np.log(baseline / candidate)))), rel=1e-12)
    expected = "slower" if slower < 0.05 else "faster" if faster < 0.05 else "no significant difference"
    assert result["verdict"] == expected


def test_compare_speed_calls_a_steady_slowdown_slower_and_round_noise_no_difference():
    baseline = [100.0, 103.0, 98.0, 101.0, 99.0, 102.0]
    assert latency.compare_speed([value * 1.04 for value in baseline], baseline)["verdict"] == "slower"
    assert latency.compare_speed([value / 1.04 for value in baseline], baseline)["verdict"] == "faster"
    # the same file timed twice: a few percent either way from round to round, no consistent sign
    again = [v * f for v, f in zip(baseline, (1.03, 0.97, 1.02, 0.98, 1.01, 0.99), strict=True)]
    assert latency.compare_speed(again, baseline)["verdict"] == "no significant difference"
    assert latency.compare_speed([101.0] * 3, [100.0] * 3)["verdict"] == "slower"  # no spread: the sign decides


@pytest.mark.parametrize("candidate, baseline", [([1.0, 2.0], [1.0, 2.0]), ([1.0, 2.0, 3.0], [1.0, 2.0])])
def test_compare_speed_refuses_too_few_or_unpaired_rounds(candidate, baseline):
    with pytest.raises(ExportError, match="at least 3"):
        latency.compare_speed(candidate, baseline)


def test_compare_speed_divides_alpha_over_the_comparisons_of_one_claim():
    baseline = [100.0, 103.0, 98.0, 101.0, 99.0, 102.0, 100.0]
    candidate = [v * f for v, f in zip(baseline, (1.04, 1.0, 1.03, 1.05, 0.99, 1.04, 1.02), strict=True)]
    alone = latency.compare_speed(candidate, baseline)
    assert 0.05 / 16 < alone["p_slower"] < 0.05 and alone["verdict"] == "slower"
    family = latency.compare_speed(candidate, baseline, comparisons=16)
    assert family["verdict"] == "no significant difference" and family["alpha"] == pytest.approx(0.05 / 16)
    with pytest.raises(ExportError, match="comparisons"):
        latency.compare_speed(candidate, baseline, comparisons=0)
