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
    local_teacher_correct,
    ncm_predict,
    relationship_loss,
    relationship_loss_with_stats,
    rkd_loss,
    semi_hard_triplets,
    teacher_confidence_weights,
)

__version__ = "0.1.0"

# The training API pulls in transformers and datasets: load it on first use, so that
# `import refilled_hf` (needed to load the CIFAR WRNs in timm) stays light.
_LAZY = {
    "RefilledConfig": "config",
    "RefilledTrainer": "trainer",
    "run_distillation": "pipeline",
    "run_teacher_training": "pipeline",
    "evaluate_model": "evaluation",
    "probe_teacher": "probe",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RefilledConfig",
    "RefilledTrainer",
    "__version__",
    "evaluate_model",
    "probe_teacher",
    "run_distillation",
    "run_teacher_training",
    "batch_class_centers",
    "class_centers",
    "embed",
    "embed_and_logits",
    "kd_loss",
    "local_classifier_loss",
    "local_teacher_correct",
    "ncm_predict",
    "relationship_loss",
    "relationship_loss_with_stats",
    "rkd_loss",
    "semi_hard_triplets",
    "teacher_confidence_weights",
]
