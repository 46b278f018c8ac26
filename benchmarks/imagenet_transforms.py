"""Cost of timm's ImageNet transforms (inputs over 64 px) per batch, on the device path
(``DeviceResizedCrops``: crop boxes, Pillow-exact resampling, flip, colour jitter,
normalization, batched) against the worker path's PIL transform (what one DataLoader
worker spends on the same batch), on whatever device is present.

    python benchmarks/imagenet_transforms.py [--device cpu|cuda] [--size 224] [--source 32] [--batches 16 128]

Source images are random ``uint8`` of ``--source`` px (CIFAR's 32 by default: a small-image
data set trained at a timm model's input size). The evaluation pixels of the two paths are
checked to be equal before timing (the training pixels, for the same draws, are by the tests). Writes
``benchmarks/results/imagenet_transforms_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from augmentation import seconds_per_call
from throughput import _device_name, _write_files

ROOT = Path(__file__).resolve().parent


def worker_batch_seconds(arrays, transform, repeats: int) -> float:
    """Fastest of 3 windows: seconds for the PIL transform of every image of ``arrays``."""
    from PIL import Image

    images = [Image.fromarray(a) for a in arrays]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            for image in images:
                transform(image)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def check_same_pixels(store, arrays, evaluation) -> None:
    """The device path's evaluation pixels equal the PIL transform's (the training pixels
    for the same draws are checked by tests/test_data_device_timm.py)."""
    import torch
    from PIL import Image

    ours = store.batch(torch.arange(len(arrays), device=store.device), False).cpu()
    if not torch.equal(ours, torch.stack([evaluation(Image.fromarray(a)) for a in arrays])):
        raise SystemExit("the device path and the PIL evaluation transform disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", type=int, default=224, help="input size (a timm model's, over 64 px)")
    parser.add_argument("--source", type=int, default=32, help="source image size")
    parser.add_argument("--interpolation", default="bicubic")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--store", type=int, default=50_000, help="images in the store (CIFAR-100's training split)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()

    import numpy as np
    import torch

    from refilled_hf.data import build_transform
    from refilled_hf.data_device_timm import DeviceResizedCrops, plan_from_transforms

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = _device_name(device)
    cfg = {"input_size": (3, args.size, args.size), "interpolation": args.interpolation, "crop_pct": 0.875,
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip
    train, evaluation = build_transform(cfg, train=True), build_transform(cfg, train=False)
    plan, why = plan_from_transforms(train, evaluation)
    if plan is None:
        raise SystemExit(f"the device path does not apply: {why}")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (args.store, 3, args.source, args.source), dtype=np.uint8))
    sizes = torch.full((args.store, 2), args.source, dtype=torch.int64)
    store = DeviceResizedCrops(images, sizes, plan, device)
    arrays = [images[i].permute(1, 2, 0).numpy() for i in range(max(args.batches))]
    torch.manual_seed(0)
    check_same_pixels(store, arrays[:8], evaluation)

    rows = []
    for batch in args.batches:
        index = torch.randperm(args.store, device=device)[:batch]
        batch_arrays = [images[i].permute(1, 2, 0).numpy() for i in index.tolist()]
        row = {
            "batch": batch,
            "device_train_ms": 1e3 * seconds_per_call(lambda i=index: store.batch(i, True), device, args.repeats),
            "device_eval_ms": 1e3 * seconds_per_call(lambda i=index: store.batch(i, False), device, args.repeats),
            "worker_train_ms": 1e3 * worker_batch_seconds(batch_arrays, train, max(1, args.repeats // 2)),
            "worker_eval_ms": 1e3 * worker_batch_seconds(batch_arrays, evaluation, max(1, args.repeats // 2)),
        }
        row["train_speedup"] = row["worker_train_ms"] / row["device_train_ms"]
        row["eval_speedup"] = row["worker_eval_ms"] / row["device_eval_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    settings = {"size": args.size, "source": args.source, "interpolation": args.interpolation, "store": args.store,
                "repeats": args.repeats, "threads": torch.get_num_threads()}  # fmt: skip
    result = {"device": name, "settings": settings, "rows": rows, "torch": torch.__version__}
    lines = [
        f"# timm's ImageNet transforms per batch on {name}",
        "",
        f"{args.source}-px source images trained at {args.size} px ({args.interpolation}): random-resized crop, "
        "flip, colour jitter 0.4, normalization (training) and resize + centre crop (evaluation). Device path: "
        "`DeviceResizedCrops`, one batched call on the device. Worker path: timm's PIL transform image by image, "
        "in one process (what one DataLoader worker spends on the batch; N workers divide it by at most N). "
        "Both give the same pixels for the same draws (tests/test_data_device_timm.py). Fastest of 3 windows.",
        "",
        "| batch | training: workers / device (ms) | speed-up | evaluation: workers / device (ms) | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['worker_train_ms']:.1f} / {r['device_train_ms']:.1f} | "
                     f"{r['train_speedup']:.2f}x | {r['worker_eval_ms']:.1f} / {r['device_eval_ms']:.1f} | "
                     f"{r['eval_speedup']:.2f}x |")  # fmt: skip
    _write_files(Path(args.out), f"imagenet_transforms_{device}", result, lines)


if __name__ == "__main__":
    main()
