"""The device data path draws from the worker path's augmentation distribution: the same
162 crops x flips of each image (padding 4 at 32 px), each equally likely, and the same
normalized pixels for each of them; the pipeline chooses a path and says which."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_recipe
from PIL import Image
from scipy.stats import chisquare
from torchvision import transforms as T

from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.data import build_transform
from refilled_hf.data_device import DeviceImages, IndexedImages, crop_and_flip
from refilled_hf.data_device_timm import DeviceResizedCrops, plan_from_transforms
from refilled_hf.pipeline import load_data, run_distillation

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _image(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _all_variants(store: DeviceImages) -> torch.Tensor:
    """Every crop x flip of image 0 of ``store``, normalized: ``[(2p+1)^2 * 2, 3, S, S]``."""
    span = 2 * store.padding + 1
    top, left, flip = torch.meshgrid(torch.arange(span), torch.arange(span), torch.arange(2), indexing="ij")
    n = top.numel()
    images = store.images[torch.zeros(n, dtype=torch.long)]
    crops = crop_and_flip(images, top.reshape(-1), left.reshape(-1), flip.reshape(-1).bool(), store.padding)
    return (crops.float() / 255.0 - store.mean) / store.std


def test_each_crop_and_flip_equals_the_worker_path_ops():
    array, padding = _image(16), 2
    store = DeviceImages.from_arrays([array], 16, MEAN, STD, padding=padding, flip=True, device="cpu")
    variants = _all_variants(store)
    pil = Image.fromarray(array)
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    k = 0
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            for flip in (False, True):
                expected = T.functional.crop(T.functional.pad(pil, padding), top, left, 16, 16)
                if flip:
                    expected = T.functional.hflip(expected)
                torch.testing.assert_close(variants[k], to_tensor(expected), rtol=0, atol=1e-6)
                k += 1


def test_each_image_of_a_batch_gets_its_own_crop_and_flip():
    """Distinct images with their own offsets and flips, against a per-image slicing loop
    (the test above sees one image only, so it cannot catch pixels taken from another)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 10, 10), dtype=torch.uint8, generator=generator)
    padding = 3
    top = torch.randint(0, 2 * padding + 1, (12,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (12,), generator=generator)
    flip = torch.rand(12, generator=generator) < 0.5
    crops = crop_and_flip(images, top, left, flip, padding)
    for i in range(12):
        padded = torch.zeros(3, 16, 16, dtype=torch.uint8)
        padded[:, padding : padding + 10, padding : padding + 10] = images[i]
        expected = padded[:, int(top[i]) : int(top[i]) + 10, int(left[i]) : int(left[i]) + 10]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(crops[i], expected), f"image {i}"


def test_offsets_and_flips_are_uniform():
    store = DeviceImages.from_arrays([_image()], 32, MEAN, STD, padding=4, flip=True, device="cpu")
    torch.manual_seed(0)
    top, left, flip = store.draw(162_000)
    cells = (top * 9 + left) * 2 + flip.long()
    counts = torch.bincount(cells, minlength=162).numpy()
    assert counts.size == 162 and counts.min() > 0
    assert chisquare(counts).pvalue > 1e-4


@pytest.mark.parametrize("store_kind", ["cifar-style", "timm"])
def test_each_process_draws_its_rows_of_the_global_batchs_draw(monkeypatch, store_kind):
    """Every process seeds the device's generator alike, so the k-th image of every process's
    batch drew the same crop, flip (and jitter): each now draws for the global batch and
    keeps its own rows, and together they are what one process draws for that batch."""
    import refilled_hf.data_device as data_device

    if store_kind == "cifar-style":
        store = DeviceImages.from_arrays([_image()], 32, MEAN, STD, padding=4, flip=True, device="cpu")

        def draw(count: int) -> list[torch.Tensor]:
            return list(store.draw(count))
    else:
        cfg = {"input_size": (3, 72, 72), "interpolation": "bicubic", "mean": MEAN, "std": STD, "crop_pct": 0.9}
        plan, why = plan_from_transforms(build_transform(cfg, train=True), build_transform(cfg, train=False))
        assert plan is not None and plan.jitter is not None, why
        store = DeviceResizedCrops.from_arrays([_image(90)], plan, "cpu")

        def draw(count: int) -> list[torch.Tensor]:
            return list(store.draw(torch.tensor([[90, 80]] * count)).values())

    torch.manual_seed(0)
    whole = draw(32)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(data_device, "processes_and_rank", lambda rank=rank: (2, rank))
        torch.manual_seed(0)
        shares.append(draw(16))
    for k, drawn in enumerate(whole):
        assert torch.equal(torch.cat([shares[0][k], shares[1][k]]), drawn), k
    assert not torch.equal(shares[0][0], shares[1][0])  # the processes' crops differ (they were the same)


def test_the_worker_transform_draws_exactly_the_same_162_variants():
    array = _image()
    store = DeviceImages.from_arrays([array], 32, MEAN, STD, padding=4, flip=True, device="cpu")
    variants = _all_variants(store).reshape(162, -1)
    transform = build_transform({"input_size": (3, 32, 32), "mean": MEAN, "std": STD}, train=True)
    torch.manual_seed(0)
    seen = set()
    pil = Image.fromarray(array)
    for _ in range(3000):
        out = transform(pil).reshape(1, -1)
        match = torch.nonzero((variants - out).abs().amax(1) < 1e-6).flatten()
        assert match.numel() == 1, "the worker path produced an image the device path cannot"
        seen.add(int(match))
    assert len(seen) == 162


def test_evaluation_batches_are_the_worker_paths_eval_transform():
    arrays = [_image(24, seed) for seed in range(3)]  # resized to 32 like the worker path
    store = DeviceImages.from_arrays(arrays, 32, MEAN, STD, padding=0, flip=False, device="cpu")
    evaluation = build_transform({"input_size": (3, 32, 32), "mean": MEAN, "std": STD}, train=False)
    expected = torch.stack([evaluation(Image.fromarray(a)) for a in arrays])
    dataset = IndexedImages(store, np.arange(3), augment=False)
    torch.testing.assert_close(dataset.pixels(torch.arange(3)), expected, rtol=0, atol=1e-6)


def test_the_path_is_chosen_and_can_be_forced(data_dir, tmp_path):
    import timm

    cfg = timm.create_model("cifar_wrn_16_1").pretrained_cfg
    base = tiny_recipe(data_dir, tmp_path / "o", method="ce")
    auto = load_data(RefilledConfig(**base), "3-5", cfg)
    assert auto.info["data_path"] == "device" and isinstance(auto.train, IndexedImages)
    workers = load_data(RefilledConfig(**{**base, "data_path": "workers"}), "3-5", cfg)
    assert workers.info["data_path"] == "workers" and not isinstance(workers.train, IndexedImages)
    small = load_data(RefilledConfig(**{**base, "device_data_budget_gb": 1e-6}), "3-5", cfg)
    assert small.info["data_path"] == "workers"
    large = load_data(RefilledConfig(**{**base, "image_size": 96}), "3-5", cfg)
    assert large.info["data_path"] == "workers"  # on a CPU, timm's PIL transforms are faster in workers
    large = load_data(RefilledConfig(**{**base, "image_size": 96, "data_path": "device"}), "3-5", cfg)
    assert large.info["data_path"] == "device" and isinstance(large.train.images, DeviceResizedCrops)
    assert large.train.pixels(torch.arange(2)).shape == (2, 3, 96, 96)
    nearest = {**cfg, "interpolation": "nearest"}  # Pillow's nearest is not reproduced on the device
    with pytest.raises(ConfigError, match="--data_path device cannot be used: for inputs of 96 px, the random-res"):
        load_data(RefilledConfig(**{**base, "data_path": "device", "image_size": 96}), "3-5", nearest)
    assert load_data(RefilledConfig(**{**base, "image_size": 96}), "3-5", nearest).info["data_path"] == "workers"


@pytest.mark.parametrize("image_size", [16, 96])  # the CIFAR-style store; timm's random-resized crops
def test_without_the_flip_neither_path_flips(image_size, data_dir, tmp_path):
    import timm

    cfg = timm.create_model("cifar_wrn_16_1").pretrained_cfg
    base = tiny_recipe(data_dir, tmp_path / "o", method="ce", image_size=image_size, data_path="device")
    for flip in (True, False):
        workers = load_data(RefilledConfig(**{**base, "data_path": "workers", "horizontal_flip": flip}), "3-5", cfg)
        names = [type(t).__name__ for t in workers.train.transform.transforms]
        assert ("RandomHorizontalFlip" in names) is flip, names
        device = load_data(RefilledConfig(**{**base, "horizontal_flip": flip}), "3-5", cfg)
        store = device.train.images
        torch.manual_seed(0)
        flips = store.draw(400)[2] if isinstance(store, DeviceImages) else store.draw(torch.full((400, 2), 32))["flip"]
        assert bool(flips.any()) is flip and bool(flips.all()) is False


@pytest.mark.slow
@pytest.mark.parametrize("path", ["device", "workers"])
def test_both_paths_train_and_count_every_image(path, data_dir, tmp_path, recwarn):
    # use_cpu unset: the default device, as a user runs it (a CPU run used to warn that pin_memory does nothing)
    recipe = tiny_recipe(data_dir, tmp_path / path, method="refilled", data_path=path, use_cpu=False,
                         teacher=f"local-dir:{_teacher(tmp_path)}")  # fmt: skip
    results = run_distillation(RefilledConfig(**recipe))
    if not torch.cuda.is_available():  # no loader asks to pin memory where nothing can be pinned
        assert not [w for w in recwarn if "pin_memory" in str(w.message)]
    assert results["data"]["data_path"] == path
    assert results["final"]["test_samples"] == 18 and results["stage1"]["test_samples"] == 18
    assert 0 <= results["final"]["test_top1"] <= 100
    run = json.loads((tmp_path / path / "run.json").read_text())
    assert run["identity"]["data_path"] == path


def _teacher(tmp_path: Path) -> Path:
    from helpers import write_random_teacher

    return write_random_teacher(tmp_path / "teacher")


@pytest.mark.slow
def test_teacher_centres_without_validation_or_test_split_agree_across_paths(data_dir, tmp_path):
    from safetensors.torch import load_file

    teacher = _teacher(tmp_path)
    centres = {}
    for path in ("device", "workers"):
        recipe = tiny_recipe(data_dir, tmp_path / path, method="refilled", teacher=f"local-dir:{teacher}",
                             data_path=path, validation_fraction=0.0, test_split="none", stage1_epochs=1,
                             stage2_epochs=1)  # fmt: skip
        run_distillation(RefilledConfig(**recipe))
        centres[path] = load_file(str(tmp_path / path / "stage2" / "teacher_centers.safetensors"))["centers"]
    # the training images under the evaluation transform, on either path
    torch.testing.assert_close(centres["device"], centres["workers"], rtol=0, atol=1e-5)


def test_a_training_split_read_unaugmented_is_placed_and_reported_so(data_dir, caplog):
    """probe-teacher reads the training split only for its class centres, unaugmented: the
    device path places it so, and its log does not claim augmentation."""
    config = RefilledConfig(**tiny_recipe(data_dir, "unused"))
    cfg = {"input_size": (3, 16, 16), "mean": MEAN, "std": STD}
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
        data = load_data(config, config.classes, cfg, splits=("train", "validation"), augment_train=False)
    assert data.info["data_path"] == "device" and "transformed there (no augmentation)" in caplog.text
    assert isinstance(data.train, IndexedImages) and not data.train.augment
    first, again = (data.train.pixels(torch.arange(len(data.train))) for _ in range(2))
    assert torch.equal(first, again)  # nothing random
    caplog.clear()
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
        data = load_data(config, config.classes, cfg, splits=("train", "validation"))
    assert data.train.augment and "augmented there (random crop and flip)" in caplog.text
    assert "--dataloader_num_workers" not in caplog.text  # (left unset: the machine's count, nothing to say)
    caplog.clear()
    workers = RefilledConfig(**tiny_recipe(data_dir, "unused", dataloader_num_workers=2))
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
        load_data(workers, workers.classes, cfg, splits=("train", "validation"))
    assert (
        "the training process loads the batches: --dataloader_num_workers 2 is for the worker path "
        "(--data_path workers)"
    ) in caplog.text  # a count the user set, which this path does not use


def test_loaders_of_the_device_path_start_no_workers(data_dir, tmp_path):
    """Its loaders (training and evaluation) only yield indices: worker processes would add
    nothing but start-up (and under a spawn context a copy of the images each). The worker
    path keeps its workers."""
    import timm

    from refilled_hf.backbone import StudentModel
    from refilled_hf.pipeline import inference_trainer
    from refilled_hf.trainer import RefilledTrainer

    model = timm.create_model("cifar_wrn_16_1", num_classes=3)
    base = tiny_recipe(data_dir, tmp_path / "o", method="ce", dataloader_num_workers=2)
    for path, workers in (("device", 0), ("workers", 2)):
        config = RefilledConfig(**{**base, "data_path": path})
        data = load_data(config, "3-5", model.pretrained_cfg)
        loader = inference_trainer(model, config, data.num_classes).evaluation_dataloader(data.test)
        assert loader.num_workers == workers, path
        trainer = RefilledTrainer(model=StudentModel(model), args=config, stage="ce", num_classes=3,
                                  train_dataset=data.train, eval_dataset=data.test)  # fmt: skip
        assert trainer.get_train_dataloader().num_workers == workers, path
        assert sum(len(batch["labels"]) for batch in loader) == len(data.test) == 18


def test_the_log_names_the_input_size_its_source_and_how_far_it_upscales_the_images(data_dir, tmp_path, caplog):
    import timm

    cfg = timm.create_model("cifar_wrn_16_1").pretrained_cfg  # 32 px; the data's images are 16 px
    base = tiny_recipe(data_dir, tmp_path / "o", method="ce")

    def logged(augment_train=True, splits=("train", "validation", "test"), model_cfg=cfg, **overrides) -> str:
        caplog.clear()
        with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
            config = RefilledConfig(**{**base, **overrides})
            load_data(config, "3-5", model_cfg, splits=splits, augment_train=augment_train)
        return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Input: "))

    assert logged() == "Input: 16 x 16 px (--image_size); the train images measure 16 px a side."
    # a size the user chose is theirs: no advice (the quickstart trains 8-px digits at 16 on purpose)
    assert logged(image_size=32) == "Input: 32 x 32 px (--image_size); the train images measure 16 px a side."
    assert logged(image_size=None) == (
        "Input: 32 x 32 px (the model's pretrained_cfg; --image_size sets another); the train images measure 16 px "
        "a side, so each is upscaled at least 2.0x (--image_size 16 trains at their size)."
    )
    # a model whose input size cannot change, or images read, not trained on: sizes only, no advice
    assert logged(image_size=None, model_cfg={**cfg, "fixed_input_size": True}) == (
        "Input: 32 x 32 px (the model's pretrained_cfg); the train images measure 16 px a side."
    )
    assert logged(image_size=None, augment_train=False) == (
        "Input: 32 x 32 px (the model's pretrained_cfg); the train images measure 16 px a side."
    )
    assert logged(image_size=None, splits=("test",)) == (
        "Input: 32 x 32 px (the model's pretrained_cfg); the test images measure 16 px a side."
    )


def test_preloading_records_the_smallest_and_largest_image_side():
    import datasets

    from refilled_hf.data import ImageClassificationDataset

    images = [Image.fromarray(np.zeros((h, w, 3), np.uint8)) for h, w in ((20, 30), (40, 12), (25, 25))]
    rows = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    split = ImageClassificationDataset(rows, "image", np.zeros(3, np.int64))
    assert split.side_range is None
    assert split.preload().side_range == (12, 40)
