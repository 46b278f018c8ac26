"""Start-up cost of a data set of photos: the decode-check every run makes of each image of its
splits (``ImageClassificationDataset.preload``), in one process and with the pool of decoding
processes (``refilled_hf.image_decoding``), alternated in one run, on a generated folder of
ImageNet-sized JPEGs (by default 4,000 of 500 x 375 px, about 90 kB each, as ImageNet's
average photo) and on CIFAR-sized PNGs, which stay in one process.

    python benchmarks/decoding.py [--images 4000] [--rounds 2]

Both ways are checked to give the same digests. The main process's own share per image
(reading the table, hashing the pixels, keeping them) bounds what any number of workers can
gain: it is measured too, as the serial time less the decoding alone. Writes
``benchmarks/results/decoding_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from throughput import _processor_name, _write_files, exit_through_cleanup_on_sigterm

ROOT = Path(__file__).resolve().parent


def write_photos(folder: Path, images: int, width: int, height: int, seed: int = 0) -> None:
    """``images`` JPEGs (quality 90) over 4 classes in ``folder/train/<class>/``, smooth
    colour fields with grain, so that they compress as photos do."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        klass = folder / "train" / f"c{i % 4}"
        klass.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
        pixels = np.asarray(field.resize((width, height), Image.BILINEAR), dtype=np.int16)
        pixels = (pixels + rng.integers(-20, 21, pixels.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(klass / f"{i}.jpg", quality=90)


def write_small(folder: Path, images: int, size: int = 32, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        klass = folder / "train" / f"c{i % 4}"
        klass.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(klass / f"{i}.png")


def preload_seconds(folder: Path, workers: int, foresee: bool = True) -> tuple[float, float, str, bool]:
    """Seconds to decode-check the training split with at most ``workers`` processes, the
    CPU seconds of this (the main) process meanwhile, the split's content digest, and
    whether the pool ran. ``foresee=False``: as before 2026-12-06, a split too large to keep
    was kept until it passed the budget, then dropped."""
    import refilled_hf.data as data_module
    import refilled_hf.image_decoding as decoding
    from refilled_hf.data import load_classification_data, load_raw_dataset

    foresee_after = data_module._FORESEE_AFTER
    data_module._FORESEE_AFTER = foresee_after if foresee else 1 << 62
    decoding_workers = decoding.decode_workers
    used = []
    original = decoding._decode_in_pool

    def counted(*args, **kwargs):
        used.append(True)
        return original(*args, **kwargs)

    decoding.decode_workers, decoding._decode_in_pool = (lambda: workers), counted
    try:
        load_raw_dataset.cache_clear()
        data = load_classification_data(str(folder), validation_fraction=0.0, test_split=None, decode=False)
        start, cpu = time.perf_counter(), time.process_time()
        data.train.preload()
        return time.perf_counter() - start, time.process_time() - cpu, data.train.content_digest, bool(used)
    finally:
        decoding.decode_workers, decoding._decode_in_pool = decoding_workers, original
        data_module._FORESEE_AFTER = foresee_after


def decode_only_seconds(folder: Path) -> float:
    """Seconds to decode every training image (and its BLAKE2b digest) and nothing else."""
    from refilled_hf.image_decoding import decode_checked

    paths = sorted((folder / "train").rglob("*.*"))
    start = time.perf_counter()
    for path in paths:
        decode_checked(str(path), str(path))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--small_images", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--parallel_after_seconds",
        type=float,
        default=None,
        help="The pool's threshold (default: the library's); 0 starts it for any split.",
    )
    parser.add_argument(
        "--probe_images",
        type=int,
        default=None,
        help="Images timed in one process before the pool may start (default: the library's).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    exit_through_cleanup_on_sigterm()

    import refilled_hf.image_decoding as decoding

    if args.parallel_after_seconds is not None:
        decoding.PARALLEL_AFTER_SECONDS = args.parallel_after_seconds
    if args.probe_images is not None:
        decoding.PROBE_IMAGES = args.probe_images
    workers = decoding.decode_workers()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"CPU ({_processor_name()}, {cores} cores)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos, small = Path(tmp) / "photos", Path(tmp) / "small"
        write_photos(photos, args.images, args.width, args.height)
        write_small(small, args.small_images)
        megabytes = sum(p.stat().st_size for p in photos.rglob("*.jpg")) / 2**20
        for name, folder, count in (
            (f"{args.images} JPEGs {args.width}x{args.height} ({megabytes:.0f} MB)", photos, args.images),
            (f"{args.small_images} PNGs 32x32", small, args.small_images),
        ):
            times: dict[str, list[float]] = {"before": [], "serial": [], "pool": [], "pool_main_cpu": []}
            digests, pooled = set(), False
            for _ in range(args.rounds):  # alternated, so that both see the same page cache and load
                for kind, n in (("before", 1), ("serial", 1), ("pool", workers)):
                    seconds, cpu, digest, used = preload_seconds(folder, n, foresee=kind != "before")
                    times[kind].append(seconds)
                    if kind == "pool":
                        times["pool_main_cpu"].append(cpu)
                    digests.add(digest)
                    pooled = pooled or (used and kind == "pool")
            assert len(digests) == 1, "the pool decoded other pixels than one process"
            serial, pool = min(times["serial"]), min(times["pool"])
            decode = decode_only_seconds(folder)
            rows.append({
                "images": name, "count": count, "workers": workers, "pool_ran": pooled,
                "before_seconds": min(times["before"]), "serial_seconds": serial, "pool_seconds": pool,
                "speedup": serial / pool, "speedup_over_before": min(times["before"]) / pool,
                "decode_only_ms_per_image": 1000 * decode / count,
                "main_process_ms_per_image": 1000 * max(serial - decode, 0.0) / count,
                "pool_main_process_cpu_ms_per_image": 1000 * min(times["pool_main_cpu"]) / count,
            })  # fmt: skip
    lines = [
        f"# Decode-check of a split on {device}",
        "",
        f"`ImageClassificationDataset.preload` of a generated training split, in one process and with the "
        f"pool (`refilled_hf.image_decoding`, {workers} workers here: the cores this process may use), alternated, "
        f"fastest of {args.rounds} rounds; both give the same content digest (checked). Before: one process, "
        "as before 2026-12-06, when a split too large to keep in memory (2 GiB decoded: the JPEGs here) was kept "
        "until it passed that size, then dropped; now its first 256 images foretell it. The main process's "
        "share (serial time less decoding alone) stays with it; with the pool it also receives every "
        "decoded image from the workers: its CPU time per image then (last column) bounds the pool's speed on "
        "any number of cores, at one image per that many ms.",
        "",
        "| images | pool ran | before (s) | one process (s) | pool (s) | pool / one process | pool / before "
        "| decoding (ms/image) | main process (ms/image) | main process with the pool (CPU ms/image) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['images']} | {'yes' if row['pool_ran'] else 'no (quick images)'} | {row['before_seconds']:.2f} "
            f"| {row['serial_seconds']:.2f} | {row['pool_seconds']:.2f} | {row['speedup']:.2f}x "
            f"| {row['speedup_over_before']:.2f}x | {row['decode_only_ms_per_image']:.3f} "
            f"| {row['main_process_ms_per_image']:.3f} | {row['pool_main_process_cpu_ms_per_image']:.3f} |"
        )
    _write_files(args.out, "decoding_cpu", {"device": device, "settings": vars(args) | {"out": None}, "rows": rows},
                 lines)  # fmt: skip


if __name__ == "__main__":
    main()
