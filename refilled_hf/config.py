"""`RefilledConfig`: every knob of a refilled-hf run, as a `TrainingArguments` subclass.

Parsed by `HfArgumentParser` from a YAML recipe plus command-line overrides
(``refilled-hf distill --config recipe.yaml --distill_weight 10``). The per-stage fields
(epochs, learning rates, schedules) drive the stages; the inherited ``num_train_epochs``,
``learning_rate`` and ``lr_scheduler_type`` are set from them for each stage.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch
import transformers
from accelerate.utils import get_int_from_env
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from .distributed import is_distributed
from .losses import RELATIONSHIP_VARIANTS
from .messages import error_text
from .worker_processes import default_loader_workers

__all__ = ["FIELD_USERS", "INHERITED_FIELDS", "METHODS", "RefilledConfig", "ConfigError", "option_name"]

#: Methods in the same harness: REFILLED's two stages and three baselines.
METHODS = ("refilled", "ce", "kd", "rkd")
CENTER_MODES = ("global", "batch")
DATA_PATHS = ("auto", "device", "workers")
MINING_SCOPES = ("auto", "global", "local")
DISTILL_WEIGHT_SCHEDULES = ("constant", "linear", "cosine")
#: lambda of a single stage 2 when --distill_weight is unset and no validation split can choose
DEFAULT_DISTILL_WEIGHT = 1.0
#: the lambdas chosen among on validation when --distill_weight is unset (see the README's CIFAR-100 numbers)
DEFAULT_DISTILL_WEIGHT_SEARCH = (1.0, 10.0)
#: the share of each class's training images carved for validation when no --validation_split is named
DEFAULT_VALIDATION_FRACTION = 0.1
#: which images stage 2 distils: all (the paper) or those the teacher's local classifier gets right
DISTILL_IMAGES = ("all", "teacher_correct")
TEACHER_CACHE_DTYPES = ("float16", "float32")
#: torch.compile modes (of the inductor backend; None: torch's default)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: fields that take one of a fixed set of values, checked by ``validate``
CHOICES = {
    "method": METHODS,
    "stage1_variant": RELATIONSHIP_VARIANTS,
    "centers": CENTER_MODES,
    "distill_weight_schedule": DISTILL_WEIGHT_SCHEDULES,
    "distill_images": DISTILL_IMAGES,
    "mining_scope": MINING_SCOPES,
    "teacher_cache_dtype": TEACHER_CACHE_DTYPES,
    "data_path": DATA_PATHS,
}

#: Who uses each field that not every run uses (refilled-hf's own, and the inherited ones
#: only training reads): the distillation methods (``distill --method ...``) and the
#: commands that train or run one model. A field not listed here is used by every command.
#: A run given a non-default value for a field it does not use names it in a warning (so
#: that one recipe or command line can run every method: the README's baseline
#: comparison), except train-teacher, which refuses it (it has no method to switch: there,
#: --teacher_classes or --student can only be a mistake).
FIELD_USERS: dict[str, tuple[str, ...]] = {}
_DISTILL = METHODS
_WITH_TEACHER = ("refilled", "kd", "rkd")
_TRAINING = (*METHODS, "train-teacher")
#: the commands besides distill that read a RefilledConfig
CONFIG_COMMANDS = ("train-teacher", "evaluate", "probe-teacher")
for _names, _users in (
    (("method", "student_checkpoint"), _DISTILL),
    (("student",), (*_DISTILL, "probe-teacher")),  # the probe reads its input size and normalization
    (("student_drop_rate",), _TRAINING),  # train-teacher: the trained teacher's dropout
    (("teacher", "teacher_checkpoint"), (*_WITH_TEACHER, "train-teacher", "probe-teacher")),
    (("teacher_input_size",), (*_WITH_TEACHER, "probe-teacher")),
    (("teacher_classes", "teacher_cache", "teacher_cache_dtype", "teacher_cache_budget_gb"), _WITH_TEACHER),
    (("shots_per_class",), (*_TRAINING, "probe-teacher")),
    (("horizontal_flip",), _TRAINING),
    (("mining_scope",), ("refilled", "rkd")),
    (("stage1_variant", "tau1", "margin", "stage1_weight", "stage1_epochs", "stage1_learning_rate",
      "stage1_min_lr_ratio", "tau2", "distill_weight", "distill_weight_search", "distill_weight_schedule",
      "distill_images", "centers", "confidence_weights", "student_alone_candidate"), ("refilled",)),
    (("kd_tau", "kd_weight"), ("kd",)),
    (("rkd_distance_weight", "rkd_angle_weight"), ("rkd",)),
    (("ce_weight",), _TRAINING),  # ce and train-teacher: it scales their only loss
    (("stage2_epochs", "stage2_learning_rate", "stage2_milestones", "stage2_gamma", "sgd_momentum",
      "evaluations_per_stage", "overwrite_output", "compare_runs", "card_license"), _TRAINING),
    # inherited TrainingArguments fields that only a training run reads: evaluate and probe-teacher
    # run the model once (--hub_token is left out: a warning must never print it)
    (("max_steps", "warmup_steps", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
      "gradient_accumulation_steps", "max_grad_norm", "label_smoothing_factor", "torch_empty_cache_steps",
      "per_device_train_batch_size", "dataloader_drop_last", "train_sampling_strategy", "eval_strategy",
      "eval_steps", "eval_delay", "eval_on_start", "load_best_model_at_end", "save_strategy", "save_steps",
      "save_total_limit", "save_only_model", "save_on_each_node", "restore_callback_states_from_checkpoint",
      "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_private_repo", "output_dir"), _TRAINING),
):  # fmt: skip
    FIELD_USERS.update(dict.fromkeys(_names, _users))


#: refilled-hf's own fields that every command reads (the data selection and how it is
#: placed); every other own field has its users in FIELD_USERS (a test holds the two together)
EVERY_COMMAND_FIELDS = (
    "dataset", "dataset_config", "train_split", "test_split", "validation_split", "image_column", "label_column",
    "classes", "validation_fraction", "image_size", "data_path", "device_data_budget_gb", "channels_last",
)  # fmt: skip


def field_users_text(name: str) -> str | None:
    """The ``--help`` note of a field only some runs use (None for the others)."""
    users = FIELD_USERS.get(name)
    if users is None:
        return None
    methods = [m for m in METHODS if m in users]
    if len(methods) == len(METHODS):
        parts = ["distill"]
    else:
        parts = [f"distill --method {'/'.join(methods)}"] if methods else []
    parts += [c for c in CONFIG_COMMANDS if c in users]
    rest = "the others warn that they ignore it" + ("" if "train-teacher" in users else ", train-teacher refuses it")
    return f"[used by {', '.join(parts)}; {rest}]"


class ConfigError(ValueError):
    """A configuration that cannot run (the message names the field and the fix)."""


#: Largest student or teacher input size accepted (a 100,000 px input exhausts any memory).
MAX_IMAGE_SIZE = 1024

#: Inherited fields whose job refilled-hf's own fields do (any value is refused).
REPLACED_FIELDS: dict[str, str] = {
    "learning_rate": "set --stage2_learning_rate (the baselines', train-teacher's and REFILLED's stage 2) and, for "
    "--method refilled, --stage1_learning_rate",
    "num_train_epochs": "set --stage2_epochs (the baselines' and train-teacher's epochs, REFILLED's stage 2) and, for "
    "--method refilled, --stage1_epochs",
    "lr_scheduler_type": "REFILLED's stage 1 decays by cosine to --stage1_min_lr_ratio; stage 2, the baselines and "
    "train-teacher by --stage2_gamma at --stage2_milestones; --warmup_steps adds a warm-up",
}

#: Inherited fields refilled-hf does not support, with the reason (refused unless left at
#: the transformers default).
UNSUPPORTED_FIELDS: dict[str, str] = {
    "lr_scheduler_kwargs": "the stage schedules are set by --stage1_min_lr_ratio, --stage2_milestones, --stage2_gamma",
    "optim_target_modules": "it targets language-model modules",
    "average_tokens_across_devices": "losses here are means over images, not tokens",
    "bf16_full_eval": "evaluation runs under the training precision",
    "fp16_full_eval": "evaluation runs under the training precision",
    "activation_checkpointing": "not implemented for the student; lower --per_device_train_batch_size",
    "activation_checkpointing_kwargs": "not implemented for the student",
    "gradient_checkpointing": "not implemented for the student; lower --per_device_train_batch_size",
    "gradient_checkpointing_kwargs": "not implemented for the student",
    "use_liger_kernel": "a language-model option",
    "liger_kernel_config": "a language-model option",
    "use_cache": "a language-model option",
    "neftune_noise_alpha": "a language-model option",
    "include_num_input_tokens_seen": "a language-model option",
    "auto_find_batch_size": "it would change the batch semi-hard mining sees; set --per_device_train_batch_size",
    "prediction_loss_only": "refilled-hf's evaluation computes its own metrics",
    "eval_do_concat_batches": "refilled-hf's evaluation computes its own metrics",
    "eval_use_gather_object": "refilled-hf's evaluation computes its own metrics",
    "eval_accumulation_steps": "refilled-hf's evaluation computes its own metrics",
    "include_for_metrics": "refilled-hf's evaluation computes its own metrics",
    "batch_eval_metrics": "refilled-hf's evaluation computes its own metrics",
    "metric_for_best_model": "selection uses eval_ncm_top1 in stage 1 and eval_top1 after it",
    "greater_is_better": "selection uses eval_ncm_top1 in stage 1 and eval_top1 after it",
    "hub_strategy": "stages never push; the run pushes its exported model once, at the end",
    "hub_always_push": "stages never push; the run pushes its exported model once, at the end",
    "hub_revision": "the run pushes its exported model to the main branch",
    "ignore_data_skip": "a resumed run must continue exactly where it stopped",
    "dataloader_in_order": (
        "with worker processes, false takes batches in the order the workers finish them, so a seeded run would "
        "not train the same again, nor a resumed one continue as it would have"
    ),
    "enable_jit_checkpoint": (
        "a SIGTERM while a stage trains already saves a checkpoint of the step and stops the run (transformers' "
        "may save before a step's update and lets the run go on); resume with --resume_from_checkpoint true"
    ),
    "parallelism_config": "refilled-hf trains with data parallelism (DDP) only",
    "fsdp": "refilled-hf trains with data parallelism (DDP) only",
    "fsdp_config": "refilled-hf trains with data parallelism (DDP) only",
    "deepspeed": "refilled-hf trains with data parallelism (DDP) only",
    "label_names": "labels come from the data set's label column (--label_column)",
    "length_column_name": "image data has no lengths",
    "debug": "not supported",
}

#: Inherited fields that transformers keeps for scripts and never reads; refilled-hf does not read them either.
INFORMATIONAL_FIELDS: tuple[str, ...] = ("do_train", "do_eval", "do_predict")

#: Fields a run may set from the machine it runs on (bf16 without a GPU runs on the CPU, which
#: transformers then does not pin memory for; a GPU gets non-blocking copies; the loader workers
#: follow the cores and the accelerator, unless set; one process has no process group for a
#: --ddp_backend): recipes give them as the user gave them (RefilledConfig.to_recipe), run
#: identities as they ran.
MACHINE_DECIDED_FIELDS = (
    "use_cpu", "dataloader_pin_memory", "accelerator_config", "dataloader_num_workers", "ddp_backend",
)  # fmt: skip

#: Inherited fields that do what transformers documents (some with refilled-hf's own
#: meaning, stated in their help: optim, max_steps, warmup_steps, label_smoothing_factor,
#: resume_from_checkpoint, push_to_hub).
HONOURED_FIELDS: tuple[str, ...] = (
    "max_steps", "warmup_steps", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon",
    "gradient_accumulation_steps", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16", "tf32",
    "torch_empty_cache_steps", "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node",
    "logging_nan_inf_filter", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_strategy", "eval_steps", "eval_delay",
    "per_device_eval_batch_size", "eval_on_start", "save_only_model", "save_strategy", "save_steps",
    "save_on_each_node", "save_total_limit", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id",
    "load_best_model_at_end", "restore_callback_states_from_checkpoint", "full_determinism", "seed", "data_seed",
    "use_cpu", "accelerator_config", "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "remove_unused_columns", "train_sampling_strategy", "ddp_find_unused_parameters",
    "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout",
    "skip_memory_metrics", "resume_from_checkpoint", "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "local_rank", "output_dir", "per_device_train_batch_size",
    "weight_decay", *INFORMATIONAL_FIELDS,
)  # fmt: skip

#: Every inherited field and its treatment: "honoured", "replaced" or "unsupported".
INHERITED_FIELDS: dict[str, str] = {
    **{name: "honoured" for name in HONOURED_FIELDS},
    **{name: "replaced" for name in REPLACED_FIELDS},
    **{name: "unsupported" for name in UNSUPPORTED_FIELDS},
}


@functools.cache
def undecided_fields() -> tuple[str, ...]:
    """The installed transformers' ``TrainingArguments`` fields that :data:`INHERITED_FIELDS`
    has no decision for (added by a release newer than refilled-hf): refused unless at their default."""
    return tuple(f.name for f in fields(TrainingArguments) if f.init and f.name not in INHERITED_FIELDS)


def _own_version() -> str:
    from . import __version__

    return __version__


def inherited_field_help(name: str) -> str | None:
    """refilled-hf's ``--help`` text for an inherited field it refuses or never reads, in place of
    transformers' (which would describe what the option does in a Trainer script); None for the others."""
    if name in UNSUPPORTED_FIELDS:
        return f"Not supported by refilled-hf ({UNSUPPORTED_FIELDS[name]}): refused unless left at its default."
    if name in undecided_fields():
        return (
            "Not known to this refilled-hf release (a newer transformers option): refused unless left at its default."
        )
    if name == "disable_tqdm":  # the command line turns off the bars of datasets and huggingface_hub too
        return (
            "Disable the progress bars: the Trainer's and, on the command line, those of datasets (loading a data "
            "set) and huggingface_hub (fetching a model). Default: true when log_level is warning or lower."
        )
    if name in ("bf16", "fp16"):  # transformers' help speaks of training alone
        kind = {"bf16": "bfloat16", "fp16": "float16 (a CUDA GPU)"}[name]
        return (
            f"Mixed precision: {kind} autocast, for training and evaluation alike (`evaluate --{name} true` "
            f"measures a model as a --{name} run did; its card's evaluate command passes it)."
        )
    if name == "optim_args":  # transformers' help names three optimizers; most others do not read it
        return (
            "Arguments of the --optim optimizer as key=value pairs separated by commas (rmsprop: "
            "'momentum=0.5,alpha=0.9'). Refused where that optimizer does not read them (AdamW: --adam_beta1, "
            "--adam_beta2, --adam_epsilon) and with the default sgd."
        )
    if name in ("adam_beta1", "adam_beta2", "adam_epsilon"):  # read by Adam-type optimizers only
        what = {"adam_beta1": "first-moment decay (beta1)", "adam_beta2": "second-moment decay (beta2)",
                "adam_epsilon": "epsilon"}[name]  # fmt: skip
        return f"The {what} of Adam-type --optim optimizers; refused with one that does not read it (sgd, rmsprop)."
    if name == "accelerator_config":  # some of its data-loader settings are refused
        return (
            "Accelerate's settings for the Trainer: a JSON file or a dict (non_blocking, gradient_accumulation_kwargs, "
            "...). split_batches=true, even_batches=false, dispatch_batches=true and use_seedable_sampler=false are "
            "refused: each changes which batches the processes train on (its error says how)."
        )
    if name == "train_sampling_strategy":  # transformers' help lists the length-based samplers too
        return "Training batch order: 'random' (default) or 'sequential' (the length-based samplers are refused)."
    if name in INFORMATIONAL_FIELDS:
        return (
            "Informational, as in transformers: refilled-hf does not read it (every run trains, evaluates on "
            "validation per eval_strategy and on test_split at the end of each stage)."
        )
    return None


_INF = math.inf
#: Numeric fields: (low, high, low excluded, high excluded). Every value must also be finite.
NUMERIC_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "tau1": (0, _INF, True, True),
    "tau2": (0, _INF, True, True),
    "kd_tau": (0, _INF, True, True),
    "margin": (0, _INF, True, True),
    "stage1_weight": (0, _INF, True, True),
    "distill_weight": (0, _INF, True, True),
    "stage1_learning_rate": (0, _INF, True, True),
    "stage2_learning_rate": (0, _INF, True, True),
    "stage1_min_lr_ratio": (0, 1, False, False),
    "stage1_epochs": (0, _INF, False, True),
    "stage2_epochs": (0, _INF, True, True),
    "stage2_gamma": (0, 1, True, False),
    "kd_weight": (0, _INF, False, True),
    "ce_weight": (0, _INF, False, True),
    "rkd_distance_weight": (0, _INF, False, True),
    "rkd_angle_weight": (0, _INF, False, True),
    "sgd_momentum": (0, 1, False, True),
    "weight_decay": (0, _INF, False, True),
    "validation_fraction": (0, 1, False, True),
    "shots_per_class": (1, _INF, False, True),
    "image_size": (8, MAX_IMAGE_SIZE, False, False),
    "teacher_input_size": (8, MAX_IMAGE_SIZE, False, False),
    "student_drop_rate": (0, 1, False, True),
    "per_device_train_batch_size": (1, 65536, False, False),
    "per_device_eval_batch_size": (1, 65536, False, False),
    "gradient_accumulation_steps": (1, _INF, False, True),
    "max_grad_norm": (0, _INF, False, True),
    "warmup_steps": (0, _INF, False, True),
    "label_smoothing_factor": (0, 1, False, True),
    "logging_steps": (0, _INF, True, True),
    "save_total_limit": (1, _INF, False, True),
    "save_steps": (0, _INF, True, True),
    "eval_steps": (0, _INF, True, True),
    "eval_delay": (0, _INF, False, True),
    "dataloader_num_workers": (0, 256, False, False),
    "dataloader_prefetch_factor": (1, _INF, False, True),
    "torch_empty_cache_steps": (1, _INF, False, True),
    "seed": (0, 2**32 - 1, False, False),
    "data_seed": (0, 2**32 - 1, False, False),
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_epsilon": (0, _INF, True, True),
    "ddp_timeout": (1, _INF, False, True),
    "device_data_budget_gb": (0, _INF, True, True),
    "teacher_cache_budget_gb": (0, _INF, True, True),
    "evaluations_per_stage": (0, _INF, False, True),
}


#: the words that stand for None where only text can be given (the command line, a recipe's string)
NONE_WORDS = ("none", "null")

#: what ``accelerate launch`` passes through the environment (see RefilledConfig._adopt_launcher_settings)
LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE")


#: the variables through which a launcher (torchrun, accelerate's multi-GPU launcher, mpirun)
#: tells each process how many processes there are
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def lone_process_launch_warning() -> str | None:
    """What to say when ``accelerate launch --num_processes N`` (N > 1, without
    ``--multi_gpu``) started this process alone: its simple launcher starts several processes
    only through mpirun (``--mpirun_hostfile``), and otherwise runs one, setting
    ``MASTER_ADDR`` (only when asked for several) but no world size. None otherwise."""
    env = os.environ
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and not any(v in env for v in WORLD_SIZE_VARIABLES):
        return (
            "accelerate launch started this process alone, although MASTER_ADDR is set, as `accelerate launch "
            "--num_processes N` without --multi_gpu leaves it: it starts several processes only through mpirun "
            "(--mpirun_hostfile). This run trains as one process. For N processes, launch with `accelerate launch "
            "--multi_gpu --num_processes N` (on a machine without a GPU they train as one CPU group) or `torchrun "
            "--nproc_per_node N -m refilled_hf.cli ...`."
        )
    return None


def _has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...) to train on."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


@contextlib.contextmanager
def _launcher_settings_ignored():
    """Inside the block, :data:`LAUNCHER_VARIABLES` are unset."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _default_configuration() -> RefilledConfig:
    """A configuration of every default, however this process was launched."""
    with _launcher_settings_ignored():
        return RefilledConfig()


def _recipe_value(value: Any) -> Any:
    """A field's value as a recipe writes it (an option enum as its value)."""
    return value.value if hasattr(value, "value") else value


def _check_range(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"`{name}` must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number, got {value}.")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        if low_open and high == _INF:
            wanted = f"> {low}"
        elif high == _INF:
            wanted = f">= {low}"
        else:
            wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"`{name}` must be {wanted}, got {value}.")


def option_name(value: Any) -> str:
    """A transformers option as its string: enum members (``IntervalStrategy.EPOCH``,
    ``OptimizerNames.SGD``) and plain strings (set on a stage view) alike."""
    return str(getattr(value, "value", value))


def parse_milestones(value: Any) -> list[float]:
    """``--stage2_milestones`` (``'100,140,180'``, or ``''`` for none) as sorted epochs."""
    try:
        values = [float(m) for m in str(value).split(",") if m.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(
            "`stage2_milestones` must be comma-separated epochs >= 0 like '100,140,180' (or '' for none), "
            f"got {str(value)[:80]!r}."
        )
    return sorted(values)


#: ``--dataset``'s default (``evaluate``'s where the model records no data set of its own)
DEFAULT_DATASET = "uoft-cs/cifar100"

#: the fields that name local files or folders (a ``local-dir:`` model, a data set folder, ...):
#: a leading ``~`` in them is the user's home, as in a shell (transformers does the same for
#: ``output_dir``); YAML recipes and ``local-dir:~/...`` on a command line reach us unexpanded
PATH_FIELDS = ("student", "student_checkpoint", "teacher", "teacher_checkpoint", "dataset", "teacher_cache")


def expand_home(value: Any) -> Any:
    """``value`` with a leading ``~`` (after a ``local-dir:`` prefix too) expanded to the home
    folder, as a shell expands it; anything else (a Hub id, a timm name, None) unchanged."""
    if not isinstance(value, str):
        return value
    prefix = "local-dir:" if value.startswith("local-dir:") else ""
    rest = value[len(prefix) :]
    return prefix + os.path.expanduser(rest) if rest.startswith("~") else value


def options_text(values: dict[str, Any]) -> str:
    """``--name value, ...`` as a user would type them (enum members by their value)."""
    return ", ".join(f"--{name} {option_name(value)}" for name, value in values.items())


def _plain(value: Any) -> Any:
    """Enum members as their values and every empty value (None, False, "", "no", []) as None,
    for comparisons with defaults (transformers normalizes some of them after init)."""
    value = getattr(value, "value", value)
    if isinstance(value, (list, tuple)):
        value = [getattr(v, "value", v) for v in value]
    return None if value in (None, False, "", "no", "none", [], {}) else value


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    """An optimizer's arguments as a message shows them (the learning rate is the stage's)."""
    shown = {k: v for k, v in kwargs.items() if k != "lr"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "its defaults"


@functools.lru_cache(maxsize=1)
def _transformers_defaults() -> dict[str, Any]:
    out = {}
    for f in fields(TrainingArguments):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def field_defaults() -> dict[str, Any]:
    """Each :class:`RefilledConfig` field's declared default (``dataclasses.MISSING`` where a
    factory makes it): what a value is compared with to tell whether the user set it."""
    return {f.name: f.default for f in fields(RefilledConfig)}


def _reporting_integrations() -> list[str]:
    from transformers.integrations import get_available_reporting_integrations

    return list(get_available_reporting_integrations())


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class RefilledConfig(TrainingArguments):
    """Configuration of a refilled-hf run (distillation or teacher training).

    Defaults follow the paper's CIFAR protocol (SGD with Nesterov momentum 0.9, weight
    decay 5e-4, batch 128; stage 1 cosine to 0.1x, stage 2 multi-step x0.2), except
    ``distill_weight`` (lambda), chosen on the validation split among 1 and 10 unless set:
    see the benchmark results in the README.
    """

    # ---- what to run
    method: str = field(default="refilled", **_help(f"Method: one of {', '.join(METHODS)}."))
    student: str = field(
        default="cifar_wrn_16_1",
        **_help(
            "Student timm model: a registered name (e.g. cifar_wrn_16_1, resnet18; randomly initialized unless "
            "student_checkpoint is given: a name with a pretrained tag, resnet18.a1_in1k, is refused without one), "
            "or local-dir: / hf-hub: (starting from its weights: hf-hub:timm/resnet18.a1_in1k). Its classifier is "
            "replaced by a new one unless it is for the selected classes: as many, and (where the model names its "
            "classes) the same names in the same order."
        ),
    )
    student_checkpoint: str | None = field(
        default=None, **_help("Optional initial weights for the student (safetensors, or legacy .pt/.pth).")
    )
    student_drop_rate: float | None = field(
        default=None,
        **_help(
            "Dropout passed to timm.create_model for the student (train-teacher: for the teacher it trains); the "
            "model's default if unset."
        ),
    )
    teacher: str | None = field(
        default=None,
        **_help(
            "Teacher timm model: 'local-dir:<folder>' (e.g. from `refilled-hf train-teacher`), 'hf-hub:<repo>', "
            "or a registered name with --teacher_checkpoint (or timm's pretrained weights). train-teacher: the model "
            "it trains, randomly initialized unless --teacher_checkpoint is given (a name with a pretrained tag is "
            "refused without one; hf-hub:<repo> starts from that model's weights)."
        ),
    )
    teacher_checkpoint: str | None = field(
        default=None,
        **_help(
            "Weights for a teacher given by name (safetensors, or .pt/.pth read weights_only), read through timm's "
            "checkpoint filter for its architecture (original formats timm converts load too; without classifier "
            "weights, the teacher has none)."
        ),
    )
    teacher_input_size: int | None = field(
        default=None,
        **_help(
            "Resize images to this size for the teacher (default: its pretrained_cfg's); a teacher of fixed input "
            "size (a ViT) is built for it, its position embeddings resampled."
        ),
    )

    # ---- data
    dataset: str = field(
        default=DEFAULT_DATASET,
        **_help(
            "Data set: a Hub id, a folder of parquet (or CSV) files named by split, whose image column holds bytes "
            "or paths (relative ones from that folder), a folder of images by split and class "
            "(train/<class>/*.jpg, test/<class>/...), or one parquet or CSV file (the training split)."
        ),
    )
    dataset_config: str | None = field(default=None, **_help("Configuration name of a Hub data set."))
    train_split: str = field(
        default="train",
        **_help("Split to train on (the validation split is carved from it, unless --validation_split)."),
    )
    test_split: str | None = field(
        default="test",
        **_help(
            "Split evaluated once at the end (evaluate: with --split test, and then the only split read: a data set "
            "of held-out images alone may name its one split, e.g. train); none: the data set has no test split, "
            "and no test accuracy is claimed."
        ),
    )
    validation_split: str | None = field(
        default=None,
        **_help(
            "A labelled split of the data set to validate on (its images of --classes: lambda, best-model selection "
            "and probe-teacher use it), instead of carving --validation_fraction from the training split, which "
            "then keeps all its images. Not the training or test split."
        ),
    )
    image_column: str | None = field(default=None, **_help("Image column (default: detect img/image)."))
    label_column: str | None = field(default=None, **_help("Label column (default: detect fine_label/label/labels)."))
    classes: str | None = field(
        default=None,
        **_help(
            "The student's classes (train-teacher: the teacher's): ids, ranges (50-99), names, comma-separated, "
            "or a preset "
            "(cifar100-second-half, cifar100-shift-10, ...); id:<id or range> and name:<name> say which an item "
            "is (required where class names are numbers other than their ids, as an image folder's 1, 10, 2). "
            "Default: all classes (for evaluate: the model's own classes, by its label names)."
        ),
    )
    teacher_classes: str | None = field(
        default=None,
        **_help(
            "The teacher's classes in the same data set, in its output order (stated in the model card; for kd, "
            "they tell which of its outputs are the student's classes where it names none). Unset: read from the "
            "teacher's own training-data record where it has one, which a value given must agree with."
        ),
    )
    shots_per_class: int | None = field(
        default=None,
        **_help(
            "Training images per class (seeded, stratified): the middle-shot setting. Drawn from the images "
            "the validation carve leaves: the validation split keeps its --validation_fraction of every image "
            "of the class, not of the shots."
        ),
    )
    validation_fraction: float | None = field(
        default=None,
        **_help(
            f"Fraction of each class's training images held out for validation (0 for none). Default: "
            f"{DEFAULT_VALIDATION_FRACTION:g}, or 0 with --validation_split (a fraction above 0 is then refused)."
        ),
    )
    image_size: int | None = field(
        default=None,
        **_help(
            "Input size of the student (train-teacher: of the teacher it trains; evaluate: of the model evaluated). "
            "Default: the model's pretrained_cfg's. A model of fixed input size (a ViT) is built for it, as timm's "
            "img_size does (loaded position embeddings resampled)."
        ),
    )
    horizontal_flip: bool = field(default=True, **_help("Random horizontal flips in training augmentation."))
    data_path: str = field(
        default="auto",
        **_help(
            "Where images are augmented: 'device' (decoded once into a uint8 tensor on the training device and "
            "augmented there in batches, the same pixels as the worker path for the same random draws: the CIFAR "
            "crop and flip for inputs <= 64 px; above, timm's random-resized crop, flip, colour jitter and "
            "evaluation resize, computed with Pillow's arithmetic), 'workers' (DataLoader with PIL transforms and "
            "--dataloader_num_workers), or 'auto' (device whenever it applies and the splits fit "
            "--device_data_budget_gb; for inputs over 64 px only on an accelerator, since on a CPU Pillow in the "
            "workers is faster). The log says which runs and why."
        ),
    )
    device_data_budget_gb: float = field(
        default=4.0, **_help("Most memory (GiB) the device data path may use for the decoded splits.")
    )
    teacher_cache: str | None = field(
        default=None,
        **_help(
            "Folder of a teacher-output cache shared by runs (seeds, baselines, sweeps): the teacher's outputs for "
            "every training image under every crop/flip the device data path can draw (162 per 32-px image), "
            "built once (that costs 162 teacher passes over the training split), then read instead of running "
            "the teacher each step. The same augmentations and random draws as without it (float32 storage "
            "reproduces the uncached run; float16 rounds the teacher's outputs). Needs the device data path at "
            "64 px or less. Default none."
        ),
    )
    teacher_cache_dtype: str = field(
        default="float16",
        **_help("Storage precision of the teacher cache: float16 (half the memory) or float32 (bit-exact)."),
    )
    teacher_cache_budget_gb: float = field(
        default=8.0, **_help("Most memory (GiB) the teacher cache may take on the training device.")
    )

    # ---- stage 1: relationship matching
    stage1_variant: str = field(default="tuple", **_help("Stage-1 loss: tuple (default) or triplet."))
    tau1: float = field(default=4.0, **_help("Stage-1 temperature."))
    margin: float = field(default=0.2, **_help("Semi-hard mining margin on unit-normalized embeddings."))
    stage1_weight: float | None = field(
        default=None, **_help("Stage-1 loss weight C (default 1000 for tuples, 500 for triplets).")
    )
    mining_scope: str = field(
        default="auto",
        **_help(
            "Which batch the batch-level choices see when several processes train: REFILLED stage 1's semi-hard "
            "tuples, stage 2's local classes (and its per-batch centres under --centers batch, the range of "
            "--confidence_weights), RKD's pairs and triples. 'global': the whole batch of all processes "
            "(embeddings gathered with exact gradients): the same method as one process with the global batch; "
            "'local': each process's own per-device batch; 'auto' (default): global."
        ),
    )
    stage1_epochs: float = field(default=200.0, **_help("Stage-1 epochs."))
    stage1_learning_rate: float = field(
        default=0.1, **_help("Stage-1 peak learning rate (cosine to --stage1_min_lr_ratio times it).")
    )
    stage1_min_lr_ratio: float = field(default=0.1, **_help("Stage-1 final learning rate as a fraction of the peak."))

    # ---- stage 2 (and the baselines): local classifier distillation
    tau2: float = field(default=2.0, **_help("Stage-2 temperature."))
    distill_weight: float | None = field(
        default=None,
        **_help(
            "lambda: weight of the stage-2 local-classifier KL (authors: 100). Unset (the default): chosen on the "
            "validation split among 1 and 10 (see --distill_weight_search), or 1 without a validation split. Set "
            "it to run stage 2 once with that value: 10 when the student has few images per class (<= 100) and "
            "the teacher's probe is well above what the student reaches alone (1.3-2.7 more points than 1 on "
            "CIFAR-100), 1 with many (with 450 images per class 10 cost 3 points against cross-entropy alone)."
        ),
    )
    distill_weight_search: str | None = field(
        default=None,
        **_help(
            "Comma-separated lambdas: run stage 2 once per value, each from the same stage-1 student and seed, and "
            "keep the one with the best validation top-1 (ties: the first listed). Default, when --distill_weight "
            "is unset and a validation split exists: '1,10' (stage 2 runs twice). Needs a validation split "
            "(--validation_fraction > 0 or --validation_split) and --method refilled; cannot be combined with "
            "--distill_weight. results.json and the model card "
            "list every candidate's validation top-1 and name the pick; the test split is evaluated for the pick "
            "only. The student trained alone is one more candidate (see --student_alone_candidate)."
        ),
    )
    student_alone_candidate: bool = field(
        default=True,
        **_help(
            "With the lambda search (--distill_weight unset, or --distill_weight_search): also train the student "
            "alone as one more candidate (cross-entropy from the same initial weights and seed for stage1_epochs + "
            "stage2_epochs epochs, stage 2's learning rate and milestones stretched to that length; no teacher), "
            "and export it instead of REFILLED's pick when its validation top-1 is higher (ties: REFILLED). The run "
            "warns, and results.json and the model card say which was exported. It costs one such cross-entropy "
            "run; false skips it (the export is then always REFILLED's pick). Without the search it does nothing."
        ),
    )
    distill_weight_schedule: str = field(
        default="constant",
        **_help(
            "How lambda moves over stage 2: 'constant' (the paper), 'linear' or 'cosine' (from lambda at the "
            "first step to 0 at the last step of --stage2_epochs, so stage 2 ends on cross-entropy alone)."
        ),
    )
    distill_images: str = field(
        default="all",
        **_help(
            "Which images stage 2 distils: 'all' (the paper) or 'teacher_correct' (only those whose teacher local "
            "classifier, the nearest class centre among the batch's classes, picks the true label; the others "
            "train on cross-entropy alone)."
        ),
    )
    centers: str = field(
        default="global",
        **_help("Teacher class centres: 'global' (once, over the training split) or 'batch' (per batch)."),
    )
    confidence_weights: bool = field(
        default=False, **_help("Weight each image's KL by the teacher's confidence (TPAMI variant).")
    )
    stage2_epochs: float = field(default=200.0, **_help("Stage-2 epochs; the baselines' and train-teacher's epochs."))
    stage2_learning_rate: float = field(
        default=0.1, **_help("Stage-2 (baselines', train-teacher's) initial learning rate.")
    )
    stage2_milestones: str = field(
        default="100,140,180",
        **_help(
            "Stage-2 (baselines', train-teacher's) learning-rate milestones, in epochs ('' for none). The defaults "
            "are the paper's, for 200 epochs: with fewer --stage2_epochs set milestones that fall inside them (a "
            "milestone at or beyond the last epoch never applies; the run warns)."
        ),
    )
    stage2_gamma: float = field(
        default=0.2, **_help("Learning-rate factor at each stage-2 (baseline, train-teacher) milestone.")
    )

    # ---- baselines
    kd_tau: float = field(default=4.0, **_help("KD temperature."))
    kd_weight: float = field(default=0.9, **_help("KD: weight of the distillation term."))
    ce_weight: float = field(
        default=1.0,
        **_help(
            "Weight of the cross-entropy in stage 2, kd and rkd (with ce and train-teacher it scales their only loss)."
        ),
    )
    rkd_distance_weight: float = field(default=25.0, **_help("RKD distance-term weight."))
    rkd_angle_weight: float = field(default=50.0, **_help("RKD angle-term weight."))

    # ---- cadence
    evaluations_per_stage: int = field(
        default=20,
        **_help(
            "With --eval_strategy / --save_strategy epoch: evaluate and checkpoint every ceil(epochs / N) epochs, "
            "about N times per stage (a 200-epoch stage: every 10 epochs); the final evaluation always runs. "
            "0: every epoch."
        ),
    )

    # ---- optimizer
    sgd_momentum: float = field(default=0.9, **_help("SGD momentum (Nesterov)."))
    overwrite_output: bool = field(
        default=False, **_help("Allow a run into an output_dir holding a finished run (it is replaced).")
    )
    compare_runs: str | None = field(
        default=None,
        **_help(
            "Comma-separated output_dirs of finished baseline runs, added to the model card's table with their "
            "epochs and every way their schedule differs; refused unless they used the same images (data set, "
            "classes, shots, validation carve or split, seed). none: no baseline (over a recipe that names some)."
        ),
    )
    card_license: str = field(default="apache-2.0", **_help("License written in the exported model card."))

    # ---- TrainingArguments fields with this task's defaults (see INHERITED_FIELDS for the rest)
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
        "optim",
        "max_grad_norm",
    )
    output_dir: str | None = field(
        default=None,
        **_help(
            "Where checkpoints, metrics and the export go. Default: outputs/<method> (outputs/refilled, "
            "outputs/ce, ...); train-teacher: outputs/teacher."
        ),  # fmt: skip
    )
    per_device_train_batch_size: int = field(default=128, **_help("Batch size per device for training."))
    per_device_eval_batch_size: int = field(default=256, **_help("Batch size per device for evaluation."))
    weight_decay: float = field(
        default=5e-4,
        **_help(
            "Weight decay: --optim sgd adds it to every parameter's gradient (coupled, the paper's); another "
            "--optim applies it as transformers does (AdamW: decoupled), to every parameter but biases and the "
            "weights of LayerNorms and of layers named norm (a BatchNorm named bn1, as in the CIFAR wide ResNets, "
            "is decayed)."
        ),
    )
    eval_strategy: IntervalStrategy | str = field(default="epoch", **_help("When to evaluate on validation."))
    save_strategy: SaveStrategy | str = field(
        default="epoch",
        **_help(
            "When to write a checkpoint: every epoch, every --save_steps steps, no, or best: at each evaluation "
            "that improves the stage's validation metric (stage 1: NCM top-1; after it: top-1)."
        ),
    )
    save_total_limit: int | None = field(
        default=2,
        **_help(
            "Checkpoints kept per stage: the newest ones, and the best where --load_best_model_at_end or "
            "--save_strategy best selects one; none: every one."
        ),
    )
    seed: int = field(
        default=42,
        **_help(
            "Seed of the run: the initialization of the model trained (the student; train-teacher's teacher) and "
            "its augmentation, and, unless data_seed is set, the batch order and which images shots_per_class and "
            "validation_fraction select."
        ),
    )
    data_seed: int | None = field(
        default=None,
        **_help(
            "Seed of the data: which images shots_per_class and validation_fraction select, and the batch order "
            "(default: seed). Fix it and vary seed to repeat a run on the same images."
        ),
    )
    logging_steps: float = field(default=10, **_help("Log every N steps."))
    report_to: None | str | list[str] = field(
        default="none", **_help("Trackers to report to: none (default), all, or installed ones like tensorboard.")
    )
    remove_unused_columns: bool = field(default=False, **_help("Keep every column (images are not tokens)."))
    dataloader_num_workers: int | None = field(
        default=None,
        **_help(
            "DataLoader worker processes of the worker path (the device path loads in the training process). "
            "Default: on an accelerator, the cores this process may use (its CPU affinity, shared with the "
            "launch's other processes on the machine) less one, at most 8; 0 on the CPU (loading in the training "
            "process was faster there) and where processes are not forked (not Linux). The augmentation does "
            "not depend on it: each image's draws are seeded by the run's seed, the stage, the epoch and the "
            "image."
        ),
    )
    optim: str = field(
        default="sgd",
        **_help(
            "Optimizer: 'sgd' (default: SGD with Nesterov momentum `sgd_momentum` and coupled weight decay, the "
            "paper's) or any transformers optimizer name (e.g. adamw_torch), run at the stage learning rates."
        ),
    )
    max_grad_norm: float = field(
        default=0.0,
        **_help(
            "Clip gradients to this norm; 0 (the default) does not clip, as the authors' code and timm's training "
            "script do not (transformers' default is 1, which cost REFILLED 1.3-2.5 points on CIFAR-100)."
        ),
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        **_help(
            "transformers' filter that leaves non-finite losses out of the logged mean. Off by default: it reads "
            "every step's loss back to the host, stalling a GPU each step; the library counts non-finite losses on "
            "the device instead and fails the run if there were any."
        ),
    )
    max_steps: int = field(
        default=-1,
        **_help(
            "If > 0, stop each stage after this many optimizer steps (smoke tests); the learning-rate schedules keep "
            "the lengths of stage1_epochs / stage2_epochs, and a stage that is shorter ends with its epochs."
        ),
    )
    ddp_find_unused_parameters: bool | None = field(
        default=None,
        **_help(
            "DistributedDataParallel's find_unused_parameters (several processes): whether DDP looks, at every "
            "step, for parameters that the loss does not use. Unset (the default): only where the student has "
            "some, found once per stage before it trains (transformers' default looks at every step for any model "
            "not its own); true or false: as given."
        ),
    )
    ddp_backend: str | None = field(
        default=None,
        metadata={
            "help": "Backend of the process group when several processes train (nccl between GPUs, gloo between "
            "CPUs; unset: Accelerate's choice). One process has no process group and trains as without it (a "
            "multi-GPU recipe run on one GPU).",
            # (the backends the installed transformers lists)
            **{k: v for k, v in TrainingArguments.__dataclass_fields__["ddp_backend"].metadata.items() if k != "help"},
        },
    )
    warmup_steps: float = field(
        default=0,
        **_help("Linear learning-rate warm-up at the start of each stage: steps (>= 1) or a fraction of it (< 1)."),
    )
    label_smoothing_factor: float = field(
        default=0.0, **_help("Label smoothing of the cross-entropy term (stage 2 and the baselines).")
    )
    torch_compile: bool = field(
        default=False,
        **_help(
            "Compile the student and the teacher with torch.compile (in place, for both stages); semi-hard mining "
            "and the losses stay eager (their shapes depend on the batch). Each stage starts with a compile "
            "(4-15 s on an H200, 30-107 s on a 2-core CPU). On a GPU use --torch_compile_mode reduce-overhead for "
            "long runs (CUDA graphs: 2.0-2.6x the eager images/s at batch 128 on an H200); the default mode did "
            "not help there, nor on a CPU. Under inductor a student with dropout or drop path draws its masks from "
            "inductor's generator: from the same seed another draw of the run than eager's, and a resume must "
            "compile as the run started. See the README."
        ),
    )
    torch_compile_backend: str | None = field(
        default=None, **_help("torch.compile backend (default: inductor). Setting it turns --torch_compile on.")
    )
    torch_compile_mode: str | None = field(
        default=None,
        **_help(
            "torch.compile mode of the inductor backend: default, reduce-overhead (CUDA graphs), max-autotune or "
            "max-autotune-no-cudagraphs. Setting it turns --torch_compile on."
        ),
    )
    channels_last: bool = field(
        default=False,
        **_help(
            "Keep the student's and the teacher's convolution weights, and so their activations, in channels-last "
            "(NHWC) memory format, the layout GPU tensor cores prefer under --bf16/--fp16 (on a 2-core CPU: "
            "1.12-1.19x images/s for the CIFAR wide ResNets; on an H200 at batch 128 no consistent change). "
            "Checkpoints and the "
            "export keep the usual layout. The same computation up to rounding, except that dropout draws its "
            "masks in memory order (a seeded run draws other masks than in the default layout). Off by default: "
            "some timm models crash in this layout in torch's CPU kernels (fastvit_t8, repvgg_a0)."
        ),
    )
    gradient_accumulation_steps: int = field(
        default=1,
        **_help(
            "Micro-batches accumulated into one optimizer step (their gradients averaged). REFILLED mines stage 1's "
            "tuples and takes stage 2's local classes within each micro-batch, not over the accumulated batch (more "
            "processes, unlike accumulation, keep stage 1's mining pool: --mining_scope)."
        ),
    )
    push_to_hub: bool = field(
        default=False,
        **_help(
            "Push the exported model (output_dir/model, with its model card) to --hub_model_id once, at the end of "
            "the run, from the main process; stages and checkpoints are never pushed. The Hub login is checked "
            "before training (a run that could not push is refused then)."
        ),
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        **_help(
            "'true': continue this output_dir's run from its newest complete checkpoint (a folder without a run "
            "starts one, with a warning; a finished run gives its results, training nothing, and exports its model "
            "again where model/ was removed); or the path of one of its checkpoints (under output_dir/stage1, stage2 "
            "or <method>). Refused if the run's configuration changed."
        ),
    )
    # Replaced by the per-stage fields: None means "not given"; any value is refused (see validate()).
    learning_rate: float | None = field(default=None, **_help(f"Refused: {REPLACED_FIELDS['learning_rate']}."))
    num_train_epochs: float | None = field(default=None, **_help(f"Refused: {REPLACED_FIELDS['num_train_epochs']}."))
    lr_scheduler_type: str | None = field(default=None, **_help(f"Refused: {REPLACED_FIELDS['lr_scheduler_type']}."))

    def __post_init__(self):
        self._check_replaced_fields()
        # `--test_split none`: a data set without a test split; `--teacher_cache none`, `--distill_weight_search
        # none`, `--compare_runs none`: off, also over a recipe that sets them (YAML and the command line can
        # only spell None as text)
        for name in ("test_split", "validation_split", "teacher_cache", "distill_weight_search", "compare_runs"):
            value = getattr(self, name)
            if value is not None and str(value).strip().lower() in ("", *NONE_WORDS):
                setattr(self, name, None)
        if self.output_dir is None:
            self.output_dir = self.default_output_dir()
        for name in PATH_FIELDS:
            setattr(self, name, expand_home(getattr(self, name)))
        runs = [run.strip() for run in str(self.compare_runs or "").split(",")]
        if any(run.startswith("~") for run in runs):
            self.compare_runs = ",".join(expand_home(run) for run in runs)
        self._resolve_validation()
        self._adopt_launcher_settings()
        if self.fp16 and not torch.cuda.is_available():
            raise ConfigError("--fp16 needs a CUDA GPU and none is visible: use --bf16 true (works on the CPU too).")
        # What this machine decides below (and transformers then derives: no pinned memory on the CPU), as
        # given: a recipe printed or carried by a model card says what the user chose, not what this machine
        # made of it (a bf16 run on a laptop's CPU must not make its recipe run on the CPU of a GPU machine).
        self._given = {name: getattr(self, name) for name in MACHINE_DECIDED_FIELDS}
        # bf16 on a machine without a GPU runs on the CPU rather than failing.
        if self.bf16 and not (torch.cuda.is_available() or self.use_cpu):
            self.use_cpu = True
        # Several processes (torchrun, accelerate launch) on a machine without an accelerator: Accelerate
        # makes them one CPU group only when told to use the CPU; otherwise each process trained alone, as
        # process 0 of 1, and all of them wrote the same --output_dir.
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            self.use_cpu = True
        # (the processes a launcher started, read as Accelerate reads them; or a group a script made itself)
        if (
            self.ddp_backend is not None
            and get_int_from_env(list(WORLD_SIZE_VARIABLES), 1) <= 1
            and not is_distributed()
        ):
            # the backend of a process group, and one process trains without one: a multi-GPU recipe run on one
            # GPU trains as it would without the field (transformers asked Accelerate for the size of a group
            # it never made: "Default process group has not been initialized")
            self.ddp_backend = None
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = default_loader_workers(on_accelerator=not self.use_cpu and _has_accelerator())
        if self.accelerator_config is None and self.dataloader_pin_memory and torch.cuda.is_available():
            # pinned batches copied to the GPU without blocking: a blocking copy makes the host wait for the
            # GPU to finish the previous step before it may queue the next one
            self.accelerator_config = {"non_blocking": True}
        self._check_before_transformers()
        self.validate()  # before transformers' own checks, whose failures read as tracebacks
        self.lr_scheduler_type = "linear"  # transformers needs a value; our create_scheduler never reads it
        selection = {name: getattr(self, name) for name in ("metric_for_best_model", "greater_is_better")}
        super().__post_init__()
        self.lr_scheduler_type = None
        # transformers derives these from --load_best_model_at_end ("loss", False); refilled-hf sets its own
        # per stage (trainer.stage_args), and a copy validated again (dataclasses.replace: train-teacher,
        # evaluate --split validation) would refuse the derived values as the user's
        for name, value in selection.items():
            setattr(self, name, value)
        self._check_data_loader_configuration()
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        """Refuse, before any data is loaded, an ``--optim`` this machine cannot build (a package
        missing) and the optimizer settings it would not read: transformers builds each optimizer
        from the few fields it knows (AdamW from --adam_beta1/2/--adam_epsilon, RMSprop from
        --optim_args, ...) and passes over the others in silence. What an optimizer reads is
        found by building its arguments with and without the setting (transformers' own
        ``get_optimizer_cls_and_kwargs``), so it follows the installed release."""
        optim = option_name(self.optim)
        if optim == "sgd":
            return  # refilled-hf's own SGD: _check_inherited refuses the other optimizers' fields with it
        if self.sgd_momentum != field_defaults()["sgd_momentum"]:
            raise ConfigError(
                f"--sgd_momentum applies to --optim sgd (refilled-hf's Nesterov SGD), not --optim {optim}: remove it."
            )
        from transformers import Trainer  # (a heavy import, only for another optimizer than the default)

        probe = torch.nn.Linear(1, 1)
        try:
            built, chosen = Trainer.get_optimizer_cls_and_kwargs(self, probe)
        except (ImportError, ValueError, TypeError, RuntimeError) as err:
            why = error_text(err)
            where = (" (--optim_args takes key=value pairs separated by commas, e.g. 'momentum=0.5,alpha=0.9')"
                     if self.optim_args and "unpack" in why else "")  # fmt: skip
            raise ConfigError(f"--optim {optim} cannot be built here: {why}{where}.") from None
        defaults = _transformers_defaults()
        for name in self._changed_inherited(("optim_args", "adam_beta1", "adam_beta2", "adam_epsilon")):
            without = copy.copy(self)
            setattr(without, name, defaults[name])
            if Trainer.get_optimizer_cls_and_kwargs(without, probe)[1] == chosen:
                raise ConfigError(
                    f"--{name} {getattr(self, name)} changes nothing in --optim {optim}: transformers builds "
                    f"{getattr(built, '__name__', built)} the same without it ({_kwargs_text(chosen)}). Pass settings "
                    f"{optim} reads (AdamW-type optimizers: --adam_beta1, --adam_beta2, --adam_epsilon; others: "
                    "--optim_args with their own argument names), or remove it."
                )

    def _check_data_loader_configuration(self) -> None:
        """Refuse the ``--accelerator_config`` data-loader settings that change what a run trains
        on behind refilled-hf's back (read once transformers has parsed the field: a dict, JSON
        text or a JSON file)."""
        given = self.accelerator_config
        refused = {
            "split_batches": (True, "makes --per_device_train_batch_size the global batch, split over the processes, "
                              "while refilled-hf counts batches per process (its checks, warm-up, evaluation cadence "
                              "and model card): pass --per_device_train_batch_size <global batch / processes> "
                              "instead"),
            "even_batches": (False, "gives the processes batches of different sizes at an epoch's end, while "
                             "REFILLED's stages and RKD gather every process's batch into one (--mining_scope), "
                             "which needs equal sizes: leave it true"),
            "dispatch_batches": (True, "has process 0 load every process's batches, as transformers does for "
                                 "iterable data sets; refilled-hf's are map-style, each process reading its own "
                                 "share (what its multi-process runs are tested with): leave it unset"),
            "use_seedable_sampler": (False, "draws each epoch's order from the global random state, so a run "
                                     "resumed inside an epoch trains on other batches than the uninterrupted run: "
                                     "leave it true"),
        }  # fmt: skip
        for name, (value, why) in refused.items():
            if getattr(given, name, None) is value:
                raise ConfigError(f"--accelerator_config {name}={str(value).lower()} {why}.")

    def _adopt_launcher_settings(self) -> None:
        """What ``accelerate launch`` (its flags or an Accelerate config file) asks through the
        environment, which transformers' Trainer and Accelerate would otherwise apply whatever
        the run's fields say, becomes those fields here, so that the run records, caches and
        cards what it does; what refilled-hf cannot do is refused. A run that sets ``--bf16`` /
        ``--fp16`` or any ``--torch_compile*`` field itself keeps it, as in transformers (which
        cannot tell ``--bf16 false`` from the default either: the launcher's bf16 then applies).

        - ``--mixed_precision bf16`` / ``fp16`` (``recipes/accelerate/multi_gpu.yaml`` sets
          bf16): ``--bf16`` / ``--fp16`` (the Trainer autocast in bf16 while the run's records
          said fp32); fp8 is refused.
        - ``--dynamo_backend``: ``--torch_compile`` with that backend (and mode): refilled-hf
          compiles the student and teacher in place, where Accelerate would have compiled the
          student's whole wrapper on top, unrecorded.
        - DeepSpeed, FSDP, Megatron-LM, or sharded, tensor, context or sequence parallelism:
          refused (data parallelism only)."""
        from accelerate.utils import parse_flag_from_env  # Accelerate's own reading of its flags

        env = os.environ
        for name, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP"),
                           ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):  # fmt: skip
            if parse_flag_from_env(name):
                raise ConfigError(
                    f"{name}={env[name]}: this launch asks for {what}, and refilled-hf trains with data parallelism "
                    "(DDP) only. Launch with an Accelerate config without it (e.g. recipes/accelerate/multi_gpu.yaml)."
                )
        kinds = ("DP_SHARD", "TP", "CP", "SP")
        sizes = {kind: env.get(f"PARALLELISM_CONFIG_{kind}_SIZE", "1").strip() for kind in kinds}
        sharded = [f"{kind}={size}" for kind, size in sizes.items() if size not in ("", "1")]
        if sharded and parse_flag_from_env("ACCELERATE_USE_PARALLELISM_CONFIG"):
            raise ConfigError(
                f"This launch asks for sharded, tensor, context or sequence parallelism ({', '.join(sharded)}), and "
                "refilled-hf trains with data parallelism (DDP) only: keep only --parallelism_config_dp_replicate_size "
                "(or none)."
            )
        launched = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
        if launched not in ("", "no") and not (self.bf16 or self.fp16):
            if launched not in ("bf16", "fp16"):
                raise ConfigError(
                    f"ACCELERATE_MIXED_PRECISION={launched} (accelerate launch --mixed_precision {launched}): "
                    "refilled-hf trains in fp32, bf16 or fp16. Launch with --mixed_precision bf16 (or no)."
                )
            if launched == "fp16" and not torch.cuda.is_available():
                raise ConfigError(
                    "accelerate launch --mixed_precision fp16 needs a CUDA GPU and none is visible: launch with "
                    "--mixed_precision bf16 (works on the CPU too) or no."
                )
            setattr(self, launched, True)
        backend = env.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
        asked = self.torch_compile or self.torch_compile_backend or self.torch_compile_mode
        if backend not in ("", "no") and not asked:
            mode = env.get("ACCELERATE_DYNAMO_MODE", "default").strip().lower()
            self.torch_compile, self.torch_compile_backend = True, backend
            self.torch_compile_mode = None if mode in ("", "default") else mode

    def _resolve_validation(self) -> None:
        """The validation split is carved from the training split (``validation_fraction``,
        default :data:`DEFAULT_VALIDATION_FRACTION`) or is a split of its own
        (``validation_split``), never both."""
        if self.validation_split is None:
            if self.validation_fraction is None:
                self.validation_fraction = DEFAULT_VALIDATION_FRACTION
            return
        if self.validation_fraction:
            raise ConfigError(
                f"--validation_split {self.validation_split!r} and --validation_fraction {self.validation_fraction:g} "
                "both ask for a validation split: to validate on that split, drop --validation_fraction (or pass "
                "--validation_fraction 0 over a recipe that sets it); to carve one from the training split, drop "
                "--validation_split."
            )
        self.validation_fraction = 0.0
        for name in ("train_split", "test_split"):
            if self.validation_split == getattr(self, name):
                raise ConfigError(
                    f"--validation_split {self.validation_split!r} is the {name.split('_')[0]} split: choices made on "
                    f"validation would see its images. Name another split."
                )

    @property
    def has_validation(self) -> bool:
        """Whether the run has a validation split (carved, or ``--validation_split``)."""
        return self.validation_split is not None or self.validation_fraction > 0

    def _check_replaced_fields(self) -> None:
        for name, use in REPLACED_FIELDS.items():
            if getattr(self, name) is not None:
                raise ConfigError(f"`{name}` is not used by refilled-hf: {use}.")

    def _check_before_transformers(self) -> None:
        """Checks whose failure transformers would report as a traceback, and the inherited
        fields that transformers added after this release (which cannot say what they do here)."""
        unknown = self._changed_inherited(undecided_fields())
        if unknown:
            raise ConfigError(
                f"`{unknown[0]}` is an option of transformers {transformers.__version__} that refilled-hf "
                f"{_own_version()} does not know, so it cannot say what it would do in a run: leave it at its "
                "default, or upgrade refilled-hf."
            )
        if self.load_best_model_at_end:
            if option_name(self.eval_strategy) == "no":
                raise ConfigError(
                    "--load_best_model_at_end needs evaluations: set --eval_strategy epoch (or steps) and keep "
                    "a validation split."
                )
            if not self.has_validation:
                raise ConfigError(
                    "--load_best_model_at_end selects on the validation split: set --validation_fraction > 0 (or "
                    "--validation_split)."
                )
            save = option_name(self.save_strategy)
            evals = option_name(self.eval_strategy)
            if save not in (evals, "best"):
                raise ConfigError(
                    f"--load_best_model_at_end needs --save_strategy equal to --eval_strategy ({evals}), got {save}."
                )
        if self.dataloader_prefetch_factor is not None and self.dataloader_num_workers == 0:
            raise ConfigError("--dataloader_prefetch_factor needs --dataloader_num_workers > 0.")
        if self.dataloader_persistent_workers and self.dataloader_num_workers == 0:
            raise ConfigError("--dataloader_persistent_workers needs --dataloader_num_workers > 0.")

    def validate(self) -> None:
        """Reject settings that cannot work, before any data or model is loaded."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"Unknown {name} {value!r}: choose one of {', '.join(allowed)}.")
        self._check_compile()
        if self.teacher_cache and self.data_path == "workers":
            raise ConfigError(
                "--teacher_cache needs the device data path (its exact cache indexes the crops and flips drawn "
                "there); --data_path workers was asked. Drop one of the two."
            )
        for name, (low, high, low_open, high_open) in NUMERIC_RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            _check_range(name, value, low, high, low_open, high_open)
        self._check_inherited()
        self.milestones()  # parses
        self._check_distill_weight_search()

    def _check_distill_weight_search(self) -> None:
        if self.distill_weight_search is None:
            return
        self.distill_weight_candidates()  # parses
        if self.distill_weight is not None:
            raise ConfigError(
                f"--distill_weight {self.distill_weight:g} and --distill_weight_search {self.distill_weight_search} "
                "contradict each other: pass one lambda, or the candidates to choose from."
            )
        if self.method != "refilled":
            raise ConfigError(
                f"--distill_weight_search chooses REFILLED's stage-2 lambda; --method {self.method} has no stage 2. "
                "Drop the search, or use --method refilled."
            )
        if not self.has_validation:
            raise ConfigError(
                "--distill_weight_search picks lambda on the validation split: set --validation_fraction > 0 or "
                "--validation_split (the test split never chooses)."
            )

    @property
    def precision(self) -> str:
        """What the run trains and evaluates in: ``bf16``, ``fp16`` (autocast) or ``fp32``."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend the run compiles its models with; None without
        ``--torch_compile``. transformers resolves an unset backend when the config is built
        (inductor, or the HPU or Neuron backend there); inductor where ``torch_compile`` was
        turned on afterwards."""
        return (self.torch_compile_backend or "inductor") if self.torch_compile else None

    def final_stage_schedule(self) -> dict[str, Any]:
        """How the run's last stage trains, apart from its length: stage 2 of REFILLED, a
        baseline's only stage (which follows stage 2's schedule, the paper's convention).
        Written to results.json; the model card compares a baseline's with this run's."""
        optim = option_name(self.optim)
        return {
            "learning_rate": self.stage2_learning_rate,
            "milestones": self.stage2_milestones,
            "gamma": self.stage2_gamma,
            "optim": optim,
            "sgd_momentum": self.sgd_momentum if optim == "sgd" else None,
            "weight_decay": self.weight_decay,
            "global_batch": self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps,
            "warmup_steps": self.warmup_steps,
            "max_grad_norm": self.max_grad_norm,
            "label_smoothing_factor": self.label_smoothing_factor,
            "horizontal_flip": self.horizontal_flip,
            "precision": self.precision,
            "load_best_model_at_end": bool(self.load_best_model_at_end),
        }

    def distill_weight_candidates(self) -> list[float] | None:
        """The lambdas stage 2 chooses among on validation, in order: ``--distill_weight_search``,
        else :data:`DEFAULT_DISTILL_WEIGHT_SEARCH` when ``--distill_weight`` is unset and a
        validation split exists for REFILLED; None when stage 2 runs once, at
        :meth:`resolved_distill_weight`."""
        if self.distill_weight_search is None:
            if self.distill_weight is None and self.method == "refilled" and self.has_validation:
                return list(DEFAULT_DISTILL_WEIGHT_SEARCH)
            return None
        text = str(self.distill_weight_search)
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) and v >= 0 for v in values) or len(set(values)) != len(values):
            raise ConfigError(
                f"`distill_weight_search` must be distinct comma-separated lambdas >= 0 like '1,10', got {text[:80]!r}."
            )
        return values

    def default_output_dir(self) -> str:
        """``--output_dir`` left unset: one folder per method (``outputs/refilled``, ``outputs/ce``,
        ...), so that a baseline does not meet the REFILLED run (train-teacher's command line
        gives ``outputs/teacher``)."""
        return f"outputs/{self.method}"

    def fields_unused_by(self, user: str) -> dict[str, Any]:
        """The fields of :data:`FIELD_USERS` set to other than their default that ``user``
        does not use: a method of ``distill`` or one of :data:`CONFIG_COMMANDS`."""
        if user not in (*METHODS, *CONFIG_COMMANDS):
            raise ValueError(f"unknown user {user!r}: a method ({', '.join(METHODS)}) or {', '.join(CONFIG_COMMANDS)}")
        defaults = {**field_defaults(), "output_dir": self.default_output_dir()}
        return {
            name: getattr(self, name)
            for name, users in FIELD_USERS.items()
            if user not in users and getattr(self, name) != defaults[name]
        }

    def student_alone_runs(self) -> bool:
        """Whether the run also trains the student alone as a candidate (``--student_alone_candidate``,
        effective with the lambda search only)."""
        return bool(self.student_alone_candidate) and self.distill_weight_candidates() is not None

    def student_alone_schedule(self) -> tuple[float, str]:
        """The student-alone candidate's epochs (stage 1 + stage 2) and learning-rate
        milestones (stage 2's, stretched by the same factor), as ``--stage2_epochs`` and
        ``--stage2_milestones`` of the equivalent ``--method ce`` run."""
        epochs = self.stage1_epochs + self.stage2_epochs
        stretch = epochs / self.stage2_epochs
        return epochs, ",".join(f"{m * stretch:g}" for m in self.milestones())

    def resolved_distill_weight(self) -> float:
        """The lambda of a single stage 2: ``--distill_weight``, or :data:`DEFAULT_DISTILL_WEIGHT`."""
        return DEFAULT_DISTILL_WEIGHT if self.distill_weight is None else self.distill_weight

    def _check_compile(self) -> None:
        """--torch_compile_backend must be one torch knows; a mode only exists for inductor."""
        backend, mode = self.torch_compile_backend, self.torch_compile_mode
        if backend is not None:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if backend not in known:
                raise ConfigError(f"Unknown --torch_compile_backend {backend!r}: choose one of {', '.join(known)}.")
        if mode is not None:
            if mode not in COMPILE_MODES:
                raise ConfigError(f"Unknown --torch_compile_mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}.")
            if backend not in (None, "inductor"):
                raise ConfigError(
                    f"--torch_compile_mode {mode} only applies to the inductor backend, not {backend!r} (which would "
                    "ignore it): drop one of the two."
                )

    def _changed_inherited(self, names: Iterable[str]) -> list[str]:
        """Those of the inherited fields ``names`` set to anything but transformers' default."""
        defaults = _transformers_defaults()
        return [name for name in names if _plain(getattr(self, name)) != _plain(defaults[name])]

    def _check_inherited(self) -> None:
        """Every inherited TrainingArguments field is honoured, replaced or refused: see
        :data:`INHERITED_FIELDS`; a refused field set to anything but its default is an error."""
        refused = self._changed_inherited(UNSUPPORTED_FIELDS)
        if refused:
            name = refused[0]
            raise ConfigError(f"`{name}` is not supported by refilled-hf ({UNSUPPORTED_FIELDS[name]}); remove it.")
        adam_only = self._changed_inherited(("adam_beta1", "adam_beta2", "adam_epsilon", "optim_args"))
        if adam_only and option_name(self.optim) == "sgd":
            raise ConfigError(f"`{adam_only[0]}` only applies to --optim adam*/other optimizers, not the default sgd.")
        available = _reporting_integrations()
        report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        for name in report_to:
            if name in ("none", "all"):
                continue
            if name not in available:
                raise ConfigError(
                    f"--report_to {name}: that integration is not installed here (installed: {available or 'none'}); "
                    f"install it (e.g. pip install {name}) or pass --report_to none."
                )
        if option_name(self.save_strategy) == "best" and not self.has_validation:
            raise ConfigError(
                "--save_strategy best selects on the validation split: set --validation_fraction > 0 (or "
                "--validation_split)."
            )
        sampling = str(self.train_sampling_strategy)
        if sampling not in ("random", "sequential"):
            raise ConfigError(f"--train_sampling_strategy {sampling}: refilled-hf supports random or sequential.")

    def resume_mode(self) -> str | None:
        """``--resume_from_checkpoint`` read: None (start), "latest", or a checkpoint's path."""
        value = self.resume_from_checkpoint
        if value is None or str(value).strip().lower() in ("", "false", "no", "none", "0"):
            return None
        if str(value).strip().lower() in ("true", "yes", "1", "latest"):
            return "latest"
        return str(value)

    def stage_view(self, **changes: Any) -> RefilledConfig:
        """A copy for one stage's Trainer with ``changes`` applied (its output folder,
        epochs, learning rate). Not re-validated: ``num_train_epochs`` and
        ``learning_rate`` are set here, from the stage fields, and only here."""
        view = copy.copy(self)
        for name, value in changes.items():
            setattr(view, name, value)
        return view

    def with_changes(self, **changes: Any) -> RefilledConfig:
        """``dataclasses.replace`` (a validated copy with ``changes``) that keeps what the user
        gave for :data:`MACHINE_DECIDED_FIELDS`, which the copy would take as given."""
        copied = dataclasses.replace(self, **changes)
        copied._given = {name: value for name, value in self._given.items() if name not in changes} | {
            name: value for name, value in copied._given.items() if name in changes
        }
        return copied

    def to_recipe(self, used_only: bool = False, as_run: bool = False) -> dict[str, Any]:
        """The run as a recipe that `--config` reads back: refilled-hf's own fields, then
        the `TrainingArguments` fields whose value differs from a default configuration
        (compared after ``__post_init__``, so derived values are not listed). Tokens are
        never included. ``used_only``: a field the run's method does not use (a
        train-teacher run's ``teacher``, which it trains as the ``student``) is given at
        its default, so that ``refilled-hf distill --config`` reruns it without a warning.
        :data:`MACHINE_DECIDED_FIELDS` are given as the user gave them, so that the recipe
        runs as it says on another machine, or, ``as_run``, as this run set them (its identity)."""
        parent = {f.name for f in fields(TrainingArguments)}
        default = _default_configuration()
        unused = self.fields_unused_by(self.method) if used_only else {}
        given = {} if as_run else getattr(self, "_given", {})
        ours, theirs = {}, {}
        for f in fields(self):
            if "token" in f.name or not f.init:
                continue
            value = getattr(default if f.name in unused else self, f.name)
            if f.name in given:
                value, default_value = given[f.name], default._given[f.name]
            else:
                default_value = getattr(default, f.name)
            if f.name not in parent:
                ours[f.name] = value
            elif f.name in RefilledConfig._TASK_DEFAULTS or value != default_value:
                theirs[f.name] = _recipe_value(value)
        return json.loads(json.dumps({**ours, **theirs}, default=str))

    @staticmethod
    def recipe_defaults() -> dict[str, Any]:
        """The `TrainingArguments` fields that :meth:`to_recipe` lists only where they differ
        from a default configuration, each with that default as a recipe writes it: what a
        run whose record lacks one of them ran with."""
        parent = {f.name for f in fields(TrainingArguments)}
        default = _default_configuration()
        values = {
            f.name: _recipe_value(getattr(default, f.name))
            for f in fields(default)
            if f.name in parent and f.init and "token" not in f.name and f.name not in RefilledConfig._TASK_DEFAULTS
        }
        return json.loads(json.dumps(values, default=str))

    def milestones(self) -> list[float]:
        """Stage-2 learning-rate milestones in epochs."""
        return parse_milestones(self.stage2_milestones)
