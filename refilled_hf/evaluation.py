"""``refilled-hf evaluate``: a trained model's accuracy on exactly the split it names.

An exported model records the data it was trained on (see :mod:`refilled_hf.provenance`).
Evaluation uses that record twice:

- without ``--classes``, it evaluates on the model's own classes (its label names);
- a validation split is carved from training images with a seed: under another seed,
  fraction or class selection it would hold images the model trained on, and report an
  inflated accuracy. Such a split is refused unless its rows are exactly the ones the
  model was selected on (same digest).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import ModelLoadError, load_timm_model
from .config import (
    DEFAULT_DATASET,
    DEFAULT_VALIDATION_FRACTION,
    ConfigError,
    RefilledConfig,
    field_defaults,
    options_text,
)
from .data import ClassificationData, UnknownClassError, load_raw_dataset, short_list
from .messages import error_text
from .pipeline import data_pretrained_cfg, inference_trainer, prepare_data, select_data, warn_unused_fields
from .preflight import check_compile, check_forward
from .provenance import redraw_training_rows, run_folder, same_dataset, teacher_training_rows, training_data_record
from .rundir import MANIFEST

__all__ = ["check_evaluation_split", "evaluate_model"]

logger = logging.getLogger(__name__)

EVALUATION_SPLITS = ("test", "validation")


def check_evaluation_split(record: dict[str, Any] | None, config: RefilledConfig, data, split: str,
                           model_spec: str) -> np.ndarray | None:  # fmt: skip
    """Refuse a split that can hold images ``model_spec`` was trained on.

    ``validation`` must be the model's own validation split (same row digest);
    ``test`` must not be the split the model trained on, in the same data set or a copy of
    it elsewhere (its training rows, drawn again from its record, reproduce its digest).
    Returns those rows where only the images' pixels can tell a copy from another data set
    whose rows and labels are laid out alike: :func:`check_not_trained_on` decides, once
    they are decoded.
    """
    if record is None:
        if split == "validation":
            logger.warning(
                "%s records no training data: refilled-hf cannot check that this validation split holds none of "
                "its training images (--split test can be trusted).", model_spec,
            )  # fmt: skip
        elif config.test_split == config.train_split:
            logger.warning(
                "--test_split %r is the data set's training split, and %s records no training data: refilled-hf "
                "cannot check that the model was not trained on these images.", config.test_split, model_spec,
            )  # fmt: skip
        return
    recorded = (record.get("row_digests") or {}).get("validation")
    if split == "validation" and data.row_digests.get("validation") != recorded:
        if recorded is None:
            shots = record.get("shots_per_class")
            which = f"{shots} images per class, drawn with seed {record.get('seed')}," if shots else "every image"
            why = (f"{model_spec} was trained without a validation split, on {which} of its classes in split "
                   f"{record.get('train_split')!r} of {record.get('dataset')!r}")  # fmt: skip
            fix = "evaluate it with --split test"
        elif record.get("validation_split"):
            why = (f"this validation split is not the one {model_spec} was selected on (that one: data set "
                   f"{record.get('dataset')!r}, split {record['validation_split']!r}, classes "
                   f"{short_list(record.get('class_names') or [])})")  # fmt: skip
            fix = (f"pass --validation_split {record['validation_split']} with the data set and classes it was "
                   "trained on, or use --split test")  # fmt: skip
        else:
            why = (f"this validation split is not the one {model_spec} was selected on (that one: data set "
                   f"{record.get('dataset')!r}, split {record.get('train_split')!r}, classes "
                   f"{short_list(record.get('class_names') or [])}, --validation_fraction "
                   f"{record.get('validation_fraction')}, data seed {record.get('seed')})")  # fmt: skip
            fix = (f"pass --validation_fraction {record.get('validation_fraction')} --data_seed {record.get('seed')} "
                   f"{'and no --validation_split ' if config.validation_split else ''}with the data set and classes "
                   "it was trained on, or use --split test")  # fmt: skip
        risk = "so it can hold images the model trained on and its accuracy would be inflated"
        if config.validation_split and config.validation_split != record.get("train_split"):
            # another split than the one it trained on: held-out images, measured as such with --split test
            risk = "so its accuracy is not the validation accuracy the model was selected with"
            fix = (f"measure it on split {config.validation_split!r}, images it was neither trained nor selected "
                   f"on, with --split test --test_split {config.validation_split}; or {fix}")  # fmt: skip
        raise ConfigError(f"--split validation: {why}, {risk}; {fix}.")
    if split == "test" and config.test_split == record.get("train_split"):
        # the same data set, or possibly a copy of it elsewhere (another path, a Hub id and a local
        # folder): the model's training rows drawn again from its record reproduce its digest
        if same_dataset(config.dataset, record.get("dataset")):
            raise ConfigError(_trained_on_text(config, model_spec))
        taught = teacher_training_rows(record, data, config.test_split)
        if taught is not None and not record.get("train_content_digest"):
            raise ConfigError(_trained_on_text(config, model_spec, (
                f" (its training rows and labels in {record.get('dataset')!r} are these: a copy of it, as far as its "
                "record, written by an earlier release without the images' pixels, can tell)"
            )))  # fmt: skip
        if taught is not None:
            return taught
    if (
        split == "test"
        and config.test_split is not None
        and config.test_split == record.get("validation_split")
        and same_dataset(config.dataset, record.get("dataset"))
    ):
        raise ConfigError(
            f"--test_split {config.test_split!r} is the split {model_spec} was selected on (its --validation_split): "
            "its accuracy there is optimistic, not a test accuracy. Name the data set's test split, or evaluate it "
            "as what it is with --split validation."
        )


def _trained_on_text(config: RefilledConfig, model_spec: str, where: str = "") -> str:
    return (
        f"--test_split {config.test_split!r} is the split {model_spec} was trained on{where}: its accuracy there is "
        "not a test accuracy. Name the data set's test split."
    )


def check_not_trained_on(dataset, rows: np.ndarray | None, record: dict[str, Any], config: RefilledConfig,
                         model_spec: str) -> None:  # fmt: skip
    """Refuse ``dataset`` (decoded) where the images at ``rows`` (from
    :func:`check_evaluation_split`) are, pixel for pixel, the ones the model trained on."""
    if rows is None or not np.isin(rows, dataset.source_rows).all():
        return
    if dataset.rows_content_digest(rows) == record.get("train_content_digest"):
        raise ConfigError(_trained_on_text(config, model_spec, f" (a copy of its data set {record.get('dataset')!r})"))


def _check_test_split_exists(config: RefilledConfig) -> None:
    """Refuse ``--split test`` where the data set has no such split, naming the ones it has
    (the training commands' advice, ``--test_split none``, would leave nothing to evaluate)."""
    if config.test_split is None:
        raise ConfigError("--split test with --test_split none: name the split to evaluate with --test_split.")
    raw = load_raw_dataset(config.dataset, config.dataset_config)  # cached: select_data reads the same
    if config.test_split not in raw:
        raise ConfigError(
            f"Split {config.test_split!r} not in {config.dataset!r} (splits: {list(raw)}): name the split to "
            "evaluate with --test_split (one the model was not trained on), or evaluate the validation split the "
            "model was selected on with --split validation."
        )


#: the fields that say how a data set is read, adopted from a model's record with its data set
_READING_FIELDS = ("dataset_config", "image_column", "label_column", "train_split", "test_split")


def _looks_like_hub_id(value: str) -> bool:
    """``name`` or ``owner/name``, as the Hub names data sets (a path that is not here may look
    alike: its load then fails, saying which data set it tried)."""
    return bool(re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", value))


def _recorded_dataset(config: RefilledConfig, record: dict[str, Any] | None, model_spec: str) -> RefilledConfig:
    """``config`` with ``--dataset`` left unset (None) filled in: the data set ``model_spec``
    records it was trained on (with how that one is read: its configuration, columns and
    splits, where the user left them at their defaults), where it can be read here; else,
    for a model that records none, :data:`DEFAULT_DATASET`. A recorded local
    path that is not here is refused, naming it, rather than measured on another data set."""
    recorded = (record or {}).get("dataset")
    if not isinstance(recorded, str) or not recorded:
        logger.info("--dataset is unset and %s records no training data: evaluating on %s.", model_spec,
                    DEFAULT_DATASET)  # fmt: skip
        return config.with_changes(dataset=DEFAULT_DATASET)
    path = Path(recorded).expanduser()
    local = record.get("dataset_is_local")  # (None: a record of an earlier release, which did not say)
    if not path.exists() and (local or (local is None and not _looks_like_hub_id(recorded))):
        raise ConfigError(
            f"--dataset is unset and {model_spec} was trained on the data set at {recorded!r}, which is not here "
            "(a relative path is read from where its run started): pass --dataset <your copy of it>."
        )
    if local and not path.is_absolute() and record.get("row_digests"):
        # a relative path names another folder from another working directory: its training rows tell
        _, why = redraw_training_rows(record, recorded, record.get("dataset_config"))
        if why:
            raise ConfigError(
                f"--dataset is unset and {model_spec} was trained on the data set at {recorded!r} (a relative path, "
                f"read from where its run started), but {recorded!r} here ({path.resolve()}) is not that data set: "
                f"the model's training rows do not draw again from it ({why}). Pass --dataset <your copy of it>."
            )
    defaults = field_defaults()
    adopted = {
        name: record[name]
        for name in _READING_FIELDS
        if record.get(name) is not None and getattr(config, name) == defaults[name] and record[name] != defaults[name]
    }
    logger.info("--dataset is unset: evaluating on %s, the data set %s was trained on (its record)%s.", recorded,
                model_spec, f", with {options_text(adopted)}" if adopted else "")  # fmt: skip
    return config.with_changes(dataset=recorded, **adopted)


def _own_validation_carve(config: RefilledConfig, record: dict[str, Any], model_spec: str) -> RefilledConfig:
    """``config`` with the validation split the model was selected on, where the user left
    the validation fields (and, for a carve, the data seed) at their defaults (any other
    values are checked, and refused if they name another split): its ``--validation_split``,
    or the validation fraction and data seed of its carve."""
    defaults = field_defaults()
    validation_untouched = config.validation_fraction == DEFAULT_VALIDATION_FRACTION and config.validation_split is None
    untouched = validation_untouched and config.data_seed is None and config.seed == defaults["seed"]
    own_split = record.get("validation_split")
    if validation_untouched and isinstance(own_split, str):  # a split of its own: no seed draws it
        logger.info("Evaluating the validation split %s was selected on (--validation_split %s, from its record).",
                    model_spec, own_split)  # fmt: skip
        return config.with_changes(validation_fraction=0.0, validation_split=own_split)
    fraction, seed = record.get("validation_fraction"), record.get("seed")
    if not untouched or not fraction or seed is None:
        return config
    if (fraction, seed) != (config.validation_fraction, config.seed):
        logger.info("Evaluating the validation split %s was selected on (--validation_fraction %g, data seed %d, "
                    "from its record).", model_spec, fraction, seed)  # fmt: skip
    return config.with_changes(validation_fraction=fraction, data_seed=int(seed))


def _checkpoint_run_image_size(checkpoint: Path) -> int | None:
    """The ``--image_size`` of the refilled-hf run a checkpoint lies in (its ``run.json``),
    None where it set none (the model's own size) or the checkpoint is not a run's."""
    run = run_folder(checkpoint)
    if run is None:
        return None
    try:
        size = json.loads((run / MANIFEST).read_text())["identity"].get("image_size")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged record: the size is then the user's to give
    return int(size) if isinstance(size, int) and size > 0 else None


def _checkpoint_record(checkpoint: Path) -> dict[str, Any] | None:
    """For a checkpoint a stage of a refilled-hf run wrote: refuse one of stage 1 (it trains
    the embedding only, so its classifier is untrained and its top-1 would be that of a
    random head); return the training-data record of the run's export, if it has one, so
    that a validation split is checked as for the exported model."""
    run = run_folder(checkpoint)
    if run is None:
        return None
    if checkpoint.resolve().is_relative_to(run / "stage1"):
        raise ConfigError(
            f"{checkpoint} is a checkpoint of REFILLED's stage 1, which trains the embedding only: its classifier "
            f"is untrained, so its top-1 would be meaningless. Stage 1 is measured by nearest class mean "
            f"(stage1.test_ncm_top1 in {run / 'results.json'}); evaluate the exported model "
            f"(--model local-dir:{run / 'model'}) or a stage-2 checkpoint instead."
        )
    return training_data_record(f"local-dir:{run / 'model'}")  # None where the run has not exported yet


def _trained_model(model_spec: str, checkpoint: str | None, image_size: int | None = None):
    """The model to evaluate, with trained weights (built for ``image_size`` where its input
    size is fixed): a registered timm name without ``checkpoint`` loads timm's pretrained
    weights, and is refused where it has none (its top-1 would be that of a random
    initialization)."""
    if checkpoint is not None or model_spec.startswith(("local-dir:", "hf-hub:")):
        return load_timm_model(model_spec, checkpoint=checkpoint, image_size=image_size)
    try:
        return load_timm_model(model_spec, pretrained=True, image_size=image_size)
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - timm: no pretrained weights, or none reachable offline
        raise ModelLoadError(
            f"{model_spec!r} is a timm model name and no --checkpoint was given, so its weights would be timm's "
            f"pretrained ones, which could not be loaded ({error_text(err)}). Evaluating "
            "random weights would mean nothing: pass the trained weights with --checkpoint <model.safetensors>, "
            "or the exported folder with --model local-dir:<run>/model."
        ) from err


def _warn_changed_test_split(record: dict[str, Any] | None, config: RefilledConfig, data: ClassificationData,
                             model_spec: str) -> None:  # fmt: skip
    """Warn where the test split of the data set the model records, at the path it records,
    holds other rows, labels or pixels than when the model was trained (its card's test numbers
    were measured on those): the files were changed or replaced since. ``data``'s test split
    is decoded."""
    record = record or {}
    rows = (record.get("row_digests") or {}).get("test")  # (absent from earlier releases' records)
    pixels = record.get("test_content_digest")
    if (
        (rows is None and pixels is None)
        or config.test_split != record.get("test_split")
        or config.dataset_config != record.get("dataset_config")
        or data.class_names != record.get("class_names")
        or not same_dataset(config.dataset, record.get("dataset"))
    ):
        return
    now = {"rows or labels": data.row_digests.get("test"), "pixels": data.test.content_digest}
    changed = [what for what, then in (("rows or labels", rows), ("pixels", pixels)) if then and then != now[what]]
    if changed:
        logger.warning(
            "Split %r of %s holds other %s than when %s was trained (the files were changed or replaced since): "
            "this top-1 is for other images than its model card's test numbers.",
            config.test_split, config.dataset, " and ".join(changed), model_spec,
        )  # fmt: skip


def _warn_other_precision(record: dict[str, Any] | None, config: RefilledConfig, model_spec: str) -> None:
    """Warn where the run that trained the model measured it in another precision than this
    evaluation (its card's numbers then differ from these by rounding), naming the flag."""
    measured = (record or {}).get("precision")  # (absent from earlier releases' records)
    if measured and measured != config.precision:
        flag = f"--{measured} true" if measured != "fp32" else f"--{config.precision} false"
        logger.warning(
            "%s was measured in %s by the run that trained it (its model card's numbers) and is evaluated in %s "
            "here: the numbers differ slightly. Pass %s to repeat the card's measure.",
            model_spec, measured, config.precision, flag,
        )  # fmt: skip


def evaluate_model(
    model_spec: str, config: RefilledConfig, *, checkpoint: str | None = None, split: str = "test"
) -> dict[str, Any]:
    """Top-1/top-5 accuracy of a trained model on ``split`` (``test`` or ``validation``)
    of ``config``'s data set and class selection (by default the model's own classes; with
    ``config.dataset`` None, as ``refilled-hf evaluate`` leaves it without ``--dataset``, the
    data set the model records it was trained on),
    counting each image once, the top-1 of each class (``{split}_per_class``: class name ->
    top-1 % and images), and ``data``: which images those are. Only that split is
    decoded. For ``validation``, a model that records its training data is evaluated on
    the validation split it was selected on (its ``--validation_split``, or its fraction and
    data seed, unless the config sets others, which must give the same images). A ``checkpoint`` a stage of a finished
    run wrote is treated as that run's export (its classes and record); one of stage 1 is
    refused."""
    if split not in EVALUATION_SPLITS:
        raise ConfigError(f"split must be 'test' or 'validation', got {split!r}.")
    warn_unused_fields(config, "evaluate")
    checkpoint_record = _checkpoint_record(Path(checkpoint)) if checkpoint is not None else None
    run_size = _checkpoint_run_image_size(Path(checkpoint)) if checkpoint is not None else None
    if run_size and not config.image_size:  # its weights are for that size (a ViT's position embeddings too)
        logger.info("Evaluating at %d px, the --image_size of the run that wrote %s.", run_size, checkpoint)
        config = config.with_changes(image_size=run_size)
    model = _trained_model(model_spec, checkpoint, config.image_size)
    if not model.num_classes:
        raise ConfigError(
            f"{model_spec} has no classifier (num_classes=0: an embedding model), so it has no top-1 to evaluate. "
            "To measure its embedding on your classes, run `refilled-hf probe-teacher --teacher "
            f"{model_spec}` (nearest-class-mean accuracy)."
        )
    model_cfg = getattr(model, "pretrained_cfg", None) or {}
    record = training_data_record(model_spec) if checkpoint is None else checkpoint_record
    # a run's checkpoint has no label names of its own: its run's record has the classes
    names = model_cfg.get("label_names") if checkpoint is None else (record or {}).get("class_names")
    if config.dataset is None:  # the command line's --dataset unset: the model's own data set
        config = _recorded_dataset(config, record, str(checkpoint) if checkpoint is not None else model_spec)
    if split == "validation" and record is not None:
        config = _own_validation_carve(config, record, model_spec)
    # (a checkpoint's registry cfg says nothing of the size it was trained at: its run's record does)
    trained_at = model_cfg.get("input_size") if checkpoint is None else (run_size and (run_size,))
    if config.image_size and trained_at and int(trained_at[-1]) != config.image_size:
        logger.warning(
            "--image_size %d: %s was trained at %d px, so this accuracy is for inputs of another size than its own "
            "(leave --image_size unset to evaluate at its size).", config.image_size, model_spec, int(trained_at[-1]),
        )  # fmt: skip
    if split == "test":
        _check_test_split_exists(config)
    classes = config.classes
    if classes is None and names:
        classes = [f"name:{name}" for name in names]  # by name, also where names are numbers other than ids
        logger.info("--classes is unset: evaluating on the model's own classes %s.", short_list(names))
    try:
        data = select_data(config, classes, splits=(split,))  # labels and class names, nothing decoded yet
    except UnknownClassError as err:
        if config.classes is not None or not names:
            raise
        raise ConfigError(
            f"The model's classes (its label names {short_list(names)}) are not all classes of {config.dataset!r} "
            f"({err}); pass --classes to name them in this data set."
        ) from None
    dataset = getattr(data, split)
    if dataset is None:
        raise ConfigError(f"No {split} split: set --test_split, or --validation_fraction or --validation_split.")
    if model.num_classes != data.num_classes:
        raise ConfigError(
            f"The model predicts {model.num_classes} classes but the selection has {data.num_classes}: "
            "pass the --classes the model was trained on (leave --classes unset where the model names its classes). "
            f"For some of its classes alone, read their top-1 and image counts in the output's {split}_per_class."
        )
    if names and list(names) != data.class_names:
        raise ConfigError(
            f"The model was trained on the classes {short_list(names)}, in this order, but the selection is "
            f"{short_list(data.class_names)}: pass the --classes it was trained on, in the same order."
        )
    if not names:
        logger.warning("The model records no label names: only the number of classes could be checked.")
    suspect_rows = check_evaluation_split(record, config, data, split, model_spec)
    check_forward(model, None, data_pretrained_cfg(model.pretrained_cfg, config.image_size)["input_size"],
                  student_name="model")  # fmt: skip
    check_compile(config)
    getattr(data, split).preload()  # decodes the split's images: after every check but the pixels'
    check_not_trained_on(getattr(data, split), suspect_rows, record, config, model_spec)
    if split == "test":
        _warn_changed_test_split(record, config, data, model_spec)
    _warn_other_precision(record, config, model_spec)
    data = prepare_data(config, data, model.pretrained_cfg)
    dataset = getattr(data, split)
    trainer = inference_trainer(model, config, data.num_classes)
    trainer.per_class_metrics = True
    metrics = trainer.evaluate(dataset, metric_key_prefix=split)
    metrics.pop("epoch", None)
    # by class name, beside the totals: where the model is right and on how many images
    top1, samples = metrics.pop(f"{split}_per_class_top1"), metrics.pop(f"{split}_per_class_samples")
    metrics[f"{split}_per_class"] = {
        name: {"top1": value, "samples": count} for name, value, count in zip(data.class_names, top1, samples)
    }
    # what exactly was measured, beside the numbers
    metrics["data"] = {
        "dataset": config.dataset,
        "split": data.test_split if split == "test" else data.validation_description(),
        "class_names": data.class_names,
        **({"validation_fraction": data.info["validation_fraction"], "data_seed": data.info["seed"]}
           if split == "validation" else {}),
    }  # fmt: skip
    return metrics
