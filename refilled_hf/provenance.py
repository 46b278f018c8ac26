"""What an exported model records of the data it was trained on, and what reads it.

``export_model`` writes ``ClassificationData.selection_record()`` under the
``config.json`` key :data:`~refilled_hf.hub.TRAINING_DATA_KEY`: data set, splits,
classes, validation fraction, data seed, shots and digests of the training and
validation rows. ``evaluate`` uses it to default the classes and to refuse a validation
split that is not the model's own; ``distill`` and ``probe-teacher`` use a teacher's
record to say when the student's validation images may be the teacher's training images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .data import short_list
from .hub import TRAINING_DATA_KEY

__all__ = ["same_dataset", "teacher_validation_overlap", "training_data_record", "warn_teacher_validation_overlap"]

logger = logging.getLogger(__name__)


def training_data_record(model_spec: str | None) -> dict[str, Any] | None:
    """The training-data record in the ``config.json`` of a ``local-dir:`` or ``hf-hub:``
    model (None for a registered timm name, or a model exported without one)."""
    config = None
    if model_spec and model_spec.startswith("local-dir:"):
        path = Path(model_spec[len("local-dir:") :]) / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else None
    elif model_spec and model_spec.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = model_spec[len("hf-hub:") :].partition("@")
        try:  # timm has just fetched this file to build the model: it is in the local cache
            config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision or None)).read_text())
        except Exception as err:  # noqa: BLE001 - any failure means: no record to check against
            logger.warning("Could not read config.json of %s (%s): its training data is unknown.", model_spec, err)
    record = (config or {}).get(TRAINING_DATA_KEY)
    return record if isinstance(record, dict) else None


def same_dataset(a: str | None, b: str | None) -> bool:
    """Whether two ``--dataset`` values name the same data set (a local path may be
    written relative or absolute)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def teacher_validation_overlap(record: dict[str, Any] | None, data) -> list[str]:
    """The student's classes whose validation images (carved from ``data``'s training
    split) may be among the teacher's training images, by the teacher's ``record``:
    same data set and split, shared classes, and not the very same validation rows."""
    if record is None or data.row_digests.get("validation") is None:
        return []
    if record.get("train_split") != data.train_split or not same_dataset(record.get("dataset"), data.dataset_name):
        return []
    if (record.get("row_digests") or {}).get("validation") == data.row_digests["validation"]:
        return []  # the teacher held out exactly these images
    taught = set(record.get("class_names") or [])
    return [name for name in data.class_names if name in taught]


def warn_teacher_validation_overlap(teacher_spec: str | None, data) -> list[str]:
    """Log (and return) :func:`teacher_validation_overlap` for the teacher ``teacher_spec``."""
    shared = teacher_validation_overlap(training_data_record(teacher_spec), data)
    if shared:
        logger.warning(
            "The teacher was trained on split %r of this data set, on %d of the student's classes %s: the student's "
            "validation images of those classes can be among the teacher's training images, so validation numbers "
            "(the teacher probe, the choice of lambda, model selection) are optimistic there; test numbers are not "
            "affected.", data.train_split, len(shared), short_list(shared),
        )  # fmt: skip
    return shared
