"""Training: the loop (``fit``), optimisers and schedules, and checkpoints that resume bit for bit."""

from qdistill.train.allocator import keep_freed_memory
from qdistill.train.checkpoint import Progress, find_checkpoint, load_checkpoint, save_checkpoint
from qdistill.train.loop import CheckpointPlan, Supervised, fingerprint, fit
from qdistill.train.optim import lr_factor, make_optimizer, make_scheduler

__all__ = ["CheckpointPlan", "Progress", "Supervised", "find_checkpoint", "fingerprint", "fit", "keep_freed_memory", "load_checkpoint",
           "lr_factor", "make_optimizer", "make_scheduler", "save_checkpoint"]
