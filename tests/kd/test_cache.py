"""The teacher-logit cache is used only where it cannot change what the student sees, and the report says which."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill.data import make_loader
from qdistill.kd.cache import CachedTeacherLoader, is_cacheable

RECIPE = {"train": {"epochs": 1}, "quant": {"weight_bits": 8, "act_bits": 8}}


class _Flipping(TensorDataset):
    """A per-sample transform (random horizontal flip): the teacher must see each step's flipped input."""

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


def test_plain_in_memory_loader_is_cached_with_the_same_batches(digits, digits_teacher):
    bundle, train, _ = digits
    cached = CachedTeacherLoader.wrap(train, digits_teacher)
    assert cached is not None
    train.sampler.set_epoch(1)
    for (x, y), (cached_x, cached_y, logits) in zip(train, cached, strict=True):
        assert torch.equal(x, cached_x) and torch.equal(y, cached_y)
        with torch.no_grad():
            assert torch.allclose(logits, digits_teacher(x), atol=1e-5)


def test_transforms_custom_collate_and_other_samplers_are_not_cached(digits):
    bundle, _, _ = digits
    x, y = bundle.train_x[:64], bundle.train_y[:64]
    plain = make_loader(x, y, 16, seed=0, shuffle=True)
    assert is_cacheable(plain)
    flipping = DataLoader(_Flipping(x, y), batch_size=16, sampler=plain.sampler)
    custom_collate = DataLoader(TensorDataset(x, y), batch_size=16, sampler=plain.sampler,
                                collate_fn=lambda batch: torch.utils.data.default_collate(batch))
    shuffled = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    dropping = DataLoader(TensorDataset(x, y), batch_size=16, sampler=plain.sampler, drop_last=True)
    assert not any(is_cacheable(loader) for loader in (flipping, custom_collate, shuffled, dropping))


def test_report_says_whether_teacher_logits_were_cached(digits, digits_teacher):
    bundle, train, val = digits
    cached = qd.distill(digits_teacher, train, val, RECIPE, show_progress=False)
    assert cached.report["teacher_logits"] == "cached"
    augmented = DataLoader(_Flipping(bundle.train_x, bundle.train_y), batch_size=32, sampler=train.sampler)
    live = qd.distill(digits_teacher, augmented, val, RECIPE, show_progress=False)
    assert live.report["teacher_logits"] == "live"
    no_kd = qd.distill(digits_teacher, train, val, {**RECIPE, "distill": {"alpha": 0.0}}, show_progress=False)
    assert no_kd.report["teacher_logits"] == "unused"
