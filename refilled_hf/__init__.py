"""refilled-hf: REFILLED knowledge distillation for timm models with the Hugging Face Trainer.

Importing the package registers its CIFAR wide ResNets with timm.
"""

from . import models  # noqa: F401  (registers the timm models)
from .backbone import embed, embed_and_logits
from .losses import (
    batch_class_centers,
    class_centers,
    kd_loss,
    local_classifier_loss,
    ncm_predict,
    relationship_loss,
    relationship_loss_with_stats,
    rkd_loss,
    semi_hard_triplets,
    teacher_confidence_weights,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "batch_class_centers",
    "class_centers",
    "embed",
    "embed_and_logits",
    "kd_loss",
    "local_classifier_loss",
    "ncm_predict",
    "relationship_loss",
    "relationship_loss_with_stats",
    "rkd_loss",
    "semi_hard_triplets",
    "teacher_confidence_weights",
]
