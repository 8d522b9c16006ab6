"""The training loop: optimiser, schedule, early stop at a target, checkpoints, progress.

``fit`` trains any module whose forward ``(x, labels)`` returns ``LossParts`` (a ``Distiller``
or a ``Supervised`` wrapper). With a checkpoint folder it saves everything at each epoch end and
every ``checkpoint_every_steps`` steps, and continues from there bit for bit.

Under torchrun (``train.distributed``) each process trains on its shard of the batches inside
``DistributedDataParallel``, the history is averaged over the processes, and only rank 0 writes
checkpoints and TensorBoard files.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar
from torch import nn

from qdistill.batch import batch_parts, call_model, move_inputs, to_device
from qdistill.errors import NonFiniteError, QdistillError
from qdistill.kd.losses import LossParts
from qdistill.quant.quantizer import quantizer_parameters
from qdistill.recipe import TrainSpec
from qdistill.train import distributed
from qdistill.train.checkpoint import Progress, find_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from qdistill.train.dropout import dropout_off
from qdistill.train.optim import make_optimizer, make_scheduler
from qdistill.train.tensorboard import TensorBoardLog


class Supervised(nn.Module):
    """Plain cross-entropy training of ``model`` (used for the teacher and the no-KD baseline)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.student = model

    def forward(self, x: Any, labels: torch.Tensor | None) -> LossParts:
        """``x``: a batch's inputs in any form of ``qdistill.batch`` (a tensor, a tuple or a dict)."""
        task = F.cross_entropy(call_model(self.student, x), labels)
        return LossParts(total=task, kd=task.new_zeros(()), task=task)


@dataclass
class CheckpointPlan:
    """Where and how often to checkpoint, and the recipe fingerprint that must match on resume."""

    directory: Path
    fingerprint: str
    every_steps: int | None = None
    resume: bool = False


def fingerprint(*parts: str) -> str:
    """A short hash identifying the settings a run was started with."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _loss_values(parts: LossParts, progress: Progress) -> dict[str, float]:
    """This rank's loss parts as floats, read in one host synchronisation, after checking they are finite.

    Under torchrun the check runs on the parts summed over the ranks: every rank must stop
    together, or the others wait forever in the next all-reduce.
    """
    items = parts.items()
    stacked = torch.stack([value.detach().float().reshape(()) for value in items.values()])
    checked = stacked
    if distributed.active():
        checked = stacked.clone()
        torch.distributed.all_reduce(checked)
        stacked = torch.cat([stacked, checked])
    floats = stacked.tolist()  # the step's one read of its losses
    values = dict(zip(items, floats[: len(items)], strict=True))
    for name, value in zip(items, floats[len(items):] or floats, strict=True):
        if not math.isfinite(value):
            raise NonFiniteError(
                f"training stopped at step {progress.global_step} (epoch {progress.epoch + 1}): loss part {name!r} "
                f"became {value}; the weights of the last good step were kept (lower train.lr or check the data)"
            )
    return values


def _non_finite_step_size(step_sizes: dict[str, nn.Parameter]) -> str | None:
    """The name of the first quantizer step size that is NaN or Inf, or None (one host synchronisation when all are finite)."""
    if not step_sizes or bool(torch.isfinite(torch.cat([value.detach().reshape(-1) for value in step_sizes.values()])).all()):
        return None
    for name, parameter in step_sizes.items():
        if not torch.isfinite(parameter).all():
            return name
    return None


class _Loop:
    """State of one ``fit`` call, split into readable steps."""

    def __init__(self, module, loader, spec, phase, validate, plan):
        self.module, self.loader, self.spec, self.validate, self.plan = module, loader, spec, validate, plan
        self.forward = distributed.wrap(module)  # DistributedDataParallel under torchrun, else the module
        if spec.compile:
            self.forward = torch.compile(self.forward)  # compiled at the first step (minutes on a CPU)
        self.device = next(module.parameters()).device
        self.steps_per_epoch = len(loader)
        self.step_sizes = quantizer_parameters(module)  # found once: the module tree does not change while training
        self.optimizer = make_optimizer(module, spec)
        self.scheduler = make_scheduler(self.optimizer, self.steps_per_epoch, spec)
        self.progress = Progress(phase)
        self.sums: dict[str, float] = {}
        self.last_good = None

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sums": dict(self.sums)}

    def save(self) -> None:
        self.last_good = {key: value.detach().clone() for key, value in self.module.state_dict().items()}
        if self.plan is not None and distributed.is_main():
            save_checkpoint(self.plan.directory, self.module.state_dict(), self.training_state(), self.progress,
                            self.plan.fingerprint)

    def restore(self) -> bool:
        """Continue from the plan's checkpoint when it belongs to this phase; False when there is none."""
        if find_checkpoint(self.plan.directory) is None:
            return False
        model_state, training_state, progress = load_checkpoint(self.plan.directory, self.plan.fingerprint)
        if progress.phase != self.progress.phase:
            return False
        self.module.load_state_dict(model_state)
        self.optimizer.load_state_dict(training_state["optimizer"])
        self.scheduler.load_state_dict(training_state["scheduler"])
        self.sums = dict(training_state["sums"])
        set_rng_state(training_state["rng"])
        self.progress = progress
        return True

    def step(self, batch: Any) -> None:
        x, labels, teacher_logits = batch_parts(batch)
        x, labels, teacher_logits = move_inputs(x, self.device), to_device(labels, self.device), to_device(teacher_logits, self.device)
        if "lr" not in self.sums:
            self.sums["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this epoch's first step uses
        parts = self._forward(x, labels, teacher_logits)
        values = _loss_values(parts, self.progress)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        self.optimizer.step()
        self.scheduler.step()
        bad_scale = _non_finite_step_size(self.step_sizes)
        if bad_scale is not None:
            self.module.load_state_dict(self.last_good)
            raise NonFiniteError(
                f"training stopped at step {self.progress.global_step} (epoch {self.progress.epoch + 1}): quantizer "
                f"scale {bad_scale!r} became non-finite; the weights of the last checkpoint were restored"
            )
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.sums["batches"] = self.sums.get("batches", 0.0) + 1
        self.progress.step_in_epoch += 1
        self.progress.global_step += 1

    def _forward(self, x, labels, teacher_logits) -> LossParts:
        arguments = (x, labels) if teacher_logits is None else (x, labels, teacher_logits)
        if not self.spec.compile:
            return self.forward(*arguments)
        try:
            return self.forward(*arguments)
        except torch._dynamo.exc.TorchDynamoException as error:  # compiler missing or op unsupported
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise QdistillError(f"train.compile: torch.compile failed ({reason}); set train.compile: false") from None

    def end_epoch(self, seconds: float) -> dict[str, Any]:
        self.sums = distributed.mean_over_ranks(self.sums)  # every rank ran as many batches (padded shards)
        batches = max(self.sums.get("batches", 1.0), 1.0)
        record = {"epoch": self.progress.epoch + 1, "loss": self.sums.get("total", 0.0) / batches,
                  "kd_loss": self.sums.get("kd", 0.0) / batches, "task_loss": self.sums.get("task", 0.0) / batches}
        for name, total in self.sums.items():
            if name.startswith("feature:"):
                record[f"{name}_loss"] = total / batches
        record["val_accuracy"] = self.validate() if self.validate else None
        record["lr"] = self.sums.get("lr", self.optimizer.param_groups[0]["lr"])
        record["seconds"] = round(seconds, 3)
        self.progress.history.append(record)
        self.progress.epoch += 1
        self.progress.step_in_epoch = 0
        self.sums = {}
        return record


def fit(module: nn.Module, loader, spec: TrainSpec, *, phase: str = "student",
        validate: Callable[[], float | None] | None = None, plan: CheckpointPlan | None = None,
        show_progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        tensorboard: str | Path | None = None) -> list[dict[str, Any]]:
    """Train ``module`` (forward ``(x, labels) -> LossParts``) and return the history per epoch.

    ``spec.dropout`` "off" trains with every dropout probability at 0 (``train.dropout``); "auto" and "on"
    leave dropout as the model has it (the recipe's "auto" is resolved by the caller, ``runs.student``).

    With ``tensorboard`` (a folder), each epoch's history record and the step sizes of
    ``module.student`` are also written there as TensorBoard scalars (the optional extra).

    Example:
        >>> from qdistill.data import make_loader
        >>> loader = make_loader(torch.randn(32, 4), torch.randint(0, 2, (32,)), 8, seed=0, shuffle=True)
        >>> history = fit(Supervised(nn.Linear(4, 2)), loader, TrainSpec(epochs=2), show_progress=False)
        >>> [record["epoch"] for record in history], sorted(history[0])[:3]
        ([1, 2], ['epoch', 'kd_loss', 'loss'])
    """
    torch.manual_seed(spec.seed)  # every rank: dropout draws the global batch's masks (distributed.global_batch_dropout)
    if distributed.active():
        loader = distributed.shard_loader(loader)
        show_progress = show_progress and distributed.is_main()
        tensorboard = tensorboard if distributed.is_main() else None
    loop = _Loop(module, loader, spec, phase, validate, plan)
    if plan is not None and plan.resume:
        loop.restore()  # every rank continues rank 0's saved generator state: the ranks share one stream
    loop.last_good = {key: value.detach().clone() for key, value in module.state_dict().items()}
    sampler = getattr(loader, "sampler", None)
    log = TensorBoardLog(tensorboard) if tensorboard is not None else None
    try:
        with distributed.global_batch_dropout(module), dropout_off(module) if spec.dropout == "off" else nullcontext(), Bar(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[loss]}"), transient=True, disable=not show_progress) as bar:
            while not loop.progress.finished and loop.progress.epoch < spec.epochs:
                _run_epoch(loop, loader, sampler, bar, _epoch_callback(on_epoch, log, module))
    finally:
        if log is not None:
            log.close()
    return loop.progress.history


def _epoch_callback(on_epoch, log: TensorBoardLog | None, module: nn.Module):
    """``on_epoch`` preceded by writing the record (and the student's step sizes) to TensorBoard."""
    if log is None:
        return on_epoch

    def callback(record: dict[str, Any]) -> None:
        log.epoch(record, getattr(module, "student", module))
        if on_epoch:
            on_epoch(record)
    return callback


def _run_epoch(loop: _Loop, loader, sampler, bar: Bar, on_epoch) -> None:
    progress, spec = loop.progress, loop.spec
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(progress.epoch)
    task = bar.add_task(f"{progress.phase} epoch {progress.epoch + 1}/{spec.epochs}", total=loop.steps_per_epoch, loss="")
    loop.module.train()
    started, skip = time.perf_counter(), progress.step_in_epoch
    for index, batch in enumerate(loader):
        if index < skip:
            continue  # done before the checkpoint this run resumed from
        loop.step(batch)
        bar.update(task, completed=progress.step_in_epoch, loss=f"loss {loop.sums['total'] / loop.sums['batches']:.4f}")
        if loop.plan and loop.plan.every_steps and progress.global_step % loop.plan.every_steps == 0:
            if progress.step_in_epoch < loop.steps_per_epoch:
                loop.save()
    record = loop.end_epoch(time.perf_counter() - started)
    bar.remove_task(task)
    target = spec.target_accuracy
    if target is not None and record["val_accuracy"] is not None and record["val_accuracy"] >= target:
        progress.finished = True
    if progress.epoch >= spec.epochs:
        progress.finished = True
    loop.save()
    if on_epoch:
        on_epoch(record)
