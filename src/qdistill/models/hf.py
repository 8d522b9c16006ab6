"""Hugging Face encoders (BERT family, the ``nlp`` extra) from a local folder, as ordinary ``nn.Module``s.

A recipe names one with ``model: {hf: <folder>, task: embedding, pooling: mean}``; the Python API calls
``load_hf``. The folder is a ``save_pretrained`` folder (``config.json`` + weights); nothing is ever
downloaded (``local_files_only=True``). The result, ``HFEncoder``, is called as
``model(input_ids, attention_mask=None, token_type_ids=None)`` (or with a dict batch through
``qdistill.batch.call_model``) and returns one tensor:

- ``task: embedding``: the pooled sentence embedding ``(batch, hidden)``: ``pooling: mean`` averages the
  last hidden states over the attention mask (sentence-transformers' pooling), ``cls`` takes the first token's;
- ``task: sequence_classification``: class logits ``(batch, num_labels)`` from a linear head on that pooled vector.

``num_layers`` builds a shallower student: the encoder keeps ``num_layers`` of the folder's layers, evenly
spaced from the first to the last (``layer_indices``), with their weights, so the student starts from the teacher.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from qdistill.errors import ModelError

HF_TASKS = ("embedding", "sequence_classification")
POOLINGS = ("mean", "cls")
INSTALL = "pip install 'qdistill[nlp]'"


def import_transformers(field: str = "model.hf") -> ModuleType:
    """The ``transformers`` module; a one-line ``ModelError`` naming the extra when it is not installed.

    Example:
        >>> import pytest; _ = pytest.importorskip("transformers")   # needs the nlp extra
        >>> import_transformers().__name__
        'transformers'
    """
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ModelError(f"{field}: transformers is not installed; install the nlp extra: {INSTALL}") from None


def layer_indices(total: int, keep: int) -> list[int]:
    """Which of ``total`` layers a ``keep``-layer student takes: evenly spaced (rounded down), first and last included.

    Example:
        >>> layer_indices(6, 3), layer_indices(6, 2), layer_indices(6, 6), layer_indices(12, 1)
        ([0, 2, 5], [0, 5], [0, 1, 2, 3, 4, 5], [11])
        >>> layer_indices(12, 4)
        [0, 3, 7, 11]
    """
    if keep == 1:
        return [total - 1]
    return [i * (total - 1) // (keep - 1) for i in range(keep)]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The average of ``hidden`` ``(batch, tokens, width)`` over the tokens whose mask is 1.

    Example:
        >>> mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]])).tolist()
        [[2.0]]
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class HFEncoder(nn.Module):
    """A Hugging Face encoder plus pooling (and a class head): one tensor out.

    ``encoder`` is a ``transformers`` base model (e.g. ``BertModel``) returning ``last_hidden_state``.
    """

    def __init__(self, encoder: nn.Module, task: str, pooling: str, num_labels: int | None = None) -> None:
        super().__init__()
        if task not in HF_TASKS:
            raise ModelError(f"model.task: {task!r} is not supported; allowed: {', '.join(HF_TASKS)}")
        if pooling not in POOLINGS:
            raise ModelError(f"model.pooling: {pooling!r} is not supported; allowed: {', '.join(POOLINGS)}")
        self.encoder, self.task, self.pooling = encoder, task, pooling
        self.head = None
        if task == "sequence_classification":
            if not num_labels or num_labels < 2:
                raise ModelError(f"model.task sequence_classification needs at least 2 classes (got {num_labels}); "
                                 "give labelled data (data.label_field) or task: embedding")
            self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def output_kind(self) -> str:
        """``"embedding"`` or ``"logits"`` (``qdistill.models.outputs.OUTPUT_KINDS``)."""
        return "embedding" if self.task == "embedding" else "logits"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        pooled = mean_pool(hidden, attention_mask) if self.pooling == "mean" else hidden[:, 0]
        return pooled if self.head is None else self.head(pooled)


def load_hf(folder: str, task: str = "embedding", pooling: str = "mean", num_labels: int | None = None,
            num_layers: int | None = None, field: str = "model") -> HFEncoder:
    """The encoder saved in ``folder`` (local files only) as an ``HFEncoder``.

    It is built with eager attention (plain matmuls and softmax, which qdistill quantizes and exports)
    and without BERT's pooler when ``pooling`` is ``mean`` (the pooler is unused then).

    Example:
        >>> import pytest; _ = pytest.importorskip("transformers")   # needs the nlp extra
        >>> load_hf("no/such/folder")
        Traceback (most recent call last):
        ...
        qdistill.errors.ModelError: model.hf: folder 'no/such/folder' does not exist or has no config.json
    """
    transformers = import_transformers(f"{field}.hf")
    if not (Path(folder) / "config.json").is_file():
        raise ModelError(f"{field}.hf: folder {folder!r} does not exist or has no config.json")
    try:
        with _quiet(transformers):
            encoder = transformers.AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager",
                                                             **_pooler_kwargs(transformers, folder, pooling))
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{field}.hf: cannot load a model from {folder!r} ({reason})") from None
    if num_layers is not None:
        keep_layers(encoder, num_layers, field)
    return HFEncoder(encoder, task, pooling, num_labels).eval()


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """No load report or progress bar while loading (an unused pooler is "UNEXPECTED" there, which is expected)."""
    logging = transformers.utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _pooler_kwargs(transformers: ModuleType, folder: str, pooling: str) -> dict[str, Any]:
    """``add_pooling_layer=False`` for mean pooling, where the model class takes it (BERT's family does)."""
    if pooling != "mean":
        return {}
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = transformers.AutoModel._model_mapping.get(type(config), None)  # noqa: SLF001 (no public lookup)
    takes = model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if takes else {}


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a BERT-family encoder (``encoder.encoder.layer``)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"model.num_layers: {type(encoder).__name__} has no encoder.layer list; "
                         "num_layers applies to BERT-family encoders")
    return layers


def keep_layers(encoder: nn.Module, num_layers: int, field: str = "model") -> list[int]:
    """Keep ``num_layers`` evenly spaced layers of ``encoder`` (in place); returns their indices in the original."""
    layers = encoder_layers(encoder)
    if not 1 <= num_layers <= len(layers):
        raise ModelError(f"{field}.num_layers: {num_layers} is out of range; the model has {len(layers)} layers "
                         f"(allowed: 1..{len(layers)})")
    kept = layer_indices(len(layers), num_layers)
    encoder.encoder.layer = nn.ModuleList([layers[index] for index in kept])
    encoder.config.num_hidden_layers = num_layers
    for position, layer in enumerate(encoder.encoder.layer):  # transformers numbers layers for its caches
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = position
    return kept
