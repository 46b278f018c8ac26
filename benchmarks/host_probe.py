"""``host_probe``: a timm model with almost no compute (one strided 4x4 convolution to 8
channels, average pooling, a linear head), registered with timm on import, so that a
training step's time is the host's own work: the Python and kernel launches around the
model that the pipeline adds to a bare loop. On a GPU at batch 128 the steps of the
CIFAR wide ResNets are launch-bound, so this host work sets their pace; on this CPU it
is hidden under the convolutions' compute, and this model makes it visible.

It follows timm's model interface (``forward_features``, ``forward_head(pre_logits=)``,
``get_classifier``, ``reset_classifier``, a ``pretrained_cfg`` with the CIFAR input size
and normalization), so the pipeline runs it like any student or teacher.
"""

from __future__ import annotations

import torch
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from refilled_hf.models.cifar_wrn import _cfg

WIDTH = 8


class HostProbe(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg", **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, WIDTH, 4, stride=4)
        self.num_features = self.head_hidden_size = WIDTH
        self.global_pool, self.fc = create_classifier(WIDTH, num_classes, pool_type=global_pool)

    def get_classifier(self, name_only: bool = False):
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(WIDTH, num_classes, pool_type=global_pool or "avg")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"host_probe": _cfg(first_conv="stem", pool_size=(8, 8))})


@register_model
def host_probe(pretrained: bool = False, **kwargs) -> HostProbe:
    """The host-overhead probe (about 1,000 parameters with 10 classes)."""
    return build_model_with_cfg(HostProbe, "host_probe", pretrained, **kwargs)
