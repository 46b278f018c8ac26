"""Any timm model as an embedder: the pooled pre-logits embedding REFILLED works on."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["embed", "embed_and_logits"]


def _check_timm_interface(model: nn.Module) -> None:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(
            f"{type(model).__name__} has no `forward_features`/`forward_head`: pass a timm model "
            "(timm.create_model(...)), whose pooled pre-logits embedding REFILLED uses."
        )


def _flatten(x: torch.Tensor) -> torch.Tensor:
    # Models built with global_pool="" return unpooled maps from forward_head(pre_logits=True).
    return x.flatten(1) if x.dim() > 2 else x


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits embedding ``[B, num_features]`` of any timm model:
    ``model.forward_head(model.forward_features(x), pre_logits=True)``."""
    _check_timm_interface(model)
    return _flatten(model.forward_head(model.forward_features(images), pre_logits=True))


def embed_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding and logits from one pass through the trunk (the head runs twice; it is
    cheap and running it twice is correct for every timm head, including those with a
    norm or dropout before the classifier)."""
    _check_timm_interface(model)
    features = model.forward_features(images)
    return _flatten(model.forward_head(features, pre_logits=True)), model.forward_head(features)
