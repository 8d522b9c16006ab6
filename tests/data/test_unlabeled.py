"""Scarce labels and unlabeled transfer data: ``data.label_fraction`` keeps a stratified fraction of the training
labels, ``data.unlabeled`` adds inputs normalised like the training data; validation and test are untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from data.digit_images import digit_pixels, write_digit_folder
from qdistill.data import load_data, make_loaders, make_unlabeled_loader
from qdistill.data.unlabeled import stratified_keep
from qdistill.errors import DataError, RecipeError
from qdistill.recipe import DataSpec, Recipe


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_stratified_keep_takes_the_rounded_fraction_of_every_class():
    labels = np.repeat(np.arange(4), [10, 25, 3, 40])
    kept, dropped = stratified_keep(labels, 0.1, seed=5)
    assert np.bincount(labels[kept]).tolist() == [1, 2, 1, 4]  # round(0.1 * n), at least one (class 2: 0.3 -> 1)
    assert sorted([*kept, *dropped]) == list(range(len(labels))) and not set(kept) & set(dropped)
    again, _ = stratified_keep(labels, 0.1, seed=5)
    other, _ = stratified_keep(labels, 0.1, seed=6)
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)


def test_label_fraction_moves_the_other_training_samples_to_unlabeled():
    full = load_data(DataSpec(name="digits"))
    scarce = load_data(DataSpec(name="digits", label_fraction=0.1))
    counts = np.bincount(full.train_y.numpy())
    assert np.bincount(scarce.train_y.numpy()).tolist() == [max(1, round(0.1 * n)) for n in counts]
    assert len(scarce.train_x) + len(scarce.unlabeled_x) == len(full.train_x)
    assert _rows(scarce.train_x) | _rows(scarce.unlabeled_x) == _rows(full.train_x)
    assert not _rows(scarce.train_x) & _rows(scarce.unlabeled_x)
    # every kept sample keeps its own label
    labels = {row.tobytes(): int(y) for row, y in zip(full.train_x.reshape(len(full.train_x), -1).numpy(), full.train_y,
                                                      strict=True)}
    kept = scarce.train_x.reshape(len(scarce.train_x), -1).numpy()
    assert all(labels[row.tobytes()] == int(y) for row, y in zip(kept, scarce.train_y, strict=True))
    assert torch.equal(scarce.val_x, full.val_x) and torch.equal(scarce.test_y, full.test_y)
    assert scarce.split_sizes() == full.split_sizes()  # train_samples is still the whole training split
    assert scarce.unlabeled_from_train == scarce.unlabeled_samples == len(full.train_x) - len(scarce.train_x)


def test_label_fraction_one_changes_nothing():
    full, same = load_data(DataSpec(name="digits")), load_data(DataSpec(name="digits", label_fraction=1.0))
    assert torch.equal(full.train_x, same.train_x) and same.unlabeled_x is None


def test_unlabeled_npz_gets_the_training_normalisation(tmp_path):
    raw = load_digits().data.reshape(-1, 1, 8, 8)[:50]  # 0..16, as the built-in digits
    np.savez(tmp_path / "extra.npz", x=raw, y=np.zeros(50, dtype=np.int64))  # y is ignored
    bundle = load_data(DataSpec(name="digits", unlabeled={"npz": str(tmp_path / "extra.npz"), "limit": 40}))
    assert bundle.unlabeled_x.dtype == torch.float32 and bundle.unlabeled_from_train == 0
    np.testing.assert_allclose(bundle.unlabeled_x.numpy(), raw[:40] / 16.0, rtol=1e-6)  # digits' unit range is 0..16
    standard = load_data(DataSpec(name="digits", normalize="standard", unlabeled={"npz": str(tmp_path / "extra.npz")}))
    plain = load_data(DataSpec(name="digits", normalize="none"))
    mean, std = plain.train_x.numpy().mean(), plain.train_x.numpy().std()  # statistics of the training split only
    np.testing.assert_allclose(standard.unlabeled_x.numpy(), (raw - mean) / std, rtol=1e-4, atol=1e-5)


def test_label_fraction_and_unlabeled_data_add_up(tmp_path):
    np.savez(tmp_path / "extra.npz", x=load_digits().data.reshape(-1, 1, 8, 8)[:30])
    bundle = load_data(DataSpec(name="digits", label_fraction=0.5, unlabeled={"npz": str(tmp_path / "extra.npz")}))
    assert bundle.unlabeled_samples == bundle.unlabeled_from_train + 30


def test_unlabeled_factory_inputs_are_used_as_returned():
    bundle = load_data(DataSpec(name="digits", unlabeled={"factory": "support:unlabeled_digits"}))
    assert torch.equal(bundle.unlabeled_x, torch.full((12, 1, 8, 8), 0.5))


@pytest.mark.parametrize(("unlabeled", "message"), [
    ({"factory": "support:unlabeled_wrong_shape"}, r"data.unlabeled.factory: samples have shape \(1, 4, 4\) but the "
                                                    r"training inputs have \(1, 8, 8\); they must match"),
    ({"npz": "missing.npz"}, "data.unlabeled.npz: file 'missing.npz' does not exist"),
])
def test_bad_unlabeled_data_is_one_line(unlabeled, message):
    with pytest.raises(DataError, match=message):
        load_data(DataSpec(name="digits", unlabeled=unlabeled))


def test_nan_unlabeled_inputs_are_refused(tmp_path):
    x = np.zeros((4, 1, 8, 8))
    x[1, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    with pytest.raises(DataError, match="data.unlabeled.npz .* contain 1 NaN or Inf values"):
        load_data(DataSpec(name="digits", unlabeled={"npz": str(tmp_path / "nan.npz")}))


def test_label_fraction_needs_labels(tmp_path):
    np.savez(tmp_path / "nolabels.npz", x=np.random.default_rng(0).random((40, 1, 4, 4)))
    with pytest.raises(DataError, match="data.label_fraction: the training data has no labels"):
        load_data(DataSpec(npz=str(tmp_path / "nolabels.npz"), label_fraction=0.5))


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "digits", "unlabeled": {"npz": "a.npz", "factory": "m:f"}}, "give exactly one of 'npz'"),
    ({"name": "digits", "unlabeled": {}}, "give exactly one of 'npz'"),
    ({"name": "digits", "unlabeled": {"image_folder": "photos"}}, "unlabeled.image_folder goes with image_folder data"),
    ({"name": "digits", "label_fraction": 0.0}, "data.label_fraction: 0.0 is not allowed"),
    ({"name": "digits", "label_fraction": 1.5}, "data.label_fraction: 1.5 is not allowed"),
])
def test_recipe_refuses_bad_unlabeled_settings(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(data=data)


def test_unlabeled_loader_leaves_the_labelled_order_alone(tmp_path):
    np.savez(tmp_path / "extra.npz", x=load_digits().data.reshape(-1, 1, 8, 8)[:100])
    plain = load_data(DataSpec(name="digits", label_fraction=0.3))
    mixed = load_data(DataSpec(name="digits", label_fraction=0.3, unlabeled={"npz": str(tmp_path / "extra.npz")}))
    plain_batches = [y.tolist() for _, y in make_loaders(plain, 32, seed=0)[0]]
    assert [y.tolist() for _, y in make_loaders(mixed, 32, seed=0)[0]] == plain_batches
    loader = make_unlabeled_loader(mixed, 32, seed=0)
    seen = torch.cat([batch[0] for batch in loader])
    assert _rows(seen) == _rows(mixed.unlabeled_x) and len(seen) == mixed.unlabeled_samples
    assert make_unlabeled_loader(load_data(DataSpec(name="digits")), 32, seed=0) is None


def test_unlabeled_image_folder_is_decoded_like_the_training_images(tmp_path):
    write_digit_folder(tmp_path / "labelled", count_per_class=6)
    flat = tmp_path / "extra" / "any" / "depth"
    flat.mkdir(parents=True)
    for number, (_, pixels) in enumerate(digit_pixels(count_per_class=2)):
        Image.fromarray(pixels).save(flat / f"{number}.png")
    (flat / "notes.txt").write_text("not an image")
    spec = DataSpec(image_folder=str(tmp_path / "labelled"), image_size=16, normalize="imagenet",
                    unlabeled={"image_folder": str(tmp_path / "extra")}, workers=0)
    bundle = load_data(spec)
    assert bundle.unlabeled_samples == 20 and bundle.unlabeled_x.normalization == bundle.train_x.normalization
    assert tuple(bundle.unlabeled_x[0].shape) == bundle.input_shape == (3, 16, 16)
    scarce = load_data(spec.model_copy(update={"label_fraction": 0.5}))
    assert scarce.unlabeled_samples == 20 + scarce.unlabeled_from_train and scarce.unlabeled_from_train > 0
    assert set(scarce.unlabeled_x.files) >= set(bundle.unlabeled_x.files)


def test_unlabeled_image_folder_without_images(tmp_path):
    write_digit_folder(tmp_path / "labelled", count_per_class=6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.unlabeled.image_folder: .* has no images"):
        load_data(DataSpec(image_folder=str(tmp_path / "labelled"), unlabeled={"image_folder": str(tmp_path / "empty")}))
