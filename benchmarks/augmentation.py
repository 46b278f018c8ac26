"""Cost of the device data path's batched augmentation, per batch, on whatever device is
present: ``crop_and_flip`` (one gather over the flattened padded images) against the
indexing it replaced (four broadcast index tensors), and a whole training batch
(``DeviceImages.augmented``: selection, draws, crop and flip, normalization) against the
way it was made before, in one process.

    python benchmarks/augmentation.py [--device cpu|cuda] [--batches 16 128 512]

The previous and the current way are checked to give the same pixels before they are timed. Writes
``benchmarks/results/augmentation_<device>.json`` and ``.md`` (device named inside).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from throughput import _device_name, _write_files

ROOT = Path(__file__).resolve().parent


def indexed_crop_and_flip(images, top, left, flip, padding: int):
    """The crop before the gather: advanced indexing with four broadcast index tensors."""
    import torch

    size = images.shape[-1]
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    steps = torch.arange(size, device=images.device)
    rows = top[:, None] + steps
    columns = torch.where(flip[:, None], left[:, None] + (size - 1 - steps), left[:, None] + steps)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], columns[:, None, None, :]]


def seconds_per_call(fn, device: str, repeats: int) -> float:
    """Fastest mean of 3 timed windows of ``repeats`` calls (after 5 warm-up calls)."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def previous_training_batch(store, index):
    """A training batch as the device path made it before: tensor indexing of the store,
    the indexed crop, an out-of-place normalization."""
    images = store.images[index]
    crops = indexed_crop_and_flip(images, *store.draw(images.shape[0]), store.padding)
    return (crops.float() / 255.0 - store.mean) / store.std


def batch_row(batch: int, store, args, device: str) -> dict:
    """The timings of one batch size, on a random batch of ``store``'s images."""
    import torch

    from refilled_hf.data_device import crop_and_flip

    index = torch.randperm(len(store), device=device)[:batch]
    images = store.select(index)
    draws = store.draw(batch)
    if not torch.equal(store.images[index], images) or not torch.equal(
        crop_and_flip(images, *draws, args.padding), indexed_crop_and_flip(images, *draws, args.padding)
    ):
        raise SystemExit("the previous and the current augmentation disagree")
    torch.manual_seed(0)
    before = previous_training_batch(store, index)
    torch.manual_seed(0)
    if not torch.equal(before, store.augmented(index)[0]):
        raise SystemExit("the previous and the current training batch disagree")
    row = {
        "batch": batch,
        "indexed_select_us": 1e6 * seconds_per_call(lambda: store.images[index], device, args.repeats),
        "index_select_us": 1e6 * seconds_per_call(lambda: store.select(index), device, args.repeats),
        "indexed_crop_us": 1e6 * seconds_per_call(
            lambda: indexed_crop_and_flip(images, *draws, args.padding), device, args.repeats),
        "gather_crop_us": 1e6 * seconds_per_call(
            lambda: crop_and_flip(images, *draws, args.padding), device, args.repeats),
        "previous_batch_us": 1e6 * seconds_per_call(lambda: previous_training_batch(store, index), device,
                                                    args.repeats),
        "training_batch_us": 1e6 * seconds_per_call(lambda: store.augmented(index), device, args.repeats),
    }  # fmt: skip
    row["batch_speedup"] = row["previous_batch_us"] / row["training_batch_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--padding", type=int, default=4)
    parser.add_argument("--store", type=int, default=50_000, help="images in the store (CIFAR-100's training split)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = _device_name(device)
    from refilled_hf.data_device import DeviceImages

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.store, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    store = DeviceImages(images, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), padding=args.padding,
                         flip=True, device=device)  # fmt: skip
    rows = []
    for batch in args.batches:
        rows.append(batch_row(batch, store, args, device))
        print(json.dumps(rows[-1]), flush=True)
    stem = f"augmentation_{device}"
    settings = {"store": args.store, "size": args.size, "padding": args.padding, "repeats": args.repeats}
    result = {"device": name, "settings": settings, "rows": rows, "torch": torch.__version__}
    lines = [
        f"# Device-path augmentation per batch on {name}",
        "",
        f"A store of {args.store:,} uint8 images of {args.size} px, random batches, crop padding {args.padding}, "
        f"flips; fastest of 3 windows of {args.repeats} calls each. Previous: tensor indexing of the store, "
        "indexing with four broadcast index tensors for the crop, out-of-place normalization. Now: `index_select`, "
        "one `gather` (`crop_and_flip`), in-place normalization (`DeviceImages.augmented`). Both give the same "
        "pixels (checked before timing).",
        "",
        "| batch | select: previous / now (us) | crop: previous / now (us) | training batch: previous / now (us) "
        "| batch speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r['indexed_select_us']:.0f} / {r['index_select_us']:.0f}",
                 f"{r['indexed_crop_us']:.0f} / {r['gather_crop_us']:.0f}",
                 f"{r['previous_batch_us']:.0f} / {r['training_batch_us']:.0f}",
                 f"{r['batch_speedup']:.2f}x"]  # fmt: skip
        lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
    _write_files(Path(args.out), stem, result, lines)


if __name__ == "__main__":
    main()
