"""Knowledge distillation: KD losses, the frozen teacher, feature hints, the Distiller, the teacher-logit cache and
the mixing of unlabeled transfer data."""

from qdistill.kd.cache import CachedTeacherLoader
from qdistill.kd.distiller import Distiller
from qdistill.kd.hints import FeatureTap, make_adapter
from qdistill.kd.losses import UNLABELED, KDLoss, LossParts, soft_kl, soft_kl_each
from qdistill.kd.mixing import MixedLoader, mix
from qdistill.kd.teacher import freeze

__all__ = ["UNLABELED", "CachedTeacherLoader", "Distiller", "FeatureTap", "KDLoss", "LossParts", "MixedLoader", "freeze",
           "make_adapter", "mix", "soft_kl", "soft_kl_each"]
