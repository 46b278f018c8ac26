"""What an exported model records of the data it was trained on, and what reads it.

``export_model`` writes ``ClassificationData.selection_record()`` under the
``config.json`` key :data:`~refilled_hf.hub.TRAINING_DATA_KEY`: data set, splits,
classes, validation fraction, data seed, shots and digests of the training and
validation rows. ``evaluate`` uses it to default the classes and to refuse a validation
split that is not the model's own; ``probe-teacher`` uses a teacher's record to leave out
the student's validation images the teacher trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import exported_config
from .data import DataError, load_classification_data
from .hub import TRAINING_DATA_KEY
from .rundir import MANIFEST, recorded_outputs

__all__ = [
    "redraw_training_rows",
    "run_folder",
    "same_dataset",
    "teacher_training_rows",
    "training_data_record",
    "weights_training_record",
]

logger = logging.getLogger(__name__)


def training_data_record(model_spec: str | None) -> dict[str, Any] | None:
    """The training-data record in the ``config.json`` of a ``local-dir:`` or ``hf-hub:``
    model (None for a registered timm name, or a model exported without one)."""
    record = (exported_config(model_spec) or {}).get(TRAINING_DATA_KEY)
    return record if isinstance(record, dict) else None


def run_folder(checkpoint: str | Path) -> Path | None:
    """The refilled-hf run folder (the one with ``run.json``) that wrote the checkpoint file:
    the nearest above it whose ``run.json`` lists the entry holding the file among what its
    run writes. A run may be written into a folder that holds other files, such as a teacher's
    export (``--output_dir`` of the teacher's ``model/``): it does not own them, and its record
    is not theirs."""
    path = Path(checkpoint).resolve()
    for folder in path.parents:
        if not (folder / MANIFEST).is_file():
            continue
        outputs = recorded_outputs(folder)  # (None: nothing shows what it owns)
        if outputs is None or path.relative_to(folder).parts[0] in outputs:
            return folder
    return None


def weights_training_record(model_spec: str | None, checkpoint: str | Path | None = None) -> dict[str, Any] | None:
    """The training-data record of the weights ``model_spec`` (with ``checkpoint``, if
    given) loads: the model's own, or, for a checkpoint that a stage of a refilled-hf run
    wrote, the record of that run's export (every stage of a run trains on the same
    images). None where nothing records it (another checkpoint, a run not exported yet)."""
    if checkpoint is None:
        return training_data_record(model_spec)
    run = run_folder(checkpoint)
    return None if run is None else training_data_record(f"local-dir:{run / 'model'}")


def same_dataset(a: str | None, b: str | None) -> bool:
    """Whether two ``--dataset`` values name the same data set (a local path may be
    written relative or absolute)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def redraw_training_rows(record: dict[str, Any], dataset_name: str, dataset_config: str | None = None,
                         split: str | None = None) -> tuple[np.ndarray | None, str]:  # fmt: skip
    """The rows of split ``split`` (default: the record's training split) of data set
    ``dataset_name`` that a model trained on, drawn again from its ``record`` (the selection
    is seeded, so it reproduces) and checked against the record's digest, which covers the
    rows and their labels (no image is decoded): ``(rows, "")``, or ``(None, why)`` where
    they do not reproduce (another data set, or one changed since)."""
    try:
        taught = load_classification_data(
            dataset_name,
            dataset_config=dataset_config,
            classes=[int(i) for i in record["source_class_ids"]],
            train_split=split or record["train_split"],
            test_split=None,
            image_column=record.get("image_column"),
            label_column=record.get("label_column"),
            shots_per_class=record.get("shots_per_class"),
            validation_fraction=record.get("validation_fraction") or 0.0,
            seed=int(record.get("seed") or 0),
            splits=(),
        )
        if taught.row_digests["train"] == record["row_digests"]["train"]:
            return taught.source_rows["train"], ""
        return None, "other rows or labels"
    except (DataError, KeyError, TypeError, ValueError) as err:
        return None, str(err)


def teacher_training_rows(record: dict[str, Any] | None, data, split: str | None = None) -> np.ndarray | None:
    """The rows of split ``split`` of ``data``'s data set (default: its training split) that
    a teacher trained on, drawn again from its ``record`` (:func:`redraw_training_rows`): a
    teacher trained on a copy of this data set under another name (a Hub id and a local
    folder) is recognised too.
    None where the teacher trained on other data, or (with a warning, where the record names
    this data set) where its selection does not reproduce."""
    split = split or data.train_split
    if record is None or record.get("train_split") != split:
        return None
    rows, why = redraw_training_rows(record, data.dataset_name, data.dataset_config, split)
    if rows is not None:
        return rows
    if same_dataset(record.get("dataset"), data.dataset_name):
        logger.warning(
            "The teacher was trained on split %r of this data set, but its training images could not be drawn "
            "again from its record (%s): numbers that evaluate the teacher on this split may include images it "
            "trained on.", split, why,
        )  # fmt: skip
    return None
