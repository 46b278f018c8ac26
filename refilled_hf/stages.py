"""One stage of a run: its trainer, its training (stopped by a signal, or refused where it
diverged), its final weights and metrics (``<stage>/final/``), and stage 2's teacher centres.
:mod:`refilled_hf.pipeline` runs the stages in order; :mod:`refilled_hf.candidates` runs stage 2
once per lambda candidate."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, set_seed

from .backbone import StudentModel
from .config import RefilledConfig
from .data import ClassificationData
from .hub import replace_dir_atomically, save_safetensors
from .preemption import StopOnSignal
from .rundir import last_complete_checkpoint
from .trainer import RefilledTrainer, stage_args

logger = logging.getLogger(__name__)

#: a finished stage's folder of its final student weights and metrics
FINAL_DIR = "final"


class RunError(ValueError):
    """A run that cannot start or continue (the message says why and what to do)."""


class DivergedError(RunError):
    """A stage whose loss or weights went non-finite."""


class RunInterrupted(RunError):
    """A stage stopped by a signal: a cluster's notice before a kill (after a checkpoint of
    the step) or a Ctrl-C. ``stopped``: where it stopped; ``resume``: how the run continues;
    ``signal_number``: the signal's number (the exit status is 128 + it)."""

    def __init__(self, stopped: str, resume: str, signal_number: int):
        super().__init__(f"{stopped}. Nothing was exported. {resume}.")
        self.stopped, self.resume, self.signal_number = stopped, resume, signal_number


def make_trainer(
    config: RefilledConfig,
    stage: str,
    stage_dir: Path,
    student: StudentModel,
    data: ClassificationData,
    callbacks: list | None = None,
    **kwargs,
) -> RefilledTrainer:
    """The trainer of ``stage`` (``stage1``, ``stage2``, or a baseline's method) in ``stage_dir``,
    on ``data``'s training and validation splits; ``kwargs``: the teacher and what it needs."""
    args = stage_args(config, stage, stage_dir, images=len(data.train), evaluates=data.validation is not None,
                      load_best_model_at_end=config.load_best_model_at_end and config.has_validation)  # fmt: skip
    return RefilledTrainer(
        model=student,
        args=args,
        stage=stage,
        num_classes=data.num_classes,
        train_dataset=data.train,
        eval_dataset=data.validation,
        callbacks=callbacks,
        **kwargs,
    )


def fit(trainer: RefilledTrainer, checkpoint: str | None) -> RefilledTrainer:
    """Train the stage (from ``checkpoint``, a resume, or its start), setting ``train_seconds``
    and ``train_metrics`` (the whole stage's); a signal stops the run (:class:`RunInterrupted`),
    a non-finite loss or weight too (:class:`DivergedError`)."""
    if checkpoint is None:
        # A stage starts from the seed alone, whatever ran before it in this process: the
        # teacher centres, computed or read from a resumed run's cache, draw from the
        # global RNG (every DataLoader iteration does), which would make a stage 2 resumed
        # before its first checkpoint differ from an uninterrupted one. From a checkpoint,
        # the Trainer restores the RNG states saved there.
        set_seed(trainer.args.seed)
    start = time.perf_counter()
    notice = StopOnSignal()  # a SIGTERM while it trains: a checkpoint of the step, then a stop
    banner = _StageBanner(_stage_name(trainer), checkpoint)
    trainer.add_callback(notice)
    trainer.callback_handler.callbacks.insert(0, banner)  # before the progress bar starts
    try:
        with notice.installed():
            train_output = trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:  # Ctrl-C: stop now, saying what a resume continues from
        _stop_for_interrupt(trainer)
    finally:
        trainer.remove_callback(notice)
        trainer.remove_callback(banner)
    if notice.received is not None:
        _stop_for_notice(trainer, notice)
    # (a resumed stage: the calls before this one too, as its checkpoint recorded them)
    trainer.train_seconds = trainer.earlier_training["seconds"] + time.perf_counter() - start
    trainer.train_metrics = train_output.metrics
    _check_finite(trainer)
    return trainer


class _StageBanner(TrainerCallback):
    """Says in the log which stage starts, or continues from which checkpoint, and for how
    many steps: a run trains up to four stages in a row (stage 1, each lambda candidate, the
    student alone), whose progress bars and logged metrics do not name them."""

    def __init__(self, name: str, checkpoint: str | None):
        self.name, self.checkpoint = name, checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        # the state is the checkpoint's by now (its step), and holds the stage's steps; its
        # epochs are rounded up, the stage's own may be fractional
        bound = "--max_steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
        length = f"{state.max_steps} steps ({bound})"
        if self.checkpoint is None:
            logger.info("%s: training %s in %s.", self.name, length, args.output_dir)
        else:
            logger.info("%s: continuing from %s, at step %d of %s.", self.name, self.checkpoint, state.global_step,
                        length)  # fmt: skip


def _stage_name(trainer: RefilledTrainer) -> str:
    """The stage and, where its folder says more (a lambda candidate, the student alone), the folder."""
    folder = Path(trainer.args.output_dir).name
    return trainer.stage if folder == trainer.stage else f"{trainer.stage} ({folder})"


def _stop_for_notice(trainer: RefilledTrainer, notice: StopOnSignal) -> None:
    """The run stops where a signal stopped a stage (nothing exported), saying where it can resume."""
    name = signal.Signals(notice.received).name
    stage_dir = Path(trainer.args.output_dir)
    if notice.stopped_at is not None:
        where = (f"at step {notice.stopped_at} of {trainer.state.max_steps}, after a checkpoint of that step "
                 f"({stage_dir / f'checkpoint-{notice.stopped_at}'})")  # fmt: skip
    else:
        where = "as its training ended, before a step could be checkpointed (it resumes from its last checkpoint)"
    raise RunInterrupted(
        f"{name} received: {_stage_name(trainer)} stopped {where}",
        "Run the same command with --resume_from_checkpoint true to continue",
        notice.received,
    )


def _stop_for_interrupt(trainer: RefilledTrainer) -> None:
    """A Ctrl-C (SIGINT) while a stage trains stops at once, as the user asked, naming the
    checkpoint a resume continues from: the stage's newest complete one, where there is one."""
    stage_dir = Path(trainer.args.output_dir)
    found = last_complete_checkpoint(stage_dir)
    if found is not None:  # (checkpoint-<step>: the step its name says, as the Trainer names it)
        resume = f"continues from its newest checkpoint, {found} (step {found.name.removeprefix('checkpoint-')})"
    else:
        resume = f"starts {_stage_name(trainer)} again (it had written no checkpoint yet)"
    raise RunInterrupted(
        f"interrupted (SIGINT): {_stage_name(trainer)} stopped at step {trainer.state.global_step} of "
        f"{trainer.state.max_steps}",
        f"The same command with --resume_from_checkpoint true {resume}",
        signal.SIGINT,
    ) from None


def _check_finite(trainer: RefilledTrainer) -> None:
    """The last line of defence: a stage whose loss or weights went non-finite stops the
    run before anything is exported or any accuracy is claimed."""
    bad_weights = [
        n for n, t in trainer._student().state_dict().items() if t.is_floating_point() and not t.isfinite().all()
    ]
    loss = trainer.train_metrics.get("train_loss")
    # Every process decides alike: each counts the non-finite losses of its own share of the
    # batches (and its own buffers), so one process alone may see them; one that stopped while
    # the others went on would leave them waiting at their next collective, or exporting (a
    # lambda candidate diverged on one process only: the processes would pick different ones).
    loss_not_finite = isinstance(loss, float) and not math.isfinite(loss)
    counts = torch.tensor([float(trainer.nonfinite_losses), len(bad_weights), loss_not_finite],
                          device=trainer.accelerator.device)  # fmt: skip
    if trainer.accelerator.num_processes > 1:
        counts = trainer.accelerator.reduce(counts, reduction="sum")
    bad_steps, bad_tensors, bad_loss = (int(v) for v in counts.tolist())
    if bad_steps or bad_tensors or bad_loss:
        processes = trainer.accelerator.num_processes
        found = []
        if bad_steps:
            over = f" (counted over its {processes} processes' batches)" if processes > 1 else ""
            found.append(f"{bad_steps} training steps had a non-finite loss{over}")
        elif bad_loss:
            found.append("the training loss is not finite")
        if bad_weights:
            found.append(f"{len(bad_weights)} weight tensors hold NaN/inf (e.g. {bad_weights[0]})")
        elif bad_tensors:
            found.append(f"{bad_tensors} weight tensors of another process hold NaN/inf")
        what = "; ".join(found)
        raise DivergedError(
            f"Training diverged in {trainer.stage} ({what}). Nothing was exported. Lower the learning rate "
            "(--stage1_learning_rate / --stage2_learning_rate) or the loss weights (--distill_weight, "
            "--stage1_weight), "
            "or turn on gradient clipping (--max_grad_norm 1), and start over with --overwrite_output true."
        )


def save_final(stage_dir: Path, student: StudentModel, metrics: dict[str, Any], is_main: bool) -> None:
    """The stage's final student weights and metrics, in one atomically renamed folder."""
    if not is_main:
        return
    staging = stage_dir / f".{FINAL_DIR}.staging"
    staging.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in student.model.state_dict().items()}
    save_safetensors(state, staging / "model.safetensors")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    replace_dir_atomically(staging, stage_dir / FINAL_DIR)


def load_final(stage_dir: Path, student: StudentModel) -> dict[str, Any]:
    """Load a finished stage's final weights into ``student``; returns its metrics."""
    try:
        student.model.load_state_dict(load_file(str(stage_dir / FINAL_DIR / "model.safetensors")))
    except Exception as err:  # noqa: BLE001 - any failure means a damaged folder
        raise _damaged_final(stage_dir, err) from None
    return read_final_metrics(stage_dir)


def _damaged_final(stage_dir: Path, err: Exception) -> RunError:
    return RunError(
        f"{stage_dir / FINAL_DIR} is damaged ({type(err).__name__}): this run cannot continue from it. Start over "
        "with --overwrite_output true."
    )


def final_metrics_path(stage_dir: Path) -> Path:
    """``<stage>/final/metrics.json``: written with the stage's final weights (one renamed folder),
    it is there once the stage has finished."""
    return stage_dir / FINAL_DIR / "metrics.json"


def is_finished(stage_dir: Path) -> bool:
    """Whether the stage in ``stage_dir`` finished (its final weights and metrics are there)."""
    return final_metrics_path(stage_dir).is_file()


def read_final_metrics(stage_dir: Path) -> dict[str, Any]:
    """A finished stage's metrics (``final/metrics.json``)."""
    try:
        return json.loads(final_metrics_path(stage_dir).read_text())
    except Exception as err:  # noqa: BLE001 - any failure means a damaged folder
        raise _damaged_final(stage_dir, err) from None


def split_metrics(trainer: RefilledTrainer, data: ClassificationData, prefix_map: dict[str, str]) -> dict[str, Any]:
    """Evaluate the trainer's current model on validation and test."""
    metrics: dict[str, Any] = {}
    for split, prefix in prefix_map.items():
        dataset = getattr(data, split)
        if dataset is not None:
            metrics.update(trainer.evaluate(dataset, metric_key_prefix=prefix))
    metrics.pop("epoch", None)
    return metrics


def barrier(trainer: RefilledTrainer) -> None:
    """Wait until every process has reached this point (what the main process wrote is there)."""
    trainer.accelerator.wait_for_everyone()


def state_copy(student: StudentModel) -> dict[str, torch.Tensor]:
    """A copy of the student's weights (a starting point several candidates share)."""
    return {k: v.detach().clone() for k, v in student.model.state_dict().items()}


def stage2_trainer(config, stage_dir, student, data, callbacks, teacher, cache, centers_data, results,
                   known_centers: torch.Tensor | None = None) -> RefilledTrainer:  # fmt: skip
    """Stage 2's trainer with its teacher centres in place (``--centers global``): read from
    the stage's cache, computed (timed in ``results``), or ``known_centers`` of this run."""
    trainer = make_trainer(config, "stage2", stage_dir, student, data, callbacks, teacher=teacher, teacher_cache=cache)
    if config.centers == "global":
        start = time.perf_counter()
        _teacher_centers(trainer, stage_dir, centers_data, known=known_centers)
        results.setdefault("teacher_centers_seconds", time.perf_counter() - start)
    return trainer


def _teacher_centers(
    trainer: RefilledTrainer, stage_dir: Path, centers_data, known: torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher centres of the student's classes, computed once over the training split
    (summed over every process) and kept with the stage so a resumed stage 2 reuses them.
    ``known``: centres this run already computed (another lambda candidate's)."""
    cache = stage_dir / "teacher_centers.safetensors"
    if known is not None:
        trainer.class_centers = known.to(trainer.args.device)
        return trainer.class_centers
    if cache.is_file():
        try:
            centers = load_file(str(cache))["centers"]
        except Exception as err:  # noqa: BLE001 - a damaged cache
            raise RunError(
                f"{cache} is damaged ({type(err).__name__}). Delete it (it is recomputed) and resume again."
            ) from None
        if centers.dim() != 2 or centers.shape[0] != trainer.num_classes or not centers.isfinite().all():
            raise RunError(f"{cache} does not hold this run's class centres. Delete it (it is recomputed) and resume.")
        trainer.class_centers = centers.to(trainer.args.device)
        return trainer.class_centers
    centers = trainer.compute_teacher_centers(centers_data)
    if trainer.is_world_process_zero():
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / ".teacher_centers.tmp"
        save_safetensors({"centers": centers.detach().cpu().contiguous()}, tmp)
        os.replace(tmp, cache)
    return centers
