"""Do the device and worker data paths train to the same accuracy? CPU-scale check.

A WRN-16-1 trained with cross-entropy on real CIFAR-10 (``--shots`` images per class,
``--epochs`` epochs, validation carved from training data, the 10,000 test images), once
per data path and seed, through ``run_distillation``. The two paths draw from the same
augmentation distribution (``tests/test_data_device.py``) but not the same samples, so
their accuracies should agree within seed noise.

    python benchmarks/data_paths.py [--seeds 0 1 2] [--shots 250] [--epochs 15] [--image_size 72]

``--image_size`` over 64 px trains with timm's ImageNet transforms (random-resized crop,
flip, colour jitter), whose device path is ``DeviceResizedCrops`` (forced here: on a CPU
``auto`` would pick the workers). Writes ``benchmarks/results/data_paths.json`` and ``.md``
(``data_paths_<size>px.*`` with ``--image_size``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CIFAR10 = ROOT.parent.parent / "shared" / "data" / "cifar10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(CIFAR10))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image_size", type=int, default=None, help="input size (default: the student's, 32)")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()

    import refilled_hf  # noqa: F401
    from refilled_hf.config import RefilledConfig
    from refilled_hf.pipeline import run_distillation

    work = Path(tempfile.mkdtemp(prefix="data-paths-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the runs are scratch: leave nothing in /tmp
    runs = []
    for seed in args.seeds:
        for path in ("device", "workers"):
            config = RefilledConfig(
                method="ce", student="cifar_wrn_16_1", dataset=args.dataset, shots_per_class=args.shots,
                validation_fraction=0.1, stage2_epochs=args.epochs, stage2_learning_rate=0.05,
                stage2_milestones=f"{int(args.epochs * 0.6)},{int(args.epochs * 0.85)}", seed=seed, data_path=path,
                image_size=args.image_size, eval_strategy="no", save_strategy="no", disable_tqdm=True,
                logging_steps=50, use_cpu=True,
                output_dir=str(work / f"{path}-{seed}"),
            )  # fmt: skip
            final = run_distillation(config)["final"]
            row = {"seed": seed, "path": path, "test_top1": final["test_top1"], "train_seconds": final["train_seconds"]}
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for path in ("device", "workers"):
        accs = [r["test_top1"] for r in runs if r["path"] == path]
        secs = [r["train_seconds"] for r in runs if r["path"] == path]
        summary[path] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "train_seconds_mean": statistics.mean(secs)}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "runs": runs, "summary": summary}
    stem = f"data_paths_{args.image_size}px" if args.image_size else "data_paths"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Device vs worker data path: accuracy (CPU)",
        "",
        f"WRN-16-1, cross-entropy, CIFAR-10 {args.shots} images/class, {args.epochs} epochs, seeds {args.seeds}"
        + (f", at {args.image_size} px (timm's ImageNet transforms)" if args.image_size else "")
        + "; test top-1 on the 10,000 test images.",
        "",
        "| data path | test top-1 % (mean ± std) | training seconds (mean) |",
        "|---|---:|---:|",
    ]
    for path, s in summary.items():
        lines.append(f"| {path} | {s['mean']:.2f} ± {s['std']:.2f} | {s['train_seconds_mean']:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
