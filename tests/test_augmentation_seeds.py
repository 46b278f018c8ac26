"""The worker path's per-image seeding of the augmentation (refilled_hf.augmentation_seeds)."""

from __future__ import annotations

import random

import numpy as np
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T

from refilled_hf.augmentation_seeds import SeededAugmentation


def _transform():
    """Draws from all three global generators: timm's crop from Python's, torchvision's flip and
    jitter from torch's, and a NumPy draw (as timm's RandAugment makes) added to the pixels."""
    return T.Compose([
        timm.data.transforms.RandomResizedCropAndInterpolation(24),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.4, 0.4, 0.4),
        T.PILToTensor(),
        T.Lambda(lambda x: x + int(np.random.randint(0, 100))),
    ])  # fmt: skip


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def test_an_image_gets_the_same_draws_for_the_same_seed_stage_epoch_and_index_whatever_ran_before():
    image, augmentation = _image(), SeededAugmentation(_transform(), seed=7, stream="stage2")
    augmentation.set_epoch(3)
    first = augmentation(image, 5)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # another process's state, or other draws before
    [torch.rand(10), random.random(), np.random.rand()]
    again = SeededAugmentation(_transform(), seed=7, stream="stage2")
    again.set_epoch(3)
    assert torch.equal(again(image, 5), first)
    others = []
    for seed, stream, epoch, index in [
        (8, "stage2", 3, 5),
        (7, "stage1", 3, 5),
        (7, "stage2", 4, 5),
        (7, "stage2", 3, 6),
    ]:
        other = SeededAugmentation(_transform(), seed=seed, stream=stream)
        other.set_epoch(epoch)
        others.append(other(image, index))
    assert not any(torch.equal(o, first) for o in others)  # each of seed, stage, epoch and image changes the draws


def test_the_calling_process_keeps_its_own_draws():
    """A training process that transforms its batches itself (no loader workers) draws its
    dropout and the rest from its generators as if no image had been transformed."""
    augmentation = SeededAugmentation(_transform(), seed=0, stream="ce")
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    augmentation(_image(), 0)
    assert (
        torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    )


def test_the_epoch_is_shared_with_worker_processes():
    """Set in the training process as each epoch starts, read by persistent workers too."""
    augmentation = SeededAugmentation(_transform(), seed=0, stream="ce")
    assert augmentation.epoch.is_shared()
    seeds = {augmentation.item_seed(0)}
    augmentation.set_epoch(1)
    seeds.add(augmentation.item_seed(0))
    assert len(seeds) == 2 and all(0 <= s < 2**64 for s in seeds)


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, augmentation: SeededAugmentation):
        self.augmentation, self.images = augmentation, [_image(i) for i in range(6)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.augmentation(self.images[index], index)


def test_loader_workers_draw_what_the_training_process_draws():
    """In a worker the generators are only seeded (nothing else draws from them there); in the
    training process they are also given back: the same pixels either way."""
    augmentation = SeededAugmentation(_transform(), seed=3, stream="stage1")
    augmentation.set_epoch(2)
    dataset = _Augmented(augmentation)
    here = [dataset[i] for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, shuffle=False,
                                         multiprocessing_context="fork")  # fmt: skip
    assert all(torch.equal(batch[0], image) for batch, image in zip(loader, here, strict=True))
