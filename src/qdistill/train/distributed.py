"""Multi-process training on torch.distributed: ``torchrun --nproc_per_node=N -m qdistill run RECIPE``.

- **Process group.** ``setup()`` joins the group torchrun describes (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on the CPU, nccl on GPUs (each process on
  ``cuda:LOCAL_RANK``). Without torchrun everything here is a no-op and training is one process.
- **Batches.** ``data.batch_size`` is per process: N processes at batch ``b`` take the global
  batches of one process at ``N * b``. ``ShardedEpochSampler`` applies DistributedSampler's rule
  (pad the epoch's order to a multiple of N by repeating its start, rank ``r`` takes positions
  ``r, r + N, ...``) to qdistill's own epoch order (``EpochSampler``), so the union of the ranks'
  k-th batches is the single process's k-th batch; calibration runs on the global batches
  (``global_loader``) on every rank. The teacher-logit cache is sharded the same way:
  each rank reads its own samples' logits (``shard_loader``).
- **Model.** ``fit`` wraps the trained module (the student and adapters; the teacher is kept out of
  the module tree and so outside the wrapper) in ``DistributedDataParallel``. Its constructor
  broadcasts rank 0's parameters and buffers, so every quantizer's step size, zero point and
  ``initialized`` flag start equal on all ranks (``broadcast_state`` does it again explicitly), and
  the gradients are all-reduced (averaged) at every step, so they stay equal.
- **Random draws.** Every rank seeds torch's generator as one process does, and while training
  each ``nn.Dropout`` draws the mask of the *global* batch and applies this rank's rows of it
  (``global_batch_dropout``), so rank ``r``'s samples get exactly the masks one process at the
  global batch size gives them: 2 processes at batch 32 compute the 1-process batch-64 step up to
  the order of float sums (BatchNorm layers, per-rank statistics, are not synchronised: the
  student's are folded into its convolutions).
- **Files.** Only rank 0 (``is_main()``) writes checkpoints, run files and reports; the others
  read the checkpoint on ``--resume``.

Example (one process: nothing to set up):
    >>> setup(), world_size(), rank(), is_main()
    (False, 1, 0, True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from qdistill.data.loaders import EpochSampler
from qdistill.errors import QdistillError
from qdistill.kd.cache import CachedImageLoader, CachedTeacherLoader


def requested() -> bool:
    """True when torchrun (or another launcher) started more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup() -> bool:
    """Join the process group torchrun describes (once); returns whether training is distributed.

    gloo on the CPU, nccl when CUDA is present (and this process's GPU is ``cuda:LOCAL_RANK``).
    """
    if not requested():
        return False
    if not dist.is_available():
        raise QdistillError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def teardown(wait: bool = True) -> None:
    """Leave the process group; with ``wait``, after a barrier, so no rank exits while another still
    talks to it (after a failure there is no waiting: the launcher stops the other ranks)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """The number of training processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """True on the process that writes files (rank 0; the only process without torchrun)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if active():
        dist.barrier()


class ShardedEpochSampler(EpochSampler):
    """This rank's share of an ``EpochSampler``'s order, by DistributedSampler's rule.

    Example (10 samples, 3 ranks: the order is padded to 12 and dealt out like cards):
        >>> inner = EpochSampler(10, seed=0, shuffle=False)
        >>> [list(ShardedEpochSampler(inner, rank, 3)) for rank in range(3)]
        [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    """

    def __init__(self, inner: EpochSampler, rank: int, world_size: int) -> None:
        super().__init__(inner.size, inner.seed, inner.shuffle)
        self.inner, self.rank, self.world_size = inner, rank, world_size
        self.epoch = inner.epoch
        self.per_rank = math.ceil(inner.size / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        order = list(iter(self.inner))
        total = self.per_rank * self.world_size
        order += (order * math.ceil(total / max(len(order), 1)))[: total - len(order)]  # DistributedSampler's padding
        return iter(order[self.rank : total : self.world_size])

    def __len__(self) -> int:
        return self.per_rank


def shard_loader(loader: Any, rank_: int | None = None, world: int | None = None) -> Any:
    """The same loader reading only this rank's samples (``ShardedEpochSampler``), batch size unchanged.

    Takes qdistill's loaders: a ``DataLoader`` over an ``EpochSampler`` (``data.make_loader``) or a
    teacher-logit cache (``CachedTeacherLoader``, ``CachedImageLoader``); the cache's logits are
    indexed by sample, so each rank reads its own samples' logits. Anything else is refused.

    Example:
        >>> from qdistill.data import make_loader
        >>> loader = make_loader(torch.arange(8.0).reshape(8, 1), None, 2, seed=0, shuffle=False)
        >>> [batch[0].flatten().tolist() for batch in shard_loader(loader, rank_=1, world=2)]
        [[1.0, 3.0], [5.0, 7.0]]
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if isinstance(loader, CachedTeacherLoader):
        return CachedTeacherLoader(loader.tensors, loader.logits, loader.batch_size,
                                   ShardedEpochSampler(loader.sampler, rank_, world))
    if isinstance(loader, CachedImageLoader):
        sharded = CachedImageLoader.__new__(CachedImageLoader)
        sharded.logits, sharded.batch_size = loader.logits, loader.batch_size
        sharded.loader = shard_loader(loader.loader, rank_, world)
        sharded.sampler = sharded.loader.sampler
        return sharded
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, EpochSampler):
        return type(loader)(loader.dataset, batch_size=loader.batch_size,
                            sampler=ShardedEpochSampler(loader.sampler, rank_, world), num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn, generator=loader.generator)
    raise QdistillError(f"distributed training: a {type(loader).__name__} cannot be sharded across processes; "
                        "allowed: qdistill's loaders (qdistill.data.make_loader, the recipe's data section)")


def global_loader(loader: Any) -> Any:
    """The loader whose batches are the global batches (``world_size()`` times the per-process size).

    Calibration runs on it on every rank, so every rank finds the step sizes one process at the
    global batch size finds (then ``wrap`` broadcasts rank 0's anyway). One process: ``loader`` itself.

    Example:
        >>> from qdistill.data import make_loader
        >>> loader = make_loader(torch.zeros(8, 1), None, 2, seed=0, shuffle=True)
        >>> global_loader(loader) is loader
        True
    """
    world = world_size()
    if world == 1:
        return loader
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, EpochSampler):
        return type(loader)(loader.dataset, batch_size=loader.batch_size * world, sampler=loader.sampler,
                            num_workers=loader.num_workers, collate_fn=loader.collate_fn, generator=loader.generator)
    raise QdistillError(f"distributed training: a {type(loader).__name__} cannot be re-batched for calibration; "
                        "allowed: qdistill's loaders (qdistill.data.make_loader, the recipe's data section)")


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers (quantizer step sizes, zero points, ``initialized`` flags) on every rank."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dtype == torch.bool:  # gloo has no bool broadcast
                values = tensor.to(torch.uint8)
                dist.broadcast(values, src=0)
                tensor.copy_(values.bool())
            else:
                dist.broadcast(tensor.data, src=0)


def wrap(module: nn.Module) -> nn.Module:
    """``module`` inside ``DistributedDataParallel`` (the module itself in one process).

    ``find_unused_parameters``: a quantizer that calibration never reached passes values through,
    so its step size gets no gradient; buffers are not re-broadcast at every step (they do not
    change while training: BatchNorm is folded, zero points are fixed).
    """
    if not active():
        return module
    broadcast_state(module)
    device = next(module.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True,
                                   broadcast_buffers=False)


def _global_batch_dropout(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``nn.Dropout.forward`` drawing the global batch's mask and keeping this rank's rows of it."""
    rank_, world = self._qdistill_shard  # type: ignore[attr-defined]
    if not self.training or self.p == 0.0 or x.dim() == 0:
        return F.dropout(x, self.p, self.training, self.inplace)
    # F.dropout multiplies by a mask of 0 and 1/(1-p); on ones it returns that mask, with the same draws
    mask = F.dropout(torch.ones((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype, device=x.device), self.p, True)
    mask = mask[rank_::world]  # the rows of this rank's samples: global positions r, r + N, ... (ShardedEpochSampler)
    return x.mul_(mask) if self.inplace else x * mask


@contextmanager
def global_batch_dropout(module: nn.Module, rank_: int | None = None, world: int | None = None) -> Iterator[None]:
    """While inside, ``module``'s ``nn.Dropout`` layers draw the global batch's masks (one process: unchanged).

    With every rank's generator in the same state (seeded alike), rank ``r`` applies rows
    ``r, r + N, ...`` of the mask one process draws for the global batch, the rows of the samples
    ``ShardedEpochSampler`` gives it. The first dimension is taken to be the batch. Dropout inside
    other code (functional calls) draws the same stream on every rank: valid masks, equal across
    the ranks' corresponding rows.

    Example (rank 1 of 2 gets the odd rows of one process's mask):
        >>> layer = nn.Dropout(0.5).train()
        >>> _ = torch.manual_seed(0); one = layer(torch.ones(4, 3))
        >>> _ = torch.manual_seed(0)
        >>> with global_batch_dropout(layer, rank_=1, world=2):
        ...     shard = layer(torch.ones(2, 3))
        >>> torch.equal(shard, one[1::2])
        True
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    layers = [layer for layer in module.modules()
              if isinstance(layer, nn.Dropout) and type(layer).forward is nn.Dropout.forward]
    if world == 1:
        yield
        return
    for layer in layers:  # an instance attribute shadows the class's forward; removed again below
        layer._qdistill_shard = (rank_, world)
        layer.forward = MethodType(_global_batch_dropout, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward, layer._qdistill_shard


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (the values of one process unchanged).

    Example:
        >>> mean_over_ranks({"loss": 0.5})
        {'loss': 0.5}
    """
    if not active() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {key: float(value) / world_size() for key, value in zip(keys, tensor.cpu().tolist(), strict=True)}


__all__ = ["ShardedEpochSampler", "active", "barrier", "broadcast_state", "global_batch_dropout", "global_loader", "is_main", "mean_over_ranks", "rank",
           "requested", "setup", "shard_loader", "teardown", "world_size", "wrap"]
