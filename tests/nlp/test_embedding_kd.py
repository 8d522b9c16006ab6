"""Label-free embedding KD on the real MiniLM: a 3-layer student gets closer to the 6-layer teacher on held-out text."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

from qdistill.data.loaders import make_loader
from qdistill.data.text import load_tokenizer, tokenize
from qdistill.evaluate import embed, embedding_metrics
from qdistill.kd.distiller import Distiller
from qdistill.kd.losses import EmbeddingKDLoss
from qdistill.models.hf import load_hf

pytest.importorskip("transformers")


def _sentences(count: int) -> list[str]:
    """Real English that ships with Python: the first sentences of the pydoc topics."""
    text = " ".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    sentences = [part.strip() for part in text.replace("\n", " ").split(". ") if 30 < len(part.strip()) < 200]
    return sentences[:count]


def test_label_free_kd_raises_cosine_to_teacher_on_held_out_text(minilm):
    tokenizer = load_tokenizer(minilm)
    texts = _sentences(96)
    train, held_out = tokenize(tokenizer, texts[:64], 32), tokenize(tokenizer, texts[64:], 32)
    teacher, student = load_hf(minilm), load_hf(minilm, num_layers=3)
    loader = make_loader(held_out, None, 32, seed=0, shuffle=False)
    reference = embed(teacher, loader)
    before = embedding_metrics(embed(student, loader), reference)
    distiller = Distiller(teacher, student.train(), EmbeddingKDLoss(cosine_weight=1.0))
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5)
    for _ in range(2):
        for (batch,) in make_loader(train, None, 16, seed=0, shuffle=True):
            optimizer.zero_grad()
            distiller(batch).total.backward()
            optimizer.step()
    after = embedding_metrics(embed(student, loader), reference)
    assert after["mean_cosine"] > before["mean_cosine"] + 0.02, (before, after)
