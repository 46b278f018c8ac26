"""The device data path for inputs over 64 px reproduces timm's ImageNet transforms: for
the same crop box, flip and jitter draws its pixels are Pillow's, bit for bit; its draws
follow timm's and torchvision's distributions; its evaluation batches are the worker
path's. Pillow itself (through torchvision's PIL functional ops) is the reference."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import tiny_recipe
from PIL import Image
from scipy.stats import chi2_contingency, chisquare, kstest
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as F

from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.data import build_transform
from refilled_hf.data_device import IndexedImages
from refilled_hf.data_device_timm import (
    PILLOW_VERTICAL_FIRST,
    DeviceResizedCrops,
    plan_from_transforms,
    sample_resized_crops,
)
from refilled_hf.pil_ops import (
    FILTERS,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    resample,
    resize_weights,
)
from refilled_hf.pipeline import load_data, run_distillation

MODES = {"box": Image.BOX, "bilinear": Image.BILINEAR, "hamming": Image.HAMMING, "bicubic": Image.BICUBIC,
         "lanczos": Image.LANCZOS}  # fmt: skip
# (35, 32): an odd margin to centre-crop at evaluation; (150, 96): crops Pillow 13 shrinks vertically first
SHAPES = [(32, 32), (40, 30), (90, 100), (120, 50), (72, 72), (9, 61), (35, 32), (150, 96)]


def _arrays(seed: int = 0, shapes=SHAPES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    arrays[1] = np.cumsum(arrays[1], axis=1, dtype=np.int64).astype(np.uint8)  # some smooth structure too
    return arrays


def _cfg(size: int = 72, **overrides) -> dict:
    cfg = {"input_size": (3, size, size), "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
           "crop_pct": 0.9}  # fmt: skip
    cfg.update(overrides)
    return cfg


def _store(cfg: dict, arrays) -> tuple[DeviceResizedCrops, object, object]:
    train, evaluation = build_transform(cfg, train=True), build_transform(cfg, train=False)
    plan, why = plan_from_transforms(train, evaluation)
    assert plan is not None, why
    return DeviceResizedCrops.from_arrays(arrays, plan, "cpu"), train, evaluation


@pytest.mark.parametrize("interpolation", sorted(FILTERS))
def test_resampling_is_pillows_for_every_filter(interpolation):
    """Random crops of images of several sizes, shrunk and enlarged (and, on Pillow 13,
    shrunk in height enough for the vertical pass to come first), equal Pillow's crop +
    resize exactly."""
    arrays = _arrays(1)
    store = DeviceResizedCrops.from_arrays(arrays, plan=_plan_stub(), device="cpu")
    images, sizes = store.select(torch.arange(len(arrays)))
    rng = np.random.default_rng(2)
    for out_h, out_w in ((72, 72), (20, 33), (7, 90)):
        top = torch.tensor([rng.integers(0, h) for h, _ in SHAPES])
        left = torch.tensor([rng.integers(0, w) for _, w in SHAPES])
        height = torch.tensor([rng.integers(1, h - t + 1) for (h, _), t in zip(SHAPES, top.tolist())])
        width = torch.tensor([rng.integers(1, w - t + 1) for (_, w), t in zip(SHAPES, left.tolist())])
        zero = torch.zeros_like(top)
        rows = resize_weights(top, height, torch.full_like(top, out_h), out_h, zero, images.shape[2], interpolation)
        columns = resize_weights(left, width, torch.full_like(top, out_w), out_w, zero, images.shape[3], interpolation)
        shrink_h, shrink_w = height - out_h, width - out_w
        vertical_first = (shrink_h > 0) & (shrink_h > 2 * shrink_w) if PILLOW_VERTICAL_FIRST else None
        ours = resample(images, rows, columns, vertical_first).permute(0, 2, 3, 1).numpy()
        for k, array in enumerate(arrays):
            box = (int(left[k]), int(top[k]), int(left[k] + width[k]), int(top[k] + height[k]))
            expected = np.asarray(Image.fromarray(array).crop(box).resize((out_w, out_h), MODES[interpolation]))
            np.testing.assert_array_equal(ours[k], expected, err_msg=f"image {k}, box {box}, to {out_h}x{out_w}")


def _plan_stub():
    plan, _ = plan_from_transforms(build_transform(_cfg(), train=True), build_transform(_cfg(), train=False))
    return plan


def test_brightness_contrast_and_saturation_are_pillows():
    arrays = _arrays(3, [(31, 45)] * 6)
    levels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    factors = torch.tensor([0.0, 0.6, 0.97, 1.0, 1.33, 1.4])
    for ours, theirs in ((adjust_brightness, F.adjust_brightness), (adjust_contrast, F.adjust_contrast),
                         (adjust_saturation, F.adjust_saturation)):  # fmt: skip
        out = ours(levels.clone(), factors).permute(0, 2, 3, 1).to(torch.uint8).numpy()
        for k, array in enumerate(arrays):
            expected = np.asarray(theirs(Image.fromarray(array), float(factors[k])))
            np.testing.assert_array_equal(out[k], expected, err_msg=f"{ours.__name__}, factor {float(factors[k])}")


def _worker_pixels(array, draws, k: int, train) -> torch.Tensor:
    """The worker path's training transform with the device path's draws for image ``k``."""
    crop = train.transforms[0]
    box = [int(draws[key][k]) for key in ("top", "left", "height", "width")]
    image = F.resized_crop(Image.fromarray(array), *box, list(crop.size), crop.interpolation)
    if draws["flip"][k]:
        image = F.hflip(image)
    for op in draws["order"][k].tolist():  # torchvision's ColorJitter, in this image's order
        image = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)[op](image, float(draws["factors"][k, op]))
    return train.transforms[-1](train.transforms[-2](image))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_training_pixels_are_the_worker_transforms_for_the_same_draws(interpolation):
    arrays = _arrays(4)
    store, train, _ = _store(_cfg(interpolation=interpolation), arrays)
    index = torch.arange(len(arrays))
    torch.manual_seed(0)
    vertical_first = 0
    for _ in range(8):
        images, sizes = store.select(index)
        draws = store.draw(sizes)
        ours = store.normalize(store.apply(images, draws))
        expected = torch.stack([_worker_pixels(a, draws, k, train) for k, a in enumerate(arrays)])
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        shrink_h, shrink_w = draws["height"] - 72, draws["width"] - 72
        vertical_first += int(((shrink_h > 0) & (shrink_h > 2 * shrink_w)).sum())
    assert vertical_first > 0  # the draws include boxes Pillow 13 resamples vertically first


@pytest.mark.parametrize("overrides", [{}, {"crop_pct": 1.25}, {"crop_mode": "squash", "interpolation": "bilinear"}])
def test_evaluation_pixels_are_timms_eval_transform(overrides):
    """Resize (shorter side, or both sides when squashed) and centre crop, zero padding
    where the resized image is smaller than the crop (crop_pct > 1)."""
    arrays = _arrays(5)
    store, _, evaluation = _store(_cfg(**overrides), arrays)
    expected = torch.stack([evaluation(Image.fromarray(a)) for a in arrays])
    dataset = IndexedImages(store, np.arange(len(arrays)), augment=False)
    torch.testing.assert_close(dataset.pixels(torch.arange(len(arrays))), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("shape", "scale", "ratio"), [((32, 32), (0.08, 1.0), (3 / 4, 4 / 3)),
                                                       ((20, 40), (0.5, 1.0), (3 / 4, 4 / 3))])  # fmt: skip
def test_crop_boxes_follow_timms_distribution(shape, scale, ratio):
    """The boxes' sizes (a contingency test against timm's own ``get_params``), the share
    of central fallbacks (frequent on the wide image) and uniform offsets."""
    height, width = shape
    n = 20000
    random.seed(0)
    image = Image.new("RGB", (width, height))
    theirs = [RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(n)]
    torch.manual_seed(0)
    top, left, box_h, box_w = sample_resized_crops(torch.full((n,), height), torch.full((n,), width), scale, ratio)
    ours = list(zip(top.tolist(), left.tolist(), box_h.tolist(), box_w.tolist()))
    sizes = sorted({(h, w) for _, _, h, w in ours + theirs})
    ours_count, theirs_count = Counter((h, w) for _, _, h, w in ours), Counter((h, w) for _, _, h, w in theirs)
    table = np.array([[ours_count[s] for s in sizes], [theirs_count[s] for s in sizes]])
    kept = table.sum(0) >= 20  # pool the rare sizes into one cell
    if (~kept).any():
        table = np.concatenate([table[:, kept], table[:, ~kept].sum(1, keepdims=True)], axis=1)
    assert chi2_contingency(table).pvalue > 1e-3
    fallback = ((height - box_h) // 2 == top) & ((width - box_w) // 2 == left)
    theirs_fallback = sum(t == (height - h) // 2 and le == (width - w) // 2 for t, le, h, w in theirs)
    assert abs(int(fallback.sum()) - theirs_fallback) < 4 * np.sqrt(max(theirs_fallback, 25))
    assert bool(((top >= 0) & (top + box_h <= height) & (left >= 0) & (left + box_w <= width)).all())
    movable = box_h < height
    position = (top[movable].double() + torch.rand(int(movable.sum()), dtype=torch.float64)) / (
        height - box_h[movable] + 1
    ).double()  # uniform on [0, 1) when the offset is uniform over its range
    assert kstest(position.numpy(), "uniform").pvalue > 1e-3


def test_flips_jitter_factors_and_orders_are_drawn_per_image():
    arrays = _arrays(6, [(32, 32)] * 4)
    store, _, _ = _store(_cfg(), arrays)
    torch.manual_seed(0)
    draws = store.draw(torch.full((6000, 2), 32))
    assert abs(draws["flip"].float().mean().item() - 0.5) < 0.03
    assert float(draws["factors"].min()) >= 0.6 and float(draws["factors"].max()) <= 1.4
    assert kstest(((draws["factors"] - 0.6) / 0.8).flatten().numpy(), "uniform").pvalue > 1e-3
    orders = Counter(tuple(o) for o in draws["order"].tolist())
    assert len(orders) == 6 and chisquare(list(orders.values())).pvalue > 1e-3


def test_a_transform_the_device_path_does_not_reproduce_is_named():
    for overrides, named in (({"interpolation": "random"}, "interpolation"), ({"interpolation": "nearest"},
                             "interpolation")):  # fmt: skip
        plan, why = plan_from_transforms(build_transform(_cfg(**overrides), True), build_transform(_cfg(), False))
        assert plan is None and named in why
    import timm

    hue = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=_cfg()), is_training=True,
                                     color_jitter=(0.4, 0.4, 0.4, 0.1))  # fmt: skip
    assert plan_from_transforms(hue, build_transform(_cfg(), False)) == (None, "the colour jitter changes hue")
    erasing = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=_cfg()), is_training=True,
                                         re_prob=0.25)  # fmt: skip
    plan, why = plan_from_transforms(erasing, build_transform(_cfg(), False))
    assert plan is None and "RandomErasing" in why


def test_real_pipeline_splits_match_the_worker_path(data_dir, tmp_path):
    """Through ``load_data`` at 72 px (over 64), the device path's evaluation batches of
    every split, and of the training split under the evaluation transform, are the
    worker path's."""
    import timm

    cfg = timm.create_model("cifar_wrn_16_1").pretrained_cfg
    base = tiny_recipe(data_dir, tmp_path / "o", method="ce", image_size=72, data_path="device")
    device = load_data(RefilledConfig(**base), "3-5", cfg)
    workers = load_data(RefilledConfig(**{**base, "data_path": "workers"}), "3-5", cfg)
    assert device.info["data_path"] == "device" and isinstance(device.train.images, DeviceResizedCrops)
    for name in ("validation", "test"):
        split = getattr(workers, name)
        expected = torch.stack([split[i]["pixel_values"] for i in range(len(split))])
        torch.testing.assert_close(getattr(device, name).pixels(torch.arange(len(split))), expected, rtol=0, atol=0)
    train_eval = IndexedImages(device.train.images, device.train.labels, augment=False)
    workers.train.transform = workers.test.transform
    expected = torch.stack([workers.train[i]["pixel_values"] for i in range(len(workers.train))])
    torch.testing.assert_close(train_eval.pixels(torch.arange(len(workers.train))), expected, rtol=0, atol=0)
    augmented = device.train.pixels(torch.arange(len(workers.train)))
    assert augmented.shape == expected.shape and not torch.equal(augmented, expected)


def test_a_run_over_64_px_trains_on_the_device_path(data_dir, tmp_path, teacher_dir):
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="refilled", image_size=72, data_path="device",
                         teacher=f"local-dir:{teacher_dir}", stage1_epochs=1, stage2_epochs=1,
                         per_device_train_batch_size=18)  # fmt: skip
    results = run_distillation(RefilledConfig(**recipe))
    assert results["data"]["data_path"] == "device"
    assert results["final"]["test_samples"] == 18 and 0 <= results["final"]["test_top1"] <= 100
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["identity"]["data_path"] == "device"
    with pytest.raises(ConfigError, match="too many to cache exactly"):
        run_distillation(RefilledConfig(**{**recipe, "output_dir": str(tmp_path / "c"),
                                           "teacher_cache": str(tmp_path / "cache")}))  # fmt: skip


def test_large_batches_are_made_in_chunks_with_the_same_pixels(monkeypatch):
    arrays = _arrays(7)
    store, _, _ = _store(_cfg(), arrays)
    index = torch.arange(len(arrays))
    whole = store.batch(index, augment=False)
    monkeypatch.setattr(DeviceResizedCrops, "chunk", property(lambda self: 3))
    torch.testing.assert_close(store.batch(index, augment=False), whole, rtol=0, atol=0)
    assert store.batch(index, augment=True).shape == whole.shape


def test_without_the_flip_no_image_is_flipped():
    """``--horizontal_flip false`` removes the flip from the worker transform; the plan
    read from it then draws no flips."""
    train = build_transform(_cfg(), train=True)
    train.transforms = [t for t in train.transforms if type(t).__name__ != "RandomHorizontalFlip"]
    plan, why = plan_from_transforms(train, build_transform(_cfg(), train=False))
    assert plan is not None and not plan.flip and "flip" not in why
    store = DeviceResizedCrops.from_arrays(_arrays(8, [(32, 32)] * 3), plan, "cpu")
    assert not store.draw(torch.full((500, 2), 32))["flip"].any()


def test_mixed_precision_leaves_the_pixels_unchanged():
    """Batches are made inside the Trainer's autocast region: float64 is not autocast-eligible,
    so the exact resampling keeps its precision (bf16 here, on the CPU)."""
    store, _, _ = _store(_cfg(), _arrays(9))
    index = torch.arange(len(SHAPES))
    for augment in (True, False):
        torch.manual_seed(0)
        plain = store.batch(index, augment)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = store.batch(index, augment)
        assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
