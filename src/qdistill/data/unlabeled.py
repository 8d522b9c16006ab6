"""Scarce labels and unlabeled transfer data: ``data.label_fraction`` and ``data.unlabeled``.

``label_fraction`` keeps the labels of a stratified fraction of the training split: in every class
``round(fraction * n)`` samples (at least one) chosen by ``RandomState(data.seed)``; the other
training samples lose their labels and join the unlabeled inputs. ``data.unlabeled`` adds inputs
from an ``npz`` file (array ``x``, normalised with the training data's own offset and scale), an
image folder without classes (decoded like the training images) or a factory (used as returned).
Validation and test keep their labels. How the student learns from unlabeled inputs (the KD loss
only) is ``kd.mixing``'s rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qdistill.data.bundle import DataBundle
from qdistill.data.checks import check_arrays
from qdistill.data.images import LazyImages
from qdistill.errors import DataError
from qdistill.factory import call_factory
from qdistill.recipe import UnlabeledSpec

Inputs = torch.Tensor | LazyImages
Transform = Callable[[np.ndarray], np.ndarray]  # the training data's normalisation, applied to unlabeled arrays


def stratified_keep(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, dropped)`` sorted index arrays: per class ``round(fraction * n)`` samples (at least 1) keep their labels.

    Example:
        >>> labels = np.array([0] * 10 + [1] * 20)
        >>> kept, dropped = stratified_keep(labels, 0.1, seed=0)
        >>> np.bincount(labels[kept]).tolist(), len(dropped)
        ([1, 2], 27)
    """
    rng = np.random.RandomState(seed)
    kept = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        kept.append(rng.permutation(members)[: max(1, int(round(fraction * len(members))))])
    kept_index = np.sort(np.concatenate(kept))
    return kept_index, np.setdiff1d(np.arange(len(labels)), kept_index)


def take(x: Inputs, index: np.ndarray) -> Inputs:
    """The samples ``index`` of a tensor, or of ``LazyImages`` without decoding them.

    Example:
        >>> take(torch.arange(5), np.array([4, 0])).tolist()
        [4, 0]
    """
    if isinstance(x, LazyImages):
        return LazyImages([x.files[i] for i in index], x.size, x.normalization, x.augment, x.workers)
    return x[torch.as_tensor(index, dtype=torch.long)]


def join(first: Inputs | None, second: Inputs | None) -> Inputs | None:
    """Two input sets one after the other (either may be None).

    Example:
        >>> join(torch.zeros(2, 3), torch.ones(1, 3)).shape, join(None, None)
        (torch.Size([3, 3]), None)
    """
    if first is None or second is None:
        return second if first is None else first
    if isinstance(first, LazyImages) and isinstance(second, LazyImages):
        return LazyImages(first.files + second.files, first.size, first.normalization, first.augment, first.workers)
    return torch.cat([torch.as_tensor(first), torch.as_tensor(second)])


def keep_label_fraction(bundle: DataBundle, fraction: float | None, seed: int) -> DataBundle:
    """The bundle with labels kept on a stratified ``fraction`` of its training split; the rest become unlabeled."""
    if fraction is None or fraction >= 1.0:
        return bundle
    if bundle.train_y is None:
        raise DataError("data.label_fraction: the training data has no labels to keep a fraction of; "
                        "remove label_fraction or give labelled data")
    kept, dropped = stratified_keep(bundle.train_y.numpy(), fraction, seed)
    return replace(bundle, train_x=take(bundle.train_x, kept), train_y=bundle.train_y[torch.from_numpy(kept)],
                   unlabeled_x=join(take(bundle.train_x, dropped), bundle.unlabeled_x),
                   unlabeled_from_train=bundle.unlabeled_from_train + len(dropped))


def read_unlabeled_npz(path: str) -> np.ndarray:
    """Array ``x`` of an npz file (any ``y`` is ignored: these inputs are learned from the teacher alone)."""
    if not Path(path).is_file():
        raise DataError(f"data.unlabeled.npz: file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays:
                raise DataError(f"data.unlabeled.npz: {path!r} has no array 'x' (the unlabeled inputs)")
            return arrays["x"]
    except (OSError, ValueError) as error:
        raise DataError(f"data.unlabeled.npz: {path!r} is not a readable .npz file ({error})") from None


def unlabeled_inputs(spec: UnlabeledSpec, transform: Transform | None) -> torch.Tensor | None:
    """``data.unlabeled``'s npz or factory inputs (an image folder is read by ``data.image_folder``; None here).

    npz arrays go through ``transform`` (the training data's normalisation; None: as stored); a
    factory's tensor is used as returned. ``limit`` keeps the first samples.
    """
    if spec.npz is not None:
        x = read_unlabeled_npz(spec.npz)[: spec.limit]
        check_arrays(x, None, f"data.unlabeled.npz {spec.npz!r}")
        return torch.from_numpy(np.ascontiguousarray(transform(x) if transform else x.astype(np.float32)))
    if spec.factory is not None:
        x = call_factory(spec.factory, "data.unlabeled.factory")
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise DataError(f"data.unlabeled.factory: {spec.factory!r} returned {type(x).__name__}; "
                            "it must return a tensor (or numpy array) of inputs")
        x = torch.as_tensor(x)[: spec.limit]
        check_arrays(x.numpy(), None, f"data.unlabeled.factory {spec.factory!r}")
        return x.float() if not x.is_floating_point() else x
    return None


def add_unlabeled(bundle: DataBundle, spec: UnlabeledSpec | None, transform: Transform | None) -> DataBundle:
    """The bundle with ``data.unlabeled``'s inputs appended to its unlabeled ones (their shape must match the training inputs)."""
    if spec is None:
        return bundle
    extra = unlabeled_inputs(spec, transform)
    if extra is None:
        return bundle
    check_shape(extra, bundle, spec)
    return replace(bundle, unlabeled_x=join(bundle.unlabeled_x, extra))


def check_shape(extra: Inputs, bundle: DataBundle, spec: UnlabeledSpec) -> None:
    """Unlabeled inputs must have the training inputs' per-sample shape; else a one-line ``DataError``."""
    if tuple(extra.shape[1:]) != bundle.input_shape:
        source = next(key for key in ("npz", "image_folder", "factory") if getattr(spec, key) is not None)
        raise DataError(f"data.unlabeled.{source}: samples have shape {tuple(extra.shape[1:])} but the training inputs "
                        f"have {bundle.input_shape}; they must match")
