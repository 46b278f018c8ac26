"""What an accelerator waits for on the worker path, by the number of DataLoader workers.

On the worker path (photos too large to keep decoded on the device, inputs over 64 px on a
CPU, a transform the device path does not reproduce) each training batch is read and
transformed by timm's PIL transforms. With ``--dataloader_num_workers 0`` (transformers'
default, and refilled-hf's before 2026-12-06) that happens in the training process, between
steps, while the accelerator waits; with workers it overlaps the steps.

This script takes the training batches of the run's own loader (``RefilledTrainer``'s
``get_train_dataloader`` over ``load_data``'s training split, as ``refilled-hf distill``
builds them) from a generated folder of ImageNet-sized JPEGs, and after each batch stands
for an accelerator step of ``--step_ms`` during which the host is free (a sleep: the
training process only waits for the accelerator then). It reports, per worker count, the
images per second and the share of the time the accelerator would be busy; a step of 0 ms
gives the loader's own throughput. No GPU needed: what it measures is the host.

    python benchmarks/loader_workers.py [--images 1536] [--image_size 224] [--batch 128]
        [--workers 0 1] [--step_ms 0 100 400] [--batches 8]

Writes ``benchmarks/results/loader_workers_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from decoding import write_photos
from throughput import _processor_name, _write_files, exit_through_cleanup_on_sigterm

ROOT = Path(__file__).resolve().parent


def training_loader(folder: Path, workers: int, image_size: int, batch: int, out: Path):
    """The training DataLoader a ``ce`` run on ``folder`` (4 classes) builds on the worker path
    with ``workers`` loader workers, and the library's default count on this machine."""
    import timm

    from refilled_hf import RefilledConfig, RefilledTrainer
    from refilled_hf.pipeline import load_data
    from refilled_hf.worker_processes import default_loader_workers

    config = RefilledConfig(
        dataset=str(folder), student="resnet18", image_size=image_size, data_path="workers", test_split=None,
        validation_fraction=0.0, per_device_train_batch_size=batch, dataloader_num_workers=workers,
        output_dir=str(out), disable_tqdm=True, report_to="none", use_cpu=True,
    )  # fmt: skip
    student = timm.create_model("resnet18", num_classes=4)
    data = load_data(config, None, student.pretrained_cfg)
    trainer = RefilledTrainer(
        model=student, stage="ce", args=config, num_classes=data.num_classes, train_dataset=data.train
    )
    return trainer.get_train_dataloader(), default_loader_workers(on_accelerator=True)


def images_per_second(loader, batches: int, step_ms: float) -> tuple[float, float]:
    """Images per second over ``batches`` batches after the first two (which start the workers
    and fill their queue), with an accelerator step of ``step_ms`` after each, and the share of
    the time it is busy."""
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
        time.sleep(step_ms / 1000)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        images += len(next(iterator)["labels"])
        time.sleep(step_ms / 1000)
    seconds = time.perf_counter() - start
    return images / seconds, batches * step_ms / 1000 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1536, help="JPEGs over 4 classes")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts (default: 0 and the library's default on an accelerator here)")  # fmt: skip
    parser.add_argument("--step_ms", type=float, nargs="+", default=[0.0, 100.0, 400.0])
    parser.add_argument("--batches", type=int, default=8, help="batches timed per cell, after the first two")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    exit_through_cleanup_on_sigterm()
    logging.basicConfig(level=logging.WARNING)
    # (the trainer names the config fields it does not read: here, those load_data read)
    logging.getLogger("refilled_hf.trainer").setLevel(logging.ERROR)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"CPU ({_processor_name()}, {cores} cores)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        write_photos(folder, args.images, args.width, args.height)
        _, default = training_loader(folder, 0, args.image_size, args.batch, Path(tmp) / "out")
        counts = args.workers if args.workers is not None else sorted({0, default})
        for step_ms in args.step_ms:
            for workers in counts:
                loader, _ = training_loader(folder, workers, args.image_size, args.batch, Path(tmp) / "out")
                rate, busy = images_per_second(loader, args.batches, step_ms)
                rows.append({"workers": workers, "step_ms": step_ms, "images_per_second": rate, "busy": busy})
                print(f"workers {workers}, step {step_ms:g} ms: {rate:.0f} img/s, accelerator busy {busy:.0%}")
    lines = [
        f"# Worker path: images per second by DataLoader workers, on {device}",
        "",
        f"Training batches of {args.batch} at {args.image_size} px from {args.images} JPEGs of {args.width} x "
        f"{args.height} px "
        "(timm's training transforms, as `refilled-hf distill` builds its loader on the worker path), each "
        f"followed by an accelerator step of the given length (a sleep: the host is free meanwhile); "
        f"{args.batches} batches timed after the first two. The library's default here, on an accelerator: "
        f"{default} worker(s) (the cores of this process less one, at most 8); 0 was the default before "
        "2026-12-06, and stays the default on the CPU. Busy: the share of the time the accelerator computes.",
        "",
        "| accelerator step (ms) | workers | images/s | accelerator busy |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['step_ms']:g} | {row['workers']} | {row['images_per_second']:.0f} | {row['busy']:.0%} |")
    payload = {"device": device, "default_workers_on_accelerator": default,
               "settings": vars(args) | {"out": None}, "rows": rows}  # fmt: skip
    _write_files(args.out, "loader_workers_cpu", payload, lines)


if __name__ == "__main__":
    main()
