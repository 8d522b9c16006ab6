"""keep_freed_memory: glibc keeps freed blocks in the heap, so a step's tensors stop page-faulting.

Each case runs in its own process (the setting is process-wide). The independent measure is the
kernel's count of minor page faults (``getrusage``) over a loop that frees 24 MiB and allocates it
again, as a training step does. glibc's own thresholds move with what the process freed before
(after importing torch one process trimmed and faulted on every step, another never), so each
process first sets the behaviour that hands memory back at once (trim threshold 128 KiB, which also
fixes the mmap threshold at 128 KiB): what keep_freed_memory must undo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
LOOP = """
import ctypes, resource, sys, torch
from qdistill.train.allocator import M_TRIM_THRESHOLD, keep_freed_memory
assert ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, 128 << 10) == 1  # hand freed memory back at once
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    blocks = [torch.ones(2 << 20) for _ in range(3)]  # 3 x 8 MiB, touched
    del blocks
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **environment: str) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "LD_PRELOAD"}
    env.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", **environment)
    done = subprocess.run([sys.executable, "-c", LOOP, mode], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_stay_in_the_heap_and_stop_page_faulting():
    default_kept, default_faults = _faults("default")
    kept, faults = _faults("keep")
    pages = 20 * 3 * (8 << 20) // 4096  # every page of every block, touched afresh each step
    assert default_kept == "None" and default_faults >= pages // 2  # memory handed back: every step faults again
    assert kept == "True" and faults < pages // 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_an_allocator_the_environment_chose_is_left_alone():
    kept, faults = _faults("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False" and faults >= 20 * 3 * (8 << 20) // 4096 // 2
