"""A whole run: data and models from a config, REFILLED's two stages (or a baseline, or
teacher training), resume, the final test evaluation and the export. The CLI and the
Python API both call :func:`run_distillation` / :func:`run_teacher_training`.

Output layout of ``output_dir``::

    stage1/            (refilled) checkpoints, trainer logs, final/ (the stage-1 student)
    stage2/ or <method>/   checkpoints and logs of the head-training stage
    stage2-lambda<v>/  (refilled choosing lambda on validation) one stage 2 per candidate, each
                       with final/ (its student and validation metrics)
    student-alone/     (the same, with --student_alone_candidate) the student trained alone with
                       cross-entropy for both stages' epochs, with final/
    model/             the exported model: config.json, model.safetensors, README.md
    results.json       every metric of the run; written last, it marks the run finished
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm.data
import torch
from transformers import set_seed

from .backbone import (
    FrozenTeacher,
    ModelLoadError,
    StudentModel,
    load_timm_model,
    setup_fingerprint,
    weights_origin,
)
from .candidates import STUDENT_ALONE_DIR, search_distill_weight
from .config import FIELD_USERS, METHODS, ConfigError, RefilledConfig, lone_process_launch_warning, options_text
from .data import (
    CIFAR_STYLE_MAX_SIZE,
    SPLITS,
    ClassificationData,
    DataError,
    build_transform,
    decode_splits,
    load_classification_data,
    short_list,
)
from .data_device import IndexedImages, choose_and_place
from .hub import (
    EXPORT_FILES,
    HubPushError,
    check_hub_access,
    export_model,
    files_not_exported,
    push_folder,
    remove_unfinished_exports,
    write_json_atomically,
)
from .model_card import LEGACY_DATA_KEY, card_template, check_comparable, render_model_card
from .preflight import (
    cache_needs_logits,
    check_compile,
    check_forward,
    check_label_spaces,
    check_memory,
    check_mining,
    check_student_start,
    check_teacher_cache,
    load_teacher,
    stated_teacher_classes,
    uses_teacher_cache,
    warn_few_steps,
)
from .rundir import (
    NON_IDENTITY_FIELDS,
    RunDirectory,
    RunDirError,
    checkpoint_problem,
    disk_full_error,
    last_complete_checkpoint,
    tensor_fingerprint,
)
from .stages import (
    FINAL_DIR,
    DivergedError,
    RunError,
    RunInterrupted,
    barrier,
    fit,
    is_finished,
    load_final,
    make_trainer,
    save_final,
    split_metrics,
    stage2_trainer,
    state_copy,
)
from .teacher_cache import TeacherCache, TeacherCacheError, load_or_build
from .trackers import end_stage_runs
from .trainer import RefilledTrainer

__all__ = [
    "DivergedError",
    "RunError",
    "RunInterrupted",
    "load_data",
    "run_distillation",
    "run_teacher_training",
    "training_seconds",
]

logger = logging.getLogger(__name__)


RESULTS_FILE = "results.json"
EXPORT_DIR = "model"


#: errors refilled-hf raises with a message of its own
OWN_ERRORS = (RunError, ConfigError, DataError, ModelLoadError, RunDirError, HubPushError, TeacherCacheError)


# --------------------------------------------------------------------------- setup


def load_data(
    config: RefilledConfig, classes: str | Sequence[str] | None, pretrained_cfg: dict[str, Any],
    splits: Sequence[str] = SPLITS, augment_train: bool = True,
) -> ClassificationData:  # fmt: skip
    """The task's splits (those in ``splits``; the others None), with the model's
    transforms (and ``image_size`` override). ``augment_train=False`` for a command that
    reads the training split unaugmented only (on the device path it is placed so)."""
    return prepare_data(config, select_data(config, classes, splits), pretrained_cfg, augment_train)


def select_data(config: RefilledConfig, classes: str | Sequence[str] | None,
                splits: Sequence[str] = SPLITS) -> ClassificationData:  # fmt: skip
    """The task's splits selected (classes, shots, validation carve), no image decoded yet:
    their labels and class names, for the checks that need nothing else. :func:`prepare_data`
    makes them trainable. Without ``test`` in ``splits`` the test split is not read at all
    (``evaluate --split validation`` and ``probe-teacher`` serve a data set that has none)."""
    return load_classification_data(
        config.dataset,
        dataset_config=config.dataset_config,
        classes=classes,
        train_split=config.train_split,
        test_split=config.test_split if "test" in splits else None,
        image_column=config.image_column,
        label_column=config.label_column,
        shots_per_class=config.shots_per_class,
        validation_fraction=config.validation_fraction,
        validation_split=config.validation_split,
        seed=config.data_seed if config.data_seed is not None else config.seed,
        splits=splits,
        decode=False,
    )


def prepare_data(config: RefilledConfig, data: ClassificationData, pretrained_cfg: dict[str, Any],
                 augment_train: bool = True) -> ClassificationData:  # fmt: skip
    """``data`` (from :func:`select_data`) decode-checked, with the model's transforms, on
    the data path chosen (logged): see :func:`load_data`."""
    decode_splits(data, log=config.process_index == 0)
    cfg = data_pretrained_cfg(pretrained_cfg, config.image_size)
    training = augment_train and data.train is not None
    logger.info("Input: %s.", input_size_text(cfg, config.image_size, data, training))
    train_tf = build_transform(cfg, train=True)
    if not config.horizontal_flip:
        train_tf.transforms = [t for t in train_tf.transforms if type(t).__name__ != "RandomHorizontalFlip"]
    eval_tf = build_transform(cfg, train=False)
    data = data.with_transforms(train_tf, eval_tf)
    try:
        budget = config.device_data_budget_gb * 2**30
        path, reason = choose_and_place(
            data, cfg, mode=config.data_path, flip=config.horizontal_flip, device=config.device, budget_bytes=budget,
            train_transform=train_tf, eval_transform=eval_tf, augment_train=augment_train,
        )  # fmt: skip
    except ValueError as err:
        raise ConfigError(str(err)) from None
    data.info["data_path"] = path
    loading = ""
    if path == "workers":
        workers = config.dataloader_num_workers
        who = {0: "the training process reads and transforms", 1: "1 DataLoader worker reads and transforms"}.get(
            workers, f"{workers} DataLoader workers read and transform"
        )
        loading = f"; {who} the batches (--dataloader_num_workers {workers})"
    elif getattr(config, "_given", {}).get("dataloader_num_workers"):  # the user's count, of no use here
        loading = (f"; the training process loads the batches: --dataloader_num_workers "
                   f"{config.dataloader_num_workers} is for the worker path (--data_path workers)")  # fmt: skip
    logger.info("Data path: %s (%s)%s.", path, reason, loading)
    return data


def data_pretrained_cfg(pretrained_cfg: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """The model's ``pretrained_cfg`` with the input size the run trains at."""
    cfg = dict(pretrained_cfg)
    if image_size:
        cfg["input_size"] = (cfg.get("input_size", (3, 0, 0))[0], image_size, image_size)
    return cfg


def input_size_text(cfg: dict[str, Any], image_size: int | None, data: ClassificationData, training: bool) -> str:
    """The input size a run feeds its model (``cfg``: its pretrained_cfg at the run's
    size), where it comes from, and the size of the images it is made from; for
    ``training`` a model whose input size can change at the size its pretrained_cfg gives
    (no --image_size), how to train at the images' own size where the input upscales them
    2x or more (a student trained from scratch on 32-px images at a timm model's 224 px
    costs about 49 times the compute: the user should see it)."""
    size = cfg["input_size"][-1]
    advise = training and not image_size and not cfg.get("fixed_input_size")  # (a size the user set is theirs)
    source = "--image_size" if image_size else "the model's pretrained_cfg"
    if advise:
        source += "; --image_size sets another"
    text = f"{size} x {size} px ({source})"
    split = next((s for s in (data.train, data.validation, data.test) if s is not None), None)
    sides = getattr(split, "side_range", None)
    if not sides:
        return text
    low, high = sides
    text += f"; the {split.split_name} images measure {low if low == high else f'{low} to {high}'} px a side"
    if advise and size >= 2 * high:
        text += f", so each is upscaled at least {size / high:.1f}x (--image_size {high} trains at their size)"
    return text


def eval_copy(dataset, transform):
    """The same images with another transform (decoded images are shared)."""
    if isinstance(dataset, IndexedImages):
        return IndexedImages(dataset.images, dataset.labels, augment=False)
    dataset.preload()
    other = copy.copy(dataset)
    other.transform = transform
    return other


def _resume_points(mode: str | None, out: Path, stage_dirs: list[Path], world_size: int) -> dict[Path, str | None]:
    """The checkpoint each stage resumes from, every one checked to resume exactly."""
    points: dict[Path, str | None] = {d: None for d in stage_dirs}
    if mode is None:
        return points
    if mode == "latest":
        for stage_dir in stage_dirs:
            if (stage_dir / FINAL_DIR).exists():
                continue  # a finished stage is not resumed
            found = last_complete_checkpoint(stage_dir)
            points[stage_dir] = str(found) if found else None
    else:
        path = Path(mode)
        owner = next((d for d in stage_dirs if path.resolve().parent == d.resolve()), None)
        if owner is None or not path.is_dir() or not path.name.startswith("checkpoint-"):
            raise RunError(
                f"--resume_from_checkpoint {mode}: not a checkpoint of the run in {out} (one of "
                f"{', '.join(str(d / 'checkpoint-<step>') for d in stage_dirs)}). To start from other weights, "
                "use --student_checkpoint."
            )
        if (owner / FINAL_DIR).exists():
            raise RunError(
                f"--resume_from_checkpoint {mode}: {owner.name} of this run has finished; resuming inside it would "
                "discard the work after it. Pass --resume_from_checkpoint true to continue, or start over in another "
                "--output_dir."
            )
        earlier = stage_dirs[: stage_dirs.index(owner)]
        unfinished = [d.name for d in earlier if d.exists() and not (d / FINAL_DIR).exists()]
        if unfinished:  # stages and lambda candidates run in order: the earlier ones must be finished
            raise RunError(
                f"--resume_from_checkpoint {mode}: {', '.join(unfinished)} before it has not finished. Pass "
                "--resume_from_checkpoint true to continue where the run stopped."
            )
        points[owner] = str(path)
    for point in points.values():
        problem = checkpoint_problem(Path(point), world_size) if point else None
        if problem:
            raise RunError(
                f"Cannot resume exactly from {point}: {problem}. Pass an earlier checkpoint with "
                "--resume_from_checkpoint <path>, or start over with --overwrite_output true."
            )
    return points


def _prepare_output_dir(config: RefilledConfig, rundir: RunDirectory) -> dict[str, Any] | None:
    """Refuse what would mix runs or lose files; returns the earlier run's manifest."""
    out, resume = rundir.out, config.resume_mode()
    rundir.check_usable()
    if resume and config.overwrite_output:
        raise RunError("--resume_from_checkpoint and --overwrite_output contradict each other: pass one of them.")
    manifest = rundir.check_ownership()
    if config.overwrite_output:
        return manifest
    if (out / RESULTS_FILE).is_file():
        if resume == "latest":
            return manifest  # _finished_run returns its results if it is this run
        raise RunError(
            f"{out} holds a finished run ({RESULTS_FILE} exists). Choose another --output_dir, pass "
            "--overwrite_output true to replace it, or --resume_from_checkpoint true to get its results (if it is "
            "this run: nothing is trained again)."
        )
    if rundir.present() and not resume:
        raise RunError(
            f"{out} holds an unfinished run. Pass --resume_from_checkpoint true to continue it, or "
            "--overwrite_output true to start over."
        )
    return manifest


def _teacher_cache(config, teacher, data, teacher_weights: str, results: dict[str, Any]) -> TeacherCache | None:
    """Read the teacher cache, or build it (the main process first; the others then read
    the file it wrote). The build runs the teacher in the precision training uses."""
    if not uses_teacher_cache(config, teacher):
        return None
    from accelerate import PartialState

    state = PartialState()
    teacher.to(data.train.images.device)
    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
    device_type = data.train.images.device.type

    def autocast():
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    try:
        with state.main_process_first():
            cache, info = load_or_build(
                config.teacher_cache, teacher, teacher_weights, data.train.images,
                precision=config.precision,
                dtype=config.teacher_cache_dtype, with_logits=cache_needs_logits(config),
                batch_size=config.per_device_eval_batch_size, autocast=autocast, write=state.is_main_process,
            )  # fmt: skip
    except TeacherCacheError as err:
        raise RunError(str(err)) from None
    results["teacher_cache"] = info
    return cache


# --------------------------------------------------------------------------- stages


def _scaled_paper_milestones(epochs: float) -> str:
    """The paper's milestones (100,140,180 of 200 epochs) scaled to a stage of ``epochs``:
    whole epochs where three distinct ones fit inside the stage, else fractions of an epoch
    (milestones become optimizer steps, so a fraction is honoured)."""
    exact = [epochs * f for f in (0.5, 0.7, 0.9)]
    whole = sorted({round(m) for m in exact if 0 < round(m) < epochs})
    return ",".join(f"{m:g}" for m in (whole if len(whole) == 3 else [round(m, 2) for m in exact]))


def _warn_unreached_milestones(config: RefilledConfig) -> None:
    """Warn where ``--stage2_milestones`` lie at or beyond ``--stage2_epochs`` (the learning
    rate would never decay there), with the paper's schedule scaled to the stage as the fix."""
    epochs, milestones = config.stage2_epochs, config.milestones()
    if epochs > max(milestones, default=0):
        return
    beyond = ",".join(f"{m:g}" for m in milestones if m >= epochs)
    logger.warning(
        "--stage2_milestones %s: %s lie at or beyond --stage2_epochs %g, so the learning rate never decays there; "
        "set milestones inside the stage (the paper's schedule, scaled: --stage2_milestones %s).",
        config.stage2_milestones, beyond, epochs, _scaled_paper_milestones(epochs),
    )  # fmt: skip


def _compare_run_folders(config: RefilledConfig) -> list[str]:
    """The folders ``--compare_runs`` names (comma-separated)."""
    return [folder.strip() for folder in (config.compare_runs or "").split(",") if folder.strip()]


def _local_inputs(config: RefilledConfig) -> list[tuple[str, str]]:
    """The local files and folders a run reads: ``(option, path)`` pairs."""
    inputs = []
    for option in ("teacher", "student"):
        spec = getattr(config, option)
        if spec and spec.startswith("local-dir:"):
            inputs.append((f"--{option}", spec[len("local-dir:") :]))
    for option in ("teacher_checkpoint", "student_checkpoint", "teacher_cache"):
        if getattr(config, option):
            inputs.append((f"--{option}", getattr(config, option)))
    if Path(config.dataset).exists():
        inputs.append(("--dataset", config.dataset))
    for folder in _compare_run_folders(config):
        inputs.append(("--compare_runs", str(Path(folder) / RESULTS_FILE)))
    return inputs


def _log_plan(config: RefilledConfig) -> None:
    """What the user should know before training starts, said once by the main process:
    milestones the schedule never reaches, the lambda search the default runs and its
    student-alone candidate."""
    if config.process_index != 0:
        return
    _warn_unreached_milestones(config)
    if config.method != "refilled":
        return
    values = config.distill_weight_candidates()
    if values and config.distill_weight_search is None:
        logger.info(
            "--distill_weight is unset: stage 2 will run once per lambda in %s and keep the best on validation "
            "(pass --distill_weight to run it once).", ", ".join(f"{v:g}" for v in values),
        )  # fmt: skip
    elif values is None and config.distill_weight is None:
        logger.info(
            "--distill_weight is unset and there is no validation split to choose it on (--validation_fraction 0, "
            "no --validation_split): "
            "stage 2 runs once with lambda %g (pass --distill_weight to choose another).",
            config.resolved_distill_weight(),
        )  # fmt: skip
    if config.student_alone_runs():
        epochs, milestones = config.student_alone_schedule()
        logger.info(
            "The student alone (cross-entropy, %g epochs, milestones %s) will train as one more candidate; it is "
            "exported instead if it beats every lambda on validation (--student_alone_candidate false skips it).",
            epochs, milestones or "none",
        )  # fmt: skip


def _run_identity(
    config: RefilledConfig, data: ClassificationData, student: StudentModel, student_cfg: dict[str, Any], teacher
) -> dict[str, Any]:
    """What makes two runs the same run (see :mod:`refilled_hf.rundir`); ``student_cfg``: the
    student's pretrained_cfg at the run's input size."""
    recipe = {k: v for k, v in config.to_recipe(as_run=True).items() if k not in NON_IDENTITY_FIELDS}
    recipe.pop("teacher_cache_dtype", None)
    # The data path the run took is recorded below; what chose it (--data_path auto or the path
    # forced, the memory budget) computes nothing, nor do loader workers (on the device path
    # every loader runs in the main process; on the worker path each image's augmentation is
    # seeded by itself, refilled_hf.augmentation_seeds): a resume may change them (another machine).
    recipe.pop("device_data_budget_gb", None)
    recipe.pop("dataloader_num_workers", None)
    return {
        **recipe,
        # a float16 cache rounds the teacher's outputs: runs with and without it differ
        "teacher_cache": config.teacher_cache_dtype if uses_teacher_cache(config, teacher) else None,
        "world_size": config.world_size,
        "student_init": tensor_fingerprint(student.model.state_dict()),
        "teacher_weights": tensor_fingerprint(teacher.model.state_dict()) if teacher is not None else None,
        # what the models compute with besides their weights: a model folder may move (MODEL_LOCATION_FIELDS)
        "student_setup": setup_fingerprint(
            student.model, config.student, **timm.data.resolve_data_config(pretrained_cfg=dict(student_cfg))
        ),
        "teacher_setup": (
            setup_fingerprint(teacher.model, config.teacher, **teacher.input_setup()) if teacher is not None else None
        ),
        "data": data.fingerprint,
        "data_path": data.info.get("data_path"),
        "random_draws": _random_draws(config, student),
    }


def _random_draws(config: RefilledConfig, student: StudentModel) -> str:
    """Who draws the random numbers the student uses in training (dropout, drop path):
    ``inductor`` where ``--torch_compile`` compiles it with inductor, which draws them from
    a generator of its own (its fallback to eager's draws is slow), so other masks than an
    eager run's, from the same seed; ``eager`` otherwise, and for a student that draws none
    (compiling then changes nothing the run computes). A resume may not change it: it
    would continue with other draws than the run it resumes."""
    inductor = config.compile_backend == "inductor"
    return "inductor" if inductor and student.draws_random_numbers_in_training() is not False else "eager"


def run_distillation(config: RefilledConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run ``config.method`` end to end and return the results (also in results.json).

    ``refilled``: stage 1 (relationship matching, NCM-evaluated), teacher class centres
    over the training split, stage 2 (CE + lambda * local-classifier KL). Baselines:
    one stage with stage 2's schedule. The test split is evaluated once, at the end of
    each stage; the final student is exported to ``output_dir/model``. ``callbacks``
    (`transformers.TrainerCallback`) are given to every stage's Trainer. Fields the method
    does not use (``RefilledConfig.fields_unused_by``) are named in a warning.
    """
    warn_unused_fields(config, config.method)
    return _train(config, callbacks)


def warn_unused_fields(config: RefilledConfig, user: str) -> None:
    """Log, on the main process, the fields set for nothing: ``user`` (a method, or one of
    the commands evaluate and probe-teacher) does not use them."""
    unused = config.fields_unused_by(user)
    if unused and config.process_index == 0:
        who = f"--method {user}" if user in METHODS else user
        logger.warning(
            "%s does not use %s: ignored (the `--help` of each says which runs use it).", who,
            options_text(unused),
        )  # fmt: skip


def _train(config: RefilledConfig, callbacks: list | None, command: str = "distill") -> dict[str, Any]:
    """The run ``config`` describes; ``command`` (distill or train-teacher, which trains its
    teacher as a ce student) is recorded in results.json, for the model card."""
    out = Path(config.output_dir)
    method = config.method
    if not config.should_log:  # a replica: --log_level_replica (transformers' default: warnings) for ours too
        logging.getLogger("refilled_hf").setLevel(config.get_process_log_level())
    alone = lone_process_launch_warning() if config.world_size == 1 else None
    if alone:
        logger.warning(alone)
    if method != "ce" and not config.teacher:
        raise ConfigError(f"method={method!r} needs a teacher: set `--teacher` (see --help).")
    if config.push_to_hub:
        if not config.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id <user>/<name>: the repo the model is pushed to.")
        check_hub_access(config.hub_model_id, config.hub_token)  # every process: all are refused alike
    try:
        card_template()  # the export writes the card: a broken install fails now, not after training
    except FileNotFoundError as err:
        raise RunError(str(err)) from None
    stage_dirs = [out / "stage1", *_stage2_dirs(config, out)] if method == "refilled" else [out / method]
    rundir = RunDirectory(out, [d.name for d in stage_dirs] + [EXPORT_DIR, RESULTS_FILE], config.process_index == 0)
    rundir.check_inputs(_local_inputs(config))
    mode = config.resume_mode()
    if not (rundir.present() and mode is not None):  # (a run that started so, resumed, goes on)
        check_student_start(config, command)
    _prepare_output_dir(config, rundir)
    finished = mode == "latest" and (out / RESULTS_FILE).is_file()
    # a finished run whose model was removed: exported again from its stages, where they hold
    # the weights it exported (nothing is trained again); otherwise refused by _check_finished_run
    export_again = finished and _export_missing(out) and _export_restore_problem(config, stage_dirs) is None
    # what only a run that exports needs (a finished run gives its results whatever became of its
    # baselines' folders or its checkpoints), checked now, not after training
    exports = not finished or export_again
    if exports:
        _check_export_folder(out)  # (an export over files of yours would lose them)
    baselines = _baseline_results(config) if exports else []
    if mode == "latest" and not rundir.present() and config.process_index == 0:
        # (not refused: a job script re-run after preemption passes the flag from its first launch on)
        logger.warning(
            "--resume_from_checkpoint true: %s holds no run yet, so this one starts from the beginning (check "
            "--output_dir if you meant to continue a run).", out,
        )  # fmt: skip
    # (its checkpoints may be unresumable, as --save_only_model writes them)
    points = _resume_points(mode, out, stage_dirs, config.world_size) if exports else {}

    # Everything that can fail on user input fails here, before any training.
    set_seed(config.seed)  # the student's initialization must not depend on what ran before
    backbone = load_timm_model(
        config.student,
        checkpoint=config.student_checkpoint,
        image_size=config.image_size,
        **({} if config.student_drop_rate is None else {"drop_rate": config.student_drop_rate}),
    )
    student_cfg = data_pretrained_cfg(backbone.pretrained_cfg, config.image_size)
    teacher = load_teacher(config, student_cfg) if method != "ce" else None
    data = select_data(config, config.classes)  # labels and class names: what the checks below need
    # a classifier for other classes is replaced: another count, or (a local-dir:/hf-hub: student
    # names its classes) other names or order; one for these classes, in this order, is kept
    own_names = backbone.pretrained_cfg.get("label_names")
    if backbone.num_classes != data.num_classes or (own_names is not None and list(own_names) != data.class_names):
        backbone.reset_classifier(data.num_classes)
    student = StudentModel(backbone, input_size=student_cfg["input_size"])
    teacher_classes = stated_teacher_classes(config, data)
    kd_columns = check_label_spaces(config, teacher, data) if teacher is not None else None
    check_mining(config, data)
    warn_few_steps(config, len(data.train))
    check_memory(
        config, [student_cfg["input_size"][-1]] + ([teacher.input_size] if teacher and teacher.input_size else [])
    )
    check_forward(student, teacher, student_cfg["input_size"])
    check_compile(config)
    data = prepare_data(config, data, backbone.pretrained_cfg)  # decodes every image: the long part
    check_teacher_cache(config, teacher, data)
    results: dict[str, Any] = {
        "command": command,
        "method": method,
        "student": config.student,
        "teacher": config.teacher if teacher is not None else None,  # ce (and train-teacher) use none
        "dataset": config.dataset,
        "classes": config.classes,
        "teacher_classes": teacher_classes,
        "teacher_input": teacher.adaptation_text() if teacher is not None else None,
        # what the teacher is where its name says where it was read from (local-dir:, a checkpoint file)
        "teacher_architecture": teacher.architecture if teacher is not None else None,
        # where each model's weights came from (a model card names them; None: its name says)
        "teacher_weights_origin": (
            weights_origin(config.teacher, config.teacher_checkpoint, pretrained=True) if teacher is not None else None
        ),
        "student_weights_origin": weights_origin(config.student, config.student_checkpoint, pretrained=False),
        "class_names": data.class_names,
        "data": data.info,
        "world_size": config.world_size,
        "image_size": student_cfg["input_size"][-1],
        "data_fingerprint": data.fingerprint,
        LEGACY_DATA_KEY: data.legacy_fingerprint,
        # the data set the images come from, whatever seed drew them (compare: copies at two paths are one)
        "data_source_fingerprint": data.source_fingerprint,
        "schedule": config.final_stage_schedule(),
        # kd: the teacher's output of each student class, where they are not the same outputs
        **({"kd_teacher_columns": kd_columns} if kd_columns is not None else {}),
    }
    check_comparable(results, baselines)
    identity = _run_identity(config, data, student, student_cfg, teacher)
    if kd_columns is not None:  # (absent otherwise: what runs recorded before KD could use a part of a teacher)
        identity["kd_teacher_columns"] = kd_columns
    legacy = {"data": data.legacy_fingerprint}  # what a run of an earlier refilled-hf recorded as its data
    # every process checks a resume (reading only), so that all refuse alike; the main one checks again
    if finished and not export_again:
        _check_finished_run(config, rundir, identity, legacy, stage_dirs)
        return _finished_run(config, rundir, identity, legacy, stage_dirs)
    if mode is not None and rundir.present():
        rundir.check_resume(identity, legacy)
    if export_again and config.process_index == 0:
        logger.warning(
            "%s holds this run, finished, but its model (%s) is missing: it is exported again from the weights its "
            "stages kept, after the final evaluation (nothing is trained again).", out, out / EXPORT_DIR,
        )  # fmt: skip
    if not export_again:  # (after the checks: a refused or finished run is told only why)
        _log_plan(config)
    centers_data = eval_copy(data.train, data.eval_transform)

    # The folder: locked by the main process, re-checked under the lock, identity recorded.
    _wait_for_everyone()  # every process has checked the folder before the main one writes to it
    rundir.acquire()
    try:
        if rundir.is_main:
            earlier = _prepare_output_dir(config, rundir)
            if mode is not None and rundir.present():
                rundir.check_resume(identity, legacy)
            if config.overwrite_output:
                rundir.remove_earlier_run(earlier)
            rundir.write_manifest(identity, _export_options(config))
        _wait_for_everyone()
        # (exported again, the run trains no step: its teacher cache is neither read nor built again)
        cache = None if export_again else _teacher_cache(config, teacher, data, identity["teacher_weights"], results)
        recorded = _read_results(out) if export_again else None
        return _run_stages(config, method, stage_dirs, points, student, teacher, data, centers_data, callbacks,
                           results, out, cache, recorded)  # fmt: skip
    except Exception as err:
        # refilled-hf's own errors say what went wrong (a diverged stage, a failed push): they are put
        # down to the disk only where they say so, not because the disk happens to be almost full
        full = disk_full_error(err, out, guess=not isinstance(err, OWN_ERRORS))
        if full is None:
            raise
        raise full from err
    finally:
        end_stage_runs()  # the last stage's tracker run, which its final metrics reached
        rundir.release()


#: Options outside a run's identity that shape its export: the card's baselines and license, and
#: the repo the card names.
EXPORT_OPTIONS = ("compare_runs", "card_license", "hub_model_id")


def _export_options(config: RefilledConfig) -> dict[str, Any]:
    recipe = config.to_recipe()
    return {name: recipe.get(name) for name in EXPORT_OPTIONS}


def _check_finished_run(
    config: RefilledConfig,
    rundir: RunDirectory,
    identity: dict[str, Any],
    legacy: dict[str, Any],
    stage_dirs: list[Path],
) -> None:
    """Refuse to give a finished run's results as this run's unless it is this run (same
    identity; ``legacy``: see :meth:`RunDirectory.identity_difference`), its export was made
    with these export options, and its model is there."""
    out = rundir.out
    rundir.check_resume(identity, legacy)
    recorded = (rundir.manifest() or {}).get("export_options")
    wanted = _export_options(config)
    if recorded != wanted:
        if recorded is None:
            why = "an earlier refilled-hf made it without recording its model card's options"
        else:
            changed = "; ".join(f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v)
            why = f"its model card was made with other options ({changed}): pass the same ones to get its results"
        raise RunError(
            f"{out} holds this run, finished, but {why}. Push its model as it is with `refilled-hf push`, or pass "
            "--overwrite_output true to train it again."
        )
    if _export_missing(out):
        problem = _export_restore_problem(config, stage_dirs)
        raise RunError(
            f"{out} holds this run, finished, but its model ({out / EXPORT_DIR}) is missing, and cannot be exported "
            f"again without training: {problem}. Pass --overwrite_output true to train it again."
        )


def _check_export_folder(out: Path) -> None:
    """Refuse a run whose export (or ``--overwrite_output``) would replace a model folder that
    holds files it does not write (yours, put there since): they would be lost."""
    foreign = files_not_exported(out / EXPORT_DIR)
    if foreign:
        raise RunError(
            f"{out / EXPORT_DIR} holds files an export does not write ({short_list(foreign)}): this run replaces that "
            "folder with its model, and they would be lost. Move them out of it, then run again."
        )


def _export_missing(out: Path) -> bool:
    """Whether the run's model folder lacks a file the export writes (its card included)."""
    return not all((out / EXPORT_DIR / name).is_file() for name in EXPORT_FILES)


def _export_restore_problem(config: RefilledConfig, stage_dirs: list[Path]) -> str | None:
    """Why the weights a finished run exported cannot be had again from its stage folders
    without training, or None where they can: each stage kept its final weights (``final/``)
    or a complete checkpoint of its last step (and, under ``--load_best_model_at_end``, the
    best step's checkpoint, which the end of the stage loads)."""
    for stage_dir in stage_dirs:
        if is_finished(stage_dir):
            continue
        if stage_dir.name == "stage1" and config.stage1_epochs == 0:  # (the ablation trains no stage 1)
            continue
        found = last_complete_checkpoint(stage_dir)
        if found is None:
            return f"{stage_dir} holds no checkpoint"
        state = json.loads((found / "trainer_state.json").read_text())
        last = state.get("max_steps")
        if state.get("global_step") != last:
            return f"the last checkpoint of {stage_dir} ({found.name}) is not of the stage's last step ({last})"
        problem = checkpoint_problem(found, config.world_size)
        if problem:
            return f"{found}: {problem}"
        best = state.get("best_global_step")
        if config.load_best_model_at_end and best and not (stage_dir / f"checkpoint-{best}").is_dir():
            return f"the best checkpoint of {stage_dir} (step {best}, which the stage ended with) is gone"
    return None


def _finished_run(
    config: RefilledConfig,
    rundir: RunDirectory,
    identity: dict[str, Any],
    legacy: dict[str, Any],
    stage_dirs: list[Path],
) -> dict[str, Any]:
    """``--resume_from_checkpoint true`` on a finished run (a job script run again after its run
    ended): its results, nothing trained again, if :func:`_check_finished_run` passes (every
    process checked it already, so all refuse alike); pushed if asked."""
    out = rundir.out
    _wait_for_everyone()
    rundir.acquire()
    try:
        if rundir.is_main:
            _prepare_output_dir(config, rundir)  # again, under the lock
            _check_finished_run(config, rundir, identity, legacy, stage_dirs)
            logger.warning("%s holds this run, finished: nothing is trained again; these are its results.", out)
            if config.push_to_hub:
                _push_export(config, out)
        _wait_for_everyone()
    finally:
        rundir.release()
    return _read_results(out)


def _read_results(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / RESULTS_FILE).read_text())
    except (OSError, ValueError) as err:
        raise RunError(
            f"{out / RESULTS_FILE} is damaged ({err}): pass --overwrite_output true to train again."
        ) from None


def _confirmed_record(recorded: dict[str, Any], measured: dict[str, Any], out: Path) -> dict[str, Any]:
    """``recorded``, the finished run's results, where the weights about to be exported again
    measure the same top-1/top-5 on the same images (those both record: an earlier release
    may have recorded fewer); refused otherwise (they are not the weights it exported, and its
    card would describe other ones)."""
    then, now = recorded.get("final") or {}, measured["final"]
    keys = sorted(k for k in now if k.endswith(("_top1", "_top5", "_samples")) and k in then)
    differ = [f"{k} {then[k]} -> {now[k]}" for k in keys if then[k] != now[k]]
    if differ or not any(k.endswith("_top1") for k in keys):
        why = (f"the weights its stages kept do not measure what its results record ({'; '.join(differ)})" if differ
               else "its results record no top-1 to compare the weights its stages kept with")  # fmt: skip
        raise RunError(
            f"{out} holds this run, finished, but {why}: they are not known to be the weights it exported, so its "
            "model is not exported again. Pass --overwrite_output true to train it again."
        )
    return recorded


def _stage2_dirs(config: RefilledConfig, out: Path) -> list[Path]:
    """``stage2/``, or one ``stage2-lambda<value>/`` per ``--distill_weight_search`` candidate
    (then ``student-alone/`` with ``--student_alone_candidate``)."""
    candidates = config.distill_weight_candidates()
    if candidates is None:
        return [out / "stage2"]
    alone = [out / STUDENT_ALONE_DIR] if config.student_alone_runs() else []
    return [out / f"stage2-lambda{value:g}" for value in candidates] + alone


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _run_stages(config, method, stage_dirs, points, student, teacher, data, centers_data, callbacks, results, out,
                cache=None, recorded=None):  # fmt: skip
    if method == "refilled":
        stage1_dir, *stage2_dirs = stage_dirs
        # the student-alone candidate starts from the weights stage 1 starts from
        initial = state_copy(student) if config.student_alone_runs() else None
        if config.stage1_epochs == 0:
            logger.info("stage1_epochs=0: stage 2 starts from the student's initial weights (an ablation).")
        elif is_finished(stage1_dir) and config.resume_mode():
            results["stage1"] = load_final(stage1_dir, student)
            logger.info("Stage 1 already finished: continuing with stage 2.")
        else:
            trainer = make_trainer(
                config, "stage1", stage1_dir, student, data, callbacks, teacher=teacher,
                centers_dataset=centers_data, teacher_cache=cache,
            )  # fmt: skip
            fit(trainer, points[stage1_dir])
            stage1 = split_metrics(trainer, data, {"validation": "validation", "test": "test"})
            stage1.update(train_seconds=trainer.train_seconds, train_metrics=trainer.train_metrics)
            save_final(stage1_dir, student, stage1, trainer.is_world_process_zero())
            barrier(trainer)
            results["stage1"] = stage1
        student.set_embeddings_only(False)
        if config.distill_weight_candidates() is not None:
            trainer = search_distill_weight(
                config, stage2_dirs, points, student, teacher, data, centers_data, callbacks, results, cache, initial
            )
            return _finish(config, trainer, student, data, results, out, recorded)
        results["distill_weight"] = config.resolved_distill_weight()
        trainer = stage2_trainer(config, stage2_dirs[0], student, data, callbacks, teacher, cache, centers_data,
                                 results)  # fmt: skip
        fit(trainer, points[stage2_dirs[0]])
    else:
        trainer = make_trainer(
            config, method, stage_dirs[0], student, data, callbacks,
            **({"teacher": teacher, "teacher_cache": cache} if teacher else {}),
            **({"teacher_columns": results["kd_teacher_columns"]} if "kd_teacher_columns" in results else {}),
        )  # fmt: skip
        fit(trainer, points[stage_dirs[0]])
    final = split_metrics(trainer, data, {"validation": "validation", "test": "test"})
    final.update(train_seconds=trainer.train_seconds, train_metrics=trainer.train_metrics)
    results["final"] = final
    return _finish(config, trainer, student, data, results, out, recorded)


def _baseline_results(config: RefilledConfig) -> list[dict[str, Any]]:
    """results.json of the ``compare_runs`` (baselines on the same data), for the card."""
    runs = []
    for folder in _compare_run_folders(config):
        path = Path(folder) / RESULTS_FILE
        if not path.is_file():
            raise ConfigError(f"compare_runs: {folder} has no {RESULTS_FILE} (is that run finished?).")
        try:
            run = json.loads(path.read_text())
            if not isinstance(run, dict) or "method" not in run or "final" not in run:
                raise ValueError("not a refilled-hf results file")
        except (OSError, ValueError) as err:
            raise ConfigError(f"compare_runs: {path} is damaged ({err}); pass finished runs only.") from None
        runs.append(run)
    return runs


def training_seconds(results: dict[str, Any]) -> float:
    """Seconds this run spent training, every stage it trained: stage 1 and each stage 2 it
    ran (every lambda candidate, and the student-alone candidate), where
    ``final.train_seconds`` is the exported candidate's alone."""
    search = results.get("distill_weight_search")
    if search:
        stage2 = sum(c.get("train_seconds", 0.0) for c in search["candidates"])
        stage2 += (results.get("student_alone") or {}).get("train_seconds", 0.0)
    else:
        stage2 = results["final"].get("train_seconds", 0.0)
    return (results.get("stage1") or {}).get("train_seconds", 0.0) + stage2


def _finish(config, trainer: RefilledTrainer, student: StudentModel, data, results: dict, out: Path,
            recorded: dict | None = None) -> dict:  # fmt: skip
    """Export the student with its model card and write ``results.json``. ``recorded``: the
    results of this run, finished, whose model is exported again: they stay its results (their
    timings are its training's, not this call's), once the weights measure what they record."""
    results["train_seconds"] = training_seconds(results)
    if recorded is not None:
        results = _confirmed_record(recorded, results, out)
    if trainer.is_world_process_zero():
        cfg = data_pretrained_cfg(student.model.pretrained_cfg, config.image_size)
        data_config = {"input_size": cfg["input_size"], "mean": cfg.get("mean"), "std": cfg.get("std")}
        if cfg["input_size"][-1] <= CIFAR_STYLE_MAX_SIZE:
            # evaluated (and trained) on each image resized to the square input, its aspect ratio not
            # kept: timm's `squash` (crop 1.0) makes timm's and transformers' preprocessing of the
            # export the same, where their default, resize and centre crop, sees another part of a
            # non-square image than the measured top-1 did
            data_config.update(crop_mode="squash", crop_pct=1.0)
        baselines = _baseline_results(config)
        check_comparable(results, baselines)
        card = render_model_card(
            results,
            config.to_recipe(used_only=True),
            architecture=student.model.pretrained_cfg["architecture"],
            repo_id=config.hub_model_id,
            baselines=baselines,
            license=config.card_license,
        )
        for path in remove_unfinished_exports(out / EXPORT_DIR):  # (this run's: the run folder is locked)
            logger.info("Removed %s, left by an export of this run that was killed.", path)
        export_model(
            student.model,
            out / EXPORT_DIR,
            label_names=data.class_names,
            data_config=data_config,
            extra_files={"README.md": card},
            # (and the precision its numbers were measured in, which `evaluate` tells apart)
            training_data={**data.selection_record(), "precision": config.precision},
            license=config.card_license,
        )
        write_json_atomically(out / RESULTS_FILE, results)
        logger.info("Exported the model to %s (process %d)", out / EXPORT_DIR, trainer.args.process_index)
        if config.push_to_hub:
            _push_export(config, out)
    barrier(trainer)
    return results


def _push_export(config: RefilledConfig, out: Path) -> None:
    url = push_folder(out / EXPORT_DIR, config.hub_model_id, private=config.hub_private_repo, token=config.hub_token)
    logger.info("Pushed %s to %s", out / EXPORT_DIR, url)


def run_teacher_training(config: RefilledConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``config.teacher`` (a registered timm name) with cross-entropy on
    ``config.classes``, with stage 2's schedule; export it to ``output_dir/model``."""
    if not config.teacher:
        raise ConfigError("train-teacher needs --teacher: the timm model to train (e.g. cifar_wrn_40_2).")
    unused = config.fields_unused_by("train-teacher")
    if unused:
        listed = options_text(unused)
        hints = [hint for names, hint in _TEACHER_TRAINING_HINTS if set(names) & set(unused)]
        refusal = f"train-teacher does not use {listed}: remove {'it' if len(unused) == 1 else 'them'}."
        raise ConfigError(" ".join([refusal, *hints]))
    teacher_config = config.with_changes(
        method="ce", student=config.teacher, student_checkpoint=config.teacher_checkpoint
    )
    return _train(teacher_config, callbacks, command="train-teacher")


#: What train-teacher does instead of the fields it refuses (see RefilledConfig.fields_unused_by).
_TEACHER_TRAINING_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("teacher_classes",), "The teacher trains on --classes (e.g. --classes 0-49)."),
    (("student", "student_checkpoint"), "The model trained is --teacher, from --teacher_checkpoint if given."),
    (("method",), "train-teacher always trains with cross-entropy."),
    (("teacher_input_size",), "The teacher trains at --image_size."),
    (
        tuple(
            n
            for n, users in FIELD_USERS.items()
            if "ce" not in users and n not in ("teacher_classes", "teacher_input_size")
        ),
        "It trains with cross-entropy on stage 2's schedule: --stage2_epochs, --stage2_learning_rate, "
        "--stage2_milestones, --stage2_gamma.",
    ),
)


def inference_trainer(model, config: RefilledConfig, num_classes: int, teacher: FrozenTeacher | None = None,
                      centers_dataset=None) -> RefilledTrainer:  # fmt: skip
    """A trainer that only runs ``model`` (evaluate, probe-teacher): no training, no
    evaluation or checkpoint schedule, and no file in the user's folders. The Trainer
    creates its ``output_dir`` on the main process, so that is a temporary folder, removed
    with the trainer (``--output_dir`` used to gain an empty ``evaluate/`` or ``probe/``).
    With ``centers_dataset`` (probe-teacher's nearest-class-mean scores of the teacher's
    embedding) it is a stage-1 trainer, which leaves ``model``'s head alone: the head may
    predict other classes than the ``num_classes`` of the data."""
    scratch = tempfile.mkdtemp(prefix="refilled-hf-inference-")
    # a view, not a re-validated copy: the training-only options it switches off (best-model
    # selection, pushing) are ignored here, with a warning, not refused
    # (a learning rate and epochs of its own: not a config used directly, whose trainer would take
    # the stage's schedule and folder and name the data fields it does not read)
    args = config.stage_view(method="ce", output_dir=scratch, eval_strategy="no", save_strategy="no",
                             load_best_model_at_end=False, push_to_hub=False, learning_rate=0.0,
                             num_train_epochs=0.0)  # fmt: skip
    stage = "stage1" if centers_dataset is not None else "ce"
    trainer = RefilledTrainer(model=StudentModel(model), args=args, stage=stage, num_classes=num_classes,
                              teacher=teacher, centers_dataset=centers_dataset)  # fmt: skip
    weakref.finalize(trainer, shutil.rmtree, scratch, ignore_errors=True)
    return trainer
