"""data/text.py: text files to tokenized dict batches, checked against the tokenizers library directly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qdistill.data.loaders import make_loaders
from qdistill.data.sources import load_data
from qdistill.data.text import read_texts
from qdistill.errors import DataError
from qdistill.recipe import DataSpec, UnlabeledSpec

tokenizers = pytest.importorskip("tokenizers")
TEXTS = [f"sentence number {index} is about {'cats' if index % 2 else 'dogs'}" for index in range(20)]


def _reference_ids(minilm: str, text: str, length: int) -> list[int]:
    """Token ids from the tokenizers library's own file reader, padded with 0 (BERT's [PAD])."""
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(minilm, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(length)
    ids = tokenizer.encode(text).ids
    return ids + [0] * (length - len(ids))


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"body": text, "y": "cat" if "cats" in text else "dog"}) + "\n" for text in TEXTS))
    return str(path)


def test_jsonl_with_labels_splits_and_tokenizes(minilm, jsonl):
    spec = DataSpec(text=jsonl, text_field="body", label_field="y", tokenizer=minilm, max_length=12,
                    val_fraction=0.25, test_fraction=0.2)
    bundle = load_data(spec)
    assert bundle.split_sizes() == {"train_samples": 12, "val_samples": 4, "test_samples": 4}
    assert bundle.class_names == ["cat", "dog"] and bundle.num_classes == 2
    train, _, _ = make_loaders(bundle, 5, 0)
    inputs, labels = next(iter(train))
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert inputs["input_ids"].dtype == torch.long and inputs["input_ids"].shape == (5, 12)
    for row, label in zip(inputs["input_ids"].tolist(), labels.tolist(), strict=True):
        text = next(text for text in TEXTS if _reference_ids(minilm, text, 12) == row)
        assert label == (0 if "cats" in text else 1)
    assert torch.equal(inputs["attention_mask"], (inputs["input_ids"] != 0).long())


def test_txt_is_unlabeled_and_every_line_is_a_sample(minilm, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(TEXTS[:10]) + "\n\n")
    bundle = load_data(DataSpec(text=str(path), tokenizer=minilm, max_length=16))
    rows = [*bundle.train_x["input_ids"].tolist(), *bundle.val_x["input_ids"].tolist(), *bundle.test_x["input_ids"].tolist()]
    assert sorted(rows) == sorted(_reference_ids(minilm, text, 16) for text in TEXTS[:10])
    assert bundle.train_y is None and not bundle.has_labels


def test_csv_and_unlabeled_text(minilm, tmp_path):
    path, extra = tmp_path / "a.csv", tmp_path / "more.txt"
    path.write_text("text,label\n" + "".join(f'"{text}",{index % 3}\n' for index, text in enumerate(TEXTS)))
    extra.write_text("one more text\nand another\n")
    bundle = load_data(DataSpec(text=str(path), label_field="label", tokenizer=minilm, max_length=8,
                                unlabeled=UnlabeledSpec(text=str(extra))))
    assert bundle.num_classes == 3 and bundle.class_names is None
    assert bundle.unlabeled_samples == 2
    assert bundle.unlabeled_x["input_ids"][0].tolist() == _reference_ids(minilm, "one more text", 8)


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), [
    ("a.parquet", "", {}, "is not a text file; allowed suffixes: .txt, .jsonl, .csv"),
    ("a.jsonl", '{"text": "x"}\nnot json\n', {}, "line 2 is not JSON"),
    ("a.jsonl", '{"body": "x"}\n', {}, "line 1 has no field 'text' \\(text_field\\); its fields: body"),
    ("a.jsonl", '{"text": "x"}\n', {"label_field": "y"}, "line 1 has no field 'y' \\(label_field\\)"),
    ("a.txt", "x\n", {"label_field": "y"}, "label_field needs a .jsonl or .csv file"),
    ("a.txt", "\n\n", {}, "holds no texts"),
])
def test_bad_files_name_the_file_and_field(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_texts(str(path), **kwargs)


def test_missing_tokenizer_folder(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a\nb\nc\nd\n")
    with pytest.raises(DataError, match="data.tokenizer: folder 'no/such' does not exist"):
        load_data(DataSpec(text=str(path), tokenizer="no/such"))
