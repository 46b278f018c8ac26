"""The worker path's augmentation draws, seeded per image: by the run's seed, the stage, the
epoch and the image, rather than by whichever process transforms it and what it drew before.

torchvision's and timm's PIL transforms draw from the global generators (torch's CPU
generator, Python's ``random``, NumPy's) of the process that runs them: the training
process, or each DataLoader worker, seeded once per epoch. A run's draws then depended on its
number of loader workers, and a resume from a checkpoint taken mid-epoch (a SIGTERM's, or
``--save_strategy steps``) was not exact even without workers: the loader reads a batch ahead,
so the generators a checkpoint saves have already drawn the next batch's augmentation.
Seeding each image's draws from ``(seed, stage, epoch, index)`` makes them the same wherever
and whenever the image is transformed: any worker count, and every resume point. (The device
path draws in the training step, from the generators every checkpoint saves.)

Hand-written: torchvision and timm take no generator argument, and
``torch.random.fork_rng`` covers torch's generators only.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["SeededAugmentation"]

_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """splitmix64's finalizer: nearby inputs give unrelated 64-bit outputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class SeededAugmentation:
    """Runs ``transform`` on an image with the global generators seeded for ``(seed, stream,
    epoch, index)``, and gives the calling process its own generators back afterwards (a
    training process that transforms its batches itself keeps drawing its dropout as
    before). ``stream`` names the stage (``stage1``, ``stage2``, ``ce``, ...), so that two
    stages do not draw the same crops; ``epoch`` is shared memory that the trainer sets as
    each epoch starts, read by every worker, persistent ones too."""

    def __init__(self, transform: Callable[[Any], Any], seed: int, stream: str):
        self.transform = transform
        self.base = _mix(_mix(int(seed)) ^ zlib.crc32(stream.encode()))
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    def item_seed(self, index: int) -> int:
        return _mix(_mix(self.base ^ int(self.epoch)) ^ int(index))

    def __call__(self, image: Any, index: int) -> Any:
        seed = self.item_seed(index)
        if torch.utils.data.get_worker_info() is not None:  # a loader worker: its generators serve this alone
            _seed_generators(seed)
            return self.transform(image)
        # (NumPy's state costs about 60 us an image to save and restore: paid only here, in a
        # training process that transforms its batches itself, which is then CPU-bound anyway)
        saved = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
        _seed_generators(seed)
        try:
            return self.transform(image)
        finally:
            torch.random.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _seed_generators(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed: every GPU's too)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
