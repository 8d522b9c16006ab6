"""Knowledge distillation: KD losses, the frozen teacher, feature hints and the Distiller."""

from qdistill.distill.losses import KDLoss, LossParts, soft_kl
from qdistill.distill.teacher import Distiller, freeze

__all__ = ["Distiller", "KDLoss", "LossParts", "freeze", "soft_kl"]
