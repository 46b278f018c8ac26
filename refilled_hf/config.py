"""`RefilledConfig`: every knob of a refilled-hf run, as a `TrainingArguments` subclass.

Parsed by `HfArgumentParser` from a YAML recipe plus command-line overrides
(``refilled-hf distill --config recipe.yaml --distill_weight 10``). The per-stage fields
(epochs, learning rates, schedules) drive the stages; the inherited ``num_train_epochs``,
``learning_rate`` and ``lr_scheduler_type`` are set from them for each stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from .losses import RELATIONSHIP_VARIANTS

__all__ = ["METHODS", "RefilledConfig", "ConfigError"]

#: Methods in the same harness: REFILLED's two stages and three baselines.
METHODS = ("refilled", "ce", "kd", "rkd")
CENTER_MODES = ("global", "batch")


class ConfigError(ValueError):
    """A configuration that cannot run (the message names the field and the fix)."""


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class RefilledConfig(TrainingArguments):
    """Configuration of a refilled-hf run (distillation or teacher training).

    Defaults follow the paper's CIFAR protocol (SGD with Nesterov momentum 0.9, weight
    decay 5e-4, batch 128; stage 1 cosine to 0.1x, stage 2 multi-step x0.2), except
    ``distill_weight`` (lambda): see the benchmark results in the README.
    """

    # ---- what to run
    method: str = field(default="refilled", **_help(f"Method: one of {', '.join(METHODS)}."))
    student: str = field(
        default="cifar_wrn_16_1",
        **_help("Student timm model: a registered name (e.g. cifar_wrn_16_1, resnet18), local-dir: or hf-hub:."),
    )
    student_checkpoint: str | None = field(
        default=None, **_help("Optional initial weights for the student (safetensors, or legacy .pt/.pth).")
    )
    student_drop_rate: float | None = field(
        default=None, **_help("Dropout passed to timm.create_model for the student (model default if unset).")
    )
    teacher: str | None = field(
        default=None,
        **_help(
            "Teacher timm model: 'local-dir:<folder>' (e.g. from `refilled-hf train-teacher`), 'hf-hub:<repo>', "
            "or a registered name with --teacher_checkpoint (or timm's pretrained weights)."
        ),
    )
    teacher_checkpoint: str | None = field(
        default=None, **_help("Weights for a teacher given by name (safetensors, or .pt/.pth read weights_only).")
    )
    teacher_input_size: int | None = field(
        default=None, **_help("Resize images to this size for the teacher (default: its pretrained_cfg's).")
    )

    # ---- data
    dataset: str = field(
        default="uoft-cs/cifar100",
        **_help("Data set: a Hub id, a folder of parquet files named by split, or one parquet file."),
    )
    dataset_config: str | None = field(default=None, **_help("Configuration name of a Hub data set."))
    train_split: str = field(default="train", **_help("Split to train on (validation is carved from it)."))
    test_split: str | None = field(default="test", **_help("Split evaluated once at the end."))
    image_column: str | None = field(default=None, **_help("Image column (default: detect img/image)."))
    label_column: str | None = field(default=None, **_help("Label column (default: detect fine_label/label)."))
    classes: str | None = field(
        default=None,
        **_help(
            "The student's classes: ids, ranges (50-99), names, comma-separated, or a preset "
            "(cifar100-second-half, cifar100-shift-10, ...). Default: all classes."
        ),
    )
    teacher_classes: str | None = field(
        default=None,
        **_help("The teacher's classes in the same data set (recorded in the model card; checked for kd)."),
    )
    shots_per_class: int | None = field(
        default=None, **_help("Training images per class (seeded, stratified): the middle-shot setting.")
    )
    validation_fraction: float = field(
        default=0.1, **_help("Fraction of each class's training images held out for validation (0 for none).")
    )
    image_size: int | None = field(default=None, **_help("Student input size (default: its pretrained_cfg's)."))
    horizontal_flip: bool = field(default=True, **_help("Random horizontal flips in training augmentation."))

    # ---- stage 1: relationship matching
    stage1_variant: str = field(default="tuple", **_help("Stage-1 loss: tuple (default) or triplet."))
    tau1: float = field(default=4.0, **_help("Stage-1 temperature."))
    margin: float = field(default=0.2, **_help("Semi-hard mining margin on unit-normalized embeddings."))
    stage1_weight: float | None = field(
        default=None, **_help("Stage-1 loss weight C (default 1000 for tuples, 500 for triplets).")
    )
    stage1_epochs: float = field(default=200.0, **_help("Stage-1 epochs."))
    stage1_learning_rate: float = field(default=0.1, **_help("Stage-1 peak learning rate (cosine to 0.1x)."))
    stage1_min_lr_ratio: float = field(default=0.1, **_help("Stage-1 final learning rate as a fraction of the peak."))

    # ---- stage 2 (and the baselines): local classifier distillation
    tau2: float = field(default=2.0, **_help("Stage-2 temperature."))
    distill_weight: float = field(
        default=10.0,
        **_help("lambda: weight of the stage-2 local-classifier KL (authors: 100; see the README for why 10)."),
    )
    centers: str = field(
        default="global",
        **_help("Teacher class centres: 'global' (once, over the training split) or 'batch' (per batch)."),
    )
    confidence_weights: bool = field(
        default=False, **_help("Weight each image's KL by the teacher's confidence (TPAMI variant).")
    )
    stage2_epochs: float = field(default=200.0, **_help("Stage-2 epochs (also the baselines' epochs)."))
    stage2_learning_rate: float = field(default=0.1, **_help("Stage-2 (and baselines') initial learning rate."))
    stage2_milestones: str = field(
        default="100,140,180", **_help("Stage-2 (and baselines') learning-rate milestones, in epochs.")
    )
    stage2_gamma: float = field(default=0.2, **_help("Learning-rate factor at each stage-2 milestone."))

    # ---- baselines
    kd_tau: float = field(default=4.0, **_help("KD temperature."))
    kd_weight: float = field(default=0.9, **_help("KD: weight of the distillation term."))
    ce_weight: float = field(default=1.0, **_help("Weight of the cross-entropy in stage 2, kd and rkd."))
    rkd_distance_weight: float = field(default=25.0, **_help("RKD distance-term weight."))
    rkd_angle_weight: float = field(default=50.0, **_help("RKD angle-term weight."))

    # ---- optimizer
    sgd_momentum: float = field(default=0.9, **_help("SGD momentum (Nesterov)."))
    overwrite_output: bool = field(
        default=False, **_help("Allow a run into an output_dir holding a finished run (it is replaced).")
    )
    compare_runs: str | None = field(
        default=None,
        **_help("Comma-separated output_dirs of baseline runs on the same data, added to the model card's table."),
    )
    card_license: str = field(default="apache-2.0", **_help("License written in the exported model card."))

    # ---- TrainingArguments defaults for this task
    _TASK_DEFAULTS: ClassVar[tuple[str, ...]] = (
        "output_dir",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "weight_decay",
        "eval_strategy",
        "save_strategy",
        "save_total_limit",
        "logging_steps",
        "report_to",
        "remove_unused_columns",
        "dataloader_num_workers",
    )
    output_dir: str | None = field(default="outputs/refilled", **_help("Where checkpoints, metrics and the export go."))
    per_device_train_batch_size: int = field(default=128, **_help("Batch size per device for training."))
    per_device_eval_batch_size: int = field(default=256, **_help("Batch size per device for evaluation."))
    weight_decay: float = field(default=5e-4, **_help("Weight decay (SGD, coupled)."))
    eval_strategy: IntervalStrategy | str = field(default="epoch", **_help("When to evaluate on validation."))
    save_strategy: SaveStrategy | str = field(default="epoch", **_help("When to write a checkpoint."))
    save_total_limit: int | None = field(default=2, **_help("Checkpoints kept per stage."))
    logging_steps: float = field(default=10, **_help("Log every N steps."))
    report_to: None | str | list[str] = field(
        default="none", **_help("Trackers to report to: none (default), all, or names like tensorboard.")
    )
    remove_unused_columns: bool = field(default=False, **_help("Keep every column (images are not tokens)."))
    dataloader_num_workers: int = field(default=0, **_help("Data-loading worker processes."))

    def __post_init__(self):
        # Mixed precision on a machine without a GPU runs on the CPU rather than failing.
        if (self.bf16 or self.fp16) and not (torch.cuda.is_available() or self.use_cpu):
            self.use_cpu = True
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        """Reject settings that cannot work, before any data or model is loaded."""
        if self.method not in METHODS:
            raise ConfigError(f"Unknown method {self.method!r}: choose one of {', '.join(METHODS)}.")
        if self.stage1_variant not in RELATIONSHIP_VARIANTS:
            raise ConfigError(
                f"Unknown stage1_variant {self.stage1_variant!r}: choose one of {', '.join(RELATIONSHIP_VARIANTS)}."
            )
        if self.centers not in CENTER_MODES:
            raise ConfigError(f"Unknown centers {self.centers!r}: choose one of {', '.join(CENTER_MODES)}.")
        positive = {
            "tau1": self.tau1,
            "tau2": self.tau2,
            "kd_tau": self.kd_tau,
            "margin": self.margin,
            "distill_weight": self.distill_weight,
            "stage1_learning_rate": self.stage1_learning_rate,
            "stage2_learning_rate": self.stage2_learning_rate,
        }
        if self.stage1_weight is not None:
            positive["stage1_weight"] = self.stage1_weight
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"`{name}` must be > 0, got {value}.")
        for name in ("kd_weight", "ce_weight", "rkd_distance_weight", "rkd_angle_weight", "stage1_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not self.stage2_epochs > 0:
            raise ConfigError(f"`stage2_epochs` must be > 0, got {self.stage2_epochs}.")
        if self.shots_per_class is not None and self.shots_per_class < 1:
            raise ConfigError(f"`shots_per_class` must be >= 1, got {self.shots_per_class}.")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"`validation_fraction` must be in [0, 1), got {self.validation_fraction}.")
        self.milestones()  # parses

    def to_recipe(self) -> dict[str, Any]:
        """The run as a recipe that `--config` reads back: refilled-hf's own fields, then
        the `TrainingArguments` fields whose value differs from a default configuration
        (compared after ``__post_init__``, so derived values are not listed). Tokens are
        never included."""
        parent = {f.name for f in fields(TrainingArguments)}
        default = RefilledConfig()
        ours, theirs = {}, {}
        for f in fields(self):
            if "token" in f.name or not f.init:
                continue
            value = getattr(self, f.name)
            if f.name not in parent:
                ours[f.name] = value
            elif f.name in RefilledConfig._TASK_DEFAULTS or value != getattr(default, f.name):
                theirs[f.name] = value.value if hasattr(value, "value") else value
        return json.loads(json.dumps({**ours, **theirs}, default=str))

    def milestones(self) -> list[float]:
        """Stage-2 learning-rate milestones in epochs."""
        try:
            values = [float(m) for m in str(self.stage2_milestones).split(",") if m.strip()]
        except ValueError as err:
            raise ConfigError(
                "`stage2_milestones` must be comma-separated epochs like '100,140,180', "
                f"got {self.stage2_milestones!r}."
            ) from err
        return sorted(values)
