"""`RefilledTrainer`: one `transformers.Trainer` for REFILLED's stages and the baselines.

The stage decides the loss:

* ``stage1``: relationship matching on embeddings only (the head is frozen);
* ``stage2``: cross-entropy + lambda * local-classifier KL with the teacher's class centres;
* ``ce``, ``kd``, ``rkd``: the baselines (``ce`` also trains teachers).

Evaluation reports nearest-class-mean accuracy (stage 1; centres from the training
split) or top-1/top-5 accuracy of the head, counting every image exactly once across
processes; prediction returns the scores it ranks, image by image.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer, TrainerCallback, default_data_collator
from transformers.trainer_utils import PredictionOutput, TrainOutput

from .augmentation_seeds import SeededAugmentation
from .backbone import FrozenTeacher, StudentModel, embed, use_channels_last
from .config import (
    DEFAULT_VALIDATION_FRACTION,
    EVERY_COMMAND_FIELDS,
    RefilledConfig,
    field_defaults,
    option_name,
    options_text,
)
from .data_device import IndexedImages
from .distributed import gather_batch, gather_for_mining, own_rows, share_rank0_buffers
from .hub import check_hub_access, export_model, files_not_exported, push_folder, with_usual_permissions
from .losses import (
    batch_class_centers,
    centers_from_sums,
    class_sums,
    kd_loss,
    local_class_mask,
    local_classifier_loss,
    local_teacher_correct,
    ncm_predict,
    relationship_loss_with_stats,
    rkd_loss,
    teacher_confidence_weights,
)
from .model_card import trainer_card
from .preflight import steps_per_epoch
from .rundir import checkpoint_problem, last_complete_checkpoint
from .teacher_cache import TeacherCache
from .trackers import KeepStageRunsOpen, end_stage_runs
from .worker_processes import loader_worker_init

__all__ = ["STAGES", "RefilledTrainer", "batch_pixels", "compute_class_centers", "set_evaluation_cadence", "stage_args"]

STAGES = ("stage1", "stage2", "ce", "kd", "rkd")


class _SplitScores(NamedTuple):
    """What one pass of the student over a split gives (see ``RefilledTrainer._score_split``)."""

    metrics: dict[str, Any]  # what evaluate() logs
    per_class: dict[str, Any]  # returned, not logged (with ``per_class_metrics``)
    scores: torch.Tensor | None  # every image's, in order, on the CPU (when kept)
    labels: torch.Tensor | None


class _StepOrderedCheckpoints(logging.Filter):
    """transformers sorts checkpoints by mtime before rotating them and, when two were saved
    within a second (every short stage: the quickstart's), warns that "mtime may not be
    reliable on this filesystem" and sorts them by step instead. Step order is the right one
    for checkpoint-<step> folders, so the warning is never actionable here: it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "mtime may not be reliable" not in record.getMessage()


logging.getLogger("transformers.trainer_utils").addFilter(_StepOrderedCheckpoints())
logger = logging.getLogger(__name__)


def batch_pixels(batch: dict[str, torch.Tensor], dataset) -> torch.Tensor:
    """A batch's pixels: ``pixel_values`` (worker path), or the images at ``index`` made
    on the device by ``dataset`` (an :class:`~refilled_hf.data_device.IndexedImages`)."""
    if "pixel_values" in batch:
        return batch["pixel_values"]
    return dataset.pixels(batch["index"])


@torch.no_grad()
def compute_class_centers(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    dataloader,
    num_classes: int,
    accelerator,
    dataset=None,
) -> torch.Tensor:
    """L2-normalized per-class sums of ``embed_fn`` over a (prepared) dataloader.

    Each batch is gathered across processes (``gather_for_metrics`` drops the samples
    that distributed sampling repeats to even out the last batch), so every image counts
    once and every rank sums the same rows: all ranks hold identical centres.
    """
    sums, counts = None, None
    for batch in dataloader:
        emb = embed_fn(batch_pixels(batch, dataset)).float()
        emb, labels = accelerator.gather_for_metrics((emb, batch["labels"]))
        part = class_sums(emb, labels, num_classes)
        sums = part if sums is None else sums + part
        batch_counts = torch.bincount(labels, minlength=num_classes)
        counts = batch_counts if counts is None else counts + batch_counts
    if sums is None:
        raise ValueError("Cannot compute class centres from an empty data set.")
    return centers_from_sums(sums, counts)


def set_evaluation_cadence(args: RefilledConfig, epochs: float, images: int) -> None:
    """``--evaluations_per_stage``, in place on a stage's ``args``: per-epoch evaluation and
    checkpoints become every ``ceil(epochs / N)`` epochs (in steps), so long schedules do not
    evaluate, re-embed the training split for NCM centres and save hundreds of times."""
    every = math.ceil(epochs / args.evaluations_per_stage) if args.evaluations_per_stage else 1
    if every <= 1:
        return
    per_epoch = steps_per_epoch(args, images)
    steps = every * per_epoch
    if option_name(args.eval_strategy) == "epoch":
        args.eval_strategy, args.eval_steps = "steps", steps
        # --eval_delay counts what the strategy counts: the user's epochs, now steps
        args.eval_delay = args.eval_delay * per_epoch
    if option_name(args.save_strategy) == "epoch":
        args.save_strategy, args.save_steps = "steps", steps


#: RefilledConfig fields that describe what ``refilled-hf distill`` loads and builds (the data,
#: the models, the lambda search, the run folder): a trainer, given its datasets and models,
#: reads none of them
PIPELINE_FIELDS = tuple(name for name in EVERY_COMMAND_FIELDS if name != "channels_last") + (
    "method", "student", "student_checkpoint", "student_drop_rate", "teacher", "teacher_checkpoint",
    "teacher_input_size", "teacher_classes", "teacher_cache", "teacher_cache_dtype", "teacher_cache_budget_gb",
    "shots_per_class", "horizontal_flip", "distill_weight_search", "student_alone_candidate", "overwrite_output",
    "compare_runs", "card_license",
)  # fmt: skip


def _warn_pipeline_fields(args: RefilledConfig) -> None:
    """Name the fields a config used directly sets for nothing (they are distill's)."""
    defaults = field_defaults()
    # (as the config resolved it when left unset)
    defaults["validation_fraction"] = DEFAULT_VALIDATION_FRACTION if args.validation_split is None else 0.0
    unread = {name: getattr(args, name) for name in PIPELINE_FIELDS if getattr(args, name) != defaults[name]}
    if unread:
        logger.warning(
            "RefilledTrainer does not read %s: they describe what `refilled-hf distill` loads and builds; a trainer "
            "takes its datasets and models as arguments.", options_text(unread),
        )  # fmt: skip


def stage_args(config: RefilledConfig, stage: str, output_dir: str | os.PathLike, *, images: int | None,
               evaluates: bool, load_best_model_at_end: bool) -> RefilledConfig:  # fmt: skip
    """The view of the run's ``config`` that ``stage``'s trainer runs with, for distill and for
    a config used directly alike: the stage's epochs and learning rate (``stage1_*``, or
    ``stage2_*``), its own ``output_dir``, ``--evaluations_per_stage``'s cadence over
    ``images`` training images (None: unknown, every epoch), ``--max_steps`` only where it
    stops the stage before its epochs do, no evaluation where there is no evaluation set, and
    the stage's selection metric. Checkpoints are never pushed (the run
    pushes its export once), nor the token pickled into them; the stage itself resumes only
    from the checkpoint its train() is given."""
    first = stage == "stage1"
    epochs = config.stage1_epochs if first else config.stage2_epochs
    view = config.stage_view(
        output_dir=str(output_dir),
        # each stage (and lambda candidate) is a run of its own for the trackers: W&B, MLflow, trackio name it
        run_name=tracker_run_name(config, Path(output_dir).name),
        num_train_epochs=epochs,
        learning_rate=config.stage1_learning_rate if first else config.stage2_learning_rate,
        resume_from_checkpoint=None,
        push_to_hub=False,
        hub_token=None,
        load_best_model_at_end=load_best_model_at_end,
    )
    if view.load_best_model_at_end or option_name(view.save_strategy) == "best":  # (best: saved where it improves)
        view.metric_for_best_model = "eval_ncm_top1" if first else "eval_top1"
        view.greater_is_better = True
    if not evaluates:
        view.eval_strategy = "no"
    if images is not None:
        set_evaluation_cadence(view, epochs, images)
        if view.max_steps >= math.ceil(epochs * steps_per_epoch(view, images)):
            # --max_steps stops a stage early; at or beyond the stage's own length the stage's
            # epochs end it (transformers would train on past them, with the schedule spent)
            view.max_steps = -1
    return view


def tracker_run_name(config: RefilledConfig, part: str) -> str:
    """The name the trackers (W&B, MLflow, trackio) give one part of a run (a stage's folder,
    ``final``): ``<--run_name, else output_dir>-<part>``."""
    return f"{config.run_name or config.output_dir}-{part}"


def _stage_config(args: RefilledConfig, stage: str, train_dataset, eval_dataset) -> tuple[RefilledConfig, bool, bool]:
    """The :func:`stage_args` view of a config used directly (not one ``refilled-hf distill``
    laid out for a stage), in the folder ``<output_dir>/<stage>``, so that the stages of one
    run never write, or resume from, each other's checkpoint-<step>. Returns the view, whether
    train() ends with a push (``push_to_hub``; never stage 1, whose head is untrained), and
    whether it continues from the folder's newest checkpoint (``resume_from_checkpoint='true'``,
    so that a script rerun after a crash continues every stage where it stopped)."""
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("push_to_hub=True needs hub_model_id='<user>/<name>': the repo the student goes to.")
    if args.resume_mode() not in (None, "latest"):
        raise ValueError(
            f"resume_from_checkpoint={args.resume_from_checkpoint!r} in the config would apply to every stage's "
            "trainer: set it to 'true' (each stage continues from its newest checkpoint), or pass the path to that "
            "stage's trainer.train(resume_from_checkpoint=...)."
        )
    _warn_pipeline_fields(args)
    if eval_dataset is None and option_name(args.eval_strategy) != "no":
        logger.info("No eval_dataset: the %s trainer evaluates only when you call evaluate().", stage)
    images = len(train_dataset) if train_dataset is not None and hasattr(train_dataset, "__len__") else None
    view = stage_args(
        args,
        stage,
        os.path.join(args.output_dir, stage),
        images=images,
        evaluates=eval_dataset is not None,
        load_best_model_at_end=args.load_best_model_at_end,
    )
    return view, bool(args.push_to_hub) and stage != "stage1", args.resume_mode() == "latest"


def collate_images(features: list[Any]) -> dict[str, torch.Tensor]:
    """A batch of a RefilledTrainer's data set: items ``{"pixel_values", "labels"}`` (or
    ``label``) as transformers' default collator stacks them, or ``(image tensor, class id)``
    pairs, as torchvision's data sets give them."""
    if features and isinstance(features[0], (tuple, list)):
        images, labels = zip(*(item[:2] for item in features))
        return {"pixel_values": torch.stack([torch.as_tensor(image) for image in images]),
                "labels": torch.as_tensor([int(label) for label in labels], dtype=torch.long)}  # fmt: skip
    return default_data_collator(features)


def _item_problem(item: Any) -> str | None:
    """Why a data set's item is not one :func:`collate_images` batches into images and class
    ids (None: it is)."""
    if isinstance(item, (tuple, list)):
        if len(item) < 2:
            return f"a {type(item).__name__} of {len(item)}"
        image, label = item[0], item[1]
    elif isinstance(item, dict):
        if "index" in item and "pixel_values" not in item:  # the device path's items (IndexedImages)
            return None
        if "pixel_values" not in item or not ({"labels", "label"} & set(item)):
            return f"a dict with the keys {sorted(item)}"
        image, label = item["pixel_values"], item.get("labels", item.get("label"))
    else:
        return f"a {type(item).__name__}"
    kind = f"of type {type(image).__module__}.{type(image).__qualname__}"
    try:  # (a list or array, as a data set without a torch format gives it, batches as a tensor)
        pixels = None if hasattr(image, "getpixel") else torch.as_tensor(image)  # (not a PIL image's HWC bytes)
    except (TypeError, ValueError, RuntimeError):
        pixels = None
    if pixels is None or pixels.ndim != 3:
        shape = "" if pixels is None else f" of shape {tuple(pixels.shape)}"
        return f"an image {kind}{shape}, not a (channels, height, width) tensor"
    if not pixels.is_floating_point():
        return f"an image of {pixels.dtype} pixels, not the floats a model's transform makes (ToTensor, Normalize)"
    if pixels.shape[0] > 4 and pixels.shape[-1] <= 4:
        return f"an image of shape {tuple(pixels.shape)}, channels last, not (channels, height, width)"
    try:
        int(label)
    except (TypeError, ValueError):
        return f"a label that is {type(label).__name__}, not a class id"
    return None


def _check_items(datasets_by_name: dict[str, Any]) -> None:
    """Refuse, when the trainer is built, a data set whose items it cannot batch (checked on
    the first item of each), naming the form it needs. (A random transform of that item
    draws from the global random streams: transformers' Trainer seeds them afterwards.)"""
    for name, dataset in datasets_by_name.items():
        sets = dataset.items() if isinstance(dataset, dict) else [(None, dataset)]
        for key, one in sets:
            if one is None or not hasattr(one, "__getitem__") or not hasattr(one, "__len__") or not len(one):
                continue
            problem = _item_problem(one[0])
            if problem:
                where = f"{name}[{key!r}]" if key is not None else name
                raise ValueError(
                    f"{where}'s items are {problem}. RefilledTrainer trains on items {{'pixel_values': image tensor "
                    "(C, H, W), 'labels': class id}, or (image tensor, class id) pairs as torchvision's data sets "
                    "give them: apply the model's transform to each image (see the README's Python example), or "
                    "pass a data_collator that makes such batches."
                )


def _check_selection_set(args: RefilledConfig, stage: str, eval_dataset) -> None:
    """Refuse ``load_best_model_at_end`` without the one evaluation set it selects on: none
    (nothing to select on), or a dict of several (transformers would stop at the first
    evaluation, asking for a ``metric_for_best_model``, which refilled-hf sets itself)."""
    if not args.load_best_model_at_end:
        return
    if eval_dataset is None:
        raise ValueError("load_best_model_at_end=True selects on evaluations: pass an eval_dataset.")
    if isinstance(eval_dataset, dict):
        metric = "nearest-class-mean top-1" if stage == "stage1" else "top-1"
        raise ValueError(
            f"load_best_model_at_end=True selects on one evaluation set's {metric}, but eval_dataset holds "
            f"{len(eval_dataset)} ({', '.join(map(repr, eval_dataset))}): pass the set to select on as "
            "eval_dataset, and evaluate the others with trainer.evaluate(...)."
        )


def _head_classes(model: torch.nn.Module) -> int | None:
    """The number of classes a timm model's head predicts (None: not a timm model)."""
    classes = getattr(model, "num_classes", None)
    return int(classes) if isinstance(classes, int) else None


def _check_label_spaces(stage: str, num_classes: int, model: StudentModel, teacher: FrozenTeacher | None,
                        teacher_columns: Sequence[int] | None = None) -> None:  # fmt: skip
    """Refuse, before any step, the label spaces a stage cannot train on: a student head
    that does not predict the ``num_classes`` classes of the labels (stage 1 leaves the head
    alone), and KD between a teacher and a student that predict different classes, unless
    ``teacher_columns`` says which teacher output is each student class."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    student_classes = _head_classes(model.model)
    if stage != "stage1" and student_classes is not None and student_classes != num_classes:
        raise ValueError(
            f"The student's head predicts {student_classes} classes but num_classes={num_classes}: "
            f"create it with timm.create_model(..., num_classes={num_classes}) or call "
            f"reset_classifier({num_classes}) on it."
        )
    teacher_classes = _head_classes(teacher.model) if teacher is not None else None
    if teacher_columns is not None:
        if stage != "kd":
            raise ValueError(f"teacher_columns are the teacher's logits KD matches: stage {stage!r} uses none.")
        columns = list(teacher_columns)
        bad = [c for c in columns if not (isinstance(c, int) and 0 <= c < (teacher_classes or 0))]
        if len(columns) != num_classes or bad or len(set(columns)) != len(columns):
            raise ValueError(
                f"teacher_columns must name {num_classes} distinct outputs of the teacher's {teacher_classes} (one per "
                f"student class, in the student's order), got {columns}."
            )
    elif stage == "kd" and teacher_classes is not None and teacher_classes != num_classes:
        raise ValueError(
            f"Stage 'kd' needs teacher and student on one label space, but the teacher predicts "
            f"{teacher_classes} classes and the student {num_classes}: pass teacher_columns (the teacher's output "
            "of each student class) where the teacher's classes include the student's, or use stage1 + stage2 "
            "(REFILLED) or 'rkd' across tasks."
        )


#: the key of a checkpoint's ``trainer_state.json`` (among transformers' ``stateful_callbacks``) that
#: holds the stage's training so far: its seconds, loss sum and steps (see ``RefilledTrainer.train``)
TRAINING_SO_FAR_KEY = "RefilledTrainingSoFar"


def _not_the_moved_best_checkpoint_warning(record: logging.LogRecord) -> bool:
    """Drops transformers' "The best checkpoint ... does not exist anymore. Ignoring it" on a
    resume: :meth:`RefilledTrainer._load_callback_state` finds the checkpoint in the stage's
    own folder, or says what its absence means."""
    return "recorded in the resumed state does not exist anymore" not in record.getMessage()


class _EpochOfAugmentation(TrainerCallback):
    """Tells the per-image seeding of the worker path's augmentation (:mod:`refilled_hf.augmentation_seeds`)
    which epoch starts, before its loader's workers start: a resume mid-epoch gets the epoch it
    stopped in (``state.epoch`` is ``epoch + steps done / steps per epoch``)."""

    def __init__(self, augmentation: SeededAugmentation):
        self.augmentation = augmentation

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.augmentation.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))


class RefilledTrainer(Trainer):
    """Trainer for one stage of REFILLED or one baseline.

    Args:
        model: the student: a timm model, trained in place (wrapped in a
            :class:`~refilled_hf.backbone.StudentModel`, or passed as one).
        args: the run's :class:`~refilled_hf.config.RefilledConfig`. The trainer reads this
            stage's epochs and learning rate from it (``stage1_*`` for ``stage1``, ``stage2_*``
            for the others) and writes its checkpoints to ``<output_dir>/<stage>``, as
            ``refilled-hf distill`` does.
        stage: one of ``stage1``, ``stage2``, ``ce``, ``kd``, ``rkd``.
        teacher: the teacher (needed by every stage but ``ce``): a timm model, frozen in a
            :class:`~refilled_hf.backbone.FrozenTeacher` that adapts the student's batches to
            its normalization and input size (or passed as one). It is prepared by Accelerate
            in evaluation mode: placed on the device, never wrapped in DDP.
        class_centers: stage 2 with ``centers="global"``: the teacher's centres of the
            student's classes, ``[num_classes, D_T]`` (or set them with
            :meth:`compute_teacher_centers` before training).
        centers_dataset: stage 1: the training split with evaluation transforms, for the
            nearest-class-mean centres.
        teacher_cache: the teacher's outputs for every training image and augmentation
            (:mod:`refilled_hf.teacher_cache`), read instead of running the teacher on
            training batches; built over ``train_dataset``'s images.
        num_classes: the student's number of classes.
        class_names: the names of those classes, which :meth:`save_model` and
            :meth:`push_to_hub` record (default: the class ids).
        teacher_columns: ``kd`` with a teacher of more classes than the student (the
            student's among them), or of the same in another order: the teacher's output of
            each student class, in the student's order. KD then matches the teacher's softmax
            over those outputs.
        kwargs: passed to :class:`transformers.Trainer` (datasets, callbacks, ...).
    """

    def __init__(
        self,
        model: StudentModel | torch.nn.Module,
        args: RefilledConfig,
        *,
        stage: str,
        num_classes: int,
        teacher: FrozenTeacher | torch.nn.Module | None = None,
        class_centers: torch.Tensor | None = None,
        centers_dataset=None,
        teacher_cache: TeacherCache | None = None,
        class_names: Sequence[str] | None = None,
        teacher_columns: Sequence[int] | None = None,
        **kwargs: Any,
    ):
        if stage not in STAGES:
            raise ValueError(f"Unknown stage {stage!r}: choose one of {STAGES}.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "RefilledTrainer's stage decides its loss, so compute_loss_func would never be called: subclass "
                "RefilledTrainer and override compute_loss to change it."
            )
        if not isinstance(model, StudentModel):
            model = StudentModel(model)  # (a timm model: checked there)
        if teacher is not None and not isinstance(teacher, FrozenTeacher):
            teacher = FrozenTeacher(teacher, student_cfg=model.model.pretrained_cfg)
            logger.info("The teacher sees %s.", teacher.adaptation_text())
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names names {len(class_names)} classes, but num_classes={num_classes}.")
        if stage != "ce" and teacher is None:
            raise ValueError(f"Stage {stage!r} needs a teacher.")
        if kwargs.get("train_dataset") is not None and not hasattr(kwargs["train_dataset"], "__len__"):
            raise ValueError(
                "train_dataset has no length (an iterable or streamed data set): RefilledTrainer lays its "
                "learning-rate schedule out in epochs of the training data, which needs their number of images. Pass "
                "a map-style data set (datasets.load_dataset without streaming=True; no .to_iterable_dataset())."
            )
        if stage == "stage1" and centers_dataset is None:
            raise ValueError("Stage 1 needs `centers_dataset` (the training split) for its NCM evaluation.")
        if kwargs.get("data_collator") is None:  # (a collator of the user's makes the batches from its items)
            kwargs["data_collator"] = collate_images
            _check_items({"train_dataset": kwargs.get("train_dataset"), "eval_dataset": kwargs.get("eval_dataset"),
                          "centers_dataset": centers_dataset})  # fmt: skip
        _check_label_spaces(stage, num_classes, model, teacher, teacher_columns)
        _check_selection_set(args, stage, kwargs.get("eval_dataset"))
        model.set_embeddings_only(stage == "stage1")  # before the optimizer and DDP see the parameters
        #: the Hub repo, privacy and token that push_to_hub() uses, and whether train() ends with it
        hub = {"repo_id": args.hub_model_id, "private": args.hub_private_repo, "token": args.hub_token}
        push_after_training = resume_latest = False
        if args.learning_rate is None or args.num_train_epochs is None:  # a config used directly
            args, push_after_training, resume_latest = _stage_config(
                args, stage, kwargs.get("train_dataset"), kwargs.get("eval_dataset")
            )
        if isinstance(kwargs.get("train_dataset"), IndexedImages):  # see evaluation_dataloader
            args = args.stage_view(dataloader_num_workers=0, dataloader_persistent_workers=False,
                                   dataloader_prefetch_factor=None)  # fmt: skip
        #: label smoothing of the cross-entropy term; applied here, since transformers' own
        #: label smoother expects a language-model config and replaces the whole loss
        self.label_smoothing = args.label_smoothing_factor
        if self.label_smoothing:
            args = args.stage_view(label_smoothing_factor=0.0)
        if args.ddp_find_unused_parameters is None and args.world_size > 1:
            # transformers has DDP look for unused parameters at every step of any model not its
            # own: a walk of the autograd graph per step, and PyTorch's warning when it finds none
            # (every trainable parameter is used in every stage, for nearly all timm models). Look
            # once, here, on the meta device; keep looking only where some are unused or it cannot tell.
            unused = model.parameters_without_gradient()
            args = args.stage_view(ddp_find_unused_parameters=unused != [])
            logger.debug("DDP find_unused_parameters=%s for %s (unused: %s).", unused != [], stage, unused)
        #: torch.compile options, applied here in place to the student and the teacher (not by
        #: accelerate, whose whole-model wrapper is skipped for a model prepared in an earlier
        #: stage, and which would leave the teacher's forward and the stage-2 student eager)
        self.compile_options = (
            {"backend": args.compile_backend, "mode": args.torch_compile_mode} if args.torch_compile else None
        )
        #: CUDA graphs (inductor's reduce-overhead and max-autotune modes) replay into static
        #: buffers: each training step is marked, and the teacher's outputs, read after the
        #: student's graph has run, are copied out of them
        self.cuda_graphs = args.torch_compile and args.torch_compile_mode in ("reduce-overhead", "max-autotune")
        # transformers' Accelerator compiles nothing: backend "no", or it would read a launcher's
        # ACCELERATE_DYNAMO_BACKEND (RefilledConfig adopts that as --torch_compile, applied above)
        args = args.stage_view(torch_compile=False, torch_compile_backend="no", torch_compile_mode=None)
        if args.channels_last:  # before any device move or DDP wrap (both keep the layout)
            use_channels_last(model)
            if teacher is not None:
                use_channels_last(teacher)
        super().__init__(model=model, args=args, **kwargs)
        # every loader pins on a GPU, so that batches (or the device path's indices) reach it without a
        # stall (see RefilledConfig.__post_init__); never on the CPU, where torch warns that it does nothing
        self.args.dataloader_pin_memory = self.args.dataloader_pin_memory and self.args.device.type == "cuda"
        self.stage = stage
        self.num_classes = num_classes
        #: kd: the teacher's output of each student class (None: the same outputs)
        self.teacher_columns = list(teacher_columns) if teacher_columns is not None else None
        self._teacher_columns_index: torch.Tensor | None = None
        #: the class names a saved or pushed student records (default: its class ids)
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.hub_settings = hub
        self.push_after_training = push_after_training
        self.resume_latest = resume_latest
        #: evaluate() also returns ``{prefix}_per_class_top1`` / ``_samples`` (lists by class id),
        #: which it does not log (``refilled-hf evaluate`` reports them)
        self.per_class_metrics = False
        self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True) if teacher is not None else None
        if self.compile_options is not None:
            # in place: the state dict keeps its keys, DDP and autocast wrap the compiled call;
            # mining and the losses (data-dependent shapes) run eager in compute_loss
            model.compile(**self.compile_options)
            if self.teacher is not None:
                self.teacher.compile(**self.compile_options)
        self.class_centers = class_centers.to(self.args.device) if class_centers is not None else None
        self.centers_dataset = centers_dataset
        if teacher_cache is not None and getattr(self.train_dataset, "images", None) is not teacher_cache.images:
            raise ValueError("The teacher cache was built over other images than this trainer's training split.")
        self.teacher_cache = teacher_cache
        self._components: dict[str, float | torch.Tensor] = defaultdict(float)
        self._component_batches = 0
        self._train_batches: int | None = None
        #: the stage's training before this call of train(), as the checkpoint it resumed from records it
        self.earlier_training = {"seconds": 0.0, "loss_sum": 0.0, "steps": 0}
        self._whole_stage_logged: dict | None = None  # the end-of-training log, made the whole stage's
        #: training steps whose loss was not finite (a device tensor; read once, at the end)
        self.nonfinite_losses: torch.Tensor | int = 0

    # ------------------------------------------------------------------ saving and sharing

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """transformers' ``train()``. From a config used directly: with
        ``resume_from_checkpoint='true'`` it continues from the stage folder's newest complete
        checkpoint (from the start, with a warning, where there is none; a finished stage
        only reloads its weights); with ``push_to_hub=True`` the Hub login is checked first
        and the student pushed at the end (:meth:`push_to_hub`)."""
        if self.stage == "stage2" and self.args.centers == "global" and self.class_centers is None:
            raise ValueError(
                "Stage 2 with centers='global' needs the teacher's class centres: call "
                "trainer.compute_teacher_centers(<the training split with evaluation transforms>) before train(), "
                "or pass class_centers=..."
            )
        if resume_from_checkpoint is None and self.resume_latest:
            found = last_complete_checkpoint(Path(self.args.output_dir))
            if found is None:
                logger.warning("resume_from_checkpoint: %s holds no checkpoint; training from the start.",
                               self.args.output_dir)  # fmt: skip
            else:
                problem = checkpoint_problem(found, self.args.world_size)
                if problem:
                    raise ValueError(f"Cannot resume exactly from {found}: {problem}. Pass an earlier checkpoint "
                                     "to train(resume_from_checkpoint=...).")  # fmt: skip
                resume_from_checkpoint = str(found)
        if self.push_after_training:  # every process: all are refused alike, none waits for the others
            check_hub_access(self.hub_settings["repo_id"], self.hub_settings["token"])
        end_stage_runs(self.callback_handler.callbacks)  # an earlier stage's tracker runs: this stage starts its own
        keeper = KeepStageRunsOpen(self.callback_handler)
        self.add_callback(keeper)  # after the trackers' callbacks: it sees the runs they start
        epochs = None
        if hasattr(self.train_dataset, "seed_augmentation"):  # the worker path's images (refilled_hf.data)
            epochs = _EpochOfAugmentation(self.train_dataset.seed_augmentation(self.args.seed, self.stage))
            self.add_callback(epochs)
        self.earlier_training = {"seconds": 0.0, "loss_sum": 0.0, "steps": 0}  # set by a resume
        self._whole_stage_logged = None
        self._call_start = time.perf_counter()
        transformers_trainer_log = logging.getLogger(Trainer.__module__)
        transformers_trainer_log.addFilter(_not_the_moved_best_checkpoint_warning)  # said by _load_callback_state
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            transformers_trainer_log.removeFilter(_not_the_moved_best_checkpoint_warning)
            self.remove_callback(keeper)
            if epochs is not None:
                self.remove_callback(epochs)
        output = self._whole_stage_output(output)
        if self.push_after_training:
            self.push_to_hub()
        return output

    # ------------------------------------------------------------------ a stage's training across resumes

    def _training_so_far(self) -> dict[str, float]:
        """The stage's training up to now, over every call of ``train()`` that resumed it: its
        seconds, the sum of its steps' losses (this call's, logged or not yet, on top of the
        earlier calls') and its steps."""
        since_log = float(self._mean_over_processes(self._tr_loss).item())  # every process's, as the logged
        return {
            "seconds": self.earlier_training["seconds"] + time.perf_counter() - self._call_start,
            "loss_sum": self.earlier_training["loss_sum"] + self._total_loss_scalar + since_log,
            "steps": self.state.global_step,
        }

    def _mean_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the processes, as transformers averages the logged loss
        (every process must call this at the same point: it is a collective)."""
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.reduce(values.detach().clone(), reduction="mean")

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> TrainOutput:
        """transformers' end of training, whose ``train_loss`` adds the loss of the steps since
        the last log: that of this process alone (every step's, under a ``--logging_steps``
        longer than the stage), where the logged ones are every process's mean. Made that mean."""
        self._tr_loss = self._mean_over_processes(self._tr_loss)
        return super()._finalize_training(trial, num_train_samples, start_time)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """transformers' checkpoint, whose ``trainer_state.json`` also carries the stage's
        training so far (:data:`TRAINING_SO_FAR_KEY`), which a resume adds to its own."""
        self.state.stateful_callbacks[TRAINING_SO_FAR_KEY] = {"args": {}, "attributes": self._training_so_far()}
        super()._save_checkpoint(model, trial)

    def _whole_stage_output(self, output: TrainOutput) -> TrainOutput:
        """transformers reports a resumed ``train()`` call's own loss and speed (a call resumed
        from the stage's last checkpoint: ``train_loss`` 0.0 and no samples); these are the
        whole stage's, where the checkpoint recorded the calls before it (as :meth:`log` gave
        them to the console and the trackers, from the same dict where transformers passes it)."""
        if not self.earlier_training["steps"]:
            return output
        metrics = output.metrics if output.metrics is self._whole_stage_logged else self._whole_stage(output.metrics)
        return TrainOutput(output.global_step, metrics["train_loss"], metrics)

    def _whole_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics``, a resumed call's end-of-training ones, as the whole stage's."""
        metrics = dict(metrics)
        steps = self.state.global_step
        seconds = self.earlier_training["seconds"] + float(metrics.get("train_runtime", 0.0))
        loss = (self.earlier_training["loss_sum"] + self._total_loss_scalar) / max(steps, 1)
        samples = len(self.train_dataset) * self.args.num_train_epochs * steps / max(self.state.max_steps, 1)
        metrics.update(train_runtime=round(seconds, 4), train_loss=loss,
                       train_samples_per_second=round(samples / max(seconds, 1e-9), 3),
                       train_steps_per_second=round(steps / max(seconds, 1e-9), 3))  # fmt: skip
        return metrics

    def _load_callback_state(self) -> None:
        """On a resume, after the Trainer has read the checkpoint's state: the stage's training
        so far, which the checkpoint carries (:meth:`_save_checkpoint`), and its best checkpoint
        in this folder (:meth:`_find_best_checkpoint_here`); then transformers' callbacks."""
        saved = (self.state.stateful_callbacks or {}).pop(TRAINING_SO_FAR_KEY, None)  # (no callback of transformers)
        so_far = saved.get("attributes") if isinstance(saved, dict) else None
        if isinstance(so_far, dict) and so_far.get("steps") == self.state.global_step:
            self.earlier_training = {"seconds": float(so_far["seconds"]), "loss_sum": float(so_far["loss_sum"]),
                                     "steps": int(so_far["steps"])}  # fmt: skip
        if self.state.best_global_step and self.args.load_best_model_at_end:
            self._find_best_checkpoint_here()
        super()._load_callback_state()

    def _find_best_checkpoint_here(self) -> None:
        """The best checkpoint is this stage folder's checkpoint of the best step. The state
        records it by the path it was saved under, which names another folder once the run
        folder has been moved or copied (a job that copies its runs to its node's disk), or
        resumed from another working directory with a relative ``--output_dir``: transformers
        then forgot the best (the stage ended with its last weights unless a later evaluation
        beat it, under ``--load_best_model_at_end``), or took another folder's checkpoint for
        it, and did not keep this folder's from ``--save_total_limit``'s rotation."""
        step, recorded = self.state.best_global_step, self.state.best_model_checkpoint
        own = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        if os.path.isdir(own):
            self.state.best_model_checkpoint = own
            if recorded is None or os.path.abspath(recorded) != os.path.abspath(own):
                logger.info("The best checkpoint so far (step %d) is %s (the checkpoint's state named another "
                            "folder: the run was moved or copied, or resumed from another working directory).",
                            step, own)  # fmt: skip
        else:
            self.state.best_model_checkpoint = None
            logger.warning(
                "The best checkpoint so far (step %d, %s %s) is no longer in %s: unless a later evaluation beats "
                "it, this stage ends with its last weights, not the best.",
                step, self.args.metric_for_best_model, self.state.best_metric, self.args.output_dir,
            )  # fmt: skip

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Your call: :meth:`export_student` to ``output_dir`` (default ``<stage folder>/model``),
        timm's Hub layout. The Trainer's own calls (checkpoints) keep its layout, which
        resuming reads."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            if self.args.should_save:
                with_usual_permissions(output_dir if output_dir is not None else self.args.output_dir)
            return
        self.export_student(output_dir if output_dir is not None else os.path.join(self.args.output_dir, "model"))

    def export_student(self, folder: str | Path, repo_id: str | None = None) -> Path:
        """Write the student in timm's Hub layout (``config.json`` with its class names,
        ``model.safetensors``, a model card): ``timm.create_model("local-dir:<folder>", pretrained=True)`` and
        transformers' ``AutoModelForImageClassification`` load it. Written atomically by the
        main process; refused over a folder that holds anything but an earlier export."""
        if self.stage == "stage1":
            raise ValueError(
                "Stage 1 trains the embedding only; the student's classifier is untrained. Save or push the student "
                "after stage 2 (or a baseline)."
            )
        folder = Path(folder)
        foreign = files_not_exported(folder)
        if foreign:
            raise ValueError(
                f"{folder} exists and holds files an export does not write ({', '.join(foreign)}): "
                "the student is saved only to a new folder or over an earlier export. Choose another folder."
            )
        if self.is_world_process_zero():
            timm_model = self.accelerator.unwrap_model(self.model).model
            names = self.class_names or [str(c) for c in range(self.num_classes)]
            card = trainer_card(timm_model.pretrained_cfg.get("architecture", type(timm_model).__name__),
                                self.stage, names, repo_id)  # fmt: skip
            export_model(timm_model, folder, label_names=names, extra_files={"README.md": card})
        self.accelerator.wait_for_everyone()
        return folder

    def push_to_hub(self, repo_id: str | None = None, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload model from refilled-hf") -> str | None:  # fmt: skip
        """Push the student, in timm's Hub layout with its model card (:meth:`export_student`),
        to ``repo_id`` (default: the config's ``hub_model_id``) in one commit; returns the
        commit URL on the main process (None on the others). Not the Trainer's checkpoint
        layout, which timm cannot load."""
        repo_id = repo_id or self.hub_settings["repo_id"]
        if not repo_id:
            raise ValueError(
                "push_to_hub needs a repo: pass repo_id='<user>/<name>' or set hub_model_id in the config."
            )
        token = token if token is not None else self.hub_settings["token"]
        private = private if private is not None else self.hub_settings["private"]
        url = None
        with tempfile.TemporaryDirectory(prefix="refilled-hf-push-") as scratch:
            folder = self.export_student(Path(scratch) / "model", repo_id=repo_id)
            if self.is_world_process_zero():
                url = push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)
                logger.info("Pushed the %s student to %s", self.stage, url)
        self.accelerator.wait_for_everyone()
        return url

    # ------------------------------------------------------------------ training

    def compute_teacher_centers(self, dataset) -> torch.Tensor:
        """Set (and return) the teacher's class centres of the student's classes: the
        normalized sums of its raw embeddings over ``dataset`` (the training split with
        evaluation transforms), summed over every process."""
        self.class_centers = compute_class_centers(
            lambda x: self.teacher(x)[0],
            self.evaluation_dataloader(dataset),
            self.num_classes,
            self.accelerator,
            dataset,
        )
        return self.class_centers

    def evaluation_dataloader(self, dataset) -> torch.utils.data.DataLoader:
        """A dataloader over exactly ``dataset``: in order, nothing dropped, sharded over
        the processes (``gather_for_metrics`` removes the padding). Built for each call:
        transformers' ``get_eval_dataloader`` caches one loader under a single key when
        workers persist, so evaluating another split would silently reuse the first, and
        its loaders drop the last batch under ``--dataloader_drop_last``. It draws from a
        generator of its own, never the global RNG (see below)."""
        args = self.args
        # the device path's loaders (training's too, see __init__) only yield indices: worker processes
        # would add nothing (and, under a spawn context, a pickled copy of the images on the device each)
        workers = 0 if isinstance(dataset, IndexedImages) else args.dataloader_num_workers
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.eval_batch_size,
            shuffle=False,
            drop_last=False,
            collate_fn=self.data_collator,
            num_workers=workers,
            worker_init_fn=loader_worker_init() if workers else None,
            pin_memory=args.dataloader_pin_memory,
            prefetch_factor=args.dataloader_prefetch_factor if workers else None,
            multiprocessing_context=args.dataloader_multiprocessing_context if workers else None,
            # each iteration draws its workers' base seed from this generator; without one, from the
            # global RNG, so every evaluation shifted the shuffles and augmentations of the training
            # after it, and how often a stage evaluated changed what it trained
            generator=torch.Generator().manual_seed(args.seed),
        )
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        loader = super().get_train_dataloader()
        if loader.num_workers:  # (read as each epoch starts its workers, from the loader accelerate wraps)
            base = getattr(loader, "base_dataloader", loader)
            base.worker_init_fn = loader_worker_init(base.worker_init_fn)
        self._train_batches = len(loader)  # the scheduler lays out its epochs with it
        return loader

    def _student_classes_of(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of the student's classes, in the student's order (KD then
        matches their softmax: the teacher's distribution renormalized over those classes)."""
        if self.teacher_columns is None:
            return teacher_logits
        if self._teacher_columns_index is None or self._teacher_columns_index.device != teacher_logits.device:
            self._teacher_columns_index = torch.tensor(self.teacher_columns, device=teacher_logits.device)
        return teacher_logits.index_select(1, self._teacher_columns_index)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The stage's loss; each component is kept for logging (``relationship``,
        ``ce``, ``distill``, ``tuples``, ``triplets``, ``local_classes``)."""
        labels = inputs["labels"]
        teacher_emb = teacher_logits = None
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.teacher_cache is not None:  # the same draws as below, the teacher's outputs read back
            images, draws = self.train_dataset.images.augmented(inputs["index"])
            teacher_emb, teacher_logits = self.teacher_cache.lookup(inputs["index"], *draws)
        else:
            images = batch_pixels(inputs, self.train_dataset)
            if self.teacher is not None:
                teacher_emb, teacher_logits = self.teacher(images)
                if self.cuda_graphs:
                    teacher_emb, teacher_logits = teacher_emb.clone(), teacher_logits.clone()
        outputs = model(pixel_values=images)
        args: RefilledConfig = self.args
        parts: dict[str, float | torch.Tensor] = {}
        # batch-level choices over the global batch of all processes (a no-op in one process)
        global_scope = args.mining_scope != "local"
        if self.stage == "stage1":
            student_emb, mined_teacher, mined_labels = outputs["embeddings"], teacher_emb, labels
            if global_scope:
                student_emb, mined_teacher, mined_labels = gather_for_mining(student_emb, teacher_emb, labels)
            loss, stats = relationship_loss_with_stats(
                student_emb,
                mined_teacher,
                mined_labels,
                variant=args.stage1_variant,
                tau=args.tau1,
                margin=args.margin,
                weight=args.stage1_weight,
            )
            parts = {"relationship": loss, "tuples": stats["tuples"], "triplets": stats["triplets"]}
        else:
            logits = outputs["logits"]
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            loss = args.ce_weight * ce
            parts["ce"] = ce
            if self.stage == "stage2":
                # The batch's local classes (and per-batch centres, confidence weights' range) are
                # the global batch's, as stage 1 mines: N processes train what one process does
                # on their global batch. Each process's loss averages its own images.
                whole = gather_batch if global_scope else (lambda t: t)
                batch_labels = whole(labels)
                if args.centers == "global":
                    if self.class_centers is None:
                        raise RuntimeError("Stage 2 with global centres: call compute_teacher_centers() first.")
                    centers = self.class_centers
                else:
                    centers = batch_class_centers(whole(teacher_emb), batch_labels, self.num_classes)
                weights = None
                if args.confidence_weights:  # min-max normalized over the batch
                    weights = teacher_confidence_weights(whole(teacher_logits))
                    weights = own_rows(weights, labels.shape[0]) if global_scope else weights
                local = local_class_mask(batch_labels, self.num_classes)
                teacher_correct = local_teacher_correct(teacher_emb, centers, labels, local_classes=local)
                if args.distill_images == "teacher_correct":  # the others train on cross-entropy alone
                    weights = teacher_correct.float() if weights is None else weights * teacher_correct
                weight = self.distill_weight()
                if weight > 0:
                    distill = local_classifier_loss(logits, teacher_emb, centers, labels, tau=args.tau2,
                                                    weight=weight, instance_weights=weights,
                                                    local_classes=local)  # fmt: skip
                else:  # a scheduled lambda's last step: cross-entropy alone
                    distill = logits.new_zeros((), dtype=torch.float32)
                parts["lambda"] = weight
                parts["teacher_local_top1"] = teacher_correct.float().mean() * 100
                # classes present in the batch, counted on the device (no host sync per step)
                parts["local_classes"] = local.sum()
            elif self.stage == "kd":
                distill = args.kd_weight * kd_loss(logits, self._student_classes_of(teacher_logits), tau=args.kd_tau)
            elif self.stage == "rkd":
                student_emb, relations_teacher = outputs["embeddings"], teacher_emb
                if global_scope:  # the relations of the global batch, as stage 1 mines
                    student_emb, relations_teacher, _ = gather_for_mining(student_emb, teacher_emb, labels)
                distill = rkd_loss(
                    student_emb,
                    relations_teacher,
                    distance_weight=args.rkd_distance_weight,
                    angle_weight=args.rkd_angle_weight,
                )
            else:
                distill = None
            if distill is not None:
                loss = loss + distill
                parts["distill"] = distill
        if model.training:
            for key, value in parts.items():
                self._components[key] += value.detach() if isinstance(value, torch.Tensor) else value
            self._component_batches += 1
            self.nonfinite_losses += (~torch.isfinite(loss.detach())).sum()
        return (loss, outputs) if return_outputs else loss

    def distill_weight(self) -> float:
        """Stage 2's lambda at the current optimizer step: ``--distill_weight`` scaled by
        ``--distill_weight_schedule`` over the stage's full length (``--stage2_epochs``,
        laid out like the learning-rate schedule, so ``--max_steps`` never moves it): lambda at
        the stage's first optimizer step, 0 at its last (the step ``global_step`` counts up to
        ``steps - 1``: the learning-rate schedules' ``step / steps`` would leave the last step
        lambda / steps, far from the cross-entropy alone that the option promises in a short
        stage)."""
        schedule, weight = self.args.distill_weight_schedule, self.args.resolved_distill_weight()
        if schedule == "constant":
            return weight
        last = self.stage_steps() - 1
        progress = min(self.state.global_step, last) / last if last else 0.0
        if schedule == "linear":
            return weight * (1.0 - progress)
        return weight * 0.5 * (1.0 + math.cos(math.pi * progress))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss component since the last training log."""
        if "loss" in logs and self._component_batches:  # the training log: every process makes it
            keys = list(self._components)
            totals = [float(self._components[k]) for k in keys]
            if self.accelerator.num_processes > 1:  # every process's, as `loss` is
                totals = self._mean_over_processes(torch.tensor(totals, dtype=torch.float64, device=self.args.device))
                totals = totals.tolist()
            for key, total in zip(keys, totals):
                logs[key] = round(total / self._component_batches, 6)
            self._components.clear()
            self._component_batches = 0
        if "train_runtime" in logs and self.earlier_training["steps"]:  # the end of a resumed stage
            logs.update(self._whole_stage(logs))  # (in place: transformers returns this dict too)
            self._whole_stage_logged = logs
        super().log(logs, start_time)

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm for transformers' training log, only at the steps that log.

        transformers (5.x) computes it at every optimizer step, even without clipping,
        where nothing but the log reads it: a norm over every gradient, on a GPU a
        handful of kernel launches and some host work per step, which a launch-bound
        step pays in full (``benchmarks/throughput.py --host_overhead``). With clipping
        (``--max_grad_norm`` > 0) the norm comes from the clip itself and is passed on.
        Older transformers, which only compute it when clipping, never call this."""
        if grad_norm is not None or self._logs_after_this_step():
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        return None

    def _logs_after_this_step(self) -> bool:
        """Whether the optimizer step under way ends in a training log, by the rule of
        transformers' ``DefaultFlowCallback`` (and the run's last step, to be safe)."""
        args, step = self.args, self.state.global_step + 1
        if step == 1 and args.logging_first_step:  # whatever the strategy, "no" included
            return True
        if args.logging_strategy == "no":
            return False
        if step >= self.state.max_steps:
            return True
        if args.logging_strategy == "steps":
            return step % (self.state.logging_steps or 1) == 0
        return step % self.steps_per_epoch() == 0  # 'epoch': every epoch has as many optimizer steps

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """``--optim sgd`` (default): SGD with Nesterov momentum and coupled weight decay
        on every trainable parameter (the paper's CIFAR protocol). Any other ``--optim``:
        transformers' optimizer of that name, at the stage's learning rate; an
        ``optimizer_cls_and_kwargs`` given to the trainer: that one, as transformers builds it."""
        if self.optimizer is None and (option_name(self.args.optim) != "sgd" or self.optimizer_cls_and_kwargs):
            return super().create_optimizer(model)
        if self.optimizer is None:
            model = model if model is not None else self.model
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(
                params,
                lr=self.args.learning_rate,
                momentum=self.args.sgd_momentum,
                nesterov=self.args.sgd_momentum > 0,
                weight_decay=self.args.weight_decay,
            )
        return self.optimizer

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of this process's training dataloader."""
        batches = self._train_batches if self._train_batches is not None else len(self.get_train_dataloader())
        return max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    def stage_steps(self) -> int:
        """Optimizer steps in the stage's full length (its epochs, whatever ``--max_steps``
        stops it at): what the learning-rate and lambda schedules are laid out over."""
        return max(1, math.ceil(self.args.num_train_epochs * self.steps_per_epoch()))

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Stage 1: cosine from the peak to ``stage1_min_lr_ratio`` of it over
        ``stage1_epochs``. Other stages: multi-step decay by ``stage2_gamma`` at
        ``stage2_milestones`` (epochs). Both are laid out in epochs of the training data,
        so ``--max_steps`` (which stops a stage early) never stretches or shifts them;
        ``--warmup_steps`` ramps the factor linearly from 0 over the first steps."""
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            per_epoch, total = self.steps_per_epoch(), self.stage_steps()
            warmup = self.args.warmup_steps
            warmup = int(warmup) if warmup >= 1 else math.ceil(warmup * total)
            if self.stage == "stage1":
                floor = self.args.stage1_min_lr_ratio

                def decay(step: int) -> float:
                    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

            else:
                bounds = [round(m * per_epoch) for m in self.args.milestones()]
                gamma = self.args.stage2_gamma

                def decay(step: int) -> float:
                    return gamma ** sum(step >= b for b in bounds)

            def factor(step: int) -> float:
                ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
                return ramp * decay(step)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ evaluation

    def _student(self) -> StudentModel:
        return self.accelerator.unwrap_model(self.model)

    def _add_computed_metrics(self, metrics: dict[str, Any], scores: torch.Tensor, labels: torch.Tensor,
                              prefix: str) -> None:  # fmt: skip
        """The user's ``compute_metrics`` over every image of the split, added to ``metrics``
        under ``{prefix}_<name>``; a name that evaluate() reports itself is refused."""
        prediction = EvalPrediction(predictions=scores.numpy(), label_ids=labels.numpy())
        for key, value in self.compute_metrics(prediction).items():
            name = key if key.startswith(f"{prefix}_") else f"{prefix}_{key}"
            if name in metrics or name == "epoch":
                raise ValueError(
                    f"compute_metrics returned {key!r}, a metric RefilledTrainer.evaluate() reports itself "
                    f"({name}): give yours another name."
                )
            metrics[name] = value

    def _score_split(self, dataset, prefix: str, *, predicting: bool) -> _SplitScores:
        """One pass of the student over ``dataset``, every image counted once across
        processes: its metrics (those evaluate() logs, the user's ``compute_metrics``
        included, and apart the per-class ones), and for predict() (or ``compute_metrics``)
        every image's scores and label in the data set's order, on the CPU. Stage 1 scores
        by the nearest class mean of the embedding (centres from ``centers_dataset``), the
        others by the head's logits. Only predict() takes a data set without labels, and
        gives its scores alone."""
        dataloader = self.evaluation_dataloader(dataset)
        student = self._student()
        was_training = student.model.training  # the timm model's own mode (its wrapper may say another)
        share_rank0_buffers(student.model)  # every share measured with the exported model's statistics
        student.eval()
        centers = None
        class_hits = class_samples = None  # per class, on the device: read once, at the end
        # Under the training precision, as transformers evaluates: Accelerate autocasts the
        # wrapper's forward, which the student's own model, called here, is not.
        precision = self.accelerator.autocast
        if self.stage == "stage1":
            with precision():
                centers = compute_class_centers(
                    lambda x: embed(student.model, x),
                    self.evaluation_dataloader(self.centers_dataset),
                    self.num_classes,
                    self.accelerator,
                    self.centers_dataset,
                )
        keep_scores = predicting or self.compute_metrics is not None
        totals = defaultdict(float)
        kept_scores: list[torch.Tensor] = []
        kept_labels: list[torch.Tensor] = []
        labelled = None
        with torch.no_grad(), precision():
            for batch in dataloader:
                images, labels = batch_pixels(batch, dataset), batch.get("labels")
                if labelled is None:
                    labelled = labels is not None
                if labelled != (labels is not None):
                    raise ValueError("Some batches of the data set have labels, others have none.")
                if not labelled and not predicting:
                    raise ValueError(
                        "evaluate() needs labels (a 'labels' entry in each batch); predict() gives the "
                        "predictions of unlabelled images."
                    )
                if centers is not None:
                    scores = ncm_predict(embed(student.model, images), centers)
                else:
                    scores = student.model(images).float()
                if keep_scores:
                    kept = scores  # what predict() returns and compute_metrics receives
                    if self.preprocess_logits_for_metrics is not None:
                        kept = self.preprocess_logits_for_metrics(scores, labels)
                    gathered = self.accelerator.gather_for_metrics((kept, labels) if labelled else kept)
                    kept_scores.append((gathered[0] if labelled else gathered).cpu())
                    if not labelled:
                        totals["samples"] += kept_scores[-1].shape[0]
                        continue
                    kept_labels.append(gathered[1].cpu())
                loss = F.cross_entropy(scores, labels, reduction="none") if centers is None else None
                top = scores.topk(min(5, scores.shape[1]), dim=1).indices
                hit1 = (top[:, 0] == labels).float()
                hit5 = (top == labels[:, None]).any(1).float()
                per_sample = torch.stack([hit1, hit5] + ([loss] if loss is not None else []), dim=1)
                per_sample = self.accelerator.gather_for_metrics(per_sample)
                totals["samples"] += per_sample.shape[0]
                sums = per_sample.sum(0).tolist()
                totals["top1"] += sums[0]
                totals["top5"] += sums[1]
                if loss is not None:
                    totals["loss"] += sums[2]
                if self.per_class_metrics:  # gathered apart: the sums above stay bit-identical without it
                    ids = self.accelerator.gather_for_metrics(labels)
                    hits = torch.bincount(ids, weights=per_sample[:, 0], minlength=self.num_classes)
                    samples = torch.bincount(ids, minlength=self.num_classes)
                    class_hits = hits if class_hits is None else class_hits + hits
                    class_samples = samples if class_samples is None else class_samples + samples
        student.train(was_training)
        scores = torch.cat(kept_scores) if kept_scores else None
        labels = torch.cat(kept_labels) if kept_labels else None
        if labelled is False:
            return _SplitScores({f"{prefix}_samples": int(totals["samples"])}, {}, scores, None)
        count = max(totals["samples"], 1)
        name = "ncm_" if centers is not None else ""
        metrics = {f"{prefix}_{name}top1": 100.0 * totals["top1"] / count}
        if self.num_classes > 5:
            metrics[f"{prefix}_{name}top5"] = 100.0 * totals["top5"] / count
        metrics[f"{prefix}_samples"] = int(totals["samples"])
        if centers is None:
            metrics[f"{prefix}_loss"] = totals["loss"] / count
        if self.compute_metrics is not None and scores is not None:
            self._add_computed_metrics(metrics, scores, labels, prefix)
        per_class = {}
        if self.per_class_metrics:  # one number per class
            hits = class_hits.tolist() if class_hits is not None else [0.0] * self.num_classes
            samples = class_samples.tolist() if class_samples is not None else [0] * self.num_classes
            per_class[f"{prefix}_{name}per_class_top1"] = [100.0 * h / n if n else None for h, n in zip(hits, samples)]
            per_class[f"{prefix}_per_class_samples"] = samples
        return _SplitScores(metrics, per_class, scores, labels)

    def evaluate(
        self,
        eval_dataset=None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Top-1/top-5 accuracy and cross-entropy of the head, or, in stage 1,
        nearest-class-mean accuracy of the embedding (``{prefix}_ncm_top1``). Every image
        of the split counts exactly once (``{prefix}_samples``). Top-5 is left out with 5
        classes or fewer, where it is 100 % whatever the model.

        A ``compute_metrics`` given to the trainer adds its metrics (``{prefix}_<name>``): it
        receives an ``EvalPrediction`` of every image's logits (stage 1: its nearest-class-mean
        scores, passed through ``preprocess_logits_for_metrics`` if given) and label. A dict of
        data sets is evaluated set by set (``{prefix}_<set>_top1``, ...), as transformers does."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a data set: none given and the Trainer has no eval_dataset.")
        if isinstance(dataset, dict):
            metrics: dict[str, Any] = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        result = self._score_split(dataset, metric_key_prefix, predicting=False)
        metrics = result.metrics
        metrics["epoch"] = self.state.epoch if self.state.epoch is not None else 0.0
        self.log(_as_logged(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        metrics.update(result.per_class)  # returned, not logged: one number per class
        return metrics

    def predict(
        self, test_dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Every image's logits (stage 1: its nearest-class-mean scores, which evaluate()
        ranks; passed through ``preprocess_logits_for_metrics`` if given), in the data set's
        order, with its labels and the metrics evaluate() reports (not logged, as in
        transformers). A data set without labels gives the predictions alone (``label_ids``
        None, metrics ``{prefix}_samples``)."""
        result = self._score_split(test_dataset, metric_key_prefix, predicting=True)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, result.metrics)
        metrics = {**result.metrics, **result.per_class}
        return PredictionOutput(
            predictions=result.scores.numpy() if result.scores is not None else None,
            label_ids=result.labels.numpy() if result.labels is not None else None,
            metrics=metrics,
        )


def _as_logged(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` as the loggers get them: a validation split's (``validation_*``, what
    ``refilled-hf distill`` measures once a stage has trained) as ``eval_*``, which
    TensorBoard, W&B and the other trackers file under ``eval/``, beside the evaluations
    during training (any other prefix but ``test_`` lands under ``train/``)."""
    prefix = "validation_"
    return {f"eval_{key[len(prefix) :]}" if key.startswith(prefix) else key: value for key, value in metrics.items()}
