"""Throughput of the full pipeline against a bare loop whose batches already sit on the
device, per method, on whatever device is present (CPU here; a GPU when one is lent).

For each method (ce, kd, rkd, REFILLED stage 1, stage 2) and data path (device,
workers), in one process:

* **pipeline**: ``run_distillation`` on real CIFAR-10 images (``--classes``, ``--shots``
  per class), timed by a callback from step ``--warmup`` to the last of ``--steps``
  optimizer steps (``--max_steps`` stops the stage; evaluation and checkpoints off);
* **bare loop**: the same student, teacher, loss and optimizer on one real batch that
  already sits on the device, no Trainer, no data loading;
* the ratio of the two, and the device's peak memory (CUDA) or the process's peak
  resident memory (CPU).

With ``--small_run``, also the wall time of the issue's small middle-shot run: REFILLED,
100 images per class x 4 classes, 60 + 60 epochs, library defaults.

    python benchmarks/throughput.py [--device cpu|cuda] [--steps 20] [--batch 128] [--small_run]
    python benchmarks/throughput.py --compile_modes default max-autotune-no-cudagraphs  # torch.compile rows
    python benchmarks/throughput.py --channels_last_rows  # memory-format rows
    python benchmarks/throughput.py --sync_rows  # host-device syncs per step (CUDA)
    python benchmarks/throughput.py --methods stage1 stage1-listed --paths device  # stage 1's two mining paths
    python benchmarks/throughput.py --compile_run reduce-overhead  # a whole run, eager and compiled
    python benchmarks/throughput.py --host_overhead --batch 16 --steps 300 --warmup 50  # host work per step

Writes ``benchmarks/results/throughput_<device>.json`` and ``.md`` (device named inside).
On a GPU machine, pass ``--dataset`` (``../shared`` does not travel; see
``../shared/docs/gpu.md``) and ``--bf16``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CIFAR10 = ROOT.parent.parent / "shared" / "data" / "cifar10"
METHODS = ["ce", "kd", "rkd", "stage1", "stage2"]
#: REFILLED stage 1 with its mined pairs listed (the CPU's way, whose sizes are read back by the
#: host every step) instead of in fixed shapes (the accelerators' default): an A/B row, on request
STAGE1_LISTED = "stage1-listed"


@contextlib.contextmanager
def stage1_mining(method: str):
    """Yield the method to run: ``stage1`` with the listed mining for :data:`STAGE1_LISTED`,
    the method itself otherwise."""
    if method != STAGE1_LISTED:
        yield method
        return
    from refilled_hf import losses

    fixed = losses._fixed_shapes
    losses._fixed_shapes = lambda device: False
    try:
        yield "stage1"
    finally:
        losses._fixed_shapes = fixed


class StepClock:
    """A TrainerCallback recording the wall time of every optimizer step's end. The GPU is
    synchronized only at the ends of the steps in ``sync_steps`` (the timed window's
    bounds): a sync every step would keep the host from queueing work ahead, which is
    exactly what the pipeline must be free to do."""

    def __new__(cls, sync_steps: set[int]):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self.begin: float | None = None

            def on_train_begin(self, args, state, control, **kwargs):
                self.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if state.global_step in sync_steps and torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter())

        return _Clock()


class SyncCounter:
    """A TrainerCallback counting the host-device synchronizations of the timed steps
    (``torch.cuda.set_sync_debug_mode('warn')`` from step ``first`` to step ``last``), by
    the Python line that caused them."""

    def __new__(cls, first: int, last: int):
        import warnings

        from transformers import TrainerCallback

        class _Counter(TrainerCallback):
            def __init__(self):
                self.sites: dict[str, int] = {}
                self._catcher = None
                self._caught: list = []

            def on_step_begin(self, args, state, control, **kwargs):
                import torch

                if state.global_step + 1 == first and torch.cuda.is_available():
                    self._catcher = warnings.catch_warnings(record=True)
                    self._caught = self._catcher.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if state.global_step == last and self._catcher is not None:
                    torch.cuda.set_sync_debug_mode("default")
                    self._catcher.__exit__(None, None, None)
                    for w in self._caught:
                        if "synchronizing" in str(w.message):
                            site = f"{Path(w.filename).name}:{w.lineno}"
                            self.sites[site] = self.sites.get(site, 0) + 1
                    self._catcher = None

        return _Counter()


def exit_through_cleanup_on_sigterm() -> None:
    """End this script on SIGTERM by raising SystemExit: gpu_session.sh's `timeout` ends a step
    with SIGTERM, whose default action skips `with` blocks and atexit, and so left the script's
    scratch folders (hundreds of MB of images) in /tmp."""
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))


def _processor_name() -> str:
    """The CPU's model as the kernel names it (Linux), else what `platform` knows: results
    measured on two machines of one architecture must not read alike."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return f"{value.strip()}, {platform.machine()}"
    return platform.processor() or platform.machine()


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({_processor_name()}, {torch.get_num_threads()} threads)"


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_teacher(folder: Path, name: str, label_names: list[str]) -> str:
    """An untrained teacher over the student's classes (so kd is legal): speed only."""
    import timm

    from refilled_hf.hub import export_model

    export_model(timm.create_model(name, num_classes=len(label_names)), folder, label_names=label_names)
    return f"local-dir:{folder}"


def pipeline_rate(method: str, path: str, args, teacher: str, work: Path, **extra) -> float:
    """Images per second of the pipeline's steady-state training steps (``extra``: more
    recipe fields)."""
    return pipeline_timing(method, path, args, teacher, work, **extra)["images_per_s"]


def pipeline_timing(
    method: str, path: str, args, teacher: str, work: Path, counters: tuple = (), **extra
) -> dict[str, float]:
    """``images_per_s`` of the steady-state steps and ``first_step_extra_s``: how much longer
    the first step took than a steady one (a compile, the first allocations). ``counters``:
    more callbacks (e.g. a :class:`SyncCounter`)."""
    with stage1_mining(method) as run:
        return _pipeline_timing(run, path, args, teacher, work, counters, run_name=method, **extra)


def _pipeline_timing(method, path, args, teacher, work, counters, run_name, **extra) -> dict[str, float]:
    from refilled_hf.config import RefilledConfig
    from refilled_hf.pipeline import run_distillation

    clock = StepClock({1, args.warmup + 1, args.steps})
    stage1 = method == "stage1"
    recipe = dict(
        method="refilled" if method.startswith("stage") else method,
        teacher=None if method == "ce" else teacher,
        student=args.student,
        dataset=str(args.dataset),
        classes=args.classes,
        teacher_classes=args.classes if method == "kd" else None,
        shots_per_class=args.shots,
        validation_fraction=0.0,
        test_split="none",
        per_device_train_batch_size=args.batch,
        stage1_epochs=100 if stage1 else 0,
        stage2_epochs=100,
        max_steps=args.steps,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        data_path=path,
        image_size=args.image_size,
        dataloader_num_workers=args.workers if path == "workers" else 0,
        dataloader_persistent_workers=path == "workers" and args.workers > 0,
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        output_dir=str(work / "-".join([run_name, path, *(f"{k}={v}" for k, v in extra.items())])),
    )
    recipe.update(extra)
    callbacks = [clock, *counters]
    if stage1:  # time stage 1 only: stop the run once stage 1 has its steps
        from transformers import TrainerCallback

        class StopAfterStage1(TrainerCallback):
            def on_train_end(self, args_, state, control, **kwargs):
                if Path(args_.output_dir).name == "stage1":
                    raise _Done

        callbacks.append(StopAfterStage1())
    with contextlib.suppress(_Done):  # stage 1 timed: the rest of the run is not needed
        run_distillation(RefilledConfig(**recipe), callbacks=callbacks)
    times = clock.times[: args.steps]
    measured = times[args.warmup :]
    if len(measured) < 2:
        raise SystemExit(f"{method} ({path}): {len(times)} optimizer steps ran, too few to time after --warmup "
                         f"{args.warmup}: give the run more images (--shots, --classes) or fewer --steps.")  # fmt: skip
    step = (measured[-1] - measured[0]) / (len(measured) - 1)
    return {"images_per_s": args.batch / step, "first_step_extra_s": times[0] - clock.begin - step}


class _Done(Exception):
    pass


def bare_rate(method: str, args, device: str, channels_last: bool = False) -> float:
    """Images per second of the same steps with the batch already on the device (student and
    teacher in channels-last memory format with ``channels_last``)."""
    with stage1_mining(method) as run:
        return _bare_rate(run, args, device, channels_last)


def _bare_rate(method: str, args, device: str, channels_last: bool) -> float:
    import timm
    import torch
    import torch.nn.functional as F

    import refilled_hf  # noqa: F401
    from refilled_hf.backbone import FrozenTeacher, StudentModel
    from refilled_hf.data import load_classification_data
    from refilled_hf.losses import kd_loss, local_classifier_loss, relationship_loss, rkd_loss

    data = load_classification_data(str(args.dataset), classes=args.classes, shots_per_class=args.shots,
                                    validation_fraction=0.0, test_split=None)  # fmt: skip
    classes = data.num_classes
    torch.manual_seed(0)
    student = StudentModel(timm.create_model(args.student, num_classes=classes)).to(device).train()
    teacher = FrozenTeacher(timm.create_model(args.teacher, num_classes=classes), student.model.pretrained_cfg)
    teacher = teacher.to(device)
    if channels_last:
        from refilled_hf.backbone import use_channels_last

        use_channels_last(student)
        use_channels_last(teacher)
    student.set_embeddings_only(method == "stage1")
    order = torch.randperm(len(data.train))[: args.batch]
    mean = torch.tensor(student.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(student.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    images = torch.stack([torch.tensor(data.train._decoded[i]).permute(2, 0, 1) for i in order.tolist()])
    x = ((images.float() / 255 - mean) / std).to(device)
    if args.image_size:  # the batch at the training size, already on the device
        x = F.interpolate(x, size=(args.image_size, args.image_size), mode="bilinear", antialias=False)
    y = torch.as_tensor(data.train.labels[order.numpy()]).to(device)
    centers = F.normalize(torch.randn(classes, teacher.model.num_features, device=device), dim=1)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                nesterov=True, weight_decay=5e-4)  # fmt: skip
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with autocast:
            out = student(x)
            t_emb, t_logits = teacher(x) if method != "ce" else (None, None)
            if method == "stage1":
                loss = relationship_loss(out["embeddings"], t_emb, y)
            else:
                loss = F.cross_entropy(out["logits"].float(), y)
                if method == "kd":
                    loss = loss + 0.9 * kd_loss(out["logits"], t_logits)
                elif method == "rkd":
                    loss = loss + rkd_loss(out["embeddings"], t_emb)
                elif method == "stage2":
                    loss = loss + local_classifier_loss(out["logits"], t_emb, centers, y, weight=10.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps - args.warmup):  # queued back to back, as a training loop runs them
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return args.batch * (args.steps - args.warmup) / (time.perf_counter() - start)


class _BuildTime(logging.Handler):
    """Catches the library's 'Teacher cache built in X s.' log record."""

    def __init__(self):
        super().__init__()
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Teacher cache built in"):
            self.seconds = float(record.args[0])


def teacher_cache_row(args, teacher: str, work: Path) -> dict:
    """REFILLED stage 1 on the device path with and without the teacher cache, in this
    process, and what building the cache cost (``--cache_shots`` images per class)."""
    import copy

    small = copy.copy(args)
    small.shots = args.cache_shots
    without = pipeline_rate("stage1", "device", small, teacher, work)
    catcher = _BuildTime()
    cache_logger = logging.getLogger("refilled_hf.teacher_cache")
    cache_logger.addHandler(catcher)
    cache_logger.setLevel(logging.INFO)
    try:
        cached = pipeline_rate("stage1", "device", small, teacher, work, teacher_cache=str(work / "cache"))
    finally:
        cache_logger.removeHandler(catcher)
    images = len(args.classes_list) * args.cache_shots
    return {
        "images": images,
        "variants": 162,
        "build_seconds": catcher.seconds,
        "stage1_images_per_s": without,
        "stage1_cached_images_per_s": cached,
        "speedup": cached / without,
        # teacher passes a run must save before the cache pays: build time / per-image saving
        "breakeven_epochs": (catcher.seconds or float("nan")) / (images * (1 / without - 1 / cached)),
    }


def small_run_seconds(args, teacher: str, work: Path) -> dict:
    """The issue's small middle-shot run: REFILLED, 100 images x 4 classes, 60 + 60 epochs."""
    from refilled_hf.config import RefilledConfig
    from refilled_hf.pipeline import run_distillation

    config = RefilledConfig(
        teacher=teacher, student=args.student, dataset=str(args.dataset), classes="0-3", shots_per_class=100,
        stage1_epochs=60, stage2_epochs=60, stage2_milestones="30,42,54", disable_tqdm=True, bf16=args.bf16,
        use_cpu=args.device == "cpu", output_dir=str(work / "small"), logging_steps=50,
    )  # fmt: skip
    start = time.perf_counter()
    results = run_distillation(config)
    return {
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": results["train_seconds"],  # stage 1 and every stage 2 the lambda search ran
        "test_top1": results["final"]["test_top1"],
    }


def compile_run_rows(args, teacher: str, work: Path) -> list[dict]:
    """A whole REFILLED run (``--classes`` x ``--shots``, validation carved, 15 + 15 epochs,
    library defaults: evaluations, checkpoints, the final test) eager and under each
    ``--compile_run`` mode, the same seed: wall time, training time and the accuracies, so
    that a mode is checked end to end (evaluation, the epoch's last batch, the export)."""
    from refilled_hf.config import RefilledConfig
    from refilled_hf.pipeline import run_distillation

    rows = []
    for mode in ["eager", *args.compile_run]:
        extra = {} if mode == "eager" else {"torch_compile_mode": mode}
        config = RefilledConfig(
            teacher=teacher, student=args.student, dataset=str(args.dataset), classes=args.classes,
            shots_per_class=args.shots, stage1_epochs=15, stage2_epochs=15, stage2_milestones="8,11,14",
            per_device_train_batch_size=args.batch, disable_tqdm=True, bf16=args.bf16, use_cpu=args.device == "cpu",
            output_dir=str(work / f"run-{mode}"), logging_steps=50, **extra,
        )  # fmt: skip
        start = time.perf_counter()
        results = run_distillation(config)
        row = {
            "mode": mode,
            "wall_seconds": time.perf_counter() - start,
            "train_seconds": results["train_seconds"],  # stage 1 and every stage 2 the lambda search ran
            "stage1_test_ncm_top1": results["stage1"]["test_ncm_top1"],
            "test_top1": results["final"]["test_top1"],
            "validation_top1": results["final"]["validation_top1"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_compile_run_results(rows: list[dict], args, device_name: str, out: Path) -> None:
    """``compile_run_<device>.json`` and ``.md`` under ``out``."""
    lines = [
        f"# A whole REFILLED run, eager and compiled, on {device_name}",
        "",
        f"{args.student} student, {args.teacher} teacher (untrained: a speed and equivalence check, not an accuracy "
        f"claim), CIFAR-10 classes {args.classes} x {args.shots} images, 15 + 15 epochs, batch {args.batch}, "
        f"{_precision(args)}, library defaults otherwise, seed 0, one process. The student's dropout masks are "
        "inductor's own draws when compiled (eager's kernels otherwise): the accuracies agree as two seeds' would, "
        "not exactly.",
        "",
        "| mode | wall (s) | training (s) | stage-1 NCM test top-1 | test top-1 | validation top-1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['wall_seconds']:.0f} | {r['train_seconds']:.0f} | {r['stage1_test_ncm_top1']:.2f} | "
            f"{r['test_top1']:.2f} | {r['validation_top1']:.2f} |"
        )
    _write_rows(out, "compile_run", rows, args, device_name, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dataset", default=str(CIFAR10))
    parser.add_argument("--classes", default="0-9")
    parser.add_argument("--shots", type=int, default=500)
    parser.add_argument("--student", default="cifar_wrn_16_2")
    parser.add_argument("--teacher", default="cifar_wrn_40_2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=None,
                        help="train at this input size (over 64 px: timm's ImageNet transforms)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the workers path")
    parser.add_argument("--paths", nargs="+", default=["device", "workers"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[*METHODS, STAGE1_LISTED])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--small_run", action="store_true")
    parser.add_argument("--teacher_cache", action="store_true",
                        help="also time stage 1 with and without the teacher cache, and its build")  # fmt: skip
    parser.add_argument("--cache_shots", type=int, default=20, help="images per class of the teacher-cache rows")
    parser.add_argument("--only_teacher_cache", action="store_true", help="only the teacher-cache rows")
    parser.add_argument("--compile_modes", nargs="+", default=None,
                        help="only the torch.compile rows: ce, stage 1 and 2 (of --methods) eager and under each "
                        "inductor mode given (default, reduce-overhead, max-autotune-no-cudagraphs, ...)")  # fmt: skip
    parser.add_argument("--channels_last_rows", action="store_true",
                        help="only the memory-format rows: each method, pipeline and bare loop, in the default "
                        "layout and with --channels_last")  # fmt: skip
    parser.add_argument("--compile_run", nargs="+", default=None,
                        help="only a whole REFILLED run (15 + 15 epochs), eager and under each inductor mode given: "
                        "time and accuracies")  # fmt: skip
    parser.add_argument("--sync_rows", action="store_true",
                        help="only the synchronization rows: host-device syncs per training step of each method and "
                        "the lines that cause them (CUDA)")  # fmt: skip
    parser.add_argument(
        "--host_overhead",
        action="store_true",
        help="per method, the host's work per step: pipeline minus bare loop, both on `host_probe`, "
        "a model with almost no compute (student and teacher; --repeats runs each, fastest kept)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell of --host_overhead")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    if args.steps < args.warmup + 2:
        parser.error(f"--steps {args.steps} leaves fewer than 2 timed steps after --warmup {args.warmup}")

    import torch

    import refilled_hf  # noqa: F401

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the runs are scratch: leave nothing in /tmp
    exit_through_cleanup_on_sigterm()  # (a stage that trains takes the notice itself, and stops likewise)
    from refilled_hf.data import load_classification_data

    if args.host_overhead:
        import host_probe  # noqa: F401  (registers the model)

        args.student = args.teacher = "host_probe"

    names = load_classification_data(
        args.dataset, classes=args.classes, shots_per_class=args.shots, validation_fraction=0.0, test_split=None
    )
    teacher = _write_teacher(work / "teacher", args.teacher, names.class_names)
    args.classes_list = names.class_names
    if args.teacher_cache or args.only_teacher_cache:
        row = teacher_cache_row(args, teacher, work)
        print(json.dumps(row), flush=True)
        write_cache_results(row, args, _device_name(device), Path(args.out))
        if args.only_teacher_cache:
            return
    if args.host_overhead:
        rows = host_overhead_rows(args, teacher, work)
        write_host_overhead_results(rows, args, _device_name(device), Path(args.out))
        return
    if args.compile_modes:
        rows = compile_rows(args, teacher, work)
        write_compile_results(rows, args, _device_name(device), Path(args.out))
        return
    if args.compile_run:
        rows = compile_run_rows(args, teacher, work)
        write_compile_run_results(rows, args, _device_name(device), Path(args.out))
        return
    if args.sync_rows:
        rows = sync_rows(args, teacher, work)
        write_sync_results(rows, args, _device_name(device), Path(args.out))
        return
    if args.channels_last_rows:
        rows = channels_last_rows(args, teacher, work)
        write_channels_last_results(rows, args, _device_name(device), Path(args.out))
        return
    rows = []
    for method in args.methods:
        bare = bare_rate(method, args, device)
        row = {"method": method, "bare_images_per_s": bare}
        for path in args.paths:
            rate = pipeline_rate(method, path, args, teacher, work)
            row[f"{path}_images_per_s"] = rate
            row[f"{path}_ratio"] = rate / bare
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "device": _device_name(device),
        "settings": _settings(args),
        "rows": rows,
        "peak_memory_mb": _peak_memory_mb(device),
        "torch": torch.__version__,
    }
    write_results(result, Path(args.out))  # the rows are kept even if the small run is interrupted
    if args.small_run:
        result["small_run"] = small_run_seconds(args, teacher, work)
        print(json.dumps(result["small_run"]), flush=True)
        write_results(result, Path(args.out))


def compile_rows(args, teacher: str, work: Path) -> list[dict]:
    """``ce``, REFILLED stage 1 and stage 2 (those of ``--methods``) on the device path, eager and under each
    ``--compile_modes`` mode, in this process: steady-state images/s and the first step's
    extra time (the compile)."""
    import torch._dynamo

    rows = []
    # full batches only: an epoch's last, smaller batch would recompile inside the timed window (once per
    # run, a one-off cost that a 60-step measurement would spread over every step)
    full = {"dataloader_drop_last": True}
    for method in [m for m in args.methods if m in ("ce", "stage1", "stage2")]:
        eager = pipeline_timing(method, "device", args, teacher, work, **full)
        for mode in args.compile_modes:
            torch._dynamo.reset()  # every row pays its own compile: nothing reused from the rows before
            timing = pipeline_timing(method, "device", args, teacher, work, torch_compile_mode=mode, **full)
            row = {"method": method, "mode": mode, "eager_images_per_s": eager["images_per_s"],
                   "compiled_images_per_s": timing["images_per_s"],
                   "speedup": timing["images_per_s"] / eager["images_per_s"],
                   "compile_seconds": timing["first_step_extra_s"] - eager["first_step_extra_s"]}  # fmt: skip
            # steps of this stage before the compile has paid for itself (never, when it does not speed up)
            saving = 1 / eager["images_per_s"] - 1 / timing["images_per_s"]
            row["breakeven_steps"] = row["compile_seconds"] / (args.batch * saving) if saving > 0 else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def host_overhead_rows(args, teacher: str, work: Path) -> list[dict]:
    """Each ``--methods`` method with ``host_probe`` as student and teacher, in this process:
    ms per step of the pipeline (device data path) and of the bare loop, the fastest of
    ``--repeats`` runs each, and their difference: the host's work the pipeline adds per
    step (augmentation, the Trainer's loop and callbacks, accelerate's wrappers, the loss
    bookkeeping)."""
    rows = []
    for method in args.methods:
        pipeline = [args.batch * 1e3 / pipeline_rate(method, "device", args, teacher, work / f"repeat{i}")
                    for i in range(args.repeats)]  # fmt: skip
        bare = [args.batch * 1e3 / bare_rate(method, args, args.device) for _ in range(args.repeats)]
        row = {"method": method, "pipeline_ms": min(pipeline), "bare_ms": min(bare),
               "host_overhead_ms": min(pipeline) - min(bare),
               "pipeline_ms_all": pipeline, "bare_ms_all": bare}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_host_overhead_results(rows: list[dict], args, device_name: str, out: Path) -> None:
    """``host_overhead_<device>.json`` and ``.md`` under ``out``."""
    lines = [
        f"# Host work per training step on {device_name}",
        "",
        f"`host_probe` (a model with almost no compute) as student and teacher, batch {args.batch}, "
        f"{_precision(args)}, device data path, steps {args.warmup}-{args.steps} timed, fastest of {args.repeats} "
        "runs per cell, all in one process. Pipeline minus bare loop = the host's work the pipeline adds to "
        "each step, which a launch-bound GPU step pays in full.",
        "",
        "| method | pipeline (ms/step) | bare loop (ms/step) | added by the pipeline (ms/step) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pipeline_ms']:.2f} | {r['bare_ms']:.2f} | {r['host_overhead_ms']:.2f} |")
    _write_rows(out, "host_overhead", rows, args, device_name, lines)


def sync_rows(args, teacher: str, work: Path) -> list[dict]:
    """Each ``--methods`` method on the device path: the host-device synchronizations per
    timed step, by the line that caused them (CUDA only; none are counted on a CPU)."""
    rows = []
    for method in args.methods:
        counter = SyncCounter(args.warmup + 1, args.steps)
        pipeline_timing(method, "device", args, teacher, work, counters=(counter,), logging_steps=10**6)
        steps = args.steps - args.warmup
        row = {"method": method, "steps": steps, "syncs_per_step": sum(counter.sites.values()) / steps,
               "sites": dict(sorted(counter.sites.items(), key=lambda kv: -kv[1]))}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_sync_results(rows: list[dict], args, device_name: str, out: Path) -> None:
    """``syncs_<device>.json`` and ``.md`` under ``out``."""
    lines = [
        f"# Host-device synchronizations per training step on {device_name}",
        "",
        f"`torch.cuda.set_sync_debug_mode('warn')` over steps {args.warmup + 1}-{args.steps} of the pipeline "
        f"(device data path, batch {args.batch}, {_precision(args)}, no logging inside the window).",
        "",
        "| method | syncs per step | where (file:line: count) |",
        "|---|---:|---|",
    ]
    for r in rows:
        sites = ", ".join(f"{k}: {v}" for k, v in list(r["sites"].items())[:6]) or "none"
        lines.append(f"| {r['method']} | {r['syncs_per_step']:.2f} | {sites} |")
    _write_rows(out, "syncs", rows, args, device_name, lines)


def channels_last_rows(args, teacher: str, work: Path) -> list[dict]:
    """Each ``--methods`` method on the device path and in the bare loop, in the default memory
    format and in channels-last, in this process: steady-state images/s and the speed-ups."""
    rows = []
    for method in args.methods:
        row: dict = {"method": method}
        for layout, extra in (("default", {}), ("channels_last", {"channels_last": True})):
            row[f"{layout}_images_per_s"] = pipeline_rate(method, "device", args, teacher, work, **extra)
            row[f"bare_{layout}_images_per_s"] = bare_rate(method, args, args.device, channels_last=bool(extra))
        row["speedup"] = row["channels_last_images_per_s"] / row["default_images_per_s"]
        row["bare_speedup"] = row["bare_channels_last_images_per_s"] / row["bare_default_images_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _write_files(out: Path, stem: str, payload: dict, lines: list[str]) -> None:
    """``<stem>.json`` (``payload``) and ``<stem>.md`` (``lines``) under ``out``; the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("out", "classes_list")}


def _precision(args) -> str:
    return "bf16" if args.bf16 else "fp32"


def _write_rows(out: Path, kind: str, rows: list[dict], args, device_name: str, lines: list[str]) -> None:
    """``<kind>_<device>.json`` (the device, the settings and ``rows``) and ``.md`` (``lines``)."""
    payload = {"device": device_name, "settings": _settings(args), "rows": rows}
    _write_files(out, f"{kind}_{args.device}", payload, lines)


def write_channels_last_results(rows: list[dict], args, device_name: str, out: Path) -> None:
    """``channels_last_<device>.json`` and ``.md`` under ``out``."""
    lines = [
        f"# Channels-last memory format on {device_name}",
        "",
        f"{args.student} student, {args.teacher} teacher, batch {args.batch}, {_precision(args)}, "
        f"device data path; steps {args.warmup}-{args.steps} timed, all rows in one process. Pipeline = "
        "`refilled-hf distill` without and with `--channels_last`; bare loop = the same steps on one batch already "
        "on the device.",
        "",
        "| method | pipeline default (img/s) | pipeline channels-last | speed-up | bare default | bare channels-last "
        "| speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['default_images_per_s']:.0f} | {r['channels_last_images_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {r['bare_default_images_per_s']:.0f} | {r['bare_channels_last_images_per_s']:.0f} "
            f"| {r['bare_speedup']:.2f}x |"
        )
    _write_rows(out, "channels_last", rows, args, device_name, lines)


def write_compile_results(rows: list[dict], args, device_name: str, out: Path) -> None:
    """``compile_<device>.json`` and ``.md`` under ``out``."""
    lines = [
        f"# torch.compile on {device_name}",
        "",
        f"REFILLED, {args.student} student, {args.teacher} teacher, batch {args.batch}, "
        f"{_precision(args)}, device data path, `--torch_compile_mode` as given (inductor); steps "
        f"{args.warmup}-{args.steps} timed, all rows in one process. Compile = the first step's extra time over the "
        "eager run's. Full batches only (`--dataloader_drop_last`): an epoch's last, smaller batch compiles once more, "
        "a one-off cost a short window would spread over every step.",
        "",
        "| stage | mode | eager (img/s) | compiled (img/s) | speed-up | compile (s) | steps to pay back |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pay = f"{r['breakeven_steps']:.0f}" if r["breakeven_steps"] is not None else "never"
        rates = f"{r['eager_images_per_s']:.0f} | {r['compiled_images_per_s']:.0f} | {r['speedup']:.2f}x"
        lines.append(f"| {r['method']} | {r['mode']} | {rates} | {r['compile_seconds']:.0f} | {pay} |")
    _write_rows(out, "compile", rows, args, device_name, lines)


def write_cache_results(row: dict, args, device_name: str, out: Path) -> None:
    """``teacher_cache_<device>.json`` and ``.md`` under ``out``."""
    lines = [
        f"# Teacher cache on {device_name}",
        "",
        f"REFILLED stage 1, {args.student} student, {args.teacher} teacher, batch {args.batch}, "
        f"{_precision(args)}, device data path, {row['images']} training images "
        f"({args.cache_shots} per class); steps {args.warmup}-{args.steps} timed, both rows in one process.",
        "",
        "| stage 1 without cache (img/s) | with cache (img/s) | speed-up | cache build (s) | epochs to pay back |",
        "|---:|---:|---:|---:|---:|",
        f"| {row['stage1_images_per_s']:.0f} | {row['stage1_cached_images_per_s']:.0f} | {row['speedup']:.2f}x | "
        f"{row['build_seconds']:.0f} | {row['breakeven_epochs']:.0f} |",
        "",
        f"The build runs the teacher on each image under all {row['variants']} crops x flips once; a run (or the "
        "sum of runs that share the cache: seeds, baselines, sweeps) recovers it after the epochs in the last column.",
    ]
    _write_files(
        out, f"teacher_cache_{args.device}", {"device": device_name, "settings": _settings(args), **row}, lines
    )


def write_results(result: dict, out: Path) -> None:
    """``throughput_<device>.json`` and ``.md`` under ``out``."""
    settings, rows = result["settings"], result["rows"]
    paths = settings["paths"]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput_{settings['device']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    size = f"{settings['image_size']} px" if settings.get("image_size") else "the student's input size"
    lines = [
        f"# Throughput on {result['device']}",
        "",
        f"{settings['student']} student, {settings['teacher']} teacher, batch {settings['batch']}, "
        f"{'bf16' if settings['bf16'] else 'fp32'}, CIFAR-10 classes {settings['classes']} x {settings['shots']} "
        f"images at {size}; steps {settings['warmup']}-{settings['steps']} timed; {settings['workers']} loader "
        "workers on the "
        "workers path.",
        "",
        "| method | bare loop (img/s) | " + " | ".join(f"{p} path (img/s) | {p} / bare" for p in paths) + " |",
        "|---|---:|" + "---:|---:|" * len(paths),
    ]
    for row in rows:
        cells = " | ".join(f"{row[f'{p}_images_per_s']:.0f} | {row[f'{p}_ratio']:.2f}" for p in paths)
        lines.append(f"| {row['method']} | {row['bare_images_per_s']:.0f} | {cells} |")
    lines.append("")
    where = "CUDA allocated" if settings["device"] == "cuda" else "resident, whole process"
    if result["peak_memory_mb"] == result["peak_memory_mb"]:  # not NaN
        lines.append(f"Peak memory: {result['peak_memory_mb']:.0f} MiB ({where}).")
    if result.get("note"):
        lines.append(f"Note: {result['note']}.")
    if "small_run" in result:
        s = result["small_run"]
        lines.append(
            f"Small run (REFILLED, 100 images x 4 classes, 60 + 60 epochs): {s['wall_seconds']:.0f} s wall, "
            f"{s['train_seconds']:.0f} s training, test top-1 {s['test_top1']:.1f} %."
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
