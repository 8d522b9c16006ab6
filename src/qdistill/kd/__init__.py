"""Knowledge distillation: KD losses, the frozen teacher, feature hints, the Distiller and the teacher-logit cache."""

from qdistill.kd.cache import CachedTeacherLoader
from qdistill.kd.distiller import Distiller
from qdistill.kd.hints import FeatureTap, make_adapter
from qdistill.kd.losses import KDLoss, LossParts, soft_kl
from qdistill.kd.teacher import freeze

__all__ = ["CachedTeacherLoader", "Distiller", "FeatureTap", "KDLoss", "LossParts", "freeze", "make_adapter", "soft_kl"]
