"""Mixing unlabeled transfer data into training: the per-sample loss rule, the mixed loader's batches (labelled ones
unchanged, the unlabeled stream a fresh shuffle per pass, resumable), and what ``distill`` reports."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qdistill.data import make_loader
from qdistill.kd import UNLABELED, KDLoss, MixedLoader
from qdistill.recipe import Recipe
from qdistill.runs.student import distill


def _kl_t2(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per row, in float64 numpy (the reference)."""
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p, log_q = log_softmax(teacher), log_softmax(student)
    return temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def _ce(student: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = student - student.max(axis=1, keepdims=True)
    return -(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))[np.arange(len(labels)), labels]


def test_mixed_batch_loss_follows_the_per_sample_rule():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    labels = torch.tensor([2, UNLABELED, 0, UNLABELED, UNLABELED])
    parts = KDLoss(temperature=3.0, alpha=0.7)(student, teacher, labels)
    kd = _kl_t2(student.double().numpy(), teacher.double().numpy(), 3.0)
    labelled = labels.numpy() != UNLABELED
    ce = _ce(student.double().numpy()[labelled], labels.numpy()[labelled])
    expected = (0.7 * kd[labelled].sum() + 0.3 * ce.sum() + kd[~labelled].sum()) / 5
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)
    assert parts.kd.item() == pytest.approx(kd.mean(), rel=1e-5)
    assert parts.task.item() == pytest.approx(ce.mean(), rel=1e-5)


def test_fully_labelled_and_fully_unlabeled_batches_keep_their_formulas():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    kd = _kl_t2(student.double().numpy(), teacher.double().numpy(), 4.0)
    ce = _ce(student.double().numpy(), labels.numpy())
    assert KDLoss(4.0, 0.9)(student, teacher, labels).total.item() == pytest.approx(0.9 * kd.mean() + 0.1 * ce.mean(), rel=1e-5)
    unlabeled = torch.full((6,), UNLABELED)
    assert KDLoss(4.0, 0.9)(student, teacher, unlabeled).total.item() == pytest.approx(kd.mean(), rel=1e-5)


def _loaders(labelled: int = 10, unlabeled: int = 7, batch: int = 4):
    x = torch.arange(labelled, dtype=torch.float32)[:, None]
    y = torch.arange(labelled) % 3
    u = 100 + torch.arange(unlabeled, dtype=torch.float32)[:, None]
    return make_loader(x, y, batch, seed=0, shuffle=True), make_loader(u, None, batch, seed=1, shuffle=True)


def _epoch(loader, epoch: int) -> list[tuple[list[float], list[int]]]:
    loader.sampler.set_epoch(epoch)
    return [(x[:, 0].tolist(), y.tolist()) for x, y in loader]


def test_labelled_batches_are_those_of_the_plain_loader_and_unlabeled_passes_cover_every_sample():
    labelled, unlabeled = _loaders()
    mixed = MixedLoader(*_loaders())
    stream = []
    for epoch in range(4):
        plain = _epoch(labelled, epoch)
        batches = _epoch(mixed, epoch)
        assert len(batches) == len(plain) == 3
        for (x, y), (plain_x, plain_y) in zip(batches, plain, strict=True):
            count = len(plain_x)
            assert x[:count] == plain_x and y[:count] == plain_y  # the labelled part is unchanged
            assert all(label == UNLABELED for label in y[count:]) and all(value >= 100 for value in x[count:])
            stream.append(x[count:])
    # 12 steps drew 12 unlabeled batches: passes of 2 batches (4 + 3 samples), each pass every sample once
    assert len(stream) == 12
    for start in range(0, 12, 2):
        assert sorted(stream[start] + stream[start + 1]) == [100.0 + i for i in range(7)]
    assert stream[0:2] != stream[2:4]  # each pass its own shuffle


def test_a_resumed_epoch_sees_the_same_unlabeled_batches():
    straight = MixedLoader(*_loaders())
    batches = [_epoch(straight, epoch) for epoch in range(3)]
    resumed = MixedLoader(*_loaders())
    assert _epoch(resumed, 2) == batches[2]  # a fresh loader (a resumed run) starts at epoch 2's stream position


def _problem(samples: int = 256, seed: int = 0):
    """Two Gaussian blobs in the positive quadrant, around (1, 3) and (3, 1): a linear teacher separates them."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (samples,), generator=generator)
    centres = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    x = (centres[y] + 0.5 * torch.randn(samples, 2, generator=generator)).clamp_min(0.0)
    return x, y


def _linear(weight: list[list[float]]) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weight))
        model[0].bias.zero_()
    return model


def _teacher() -> nn.Module:
    return _linear([[-1.0, 1.0], [1.0, -1.0]])


def test_distill_counts_labelled_and_unlabeled_samples_and_caches_both():
    x, y = _problem()
    train = make_loader(x[:8], y[:8], 8, seed=0, shuffle=True)
    unlabeled = make_loader(x[8:200], None, 8, seed=1, shuffle=True)
    val = make_loader(x[200:], y[200:], 64, seed=0, shuffle=False)
    recipe = Recipe(quant={"weight_bits": 8, "act_bits": 8}, train={"epochs": 2})
    report = distill(_teacher(), train, val, recipe, unlabeled=unlabeled, show_progress=False).report
    assert report["data"] == {"train_samples": 8, "val_samples": 56, "labelled_samples": 8, "unlabeled_samples": 192}
    assert report["teacher_logits"] == "cached"
    plain = distill(_teacher(), train, val, recipe.with_overrides(["distill.alpha=0"]), unlabeled=unlabeled,
                    show_progress=False).report
    assert plain["data"]["unlabeled_samples"] == 0 and plain["teacher_logits"] == "unused"


def test_unlabeled_data_transfers_the_teacher_where_labels_are_scarce():
    """The teacher's boundary is the diagonal x0 = x1; the student starts with the vertical one, x0 = 2. Four
    labelled points are right either way (and x0 = 2 separates them best), so labels alone leave the student
    where it is; 200 unlabeled points with the teacher's soft labels turn its boundary to the teacher's."""
    generator = torch.Generator().manual_seed(0)
    points = 4 * torch.rand(400, 2, generator=generator)  # uniform in [0, 4]^2: a quarter lies between the boundaries
    teacher_labels = (points[:, 0] > points[:, 1]).long()
    labelled = torch.tensor([[0.5, 1.0], [0.5, 3.0], [3.5, 1.0], [3.5, 3.0]])  # their widest-margin boundary is x0 = 2
    train = make_loader(labelled, (labelled[:, 0] > labelled[:, 1]).long(), 2, seed=0, shuffle=True)
    unlabeled = make_loader(points[:200], None, 50, seed=1, shuffle=True)
    val = make_loader(points[200:], teacher_labels[200:], 100, seed=0, shuffle=False)
    recipe = Recipe(quant={"weight_bits": 8, "act_bits": 8, "first_last_bits": None, "learn_scale": False},
                    train={"epochs": 100, "lr": 0.05}, distill={"alpha": 0.5, "temperature": 1.0})
    student = _linear([[-1.0, 0.0], [1.0, 0.0]])
    with torch.no_grad():
        student[0].bias.copy_(torch.tensor([2.0, -2.0]))  # class 1 where x0 > 2
    agreement = {}
    for name, extra in (("with unlabeled", unlabeled), ("labels only", None)):
        result = distill(_teacher(), train, val, recipe, student=student, unlabeled=extra, show_progress=False)
        agreement[name] = result.report["student"]["agreement_with_teacher"]
    assert agreement["with unlabeled"] >= 0.95 > agreement["labels only"], agreement


def test_unlabeled_data_left_out_without_kd_warns_when_the_recipe_asked_for_it(tmp_path):
    x, y = _problem()
    train = make_loader(x[:8], y[:8], 8, seed=0, shuffle=True)
    unlabeled = make_loader(x[8:40], None, 8, seed=1, shuffle=True)
    val = make_loader(x[200:], y[200:], 64, seed=0, shuffle=False)
    np.savez(tmp_path / "u.npz", x=x[8:40].numpy())
    recipe = Recipe(quant={"weight_bits": 8, "act_bits": 8}, train={"epochs": 1}, distill={"alpha": 0.0},
                    data={"npz": str(tmp_path / "u.npz"), "unlabeled": {"npz": str(tmp_path / "u.npz")}})
    with pytest.warns(UserWarning, match="data.unlabeled is not used: distill.alpha is 0"):
        distill(_teacher(), train, val, recipe, unlabeled=unlabeled, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # label_fraction's remainder is left out quietly
        distill(_teacher(), train, val, recipe.with_overrides(["data.unlabeled=null", "data.label_fraction=0.5"]),
                unlabeled=unlabeled, show_progress=False)
