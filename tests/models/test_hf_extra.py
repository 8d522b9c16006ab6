"""Without the nlp extra, a recipe naming a Hugging Face model or text data says which extra to install."""

from __future__ import annotations

import sys

import pytest

from qdistill.data.text import load_tokenizer
from qdistill.errors import DataError, ModelError
from qdistill.models.build import build_model
from qdistill.recipe import ModelSpec


@pytest.fixture
def no_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError


def test_hf_model_without_the_extra(no_transformers):
    with pytest.raises(ModelError, match=r"^student.hf: transformers is not installed; install the nlp extra: "
                                         r"pip install 'qdistill\[nlp\]'$"):
        build_model(ModelSpec(hf="any/folder"), {}, "student")


def test_text_data_without_the_extra(no_transformers, tmp_path):
    with pytest.raises(DataError, match=r"^data.tokenizer: transformers is not installed; install the nlp extra"):
        load_tokenizer(str(tmp_path))
