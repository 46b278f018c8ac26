"""Training-step cost of every method on the CPU, as ratios to the KD step.

For each student (WRN-16-1, WRN-16-2) and method (ce, kd, rkd, REFILLED stage 1 with
tuples and with triplets, stage 2), with a WRN-40-2 teacher at batch 128, one fresh
process measures:

* the median step time of a bare PyTorch loop doing the same work (forward of student
  and teacher, the method's loss, backward, SGD step);
* the median step time of the same step driven by ``RefilledTrainer`` (the Trainer's own
  overhead is the ratio of the two);
* the process's peak resident memory.

Then, on real CIFAR-10 images (``../shared/data/cifar10``): the data pipeline's images
per second (decode + augmentation, one process) against the student's training images
per second, and the cost of the teacher's class centres over 2,500 training images.

    python benchmarks/step_time.py [--steps 10] [--students cifar_wrn_16_1 cifar_wrn_16_2]

Writes ``benchmarks/results/step_time.json`` and ``step_time.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CIFAR10 = ROOT.parent.parent / "shared" / "data" / "cifar10"
METHODS = ["kd", "ce", "rkd", "stage1-tuple", "stage1-triplet", "stage2"]


def _setup(student_name: str, teacher_name: str, classes: int):
    import timm
    import torch

    import refilled_hf  # noqa: F401
    from refilled_hf.backbone import FrozenTeacher, StudentModel

    torch.manual_seed(0)
    student = StudentModel(timm.create_model(student_name, num_classes=classes))
    teacher = FrozenTeacher(timm.create_model(teacher_name, num_classes=classes), student.model.pretrained_cfg)
    return student, teacher


class _Synthetic:
    """Random CIFAR-sized images, ``classes`` balanced labels (enough pairs to mine)."""

    def __init__(self, n: int, classes: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": int(self.y[i])}


def _stage_and_config(method: str, out: str):
    from refilled_hf.config import RefilledConfig

    stage = {"stage1-tuple": "stage1", "stage1-triplet": "stage1"}.get(method, method)
    config = RefilledConfig(
        method="refilled" if stage.startswith("stage") else method,
        teacher="unused",
        output_dir=out,
        stage1_variant="triplet" if method == "stage1-triplet" else "tuple",
        per_device_train_batch_size=128,
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    # one stage's Trainer arguments, as the pipeline makes them (the stage fields set these two)
    return stage, config.stage_view(num_train_epochs=1, learning_rate=0.05)


def measure_one(method: str, student_name: str, teacher_name: str, steps: int, warmup: int) -> dict:
    """Run in a fresh process: bare-loop and Trainer step times of one method."""
    import torch
    from transformers import TrainerCallback

    from refilled_hf.losses import class_centers
    from refilled_hf.trainer import RefilledTrainer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    classes, batch = 10, 128
    student, teacher = _setup(student_name, teacher_name, classes)
    data = _Synthetic(batch * (steps + warmup), classes)
    with tempfile.TemporaryDirectory() as out:
        stage, config = _stage_and_config(method, out)
        if stage == "ce":
            teacher = None  # the student alone, as in the pipeline
        with torch.no_grad():
            centers = class_centers(teacher(data.x[:512])[0], data.y[:512], classes) if teacher else None

        # Bare loop: the same compute_loss, called without the Trainer machinery.
        trainer = RefilledTrainer(model=student, args=config, stage=stage, num_classes=classes, teacher=teacher,
                                  class_centers=centers, centers_dataset=data, train_dataset=data)  # fmt: skip
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
        student.train()
        bare = []
        for i, inputs in enumerate(loader):
            t0 = time.perf_counter()
            loss = trainer.compute_loss(student, inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                bare.append(time.perf_counter() - t0)

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times, self.start = [], None

            def on_step_begin(self, args, state, control, **kw):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter() - self.start)

        timer = StepTimer()
        trainer = RefilledTrainer(model=student, args=config, stage=stage, num_classes=classes, teacher=teacher,
                                  class_centers=centers, centers_dataset=data, train_dataset=data,
                                  callbacks=[timer])  # fmt: skip
        wall = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - wall
    steps_t = timer.times[warmup:]
    return {
        "method": method,
        "student": student_name,
        "teacher": teacher_name,
        "bare_ms": 1000 * statistics.median(bare),
        "trainer_ms": 1000 * statistics.median(steps_t),
        "trainer_wall_per_step_ms": 1000 * wall / len(timer.times),
        "steps": len(steps_t),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def data_pipeline(student_name: str) -> dict:
    """Decode + augmentation throughput on real CIFAR-10, and the teacher-centre cost."""
    import timm
    import torch

    import refilled_hf  # noqa: F401
    from refilled_hf.backbone import FrozenTeacher
    from refilled_hf.data import build_transform, load_classification_data
    from refilled_hf.losses import class_centers

    torch.set_num_threads(2)
    model = timm.create_model(student_name, num_classes=5)
    data = load_classification_data(str(CIFAR10), classes="0-4", shots_per_class=500, validation_fraction=0.1)
    data.with_transforms(build_transform(model.pretrained_cfg, True), build_transform(model.pretrained_cfg, False))
    t0 = time.perf_counter()
    data.train.preload()
    decode_s = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(data.train, batch_size=128, shuffle=True)
    t0 = time.perf_counter()
    n = sum(batch["pixel_values"].shape[0] for batch in loader)
    pipeline_ips = n / (time.perf_counter() - t0)
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_40_2", num_classes=5), model.pretrained_cfg)
    data.train.transform = build_transform(model.pretrained_cfg, False)
    t0 = time.perf_counter()
    embs, labels = [], []
    for batch in torch.utils.data.DataLoader(data.train, batch_size=256):
        embs.append(teacher(batch["pixel_values"])[0])
        labels.append(batch["labels"])
    class_centers(torch.cat(embs), torch.cat(labels), 5)
    return {
        "images": n,
        "decode_once_s": decode_s,
        "pipeline_img_per_s": pipeline_ips,
        "teacher_centers_s": time.perf_counter() - t0,
        "teacher_centers_images": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", nargs="+", default=["cifar_wrn_16_1", "cifar_wrn_16_2"])
    parser.add_argument("--teacher", default="cifar_wrn_40_2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "STUDENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.one[1], args.teacher, args.steps, args.warmup)))
        return
    rows = []
    for student in args.students:
        for method in METHODS:
            cmd = [sys.executable, __file__, "--one", method, student, "--teacher", args.teacher,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"{method}/{student} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{student:16s} {method:15s} bare {row['bare_ms']:8.1f} ms  trainer {row['trainer_ms']:8.1f} ms  "
                  f"peak {row['peak_rss_mb']:7.0f} MB", flush=True)  # fmt: skip
    for row in rows:
        kd = next(r for r in rows if r["student"] == row["student"] and r["method"] == "kd")
        row["ratio_to_kd"] = row["bare_ms"] / kd["bare_ms"]
        row["trainer_overhead"] = row["trainer_ms"] / row["bare_ms"]
    pipeline = data_pipeline(args.students[0]) if (CIFAR10 / "train.parquet").is_file() else None
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": 2, "batch": 128, "teacher": args.teacher, "torch": __import__("torch").__version__,
            "python": platform.python_version()}  # fmt: skip
    (args.out / "step_time.json").write_text(json.dumps({"meta": meta, "rows": rows, "data": pipeline}, indent=2))
    lines = [
        f"# Training-step cost on the CPU (2 threads, batch 128, teacher {args.teacher})",
        "",
        "Median of the measured steps after warm-up, each method in a fresh process. `ratio to KD`: bare-loop "
        "step time over the KD step of the same student. `Trainer overhead`: RefilledTrainer step over the bare "
        "loop doing the same work. `peak RSS`: the process's peak resident memory.",
        "",
        "| student | method | bare step (ms) | ratio to KD | Trainer step (ms) | Trainer overhead | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['student']} | {r['method']} | {r['bare_ms']:.0f} | {r['ratio_to_kd']:.3f} | "
                     f"{r['trainer_ms']:.0f} | {r['trainer_overhead']:.3f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    if pipeline:
        ce = next(r for r in rows if r["student"] == args.students[0] and r["method"] == "ce")
        train_ips = 128 / (ce["bare_ms"] / 1000)
        pipeline["student_train_img_per_s"] = train_ips
        lines += [
            "",
            f"Data pipeline (real CIFAR-10, {pipeline['images']} images, decode once "
            f"{pipeline['decode_once_s']:.1f} s, then crop+flip+normalize per item, one process): "
            f"**{pipeline['pipeline_img_per_s']:.0f} img/s**, against {train_ips:.0f} img/s of "
            f"{args.students[0]} training (ce step): the data pipeline is "
            f"{pipeline['pipeline_img_per_s'] / train_ips:.1f}x faster than the student consumes it.",
            "",
            f"Teacher class centres over {pipeline['teacher_centers_images']} training images (WRN-40-2 forward): "
            f"{pipeline['teacher_centers_s']:.1f} s, computed once before stage 2.",
        ]
        (args.out / "step_time.json").write_text(json.dumps({"meta": meta, "rows": rows, "data": pipeline}, indent=2))
    (args.out / "step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
