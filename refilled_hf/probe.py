"""``refilled-hf probe-teacher``: how useful is a teacher's embedding for the student's
task, before distilling (nearest-class-mean accuracy on the student's validation split)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from .backbone import load_timm_model
from .config import ConfigError, RefilledConfig
from .data import short_list
from .losses import ncm_predict
from .pipeline import data_pretrained_cfg, eval_copy, inference_trainer, load_data, warn_unused_fields
from .preflight import check_compile, check_forward, load_teacher
from .provenance import teacher_training_rows, weights_training_record
from .trainer import batch_pixels

__all__ = ["probe_teacher"]

logger = logging.getLogger(__name__)


def probe_teacher(config: RefilledConfig) -> dict[str, Any]:
    """How useful is the teacher's embedding for the student's task, before distilling?

    Nearest-class-mean accuracy of the teacher's (frozen) features on the student's
    validation split, with class centres from the student's training split: a cheap
    forecast of what REFILLED can transfer. Reported with the student's data size.
    Validation images the teacher trained on (known from the record of a teacher
    exported by refilled-hf: the same split of the same data set) are left out, since
    the teacher would be measured on its own training images; each class then keeps its
    share of the validation split (its accuracy on the images left is weighted by its
    size), so the probe estimates the same quantity as without a record. A class with no
    image left is not measured (``classes_probed`` counts the measured ones).
    """
    if not config.teacher:
        raise ConfigError("probe-teacher needs --teacher.")
    if not config.has_validation:
        raise ConfigError(
            "probe-teacher evaluates on the validation split: set --validation_fraction > 0 (or --validation_split)."
        )
    warn_unused_fields(config, "probe-teacher")
    set_seed(config.seed)
    student_cfg = load_timm_model(config.student).pretrained_cfg
    input_cfg = data_pretrained_cfg(student_cfg, config.image_size)
    teacher = load_teacher(config, input_cfg)
    check_forward(None, teacher, input_cfg["input_size"])
    check_compile(config)
    data = load_data(config, config.classes, student_cfg, splits=("train", "validation"), augment_train=False)
    record = weights_training_record(config.teacher, config.teacher_checkpoint)
    taught = teacher_training_rows(record, data, data.validation_source)
    clean = torch.ones(len(data.validation), dtype=torch.bool)
    if taught is not None:
        clean = torch.from_numpy(~np.isin(data.source_rows["validation"], taught))
    if not clean.any():
        raise ConfigError(
            f"The teacher trained on every image of the student's validation split ({len(clean)}): nothing is left "
            f"to probe it on. {_carve_fix(config, record, data)}, or use a teacher trained on other images."
        )
    if not clean.all():
        logger.info("Left out %d of %d validation images: the teacher trained on them.", int((~clean).sum()),
                    len(clean))  # fmt: skip
    # (the teacher's own head may predict any classes: only its embedding is probed)
    train = eval_copy(data.train, data.eval_transform)
    trainer = inference_trainer(teacher.model, config, data.num_classes, teacher=teacher, centers_dataset=train)
    start = time.perf_counter()
    centers = trainer.compute_teacher_centers(train)
    correct = []
    with torch.no_grad():
        # the evaluation dataloader yields the split in order (gathered over processes, padding removed)
        for batch in trainer.evaluation_dataloader(data.validation):
            scores = ncm_predict(trainer.teacher(batch_pixels(batch, data.validation))[0], centers)
            hit = (scores.argmax(1) == batch["labels"]).float()
            correct.append(trainer.accelerator.gather_for_metrics(hit).cpu())
    correct = torch.cat(correct)
    if correct.numel() != clean.numel():
        raise RuntimeError(f"probe: {correct.numel()} predictions for {clean.numel()} validation images")
    # Leaving images out must not change which classes the probe weighs: each class keeps its
    # share of the validation split, measured on its images the teacher did not train on.
    labels = torch.as_tensor(data.validation.labels, dtype=torch.long)
    share = torch.bincount(labels, minlength=data.num_classes).double()
    kept = torch.bincount(labels[clean], minlength=data.num_classes).double()
    hits = torch.bincount(labels[clean], weights=correct[clean].double(), minlength=data.num_classes)
    measured = kept > 0
    probe, stderr = class_weighted_accuracy(share, kept, hits)
    return {
        "teacher": config.teacher,
        "probe_ncm_top1": 100.0 * probe,
        "probe_ncm_top1_stderr": 100.0 * stderr,
        "validation_images": int(clean.sum()),
        "validation_split": data.validation_description(),  # which images: a carve, or --validation_split
        "left_out_teacher_training_images": int((~clean).sum()),
        "classes_probed": int(measured.sum()),
        "train_images": len(data.train),
        "classes": data.num_classes,
        "shots_per_class": config.shots_per_class,
        "seconds": time.perf_counter() - start,
    }


def class_weighted_accuracy(share: torch.Tensor, kept: torch.Tensor, hits: torch.Tensor) -> tuple[float, float]:
    """The accuracy over classes weighted by their ``share`` of the split, each measured on
    its ``kept`` images (``hits`` right; a class with none kept is left out), and its standard
    error: each class a binomial proportion over its images, at the overall rate, Laplace-
    smoothed rather than each class's own (with one or two images a class's rate is 0 or 1 and
    its own variance 0, which would call a probe on a handful of images exact)."""
    measured = kept > 0
    weight = share[measured] / share[measured].sum()
    accuracy = float((weight * hits[measured] / kept[measured]).sum())
    overall = (hits[measured].sum() + 1) / (kept[measured].sum() + 2)
    return accuracy, float((weight**2 * overall * (1 - overall) / kept[measured]).sum().sqrt())


def _carve_fix(config: RefilledConfig, record: dict[str, Any], data) -> str:
    """How to validate the student on images the teacher did not train on, given the
    teacher's training-data ``record`` (which drew every image of the student's validation
    split): a carve is drawn per class selection, with its fraction and seed."""
    fraction, seed = record.get("validation_fraction") or 0.0, int(record.get("seed") or 0)
    if config.validation_split or not fraction:
        trained = "the whole split" if not fraction else "that split"
        return f"The teacher trained on {trained}: validate on a split it did not train on (--validation_split)"
    if [int(i) for i in record["source_class_ids"]] != list(data.source_class_ids):
        return (
            "A validation carve depends on the classes selected and their order, so a student on other classes "
            f"than the teacher's ({short_list(record['class_names'])}) cannot repeat it: validate on a split the "
            "teacher did not train on (--validation_split)"
        )
    return f"Carve the validation split as the teacher's was: --validation_fraction {fraction:g} --data_seed {seed}"
