"""Mixing unlabeled transfer data into training: the rule, and the loader that applies it.

The rule (``MixedLoader``): every training step takes the next labelled batch and the next
unlabeled batch (``data.batch_size * data.unlabeled_ratio`` samples, by default as many as a
labelled batch) and trains on both at once. An epoch is one pass over the
labelled samples, so a run with unlabeled data takes exactly the steps, and the labelled batches,
of the same run without it; the unlabeled stream runs on across epochs in passes of its own
shuffled order (``data.make_unlabeled_loader``), wrapping around as often as the labelled epochs
need. Unlabeled samples carry the label ``kd.losses.UNLABELED`` and train with the KD loss only
(``KDLoss``'s per-sample rule); labelled ones with the usual ``alpha`` mix of KD and cross-entropy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from qdistill.batch import batch_parts, concat_inputs, describe_inputs, input_rows, input_tensors
from qdistill.errors import DataError
from qdistill.kd.losses import UNLABELED


class MixedSampler:
    """What the training loop sees as the mixed loader's sampler: ``set_epoch`` reaches the labelled sampler."""

    def __init__(self, labelled_sampler: Any) -> None:
        self.labelled_sampler, self.epoch = labelled_sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.labelled_sampler, "set_epoch"):
            self.labelled_sampler.set_epoch(epoch)


def mix(labelled_batch: Any, unlabeled_batch: Any) -> tuple:
    """One training batch: inputs concatenated, unlabeled samples labelled ``UNLABELED``, teacher logits when both carry them.

    Example:
        >>> x, y, logits = mix((torch.zeros(2, 3), torch.tensor([4, 5]), torch.ones(2, 10)),
        ...                    (torch.ones(1, 3), None, torch.zeros(1, 10)))
        >>> tuple(x.shape), y.tolist(), tuple(logits.shape)
        ((3, 3), [4, 5, -1], (3, 10))
        >>> len(mix((torch.zeros(2, 3), torch.tensor([4, 5])), (torch.ones(1, 3),)))   # no cached logits: (x, y)
        2
        >>> tokens = mix(({"input_ids": torch.ones(2, 5, dtype=torch.long)}, torch.tensor([0, 1])),
        ...              ({"input_ids": torch.zeros(3, 5, dtype=torch.long)},))   # named inputs join key by key
        >>> tuple(tokens[0]["input_ids"].shape), tokens[0]["input_ids"].dtype, tokens[1].tolist()
        ((5, 5), torch.int64, [0, 1, -1, -1, -1])
    """
    x_labelled, labels, logits_labelled = batch_parts(labelled_batch)
    x_unlabeled, _, logits_unlabeled = batch_parts(unlabeled_batch)
    x = concat_inputs([x_labelled, _like(x_unlabeled, x_labelled)])
    if labels is not None:
        labels = torch.cat([labels, labels.new_full((input_rows(x_unlabeled),), UNLABELED)])
    if logits_labelled is None or logits_unlabeled is None:
        return x, labels
    return x, labels, torch.cat([logits_labelled, logits_unlabeled])


def _like(unlabeled: Any, labelled: Any) -> Any:
    """The unlabeled inputs in the labelled inputs' form and dtypes; ``DataError`` when forms or sample shapes differ."""
    same_form = type(unlabeled) is type(labelled) or (isinstance(unlabeled, (list, tuple)) and isinstance(labelled, (list, tuple)))
    if isinstance(labelled, dict) and isinstance(unlabeled, dict):
        same_form = list(unlabeled) == list(labelled)
    theirs, ours = input_tensors(unlabeled), input_tensors(labelled)
    if not same_form or len(theirs) != len(ours) or any(a.shape[1:] != b.shape[1:] for a, b in zip(theirs, ours, strict=True)):
        raise DataError(f"unlabeled data: samples are {describe_inputs(unlabeled)} but the labelled ones are "
                        f"{describe_inputs(labelled)}; their form and shapes after the batch size must match (pad token "
                        "inputs to the same length)")
    converted = [a.to(b.dtype) for a, b in zip(theirs, ours, strict=True)]
    if isinstance(labelled, dict):
        return dict(zip(labelled, converted, strict=True))
    return type(labelled)(converted) if isinstance(labelled, (list, tuple)) else converted[0]


class MixedLoader:
    """Labelled batches, each joined by the next batch of an endless stream of unlabeled ones (the module's rule).

    Deterministic and resumable: the unlabeled batches of epoch ``e`` start at stream position
    ``e * len(labelled)``, whatever ran before, and each unlabeled pass ``k`` is the unlabeled
    loader's order for ``set_epoch(k)``.

    Example:
        >>> from qdistill.data import make_loader
        >>> labelled = make_loader(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2, seed=0, shuffle=True)
        >>> unlabeled = make_loader(torch.ones(3, 2), None, 2, seed=1, shuffle=True)
        >>> [batch[1].tolist() for batch in MixedLoader(labelled, unlabeled)]
        [[0, 0, -1, -1], [0, 0, -1]]
    """

    def __init__(self, labelled: Iterable[Any], unlabeled: Iterable[Any]) -> None:
        self.labelled, self.unlabeled = labelled, unlabeled
        self.sampler = MixedSampler(getattr(labelled, "sampler", None))
        self.per_pass = len(unlabeled)  # unlabeled batches in one pass
        if self.per_pass == 0:
            raise DataError("unlabeled data: the loader yielded no batches; at least one sample is needed")
        self._stream: Iterator[Any] | None = None
        self._position = -1  # the stream position the next unlabeled batch has

    def __len__(self) -> int:
        return len(self.labelled)

    def __iter__(self) -> Iterator[tuple]:
        start = self.sampler.epoch * len(self.labelled)
        if self._stream is None or self._position != start:  # a fresh run or a resumed one: (re)open the stream there
            self._stream, self._position = self._unlabeled_from(start), start
        for batch in self.labelled:
            unlabeled_batch = next(self._stream)
            self._position += 1
            yield mix(batch, unlabeled_batch)

    def _unlabeled_from(self, position: int) -> Iterator[Any]:
        pass_index, skip = divmod(position, self.per_pass)
        sampler = getattr(self.unlabeled, "sampler", None)
        while True:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(pass_index)
            for index, batch in enumerate(self.unlabeled):
                if index >= skip:
                    yield batch
            pass_index, skip = pass_index + 1, 0
