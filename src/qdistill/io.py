"""Atomic file writing and safe weight loading.

A file appears under its final name only when it is complete (written to a temporary name in the
same folder, flushed, fsynced, renamed), so a killed run never leaves a half-written output.
Weights are read only from safetensors or ``torch.load(weights_only=True)``: nothing qdistill
loads can run code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qdistill.errors import FileFormatError, ModelError, QdistillError

_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".qdistill-probe-", delete=True)
        probe.close()
    except OSError as error:
        raise QdistillError(f"output directory {str(path)!r} cannot be written ({error.strerror}); choose a writable folder") from None
    return path


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        os.chmod(temporary_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
        _fsync_dir(path.parent)
    finally:
        temporary_path.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write JSON (indented, keys in insertion order) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors to safetensors atomically (shared storage is copied apart)."""
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state_dict.items()}
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; missing, truncated or corrupt files are ``FileFormatError``s."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FileFormatError(f"weights file {str(path)!r} is truncated or not a safetensors file ({reason})") from None


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` whose key and shape mismatches are one-line ``ModelError``s naming ``source``.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> load_state(layer, {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}, "example")
        >>> layer.weight.abs().sum().item()
        0.0
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{source}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}")
    model.load_state_dict(state)


def load_torch_weights(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (never runs code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileFormatError(f"file {str(path)!r} does not exist") from None
    except Exception as error:  # pickle/zip errors come in many types
        raise FileFormatError(f"file {str(path)!r} is corrupt or holds more than tensors ({type(error).__name__})") from None


def replace_dir(temporary: Path, final: Path) -> None:
    """Swap a completed folder in under ``final``; the previous one stays until the swap is done."""
    previous = final.with_name(final.name + ".old")
    if previous.exists():
        shutil.rmtree(previous)
    if final.exists():
        os.replace(final, previous)
    os.replace(temporary, final)
    _fsync_dir(final.parent)
    if previous.exists():
        shutil.rmtree(previous)
