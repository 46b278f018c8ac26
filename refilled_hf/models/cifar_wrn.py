"""CIFAR wide residual networks (Zagoruyko & Komodakis 2016) as timm models.

The networks of the REFILLED paper's tables: a 3x3 stem with 16 channels, three groups of
``(depth - 4) / 6`` pre-activation basic blocks with 16k, 32k and 64k channels (strides
1, 2, 2), dropout between the two convolutions of every block, a final BN-ReLU and global
average pooling. ``WRN-d-k`` has ``depth = d`` and widen factor ``k``.

After ``import refilled_hf`` they are ordinary timm models::

    timm.create_model("cifar_wrn_16_2", num_classes=100)
    timm.create_model("cifar_wrn", depth=28, widen_factor=10, num_classes=10)

timm has no CIFAR-sized WRN (its ``wide_resnet*`` are ImageNet bottleneck ResNets), hence
this file.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # what timm's own models use (not re-exported)

__all__ = ["CifarWideResNet", "CIFAR100_MEAN", "CIFAR100_STD"]

#: CIFAR-100 training-set channel statistics (the paper's normalization).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus a 1x1 projection shortcut
    (taken from the activated input) when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.drop_rate = drop_rate
        self.shortcut = (
            nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd) if in_chs != out_chs or stride != 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + residual


class CifarWideResNet(nn.Module):
    """Wide ResNet for 32x32 inputs with timm's model interface.

    Args:
        depth: total depth ``d``; ``(d - 4)`` must be divisible by 6.
        widen_factor: width multiplier ``k`` (channels 16, 16k, 32k, 64k).
        num_classes: classifier outputs (0 for no classifier).
        in_chans: input channels.
        drop_rate: dropout inside every residual block (0.3 in the paper).
        global_pool: timm pooling type.
    """

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 1,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.3,
        global_pool: str = "avg",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"`depth` must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}.")
        if widen_factor < 1:
            raise ValueError(f"`widen_factor` must be >= 1, got {widen_factor}.")
        dd = {"device": device, "dtype": dtype}
        blocks = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False, **dd)
        stages, in_chs, self.feature_info = [], 16, []
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            stage = nn.Sequential(
                *[
                    PreActBasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1, drop_rate, **dd)
                    for j in range(blocks)
                ]
            )
            stages.append(stage)
            in_chs = width
            self.feature_info.append(dict(num_chs=width, reduction=2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        # the final BN-ReLU as one module (a BatchNorm2d subclass: the state dict keys are BatchNorm2d's),
        # which prune_intermediate_layers can drop as timm's pre-activation ResNets drop theirs
        self.norm = BatchNormAct2d(in_chs, act_layer=nn.ReLU, **dd)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool, **dd)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one of ``num_classes`` outputs."""
        weight = self.stem.weight
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=weight.device, dtype=weight.dtype
        )

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The outputs of the three groups (``feature_info``'s order), timm's interface.

        Args:
            x: input images ``[B, C, H, W]``.
            indices: the last ``n`` groups if an int, all if None, else the groups listed
                (negative from the end).
            norm: apply the final BN-ReLU to the last group's output when taken.
            stop_early: stop after the last group taken.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return the intermediates alone.

        Returns:
            The intermediates, or ``(final features, intermediates)``; the final features are
            ``forward_features``' unless ``stop_early`` stopped before the last group.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x)
        index = -1
        for index, stage in enumerate(stages):
            x = self._run_stage(stage, x)
            if index in take_indices:
                intermediates.append(self.norm(x) if norm and index == last else x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if index == last else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the groups after the last of ``indices`` (and the final BN-ReLU and head
        where they no longer apply); returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last group's output, and only applied to it
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the final BN-ReLU: ``[B, 64k, H/4, W/4]``."""
        return self.norm(self._run_stage(self.stages, self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling then the classifier; ``pre_logits=True`` returns the pooled embedding."""
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarWideResNet:
    return build_model_with_cfg(
        CifarWideResNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2), flatten_sequential=True),
        **kwargs,
    )


def _cfg(**kwargs) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": "stem",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "cifar_wrn": _cfg(),
        "cifar_wrn_40_2": _cfg(),
        "cifar_wrn_16_2": _cfg(),
        "cifar_wrn_40_1": _cfg(),
        "cifar_wrn_16_1": _cfg(),
    }
)


@register_model
def cifar_wrn(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """CIFAR WRN of any ``depth`` and ``widen_factor`` (defaults: WRN-16-1)."""
    return _create("cifar_wrn", pretrained, **kwargs)


@register_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-40-2 (about 2.2M parameters with 100 classes; 128-d embedding)."""
    return _create("cifar_wrn_40_2", pretrained, **dict(dict(depth=40, widen_factor=2), **kwargs))


@register_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-16-2 (about 0.70M parameters with 100 classes; 128-d embedding)."""
    return _create("cifar_wrn_16_2", pretrained, **dict(dict(depth=16, widen_factor=2), **kwargs))


@register_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-40-1 (about 0.57M parameters with 100 classes; 64-d embedding)."""
    return _create("cifar_wrn_40_1", pretrained, **dict(dict(depth=40, widen_factor=1), **kwargs))


@register_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-16-1 (about 0.18M parameters with 100 classes; 64-d embedding)."""
    return _create("cifar_wrn_16_1", pretrained, **dict(dict(depth=16, widen_factor=1), **kwargs))
