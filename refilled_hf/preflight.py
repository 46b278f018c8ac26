"""Checks that run before any training: everything in a configuration, its data and its
models that can fail on user input fails here, with a message that names the fix
(the teacher that cannot be loaded, label spaces kd cannot bridge, teacher classes the
teacher was not trained on, batches that cannot mine, inputs that do not fit, a teacher
cache that cannot apply, a model that cannot run at this input size, a machine on which
--torch_compile cannot build kernels)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import timm
import torch

from .backbone import FrozenTeacher, ModelLoadError, exported_config, load_timm_model
from .config import ConfigError, RefilledConfig
from .data import ClassificationData, DataError, class_ranges, parse_class_selection, short_list
from .data_device import DeviceImages, IndexedImages
from .messages import error_chain, error_text, offline_hint
from .provenance import same_dataset, weights_training_record
from .teacher_cache import cache_bytes

__all__ = [
    "batch_without_pair_probability",
    "cache_needs_logits",
    "check_compile",
    "check_forward",
    "check_label_spaces",
    "check_memory",
    "check_mining",
    "check_student_start",
    "check_teacher_cache",
    "load_teacher",
    "stated_teacher_classes",
    "steps_per_epoch",
    "teacher_label_names",
    "uses_teacher_cache",
    "warn_few_steps",
]

logger = logging.getLogger(__name__)


def steps_per_epoch(config: RefilledConfig, images: int) -> int:
    """Optimizer steps per epoch of each process (as the Trainer's sharded loader has it)."""
    batch = config.per_device_train_batch_size
    batches = images // batch if config.dataloader_drop_last else math.ceil(images / batch)
    return max(1, math.ceil(math.ceil(batches / config.world_size) / config.gradient_accumulation_steps))


def check_student_start(config: RefilledConfig, command: str = "distill") -> None:
    """Refuse a student (train-teacher: the model it trains) named with a pretrained tag
    (``resnet18.a1_in1k``) and no checkpoint: a model given by name starts from random
    initialization (``--help``), so the tag would select timm's configuration of those
    weights but not the weights, which the user surely meant."""
    spec, checkpoint = config.student, config.student_checkpoint
    if not spec or checkpoint is not None or not timm.is_model(spec):
        return
    architecture, tag = timm.models.split_model_name_tag(spec)
    if not tag:
        return
    flag, checkpoint_flag = ("--teacher", "--teacher_checkpoint") if command == "train-teacher" else (
        "--student", "--student_checkpoint")  # fmt: skip
    cfg = timm.models.get_pretrained_cfg(spec)
    if cfg is not None and cfg.hf_hub_id:
        weights = f"{flag} hf-hub:{cfg.hf_hub_id}, or from a file with {checkpoint_flag}"
    else:
        weights = f"their file in {checkpoint_flag}"
    raise ConfigError(
        f"{flag} {spec} names timm's pretrained weights {tag!r}, which a model given by its name does not load: it "
        f"would train from random initialization. Start from those weights with {weights}, or from random "
        f"initialization with {flag} {architecture}."
    )


def load_teacher(config: RefilledConfig, student_cfg: dict[str, Any]) -> FrozenTeacher:
    """The frozen teacher, its inputs adapted from the student's (``student_cfg``).

    Commands load it before the data, so that a teacher that cannot load fails before the
    images are decoded. Building it never draws from the global RNG (timm initializes a
    model's weights before loading them): a seeded run's student and data draws are the
    same whichever teacher it has and wherever it is loaded."""
    try:
        with torch.random.fork_rng(devices=[]):
            model = load_timm_model(
                config.teacher,
                checkpoint=config.teacher_checkpoint,
                pretrained=config.teacher_checkpoint is None,
                image_size=config.teacher_input_size,
            )
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. timm's pretrained download offline
        raise ModelLoadError(
            f"Could not load the teacher {config.teacher!r} ({error_text(err, limit=300)}). Give weights "
            f"with --teacher_checkpoint, or use a 'local-dir:' folder.{offline_hint(err)}"
        ) from err
    teacher = FrozenTeacher(model, student_cfg, input_size=config.teacher_input_size)
    logger.info("Teacher input: %s.", teacher.adaptation_text())
    return teacher


def teacher_label_names(config: RefilledConfig, teacher: FrozenTeacher) -> list[str] | None:
    """The teacher's classes, in its output order: its label names, or for a checkpoint a
    refilled-hf run wrote, the classes that run recorded (None where nothing says)."""
    names = getattr(teacher.model, "pretrained_cfg", {}).get("label_names")
    if names is None and config.teacher and config.teacher.startswith("local-dir:"):
        names = (exported_config(config.teacher) or {}).get("label_names")
    if names is None and config.teacher_checkpoint:
        names = (weights_training_record(config.teacher, config.teacher_checkpoint) or {}).get("class_names")
    return list(names) if names else None


def check_label_spaces(config: RefilledConfig, teacher: FrozenTeacher, data: ClassificationData) -> list[int] | None:
    """KD needs the teacher's classifier to predict each of the student's classes. Returns
    the teacher's output (column) of each student class, in the student's order, where they
    are not simply the same outputs: a teacher of more classes (the student's among them) or
    of the same classes in another order; None where they are. The classes are matched by the
    teacher's label names, else by ``--teacher_classes`` (its classes in this data set)."""
    if config.method != "kd":
        return None
    teacher_classes = teacher.model.num_classes
    if not teacher_classes:
        raise ConfigError(
            f"method='kd' needs the teacher's logits, but the teacher {config.teacher!r} has no classifier "
            "(num_classes=0: an embedding model). Use --method refilled (or rkd): they only use the teacher's "
            "embedding."
        )
    names = teacher_label_names(config, teacher)
    selected = None
    if config.teacher_classes is not None:
        selected = [data.dataset_class_names[i]
                    for i in parse_class_selection(config.teacher_classes, data.dataset_class_names)]  # fmt: skip
    known = names if names is not None else selected
    if known is None:
        if teacher_classes != data.num_classes:
            raise ConfigError(
                f"method='kd': the teacher predicts {teacher_classes} classes and the student {data.num_classes}, and "
                "nothing says which of the teacher's outputs are the student's classes (it records no class names). "
                "Pass --teacher_classes <its classes in this data set>, or use --method refilled (or rkd): they only "
                "use the teacher's embedding."
            )
        logger.warning(
            "kd: the teacher records no class names, so only its number of classes (%d) could be checked against the "
            "student's: KD is right only if its outputs are the student's classes, in the same order. Pass "
            "--teacher_classes <its classes> to check that.", teacher_classes,
        )  # fmt: skip
        return None
    if len(known) != teacher_classes:
        raise ConfigError(
            f"method='kd': the teacher names {len(known)} classes but predicts {teacher_classes}: its record does not "
            "describe its classifier. Use --method refilled (or rkd): they only use the teacher's embedding."
        )
    missing = [name for name in data.class_names if name not in known]
    if missing:
        raise ConfigError(
            f"method='kd' needs the teacher to predict each of the student's classes, but the teacher's "
            f"{teacher_classes} classes ({short_list(list(known), 5)}) lack {len(missing)} of the student's "
            f"{data.num_classes}: {short_list(missing, 5)}. KD needs a label space that covers the student's; use "
            "--method refilled (or rkd): they only use the teacher's embedding."
        )
    if names is not None and selected is not None and selected != list(names):
        raise ConfigError(
            f"--teacher_classes {config.teacher_classes!r} names {short_list(selected)}, but the teacher predicts "
            f"{short_list(list(names))}: leave --teacher_classes unset (`--teacher_classes none`), or name its "
            "classes in its order."
        )
    columns = [list(known).index(name) for name in data.class_names]
    if columns == list(range(teacher_classes)):
        return None
    logger.info(
        "kd: the student's %d classes are the teacher's outputs %s (of its %d), whose softmax over those the student "
        "matches.", data.num_classes, class_ranges(columns) if columns == sorted(columns) else columns, teacher_classes,
    )  # fmt: skip
    return columns


def stated_teacher_classes(config: RefilledConfig, data: ClassificationData) -> str | None:
    """The teacher's classes as the results and the model card state them: its own
    training-data record where it has one (``--teacher_classes`` must agree with it),
    else ``--teacher_classes``, checked to be classes of this data set. None without one."""
    if config.method == "ce" or not config.teacher:
        return None
    given = None
    if config.teacher_classes is not None:
        try:
            given = parse_class_selection(config.teacher_classes, data.dataset_class_names)
        except DataError as err:
            raise ConfigError(
                f"--teacher_classes {config.teacher_classes!r}: {err} It names the teacher's classes in this data set "
                "(recorded in the model card); leave it unset (`--teacher_classes none` over a recipe) if the teacher "
                "was trained on other data."
            ) from None
    record = weights_training_record(config.teacher, config.teacher_checkpoint)
    if record is None or not record.get("source_class_ids") or not record.get("class_names"):
        return None if given is None else class_ranges(given)
    taught = class_ranges([int(i) for i in record["source_class_ids"]])
    if given is not None and [data.dataset_class_names[i] for i in given] != list(record["class_names"]):
        raise ConfigError(
            f"--teacher_classes {config.teacher_classes!r} is not what the teacher was trained on: its config.json "
            f"records the classes {short_list(record['class_names'])} ({taught} of {record.get('dataset')!r}). Drop "
            "--teacher_classes (the model card then states the teacher's record) or correct it."
        )
    return taught if same_dataset(record.get("dataset"), config.dataset) else f"{taught} of {record.get('dataset')}"


#: the share of stage 1's batches without two images of one class (nothing to mine) that draws a warning
BARREN_BATCHES = 0.1


def batch_without_pair_probability(class_counts: Sequence[int], batch: int) -> float:
    """The probability that ``batch`` images drawn at random without replacement from
    images of these class counts are all of different classes (a batch where semi-hard
    mining finds no anchor-positive pair): the number of such draws, the elementary
    symmetric polynomial e_batch of the counts, over all draws, C(total, batch). Exact
    integers (Python's): the counts' products overflow floats for batches of 128."""
    total = sum(class_counts)
    batch = min(batch, total)
    if batch > sum(1 for n in class_counts if n):
        return 0.0
    distinct = [1] + [0] * batch  # distinct[j]: ways to draw j images of j different classes so far
    for n in class_counts:
        for j in range(batch, 0, -1):
            distinct[j] += n * distinct[j - 1]
    return float(Fraction(distinct[batch], math.comb(total, batch)))


def check_mining(config: RefilledConfig, data: ClassificationData) -> None:
    """Refuse REFILLED runs whose batches can never mine a semi-hard tuple (one class, a
    batch under 3, no class with two images); warn where many of stage 1's batches would
    hold nothing to mine (:data:`BARREN_BATCHES`), and where gradient accumulation leaves
    mining to micro-batches."""
    if config.method != "refilled":
        return
    if data.num_classes < 2:
        raise ConfigError("REFILLED needs at least 2 student classes: a semi-hard negative has another class.")
    if config.per_device_train_batch_size < 3:
        raise ConfigError(
            f"per_device_train_batch_size={config.per_device_train_batch_size} can never hold a semi-hard "
            "triplet (anchor, positive of its class, negative of another): use at least 3, ideally >= 64."
        )
    counts = torch.bincount(torch.as_tensor(data.train.labels), minlength=data.num_classes)
    if int(counts.max()) < 2:
        if config.shots_per_class is not None and config.shots_per_class < 2:
            fix = "raise --shots_per_class to at least 2"
        elif config.validation_split is None and config.validation_fraction > 0:
            fix = (f"the validation carve (--validation_fraction {config.validation_fraction:g}) leaves too few: lower "
                   "it, or name a validation split of the data set with --validation_split")  # fmt: skip
        else:
            fix = "the selected classes of the training split have too few images for REFILLED"
        raise ConfigError(
            f"Every class has fewer than 2 training images, so no batch can hold an (anchor, positive) pair: {fix}."
        )
    per_device = config.per_device_train_batch_size
    mined = per_device * (1 if config.mining_scope == "local" else config.world_size)
    barren = batch_without_pair_probability(counts.tolist(), mined)
    if barren >= BARREN_BATCHES and config.process_index == 0:
        logger.warning(
            "Stage 1 mines its semi-hard tuples within batches of %d images over %d classes: about %.0f%% of them "
            "hold no two images of one class, and those train nothing. Raise --per_device_train_batch_size (the "
            "paper's 128; 64 or more)%s.", mined, data.num_classes, 100 * barren,
            "" if config.mining_scope == "local" else ", or add processes (stage 1 mines over all of them)",
        )  # fmt: skip
    if config.gradient_accumulation_steps > 1 and config.process_index == 0:
        logger.warning(
            "--gradient_accumulation_steps %d: REFILLED mines stage 1's semi-hard tuples within each micro-batch "
            "(%d images) and takes stage 2's local classes from each per-device micro-batch (%d images), not from "
            "the %d images of an optimizer step: accumulation changes the method's batch, not only the gradient's. "
            "Raise --per_device_train_batch_size, or add processes (stage 1 then mines over all of them), to mine "
            "over more images.",
            config.gradient_accumulation_steps, mined, per_device,
            per_device * config.world_size * config.gradient_accumulation_steps,
        )  # fmt: skip


#: a global batch above this one, leaving fewer optimizer steps per epoch than FEW_STEPS_PER_EPOCH, draws a
#: warning (see warn_few_steps); 128 is the batch the measurements support
FEW_STEPS_PER_EPOCH = 10
LARGE_GLOBAL_BATCH = 128


def warn_few_steps(config: RefilledConfig, images: int) -> None:
    """Warn when a large global batch leaves few optimizer steps per epoch: measured on CIFAR-100
    (benchmarks/README.md, "Large batches"), 2,500 training images at batch 512 (5 steps per
    epoch, linear learning-rate scaling) lost about 5 points of test top-1 against batch 128, at
    10 + 10 and at 40 + 40 epochs. A warning, not an error: the numbers come from one setting.
    Batches up to 128 are not warned about, however small the data (the quickstart trains 50
    images at 64): nothing measured says a smaller one does better there."""
    batch = config.per_device_train_batch_size * config.world_size * config.gradient_accumulation_steps
    steps = steps_per_epoch(config, images)
    if batch > LARGE_GLOBAL_BATCH and steps < FEW_STEPS_PER_EPOCH:
        logger.warning(
            "%d training images at a global batch of %d give %d optimizer step(s) per epoch. On CIFAR-100 with "
            "2,500 images, batch 512 (5 steps per epoch) lost about 5 points of test top-1 against batch 128 "
            "(benchmarks/README.md, 'Large batches'): a global batch of at most 128 (--per_device_train_batch_size "
            "x processes x --gradient_accumulation_steps) is likely better for a training set this small.",
            images,
            batch,
            steps,
        )


def check_memory(config: RefilledConfig, sizes: list[int]) -> None:
    """Refuse a batch whose input tensors alone would take half the device's memory
    (activations take many times more): a clear error instead of the kernel's OOM kill."""
    if config.device.type == "cuda":  # (not --use_cpu, nor a launcher's --cpu, which only the device shows)
        total, where = torch.cuda.get_device_properties(config.device).total_memory, "GPU"
    else:
        total, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine"
    batch = max(config.per_device_train_batch_size, config.per_device_eval_batch_size)
    needed = batch * 3 * max(sizes) ** 2 * 4 * 2  # float32 inputs, student and teacher views
    if needed > total / 2:
        raise ConfigError(
            f"A batch of {batch} images at {max(sizes)} px needs {needed / 2**30:.1f} GiB for its inputs alone, more "
            f"than this {where}'s {total / 2**30:.0f} GiB allow: lower --per_device_train_batch_size, "
            "--per_device_eval_batch_size or --image_size / --teacher_input_size."
        )


def uses_teacher_cache(config: RefilledConfig, teacher: FrozenTeacher | None) -> bool:
    return bool(config.teacher_cache) and teacher is not None


def cache_needs_logits(config: RefilledConfig) -> bool:
    return config.method == "kd" or (config.method == "refilled" and config.confidence_weights)


def check_teacher_cache(config: RefilledConfig, teacher: FrozenTeacher | None, data: ClassificationData) -> None:
    """Refuse a teacher cache that cannot be used, before any long work."""
    if not uses_teacher_cache(config, teacher):
        if config.teacher_cache:
            logger.info("--teacher_cache is not used by --method ce (no teacher).")
        return
    if not isinstance(data.train, IndexedImages):
        raise ConfigError(
            "--teacher_cache needs the device data path, and this run uses the worker path (the log line 'Data "
            "path:' says why). Turn the cache off (--teacher_cache none) or make the device path apply (inputs of "
            "64 px or less, a larger --device_data_budget_gb)."
        )
    if not isinstance(data.train.images, DeviceImages):
        raise ConfigError(
            "--teacher_cache covers the CIFAR-style crops and flips of inputs of 64 px or less (162 per 32-px "
            "image); this run trains at a larger size with timm's random-resized crop and colour jitter, whose "
            "augmentations are too many to cache exactly. Turn the cache off (--teacher_cache none) or train at "
            "64 px or less (--image_size)."
        )
    with torch.no_grad():
        emb, logits = teacher(data.train.pixels(torch.arange(1)).cpu())
    logit_dim = logits.shape[1] if cache_needs_logits(config) else 0
    need = cache_bytes(data.train.images, emb.shape[1], logit_dim, config.teacher_cache_dtype)
    if need > config.teacher_cache_budget_gb * 2**30:
        raise ConfigError(
            f"The teacher cache would take {need / 2**30:.2f} GiB, over --teacher_cache_budget_gb "
            f"{config.teacher_cache_budget_gb:g}: raise the budget, use --teacher_cache_dtype float16, or turn the "
            "cache off (--teacher_cache none)."
        )


def _input_channels(model: torch.nn.Module) -> int | None:
    """The input channels a timm model (or the student / teacher wrapping one) declares."""
    inner = getattr(model, "model", model)
    size = (getattr(inner, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[0]) if size else None


def _double_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def check_compile(config: RefilledConfig) -> None:
    """Under ``--torch_compile``, a trivial function compiled by the run's backend and run on
    its device, before any image is decoded: a machine that lacks what the backend builds
    kernels with (inductor: a C++ compiler on a CPU; Triton on a GPU, and a C compiler for
    its launchers) fails here, in one line that names the fix, not at the first training
    step as an internal error. Inductor keeps the kernel in its on-disk cache: later runs
    pay little for this."""
    backend = config.compile_backend
    if backend is None:
        return
    try:
        torch.compile(_double_plus_one, backend=backend, fullgraph=True)(torch.ones(4, device=config.device))
    except Exception as err:  # noqa: BLE001 - whatever the toolchain lacks
        raise ConfigError(
            f"--torch_compile: torch.compile ({backend}) cannot build kernels on this machine "
            f"({error_text(error_chain(err)[-1])}). "
            "Install what it names (inductor needs a C++ compiler on a CPU, Triton and a C compiler on a GPU; CXX "
            "and CC choose them), or run without --torch_compile."
        ) from None


def check_forward(student: torch.nn.Module | None, teacher: FrozenTeacher | None, input_size: Sequence[int], *,
                  student_name: str = "student") -> None:  # fmt: skip
    """A batch of two blank RGB images of the run's ``input_size`` (``(3, H, W)``: both
    data paths make batches of that shape) through student and teacher (either may be None),
    before any image is decoded: a model that cannot run at this input size fails here, in
    one line. ``student_name``: what the error calls the student (``model`` for evaluate)."""
    batch = torch.zeros(2, 3, *input_size[-2:])  # RGB, whatever the model's config says: the data paths make RGB
    for name, model in ((student_name, student), ("teacher", teacher)):
        if model is None:
            continue
        channels = _input_channels(model)
        if channels is not None and channels != 3:
            raise ConfigError(
                f"The {name} takes {channels}-channel inputs, and refilled-hf gives every model RGB images "
                "(3 channels, grayscale images converted): use a model with 3 input channels (timm's in_chans=3)."
            )
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()
                model(batch)
        except Exception as err:  # noqa: BLE001 - shape and size errors of any model
            shape = tuple(batch.shape[1:])
            if model is teacher and teacher.input_size:  # the teacher sees the batch resized
                shape = (shape[0], teacher.input_size, teacher.input_size)
            raise ConfigError(
                f"The {name} cannot run on {shape} inputs ({error_text(err)}): choose another --image_size"
                f"{' or --teacher_input_size' if name == 'teacher' else ''}, or another model."
            ) from None
        finally:
            model.train(was_training)
