"""Consistent augmentation of image tensors (``data.augment``): deterministic per sample, and the teacher sees the student's batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import qdistill as qd
from qdistill.data import make_loader
from qdistill.data.images import ROTATE_DEGREES, SCALE_RANGE, SHIFT_PIXELS, augment_images, sample_uniforms
from qdistill.errors import DataError
from qdistill.kd.cache import CachedTeacherLoader, is_cacheable
from qdistill.recipe import Recipe
from qdistill.runs.stages import prepare_data

RECIPE = {"train": {"epochs": 1}, "quant": {"weight_bits": 8, "act_bits": 8}}


def _reference(image: np.ndarray, u: np.ndarray, mode: str) -> np.ndarray:
    """scipy's affine_transform with the documented parameters: edge pixels repeat, bilinear (order 1) or nearest."""
    size = image.shape[-1]
    dx, dy = math.floor(u[0] * (2 * SHIFT_PIXELS + 1)) - SHIFT_PIXELS, math.floor(u[1] * (2 * SHIFT_PIXELS + 1)) - SHIFT_PIXELS
    angle, scale = 0.0, 1.0
    if mode == "standard":
        angle = (2 * u[2] - 1) * math.radians(ROTATE_DEGREES)
        scale = SCALE_RANGE[0] + u[3] * (SCALE_RANGE[1] - SCALE_RANGE[0])
    # output pixel (row, col) reads the input at centre + R(-angle) (p - centre) / scale - (dy, dx)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    matrix = np.array([[cos, sin], [-sin, cos]])  # (row, col) order of [[cos, -sin], [sin, cos]] in (x, y)
    centre = np.array([(size - 1) / 2, (size - 1) / 2])
    offset = centre - matrix @ centre - np.array([dy, dx])
    return np.stack([ndimage.affine_transform(channel, matrix, offset=offset, order=0 if mode == "shift" else 1,
                                              mode="nearest") for channel in image])


@pytest.mark.parametrize("mode", ["shift", "standard"])
def test_augmentation_matches_an_independent_affine_resampling(mode):
    images = torch.rand(6, 2, 12, 12, dtype=torch.float64)
    uniforms = sample_uniforms(3, 1, range(6), 4)
    augmented = augment_images(images, uniforms, mode).numpy()
    for image, u, ours in zip(images.numpy(), uniforms, augmented, strict=True):
        np.testing.assert_allclose(ours, _reference(image, u, mode), atol=1e-9)


def test_shift_moves_whole_pixels_and_covers_every_offset():
    shifted = augment_images(torch.arange(25.0).reshape(1, 1, 5, 5).repeat(200, 1, 1, 1),
                             sample_uniforms(0, 0, range(200), 4), "shift")
    assert set(shifted.unique().tolist()) <= set(range(25))  # no pixel is interpolated
    assert len({tuple(image.flatten().tolist()) for image in shifted}) == (2 * SHIFT_PIXELS + 1) ** 2


def test_a_sample_is_a_function_of_seed_epoch_and_index_only():
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40)
    small = make_loader(x, y, 4, seed=5, shuffle=True, augment="standard")
    large = make_loader(x, y, 16, seed=5, shuffle=False, augment="standard")

    def by_label(loader, epoch):
        loader.sampler.set_epoch(epoch)
        return {int(label): image for images, labels in loader for image, label in zip(images, labels, strict=True)}

    first, again = by_label(small, 2), by_label(large, 2)
    assert all(torch.equal(first[i], again[i]) for i in range(40))  # batch size and order do not matter
    other_epoch = by_label(large, 3)
    other_seed = make_loader(x, y, 16, seed=6, shuffle=False, augment="standard")
    assert sum(torch.equal(first[i], other_epoch[i]) for i in range(40)) < 4
    assert sum(torch.equal(first[i], by_label(other_seed, 2)[i]) for i in range(40)) < 4


def test_labels_and_batch_order_are_those_of_the_plain_loader():
    x, y = torch.rand(30, 1, 8, 8), torch.randint(0, 10, (30,))
    plain, augmented = (make_loader(x, y, 8, seed=1, shuffle=True, augment=mode) for mode in ("none", "shift"))
    plain.sampler.set_epoch(4)
    augmented.sampler.set_epoch(4)
    assert [labels.tolist() for _, labels in plain] == [labels.tolist() for _, labels in augmented]


def test_augmented_loaders_are_never_cached():
    loader = make_loader(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), 4, seed=0, shuffle=True, augment="shift")
    assert not is_cacheable(loader)
    assert CachedTeacherLoader.wrap(loader, torch.nn.Flatten()) is None


SEEN: list[torch.Tensor] = []  # module level: distill may copy the teacher, and a copy shares this list


class _Recorder(torch.nn.Module):
    """Wraps a model and keeps every input it is called with in ``SEEN``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        SEEN.append(x.detach().clone())
        return self.model(x)


def test_the_teacher_sees_the_augmented_batches_the_loaders_give_the_student(digits, digits_teacher):
    bundle, _, val = digits
    train = make_loader(bundle.train_x[:96], bundle.train_y[:96], 32, seed=0, shuffle=True, augment="standard")
    unlabeled = make_loader(bundle.train_x[96:160], None, 32, seed=1, shuffle=True, augment="standard")
    SEEN.clear()
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    result = qd.distill(_Recorder(digits_teacher), train, val, {**RECIPE, "quant": {"first_last_bits": None}},
                        student=student, unlabeled=unlabeled, show_progress=False)
    assert result.report["teacher_logits"] == "live"
    steps = [x for x in SEEN if len(x) == 64]  # training steps: 32 labelled + 32 unlabeled samples
    # the same loaders again: epoch 0's labelled batches, each with the next of the unlabeled stream (2 per pass)
    train.sampler.set_epoch(0)
    stream = []
    for unlabeled_pass in (0, 1):
        unlabeled.sampler.set_epoch(unlabeled_pass)
        stream += [u for (u,) in unlabeled]
    expected = [torch.cat([x, u]) for (x, _), u in zip(train, stream[:3], strict=True)]
    assert len(steps) == 3 and all(torch.equal(a, b) for a, b in zip(steps, expected, strict=True))
    plain = [x for x, _ in make_loader(bundle.train_x[:96], bundle.train_y[:96], 32, seed=0, shuffle=True)]
    assert not any(torch.equal(step[:32], x) for step, x in zip(steps, plain, strict=True))  # augmented


def test_augment_errors_are_one_line():
    with pytest.raises(DataError, match="needs float images"):
        make_loader(torch.rand(8, 64), None, 4, seed=0, shuffle=True, augment="shift")
    with pytest.raises(ValueError, match="applies to image tensors"):
        Recipe(data={"image_folder": "photos", "augment": "shift"})
    with pytest.raises(ValueError, match="augment"):
        Recipe(data={"name": "mnist5k", "augment": "rotate"})


def test_a_recipe_augments_the_training_and_unlabeled_inputs_only():
    data = prepare_data(Recipe(data={"name": "digits", "augment": "shift", "label_fraction": 0.5}))
    assert type(data.train.dataset).__name__ == type(data.unlabeled.dataset).__name__ == "AugmentedTensorDataset"
    assert is_cacheable(data.val) and is_cacheable(data.test)  # validation and test: the plain images
    assert is_cacheable(prepare_data(Recipe(data={"name": "digits"})).train)
