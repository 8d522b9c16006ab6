"""Embedding KD loss and embedding metrics against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdistill.evaluate import embedding_metrics
from qdistill.kd.distiller import Distiller
from qdistill.kd.losses import EmbeddingKDLoss
from qdistill.models.outputs import output_kind


def _numpy_neighbours(x: np.ndarray, k: int) -> list[list[int]]:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit @ unit.T
    rows = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        rows.append(sorted(others, key=lambda j: -similarity[i, j])[:k])
    return rows


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(30, 8))
    student = teacher + rng.normal(scale=0.7, size=teacher.shape)
    got = embedding_metrics(torch.from_numpy(student).float(), torch.from_numpy(teacher).float())
    cosine = (student * teacher).sum(1) / np.linalg.norm(student, axis=1) / np.linalg.norm(teacher, axis=1)
    assert got["mean_cosine"] == pytest.approx(cosine.mean(), abs=1e-5)
    assert got["min_cosine"] == pytest.approx(cosine.min(), abs=1e-5)
    ours, theirs = _numpy_neighbours(student, 10), _numpy_neighbours(teacher, 10)
    assert got["agreement_at_1"] == pytest.approx(np.mean([a[0] == b[0] for a, b in zip(ours, theirs, strict=True)]), abs=1e-6)
    assert got["agreement_at_10"] == pytest.approx(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ours, theirs, strict=True)]),
                                                   abs=1e-6)
    assert 0 < got["agreement_at_1"] < 1  # the noise is large enough to move some neighbours


def test_relation_term_matches_numpy():
    rng = np.random.default_rng(1)
    teacher, student = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))

    def similarities(x: np.ndarray) -> np.ndarray:
        return np.array([[np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for b in x] for a in x])

    cosine = np.mean([np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(student, teacher, strict=True)])
    expected = 0.5 * (1 - cosine) + 3.0 * np.mean((similarities(student) - similarities(teacher)) ** 2)
    loss = EmbeddingKDLoss(cosine_weight=0.5, mse_weight=0.0, relation_weight=3.0)
    got = loss(torch.from_numpy(student).float(), torch.from_numpy(teacher).float()).total
    assert float(got) == pytest.approx(expected, rel=1e-5)
    rotated = torch.from_numpy(teacher).float() @ torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0].float()
    relation_only = EmbeddingKDLoss(cosine_weight=0.0, mse_weight=1e-9, relation_weight=1.0)
    # a rotation keeps every similarity: the relation term is blind to it, the cosine term is not
    assert float(relation_only(rotated, torch.from_numpy(teacher).float()).total) < 1e-6


def test_embedding_kd_trains_a_student_towards_the_teacher():
    teacher = torch.nn.Linear(6, 4)
    student = torch.nn.Linear(6, 4)
    distiller = Distiller(teacher, student, EmbeddingKDLoss(cosine_weight=1.0, mse_weight=0.5))
    x = torch.randn(64, 6)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    first = distiller(x).total.item()
    for _ in range(200):
        optimizer.zero_grad()
        distiller(x).total.backward()
        optimizer.step()
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(student(x), teacher(x)).mean()
    assert distiller(x).total.item() < 0.01 * first and float(cosine) > 0.999


def test_output_kind_comes_from_the_declaration_or_the_model():
    model = torch.nn.Linear(2, 2)
    model.output_kind = "embedding"
    assert output_kind(model) == "embedding" and output_kind(model, "logits") == "logits"
