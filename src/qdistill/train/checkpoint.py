"""Training checkpoints: everything needed to continue a run bit for bit.

``DIR/checkpoint/`` holds ``model.safetensors`` (student and adapter weights, quantizer state),
``state.pt`` (optimizer, scheduler and RNG states, loaded with ``weights_only=True``) and
``meta.json`` (epoch, step, history, recipe fingerprint). The folder is written under a temporary
name and swapped in whole, so the newest complete checkpoint is always readable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdistill.errors import CheckpointError
from qdistill.io import atomic_write_json, load_torch_weights, load_weights, replace_dir, save_weights

FORMAT_VERSION = 1


@dataclass
class Progress:
    """Where training is: ``epoch`` (0-based) and the batches of it already done."""

    phase: str
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python RNG states as tensors and plain lists."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_rest": [int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    rest = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), int(rest[0]), int(rest[1]), float(rest[2])))
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], training_state: dict[str, Any],
                    progress: Progress, fingerprint: str) -> None:
    """Write a complete checkpoint folder at ``directory`` atomically."""
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    save_weights(temporary / "model.safetensors", model_state)
    training_state = dict(training_state, rng=rng_state())
    torch.save(training_state, temporary / "state.pt")
    with open(temporary / "state.pt", "rb+") as written:
        os.fsync(written.fileno())
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "phase": progress.phase,
            "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch, "global_step": progress.global_step,
            "finished": progress.finished, "history": progress.history}
    atomic_write_json(temporary / "meta.json", meta)  # written last: its presence marks the folder complete
    replace_dir(temporary, directory)


def find_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint folder (the current one, or the previous during a swap)."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / "meta.json").is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], Progress]:
    """Read a checkpoint written by ``save_checkpoint``; refuse one from a different recipe."""
    found = find_checkpoint(directory)
    if found is None:
        raise CheckpointError(f"--resume: no complete checkpoint in {str(directory)!r}; run without --resume to start")
    try:
        meta = json.loads((found / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"--resume: {str(found / 'meta.json')!r} is corrupt; delete the checkpoint folder to start over") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"--resume: checkpoint format {meta.get('format_version')!r} is not supported; allowed: {FORMAT_VERSION}")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"--resume: the checkpoint in {str(found)!r} was made by a different recipe; "
            "resume with the recipe (and overrides) it was started with, or use a new --out folder"
        )
    progress = Progress(meta["phase"], meta["epoch"], meta["step_in_epoch"], meta["global_step"], meta["history"], meta["finished"])
    return load_weights(found / "model.safetensors"), load_torch_weights(found / "state.pt"), progress
