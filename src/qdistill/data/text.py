"""Text data (``data: {text: <file>, tokenizer: <folder>}``, the ``nlp`` extra): tokenized dict batches.

A file holds one text per sample: ``.txt`` (one per line; no labels), ``.jsonl`` (one JSON object per
line) or ``.csv`` (a header row); ``text_field`` and ``label_field`` name the fields in the last two.
Labels may be integers (class ids) or strings (classes are the sorted distinct names). Empty lines of
a ``.txt`` file are skipped. The texts are tokenized once by a local Hugging Face tokenizer
(``local_files_only``), padded and truncated to ``max_length`` tokens, into int64 tensors
``input_ids``, ``attention_mask`` and ``token_type_ids`` (a dict: ``qdistill.batch``'s mapping form,
which ``models.hf.HFEncoder`` takes). Splits follow ``data/splits.py`` (``test_fraction``, then
``val_fraction``, by ``seed``); ``data.unlabeled.text`` adds unlabeled texts tokenized the same way.
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdistill.batch import take_rows
from qdistill.data.bundle import DataBundle
from qdistill.data.splits import DEFAULT_TEST_FRACTION, split_indices
from qdistill.errors import DataError
from qdistill.recipe import DataSpec

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
INSTALL = "pip install 'qdistill[nlp]'"
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def read_texts(path: str, text_field: str = "text", label_field: str | None = None,
               source: str = "data.text") -> tuple[list[str], list[Any] | None]:
    """``(texts, labels)`` from a ``.txt``, ``.jsonl`` or ``.csv`` file (labels None without ``label_field``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = Path(folder, "a.jsonl").write_text('{"text": "hi", "y": 1}\\n{"text": "yo", "y": 0}\\n')
        ...     read_texts(f"{folder}/a.jsonl", label_field="y")
        (['hi', 'yo'], [1, 0])
    """
    file = Path(path)
    if file.suffix.lower() not in TEXT_SUFFIXES:
        raise DataError(f"{source}: {path!r} is not a text file; allowed suffixes: {', '.join(TEXT_SUFFIXES)}")
    if not file.is_file():
        raise DataError(f"{source}: file {path!r} does not exist")
    try:
        content = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{source}: cannot read {path!r} as UTF-8 text ({error})") from None
    if file.suffix.lower() == ".txt":
        if label_field is not None:
            raise DataError(f"{source}: {path!r} is a .txt file (one text per line, no labels); label_field "
                            "needs a .jsonl or .csv file")
        texts = [line.strip() for line in content.splitlines() if line.strip()]
        return _nonempty(texts, path, source), None
    records = _jsonl_records(content, path, source) if file.suffix.lower() == ".jsonl" else _csv_records(content)
    texts = [_field(record, text_field, number, path, source, "text_field") for number, record in records]
    if not all(isinstance(text, str) for text in texts):
        raise DataError(f"{source}: {path!r} field {text_field!r} must hold strings (text_field)")
    labels = None
    if label_field is not None:
        labels = [_field(record, label_field, number, path, source, "label_field") for number, record in records]
    return _nonempty(texts, path, source), labels


def _nonempty(texts: list[str], path: str, source: str) -> list[str]:
    if not texts:
        raise DataError(f"{source}: {path!r} holds no texts")
    return texts


def _jsonl_records(content: str, path: str, source: str) -> list[tuple[int, dict]]:
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}: {path!r} line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{source}: {path!r} line {number} is not a JSON object")
        records.append((number, record))
    return records


def _csv_records(content: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(content.splitlines())
    return [(number, row) for number, row in enumerate(reader, start=2)]


def _field(record: dict, field: str, number: int, path: str, source: str, key: str) -> Any:
    if field not in record or record[field] is None:
        fields = ", ".join(str(name) for name in record)
        raise DataError(f"{source}: {path!r} line {number} has no field {field!r} ({key}); its fields: {fields}")
    return record[field]


def encode_labels(labels: list[Any], source: str = "data.label_field") -> tuple[torch.Tensor, list[str] | None]:
    """Class ids and class names: integer labels are ids (names None); strings map to their sorted distinct names.

    Example:
        >>> ids, names = encode_labels(["pos", "neg", "pos"])
        >>> ids.tolist(), names
        ([1, 0, 1], ['neg', 'pos'])
        >>> encode_labels([2, 0])[0].tolist()
        [2, 0]
    """
    if all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        if min(labels) < 0:
            raise DataError(f"{source}: labels must be class ids >= 0 or class names; found {min(labels)}")
        return torch.tensor(labels, dtype=torch.long), None
    if all(isinstance(label, str) for label in labels):
        if all(label.strip().isdigit() for label in labels):  # a CSV's integer column
            return torch.tensor([int(label) for label in labels], dtype=torch.long), None
        names = sorted(set(labels))
        index = {name: position for position, name in enumerate(names)}
        return torch.tensor([index[label] for label in labels], dtype=torch.long), names
    kinds = sorted({type(label).__name__ for label in labels})
    raise DataError(f"{source}: labels must be all integers (class ids) or all strings (class names); found {', '.join(kinds)}")


def load_tokenizer(folder: str, source: str = "data.tokenizer") -> Any:
    """A local Hugging Face tokenizer (``local_files_only``); one-line errors for a missing extra or folder."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise DataError(f"{source}: transformers is not installed; install the nlp extra: {INSTALL}") from None
    if not Path(folder).is_dir():
        raise DataError(f"{source}: folder {folder!r} does not exist")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{source}: cannot load a tokenizer from {folder!r} ({reason})") from None


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``(len(texts), max_length)``, padded and truncated."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    tokens = {key: encoded[key].to(torch.long) for key in TOKEN_KEYS if key in encoded}
    if "token_type_ids" not in tokens:  # tokenizers of models without segments: all zeros, as BERT reads them
        tokens["token_type_ids"] = torch.zeros_like(tokens["input_ids"])
    return tokens


def load_text(spec: DataSpec) -> DataBundle:
    """Read, tokenize and split ``spec.text`` (and ``spec.unlabeled.text``) into a ``DataBundle`` of dict inputs."""
    texts, labels = read_texts(spec.text, spec.text_field, spec.label_field)
    if spec.limit is not None:
        texts, labels = texts[: spec.limit], None if labels is None else labels[: spec.limit]
    tokenizer = load_tokenizer(spec.tokenizer)
    tokens = tokenize(tokenizer, texts, spec.max_length)
    y, class_names = (None, None) if labels is None else encode_labels(labels)
    test_fraction = spec.test_fraction if spec.test_fraction is not None else DEFAULT_TEST_FRACTION
    if len(texts) < 3:
        raise DataError(f"data.text: {spec.text!r} holds {len(texts)} texts; train, validation and test splits need at least 3")
    train, val, test = split_indices(len(texts), spec.val_fraction, test_fraction, spec.seed)

    def part(index: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows = torch.from_numpy(np.sort(index))
        return take_rows(tokens, rows), None if y is None else y[rows]

    num_classes = 0 if y is None else max(int(y.max()) + 1, len(class_names or []))
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = part(train), part(val), part(test)
    unlabeled = None
    if spec.unlabeled is not None and spec.unlabeled.text is not None:
        extra, _ = read_texts(spec.unlabeled.text, spec.text_field, None, "data.unlabeled.text")
        unlabeled = tokenize(tokenizer, extra[: spec.unlabeled.limit] if spec.unlabeled.limit else extra, spec.max_length)
    return DataBundle(train_x, train_y, val_x, val_y, num_classes, test_x, test_y, class_names, unlabeled)
