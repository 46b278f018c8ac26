"""The device-resident data path: a split decoded once into a ``uint8`` tensor on the
training device, and its CIFAR-style augmentation run there, in batches.

The worker path (`torch.utils.data.DataLoader` + torchvision PIL transforms) costs a
Python call chain per image; on a GPU it leaves the accelerator waiting. Here the
DataLoader only yields image *indices* (so sampling, sharding across processes,
``set_epoch`` and resuming mid-epoch stay exactly the Trainer's), and
:meth:`DeviceImages.batch` turns them into normalized pixels on the device.

The augmentation draws from the same distribution as the worker path's
``Resize -> RandomCrop(size, padding) -> RandomHorizontalFlip -> ToTensor -> Normalize``
(`refilled_hf.data.build_transform` for inputs of 64 px or less): images are resized
once, with the same PIL resize, when the store is built; each image then gets its own
crop offsets, uniform over ``[0, 2 * padding]`` on each axis of the zero-padded image,
and its own flip with probability 1/2. torchvision has batched crops and flips, but
they draw one set of parameters per call (one crop for the whole batch); per-image
parameters need the gather below, which is why it is written here.

Random draws use the device's default generator, which the Trainer saves in every
checkpoint and restores on resume, so a resumed run stays exact. Every process seeds it
alike, so each draws the parameters of the whole global batch and keeps its own rows
(:func:`draw_share`): otherwise the k-th image of every process's batch got the same crop
and flip. N processes then draw what one process draws for their global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from .data import CIFAR_STYLE_MAX_SIZE
from .distributed import processes_and_rank
from .messages import byte_size

__all__ = ["DeviceImages", "IndexedImages", "UInt8Store", "crop_and_flip", "draw_share"]


def draw_share(draw: Callable[[int], torch.Tensor], count: int) -> torch.Tensor:
    """This process's ``count`` rows of ``draw(count x processes)``, a random draw for the
    global batch (every process's batch of ``count`` images, in rank order, as Accelerate
    shards the sampler's batches). Every process draws alike from identically seeded
    generators, which stay in step; a single process draws ``draw(count)``."""
    processes, rank = processes_and_rank()
    if processes == 1:
        return draw(count)
    return draw(count * processes)[rank * count : (rank + 1) * count]


def crop_and_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Per-image crops of the zero-padded ``images`` ``[B, C, S, S]`` at offsets
    ``(top, left)`` (each in ``[0, 2 * padding]``), mirrored where ``flip``.

    One ``gather`` over each padded image's flattened pixels, at the linear position of
    every output pixel: 4-5x faster on a CPU than indexing with four broadcast index
    tensors (``benchmarks/augmentation.py``), with the same pixels."""
    count, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    padded_size = size + 2 * padding
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    steps = torch.arange(size, device=images.device)
    rows = top[:, None] + steps  # [B, S]
    columns = left[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)  # [B, S]
    position = (rows[:, :, None] * padded_size + columns[:, None, :]).view(count, 1, size * size)
    crops = padded.reshape(count, channels, padded_size * padded_size).gather(
        2, position.expand(count, channels, size * size)
    )
    return crops.view(count, channels, size, size)


class UInt8Store:
    """``uint8`` images kept on ``device``, with the worker path's ``ToTensor`` +
    ``Normalize``: what both device-path stores (:class:`DeviceImages`, and
    :class:`~refilled_hf.data_device_timm.DeviceResizedCrops` for inputs over 64 px) share.

    Args:
        images: ``uint8 [N, 3, H, W]``.
        mean, std: per-channel normalization (of pixel values in ``[0, 1]``).
    """

    def __init__(self, images: torch.Tensor, mean, std, device: torch.device | str):
        self.images = images.to(device)
        self.device = self.images.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def __len__(self) -> int:
        return self.images.shape[0]

    def draw_flips(self, count: int, enabled: bool) -> torch.Tensor:
        """``bool [count]``: a horizontal flip with probability 1/2 each where ``enabled``,
        none otherwise (the device's RNG)."""
        if enabled:
            return draw_share(lambda n: torch.rand(n, device=self.device), count) < 0.5
        return torch.zeros(count, dtype=torch.bool, device=self.device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` images (or float32 whole levels) -> normalized ``float32`` pixels:
        ``(x / 255 - mean) / std``, the worker path's ``ToTensor`` + ``Normalize``, in place
        on a new ``float32`` copy."""
        return images.to(torch.float32, copy=True).div_(255.0).sub_(self.mean).div_(self.std)


class DeviceImages(UInt8Store):
    """A split's images as ``uint8 [N, 3, S, S]`` on ``device``, with the normalization
    (and, for training, the crop padding and flip) of the worker path.

    Args:
        images: ``uint8 [N, 3, S, S]`` already at the input size.
        mean, std: per-channel normalization (of pixel values in ``[0, 1]``).
        padding: random-crop padding (0: no crop); flip: random horizontal flips.
    """

    def __init__(self, images: torch.Tensor, mean, std, *, padding: int, flip: bool, device: torch.device | str):
        super().__init__(images, mean, std, device)
        self.padding = int(padding)
        self.flip = bool(flip)

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], size: int, mean, std, *, padding: int, flip: bool, device):
        """Build the store from decoded ``HxWx3`` arrays, resized to ``size`` with the
        worker path's own ``T.Resize`` (so the stored pixels are the same)."""
        resize = T.Resize((size, size))
        stacked = np.stack([np.asarray(resize(Image.fromarray(a))) for a in arrays])
        return cls(torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), mean, std, padding=padding,
                   flip=flip, device=device)  # fmt: skip

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random crop offsets and flips for ``count`` images (the device's RNG)."""
        span = 2 * self.padding + 1
        top = draw_share(lambda n: torch.randint(0, span, (n,), device=self.device), count)
        left = draw_share(lambda n: torch.randint(0, span, (n,), device=self.device), count)
        return top, left, self.draw_flips(count, self.flip)

    def batch(self, index: torch.Tensor, augment: bool) -> torch.Tensor:
        """Normalized ``float32 [B, 3, S, S]`` pixels of the images at ``index``."""
        if augment and (self.padding or self.flip):
            return self.augmented(index)[0]
        return self.normalize(self.select(index))

    def augmented(self, index: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Augmented, normalized pixels of the images at ``index`` and the draws that made
        them: ``(pixels, (top, left, flip))``."""
        images = self.select(index)
        draws = self.draw(images.shape[0])
        return self.normalize(crop_and_flip(images, *draws, self.padding)), draws

    def select(self, index: torch.Tensor) -> torch.Tensor:
        """The stored ``uint8`` images at ``index`` (``index_select``: on a CPU about 10x
        faster than indexing the 4-d store with a tensor, same pixels)."""
        return self.images.index_select(0, index.to(self.device))


class IndexedImages(torch.utils.data.Dataset):
    """What the DataLoader sees on the device path: ``{"index": i, "labels": y}`` items;
    the trainer turns index batches into pixels with ``images.batch(index, augment)``."""

    def __init__(self, images: DeviceImages, labels: np.ndarray, augment: bool):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "labels": int(self.labels[index])}

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        return self.images.batch(index, self.augment)


def choose_and_place(data, pretrained_cfg: dict[str, Any], *, mode: str, flip: bool, device, budget_bytes: float,
                     train_transform, eval_transform, augment_train: bool = True):  # fmt: skip
    """Decide the data path for ``data`` (a :class:`~refilled_hf.data.ClassificationData`
    with its images preloaded) and, for the device path, replace its splits by
    :class:`IndexedImages` on ``device``. Returns ``(path, reason)``.

    Inputs of 64 px or less get the CIFAR-style store (:class:`DeviceImages`); larger
    inputs the store of timm's ImageNet transforms
    (:class:`~refilled_hf.data_device_timm.DeviceResizedCrops`), read from
    ``train_transform`` / ``eval_transform`` (the worker path's). ``mode`` is ``auto``,
    ``device`` or ``workers``; ``device`` raises ``ValueError`` (with the reason) where the
    device path does not apply. ``augment_train=False``: the training split is only read
    unaugmented (probe-teacher's class centres), and the reason says so.
    """
    if mode == "workers":
        return "workers", "--data_path workers"
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    size = int(data_cfg["input_size"][-1])
    splits = {name: getattr(data, name) for name in ("train", "validation", "test") if getattr(data, name) is not None}
    plan, reason, what = None, None, "random crop and flip"
    if size > CIFAR_STYLE_MAX_SIZE:
        from .data_device_timm import plan_from_transforms

        plan, what = plan_from_transforms(train_transform, eval_transform)
        if plan is None:
            reason = f"for inputs of {size} px, {what}, which the device path does not do"
        elif mode == "auto" and torch.device(device).type == "cpu":
            # measured (benchmarks/imagenet_transforms.py): on a CPU, Pillow's SIMD code in the
            # workers beats the batched float64 resampling; on an accelerator the device path wins
            reason = (f"on a CPU, timm's PIL transforms for {size}-px inputs run faster than the device path's "
                      "batched ones (--data_path device forces the device path)")  # fmt: skip
    if reason is None and any(getattr(split, "_decoded", None) is None for split in splits.values()):
        reason = "the decoded images are too large to keep in memory"
    if reason is None:
        need = sum(_store_bytes(split._decoded, size, plan) for split in splits.values())
        if need > budget_bytes:
            reason = f"the splits need {need / 2**30:.2f} GiB, over --device_data_budget_gb {budget_bytes / 2**30:g}"
    if reason is not None:
        if mode == "device":
            raise ValueError(f"--data_path device cannot be used: {reason}. Use --data_path workers (or auto).")
        return "workers", reason
    for name, split in splits.items():
        setattr(data, name, IndexedImages(_store(split._decoded, size, plan, data_cfg, flip, name, device),
                                          split.labels, augment=name == "train" and augment_train))  # fmt: skip
    augmented = "train" in splits and augment_train
    done = f"augmented there ({what})" if augmented else "transformed there (no augmentation)"
    return "device", f"{byte_size(need)} of uint8 images on {torch.device(device)}, {done}"


def _store_bytes(arrays: list[np.ndarray], size: int, plan) -> int:
    if plan is None:
        return len(arrays) * 3 * size * size
    from .data_device_timm import DeviceResizedCrops

    return DeviceResizedCrops.store_bytes(arrays)


def _store(arrays, size: int, plan, data_cfg, flip: bool, split: str, device):
    if plan is not None:
        from .data_device_timm import DeviceResizedCrops

        return DeviceResizedCrops.from_arrays(arrays, plan, device)
    train = split == "train"
    return DeviceImages.from_arrays(arrays, size, data_cfg["mean"], data_cfg["std"], padding=max(1, size // 8) if train
                                    else 0, flip=flip and train, device=device)  # fmt: skip
