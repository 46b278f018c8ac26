"""The device data path for inputs over 64 px: timm's ImageNet transforms, batched on the
training device with per-image random parameters.

For those inputs the worker path runs timm's ``create_transform`` on PIL images:
``RandomResizedCropAndInterpolation -> RandomHorizontalFlip -> ColorJitter -> ToTensor ->
Normalize`` for training, ``Resize(shorter side) -> CenterCrop -> ToTensor -> Normalize``
for evaluation. :class:`DeviceResizedCrops` keeps the decoded images once, at their own
size, as ``uint8`` on the device (a 32-px CIFAR image trained at 224 px is stored at
32 px), and makes each batch there:

* the crop boxes are drawn by timm's algorithm (ten tries of a scale and a log-uniform
  aspect ratio, then the central fallback), vectorized over the batch;
* each box is resampled with Pillow's own arithmetic (:mod:`refilled_hf.pil_ops`), so for
  the same box, flip and jitter factors the pixels are the worker path's, bit for bit;
* the flips, the jitter factors and the jitter order (a random permutation per image, as
  torchvision's ``ColorJitter``) are drawn per image.

The evaluation transform is deterministic and reproduced exactly. The transforms are read
from the worker path's own ``Compose`` (:func:`plan_from_transforms`): anything the device
path does not reproduce (random interpolation, hue jitter, auto-augment, random erasing,
...) leaves the run on the worker path, and the log says which transform it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL
import torch
from torchvision import transforms as T

from .data_device import UInt8Store, draw_share
from .pil_ops import FILTERS, blend, luma, resample, resize_weights, rounded_mean

__all__ = ["DeviceResizedCrops", "TimmTransformPlan", "plan_from_transforms", "sample_resized_crops"]

#: Pillow 13 runs the vertical pass first where it shrinks the height much more than the
#: width (``ImagingResampleInner``); earlier versions always start with the horizontal one.
PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


Range = tuple[float, float]


@dataclass(frozen=True)
class TimmTransformPlan:
    """What the device path reproduces of a timm train / eval transform pair."""

    size: int
    interpolation: str
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool
    jitter: tuple[Range, Range, Range] | None  # brightness, contrast, saturation factor ranges
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_resize: tuple[int, ...]  # (shorter side,) or (height, width)
    eval_interpolation: str
    eval_crop: int


def _interpolation_name(mode: Any) -> str | None:
    name = getattr(mode, "value", mode)
    return name if isinstance(name, str) and name in FILTERS else None


def _normalize_steps(steps: list, where: str) -> tuple[tuple[float, ...], tuple[float, ...]] | str:
    if (
        len(steps) != 2
        or type(steps[0]).__name__ not in ("ToTensor", "MaybeToTensor")
        or not isinstance(steps[1], T.Normalize)
    ):
        return f"the {where} transform does not end in ToTensor + Normalize"
    return tuple(float(v) for v in steps[1].mean), tuple(float(v) for v in steps[1].std)


def plan_from_transforms(train: T.Compose, evaluation: T.Compose) -> tuple[TimmTransformPlan | None, str]:
    """Read timm's train and eval ``Compose`` into a :class:`TimmTransformPlan`, or say
    (second item) which step the device path does not reproduce."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    steps = list(getattr(train, "transforms", [train]))
    if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
        return None, f"the training transform starts with {type(steps[0]).__name__ if steps else 'nothing'}"
    crop = steps.pop(0)
    interpolation = _interpolation_name(crop.interpolation)
    if interpolation is None or crop.size[0] != crop.size[1]:
        return None, f"the random-resized crop uses {crop.interpolation} interpolation or a non-square size"
    flip = False
    if steps and isinstance(steps[0], T.RandomHorizontalFlip):
        if steps[0].p != 0.5:
            return None, f"the horizontal flip has p={steps[0].p} (the device path flips with p=0.5)"
        flip = True
        steps.pop(0)
    jitter = None
    if steps and isinstance(steps[0], T.ColorJitter):
        if steps[0].hue is not None:
            return None, "the colour jitter changes hue"
        jitter = tuple(tuple(r) if r is not None else (1.0, 1.0) for r in (steps[0].brightness, steps[0].contrast,
                                                                             steps[0].saturation))  # fmt: skip
        steps.pop(0)
    normalize = _normalize_steps(steps, "training")
    if isinstance(normalize, str):
        known = ("ToTensor", "MaybeToTensor", "Normalize")
        names = ", ".join(type(s).__name__ for s in steps if type(s).__name__ not in known)
        return None, f"the training transform has {names or 'its steps in another order'}"

    eval_steps = list(getattr(evaluation, "transforms", [evaluation]))
    if len(eval_steps) != 4 or not isinstance(eval_steps[0], T.Resize) or not isinstance(eval_steps[1], T.CenterCrop):
        return None, "the evaluation transform is not Resize -> CenterCrop -> ToTensor -> Normalize"
    resize, center = eval_steps[0], eval_steps[1]
    eval_interpolation = _interpolation_name(resize.interpolation)
    resize_size = (resize.size,) if isinstance(resize.size, int) else tuple(resize.size)
    crop_size = tuple(center.size)
    if eval_interpolation is None or resize.max_size is not None or crop_size != (crop.size[0], crop.size[0]):
        return None, "the evaluation resize uses nearest interpolation, a max_size, or another crop size"
    if _normalize_steps(eval_steps[2:], "evaluation") != normalize:
        return None, "the evaluation transform normalizes differently"
    plan = TimmTransformPlan(
        size=int(crop.size[0]), interpolation=interpolation, scale=tuple(crop.scale), ratio=tuple(crop.ratio),
        flip=flip, jitter=jitter, mean=normalize[0], std=normalize[1],
        eval_resize=tuple(int(v) for v in resize_size), eval_interpolation=eval_interpolation,
        eval_crop=int(crop.size[0]),
    )  # fmt: skip
    return plan, "timm's random-resized crop" + (", flip" if flip else "") + (", colour jitter" if jitter else "")


def sample_resized_crops(heights: torch.Tensor, widths: torch.Tensor, scale, ratio, tries: int = 10):
    """timm's ``RandomResizedCropAndInterpolation.get_params`` for a batch of images of
    ``heights`` x ``widths`` (int tensors ``[B]``): ``(top, left, height, width)``.

    Each image gets ``tries`` draws of an area fraction, uniform over ``scale``, and an
    aspect ratio, log-uniform over ``ratio``; the first draw whose box fits is used, with
    uniform offsets; an image where none fits gets timm's central fallback crop."""
    device = heights.device
    count = heights.shape[0]
    height = heights.to(torch.float64)[:, None]
    width = widths.to(torch.float64)[:, None]
    area = height * width

    def uniform(*shape: int) -> torch.Tensor:  # this process's rows of the global batch's draw
        return draw_share(lambda n: torch.rand(n, *shape, device=device, dtype=torch.float64), count)

    target = area * (scale[0] + (scale[1] - scale[0]) * uniform(tries))
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * uniform(tries))
    box_w = torch.sqrt(target * aspect).round()
    box_h = torch.sqrt(target / aspect).round()
    fits = (box_w <= width) & (box_h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first fitting try (0 where none fits)
    found = fits.any(dim=1)
    box_w, box_h = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0]
    height, width = height[:, 0], width[:, 0]
    top = torch.floor(uniform() * (height - box_h + 1))
    left = torch.floor(uniform() * (width - box_w + 1))
    # the fallback: the largest central box whose aspect ratio is within `ratio`
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fall_w = torch.where(wide, torch.round(height * max(ratio)), width)
    fall_h = torch.where(narrow, torch.round(width / min(ratio)), height)
    fall_top = torch.div(height - fall_h, 2, rounding_mode="floor")
    fall_left = torch.div(width - fall_w, 2, rounding_mode="floor")

    def pick(drawn: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        return torch.where(found, drawn, fallback).to(torch.int64)

    # a box of 0 px (only for images of a few pixels) would have no pixels: take 1
    return (
        pick(top, fall_top),
        pick(left, fall_left),
        pick(box_h, fall_h).clamp(min=1),
        pick(box_w, fall_w).clamp(min=1),
    )


def _eval_geometry(height: int, width: int, plan: TimmTransformPlan) -> tuple[int, int, int, int]:
    """torchvision's ``Resize`` output size and ``CenterCrop`` offsets (negative: padding)
    for one image: ``(resized_h, resized_w, top, left)``."""
    if len(plan.eval_resize) == 1:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = plan.eval_resize[0], int(plan.eval_resize[0] * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = plan.eval_resize
    crop = plan.eval_crop

    def offset(size: int) -> int:
        return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))

    return new_h, new_w, offset(new_h), offset(new_w)


class DeviceResizedCrops(UInt8Store):
    """A split's images as ``uint8`` on ``device`` at their own sizes (zero-padded to the
    largest), made into batches by timm's ImageNet transforms (:class:`TimmTransformPlan`).

    Args:
        images: ``uint8 [N, 3, H, W]``; image ``i`` fills ``[:sizes[i, 0], :sizes[i, 1]]``.
        sizes: ``int64 [N, 2]`` heights and widths.
        plan: the transforms; augment: whether training batches are augmented.
    """

    def __init__(self, images: torch.Tensor, sizes: torch.Tensor, plan: TimmTransformPlan, device):
        super().__init__(images, plan.mean, plan.std, device)
        self.sizes = sizes.to(self.device)
        self.plan = plan
        geometry = [_eval_geometry(int(h), int(w), plan) for h, w in sizes.tolist()]
        self.eval_geometry = torch.tensor(geometry, dtype=torch.int64, device=self.device).view(-1, 4)
        tallest = int(sizes[:, 0].max()) if len(sizes) else 0
        # Can any image's vertical pass come first (Pillow 13, height shrunk)? Else skip that order.
        self._train_may_start_vertical = PILLOW_VERTICAL_FIRST and tallest > plan.size
        self._eval_may_start_vertical = PILLOW_VERTICAL_FIRST and bool(
            (sizes[:, 0] > self.eval_geometry[:, 0].cpu()).any()
        )

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], plan: TimmTransformPlan, device) -> DeviceResizedCrops:
        """Build the store from decoded ``HxWx3`` arrays, kept at their own size."""
        sizes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64).view(-1, 2)
        height, width = (int(sizes[:, 0].max()), int(sizes[:, 1].max())) if len(arrays) else (1, 1)
        canvas = np.zeros((len(arrays), height, width, 3), dtype=np.uint8)
        for i, array in enumerate(arrays):
            canvas[i, : array.shape[0], : array.shape[1]] = array
        canvas = torch.from_numpy(canvas).permute(0, 3, 1, 2).contiguous()
        return cls(canvas, sizes, plan, device)

    @staticmethod
    def store_bytes(arrays: list[np.ndarray]) -> int:
        """Bytes :meth:`from_arrays` would keep for ``arrays`` (padded to the largest)."""
        if not arrays:
            return 0
        return len(arrays) * 3 * max(a.shape[0] for a in arrays) * max(a.shape[1] for a in arrays)

    def select(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.device)
        return self.images.index_select(0, index), self.sizes.index_select(0, index)

    def batch(self, index: torch.Tensor, augment: bool) -> torch.Tensor:
        """Normalized ``float32 [B, 3, size, size]`` pixels of the images at ``index``:
        the training transform where ``augment``, else the evaluation transform."""
        parts = index.split(self.chunk)  # bounds the float64 temporaries of large batches or images
        make = (lambda part: self.augmented(part)[0]) if augment else self.evaluated
        return make(index) if len(parts) == 1 else torch.cat([make(part) for part in parts])

    @property
    def chunk(self) -> int:
        """Images resampled at once: their float64 passes take at most about 256 MiB."""
        height, width, size = self.images.shape[2], self.images.shape[3], self.plan.size
        per_image = 8 * 3 * (height * width + 2 * max(height, width) * size + 2 * size * size)
        return max(1, (256 << 20) // per_image)

    def evaluated(self, index: torch.Tensor) -> torch.Tensor:
        """The evaluation transform: resize (shorter side), centre crop, normalize."""
        images, sizes = self.select(index)
        resized_h, resized_w, top, left = self.eval_geometry.index_select(0, index.to(self.device)).unbind(1)
        crop, zero = self.plan.eval_crop, torch.zeros_like(top)
        rows = resize_weights(zero, sizes[:, 0], resized_h, crop, top, images.shape[2], self.plan.eval_interpolation)
        columns = resize_weights(zero, sizes[:, 1], resized_w, crop, left, images.shape[3],
                                 self.plan.eval_interpolation)  # fmt: skip
        vertical_first = self._vertical_first(sizes, resized_h, resized_w) if self._eval_may_start_vertical else None
        return self.normalize(resample(images, rows, columns, vertical_first))

    def draw(self, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Random parameters for images of ``sizes``: crop boxes, flips, jitter factors and orders."""
        count = sizes.shape[0]
        top, left, height, width = sample_resized_crops(sizes[:, 0], sizes[:, 1], self.plan.scale, self.plan.ratio)
        draws = {"top": top, "left": left, "height": height, "width": width}
        draws["flip"] = self.draw_flips(count, self.plan.flip)
        if self.plan.jitter is not None:
            low = torch.tensor([r[0] for r in self.plan.jitter], device=self.device)
            high = torch.tensor([r[1] for r in self.plan.jitter], device=self.device)
            draws["factors"] = low + (high - low) * draw_share(lambda n: torch.rand(n, 3, device=self.device), count)
            draws["order"] = draw_share(lambda n: torch.rand(n, 3, device=self.device), count).argsort(dim=1)
        return draws

    def augmented(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training transform of the images at ``index`` and the draws that made it."""
        images, sizes = self.select(index)
        draws = self.draw(sizes)
        return self.normalize(self.apply(images, draws)), draws

    def apply(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training pixels (whole levels, ``uint8`` or float32) of ``images`` under given
        ``draws`` (see :meth:`draw`), before normalization."""
        size, interpolation = self.plan.size, self.plan.interpolation
        full = torch.full_like(draws["top"], size)
        zero = torch.zeros_like(draws["top"])
        rows = resize_weights(draws["top"], draws["height"], full, size, zero, images.shape[2], interpolation)
        columns = resize_weights(draws["left"], draws["width"], full, size, zero, images.shape[3], interpolation)
        columns = torch.where(draws["flip"][:, None, None], columns.flip(1), columns)
        crop_sizes = torch.stack([draws["height"], draws["width"]], dim=1)
        vertical_first = self._vertical_first(crop_sizes, full, full) if self._train_may_start_vertical else None
        pixels = resample(images, rows, columns, vertical_first)
        if "factors" in draws:
            pixels = jitter(pixels, draws["factors"], draws["order"])
        return pixels

    @staticmethod
    def _vertical_first(sizes: torch.Tensor, out_h: torch.Tensor, out_w: torch.Tensor) -> torch.Tensor:
        """Pillow 13's choice of pass order, per image (in: ``sizes``; out: ``out_h x out_w``)."""
        shrink_h, shrink_w = sizes[:, 0] - out_h, sizes[:, 1] - out_w
        return (shrink_h > 0) & (shrink_h > 2 * shrink_w)


def jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` (brightness, contrast, saturation; no hue) on PIL
    images, per image: ``factors[:, k]`` is operation ``k``'s factor, ``order[:, j]`` the
    operation applied ``j``-th. Each step is one Pillow blend against the operation's
    degenerate image (black, the rounded mean luma, the luma). ``uint8`` in, float32
    whole levels out."""
    levels = images.to(torch.float32)
    for step in range(order.shape[1]):
        op = order[:, step].view(-1, 1, 1, 1)
        grey = luma(levels)
        degenerate = torch.where(op == 0, 0.0, torch.where(op == 1, rounded_mean(grey), grey))
        levels = blend(degenerate, levels, factors.gather(1, order[:, step : step + 1])[:, 0])
    return levels
