"""Image folders: the split rule and split folders, decoding against the written pixels, deterministic augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.digit_images import digit_pixels, write_digit_folder, write_folder
from qdistill.data import LazyImages, load_data, make_loaders
from qdistill.data.images import Normalization
from qdistill.data.loaders import AugmentSampler
from qdistill.recipe import DataSpec

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 classes x 20 digit PNGs of 16x16 pixels."""
    return write_digit_folder(tmp_path_factory.mktemp("digits"))


def _spec(root, **settings) -> DataSpec:
    return DataSpec(image_folder=str(root), image_size=16, workers=0, **settings)


def _pixels(path) -> np.ndarray:
    """The reference: the PNG's pixels as (3, H, W) floats in [0, 1]."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255


def test_a_plain_folder_is_split_by_the_documented_rule(folder):
    bundle = load_data(_spec(folder, seed=3))
    files = sorted(str(path) for path in folder.rglob("*.png"))  # classes 0..9 in order, files sorted in each
    order = np.random.RandomState(3).permutation(200)
    test, rest = order[200 - 40:], order[:160]  # test: round(0.2 * 200) of all, set aside first
    val, train = rest[160 - 32:], rest[:128]  # validation: round(0.2 * 160) of the rest
    for images, labels, index in ((bundle.train_x, bundle.train_y, train), (bundle.val_x, bundle.val_y, val),
                                  (bundle.test_x, bundle.test_y, test)):
        assert images.files == [files[i] for i in index]
        assert labels.tolist() == [int(files[i].split("/")[-2]) for i in index]
    assert bundle.split_sizes() == {"train_samples": 128, "val_samples": 32, "test_samples": 40}
    assert bundle.model_kwargs() == {"in_channels": 3, "num_classes": 10, "image_size": 16}
    assert bundle.class_names == [str(digit) for digit in range(10)]


def test_train_val_test_folders_are_the_splits(tmp_path):
    samples = digit_pixels(count_per_class=6)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    write_folder(tmp_path / "train", samples[0::3], names)
    write_folder(tmp_path / "val", samples[1::3], names)
    write_folder(tmp_path / "test", samples[2::3][:10], names)  # the test folder lacks classes 5..9
    bundle = load_data(_spec(tmp_path))
    assert bundle.class_names == sorted(names)
    assert bundle.split_sizes() == {"train_samples": 20, "val_samples": 20, "test_samples": 10}
    assert all("/test/" in path for path in bundle.test_x.files)
    expected = [sorted(names).index(path.split("/")[-2]) for path in bundle.val_x.files]
    assert bundle.val_y.tolist() == expected


def test_a_missing_split_folder_is_set_aside_from_train(tmp_path):
    samples = digit_pixels(count_per_class=5)
    write_folder(tmp_path / "train", samples[0::2])  # 25 images
    write_folder(tmp_path / "test", samples[1::2])
    bundle = load_data(_spec(tmp_path, val_fraction=0.2))
    assert bundle.split_sizes() == {"train_samples": 20, "val_samples": 5, "test_samples": 25}
    assert all("/train/" in path for path in bundle.val_x.files + bundle.train_x.files)
    assert not set(bundle.val_x.files) & set(bundle.train_x.files)


def test_decoded_images_are_the_written_pixels(folder):
    unit = load_data(_spec(folder))
    imagenet = load_data(_spec(folder, normalize="imagenet"))
    path = unit.train_x.files[0]
    np.testing.assert_allclose(unit.train_x[0].numpy(), _pixels(path), atol=1e-6)
    expected = (_pixels(path) - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    np.testing.assert_allclose(imagenet.train_x[0].numpy(), expected, atol=1e-5)
    picked = np.array([3, 0, 7])
    assert torch.equal(unit.train_x[picked], torch.stack([unit.train_x[int(i)] for i in picked]))
    assert torch.equal(unit.train_x[:2], unit.train_x[[0, 1]])


def test_images_of_other_sizes_are_resized_from_their_centre_square(tmp_path):
    pixels = np.random.RandomState(0).randint(0, 256, (16, 24, 3)).astype(np.uint8)  # wider than high
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    centre = pixels[:, 4:20]
    same_size = LazyImages([str(tmp_path / "wide.png")], 16, Normalization())[0]
    np.testing.assert_allclose(same_size.numpy(), centre.transpose(2, 0, 1) / 255, atol=1e-6)
    smaller = LazyImages([str(tmp_path / "wide.png")], 8, Normalization())[0]
    resized = np.asarray(Image.fromarray(pixels).resize((12, 8), Image.Resampling.BILINEAR))  # shorter side to 8
    reference = resized[:, 2:10].transpose(2, 0, 1) / 255  # then the centre square
    np.testing.assert_allclose(smaller.numpy(), reference, atol=1e-6)


def test_standard_normalisation_uses_the_training_images_only(folder):
    bundle = load_data(_spec(folder, normalize="standard"))
    train = np.stack([_pixels(path) for path in bundle.train_x.files])  # (128, 3, 16, 16)
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    np.testing.assert_allclose(bundle.train_x.normalization.mean, mean, atol=1e-5)
    np.testing.assert_allclose(bundle.train_x.normalization.std, std, atol=1e-5)
    path = bundle.test_x.files[0]
    np.testing.assert_allclose(bundle.test_x[0].numpy(), (_pixels(path) - mean[:, None, None]) / std[:, None, None],
                               atol=1e-4)


def _epoch(loader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [x for x, _ in loader]


def test_augmentation_follows_seed_epoch_and_index_in_any_worker(folder):
    bundle = load_data(_spec(folder, augment="standard"))
    in_process, _, _ = make_loaders(bundle, 32, seed=0)
    bundle.train_x.workers = 2
    in_workers, _, _ = make_loaders(bundle, 32, seed=0)
    assert isinstance(in_workers.sampler, AugmentSampler)
    first = _epoch(in_workers, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(in_process, 1), strict=True))  # workers change nothing
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(in_workers, 1), strict=True))  # a resumed epoch 1
    order = list(iter(in_process.sampler))
    assert torch.equal(first[0][0], in_process.dataset[order[0]][0])  # one sample = one (seed, epoch, index)
    plain = bundle.train_x[order[0][1]]
    assert not torch.equal(first[0][0], plain)  # augmented ...
    assert first[0][0].shape == plain.shape == (3, 16, 16)  # ... to the same size
    again = in_process.dataset[(2, order[0][1])][0]
    assert not torch.equal(first[0][0], again)  # another epoch, another crop
    assert torch.equal(bundle.val_x[0], make_loaders(bundle, 32, seed=0)[1].dataset[0][0])  # validation never augmented
