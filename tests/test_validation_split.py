"""``--validation_split``: a data set's own validation split, instead of a carve from the
training split: the images it selects, its refusals, and the records, cards, `evaluate`
and `probe-teacher` that follow it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import tiny_recipe, write_image_dataset, write_random_teacher

from refilled_hf.config import DEFAULT_VALIDATION_FRACTION, ConfigError, RefilledConfig
from refilled_hf.data import DataError, EmptySplitError, load_classification_data
from refilled_hf.evaluation import evaluate_model
from refilled_hf.pipeline import run_distillation
from refilled_hf.probe import probe_teacher
from refilled_hf.provenance import teacher_training_rows


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory) -> Path:
    """The generated colours with a ``validation`` split of its own (other images: seed 1)."""
    folder = write_image_dataset(tmp_path_factory.mktemp("data") / "colors")
    other = write_image_dataset(tmp_path_factory.mktemp("other") / "colors", per_class_test=4, seed=1)
    shutil.copy(other / "test.parquet", folder / "validation.parquet")
    return folder


def _labels(folder: Path, split: str) -> np.ndarray:
    return np.asarray(pq.read_table(folder / f"{split}.parquet").column("label").to_pylist())


def test_the_validation_split_is_that_splits_images_of_the_classes_and_nothing_is_carved(three_splits):
    data = load_classification_data(str(three_splits), classes="3-5", validation_fraction=0.0,
                                    validation_split="validation", seed=0)  # fmt: skip
    val_labels = _labels(three_splits, "validation")
    expected = np.flatnonzero(np.isin(val_labels, [3, 4, 5]))
    assert np.array_equal(data.source_rows["validation"], expected) and len(expected) == 12
    assert np.array_equal(data.validation.labels, val_labels[expected] - 3)
    train_labels = _labels(three_splits, "train")
    assert np.array_equal(data.source_rows["train"], np.flatnonzero(np.isin(train_labels, [3, 4, 5])))  # all kept
    assert data.info["validation_images"] == 12 and data.info["validation_split"] == "validation"
    assert data.selection_record()["validation_split"] == "validation"
    assert data.validation_source == "validation" and data.validation_description() == "validation"
    assert data.validation.split_name == "validation"

    # the same training rows as without validation (shots drawn the same way), another identity
    none = load_classification_data(str(three_splits), classes="3-5", validation_fraction=0.0, seed=0)
    assert np.array_equal(none.source_rows["train"], data.source_rows["train"])
    assert none.fingerprint != data.fingerprint and none.row_digests["validation"] is None
    shots = dict(classes="3-5", validation_fraction=0.0, seed=0, shots_per_class=5)
    assert np.array_equal(
        load_classification_data(str(three_splits), **shots).source_rows["train"],
        load_classification_data(str(three_splits), validation_split="validation", **shots).source_rows["train"],
    )
    # a carve keeps its fingerprint and its record has no validation_split key
    carved = load_classification_data(str(three_splits), classes="3-5", validation_fraction=0.25, seed=0)
    assert "validation_split" not in carved.selection_record() and "validation_split" not in carved.info
    assert carved.validation_description() == "train (validation part)"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(validation_split="validation", validation_fraction=0.1), DataError, "both ask for a validation split"),
        (dict(validation_split="train", validation_fraction=0.0), DataError, "is the training or test split"),
        (dict(validation_split="test", validation_fraction=0.0), DataError, "is the training or test split"),
        (
            dict(validation_split="valid", validation_fraction=0.0),
            DataError,
            r"Split 'valid' not in .* fix `--validation_split`, or drop it",
        ),
        (
            dict(validation_split="validation", validation_fraction=0.0, classes="0-1"),
            EmptySplitError,
            r"Split 'validation' has no image of the selected classes .* \(--validation_split\), or drop "
            "--validation_split",
        ),
    ],
    ids=["with-a-fraction", "train", "test", "missing", "no-image-of-the-classes"],
)
def test_validation_splits_that_cannot_validate_are_refused(kwargs, error, message, three_splits, tmp_path):
    folder = three_splits
    if "classes" in kwargs:  # a validation split without classes 0 and 1
        folder = tmp_path / "d"
        shutil.copytree(three_splits, folder)
        table = pq.read_table(folder / "validation.parquet")
        keep = [i for i, v in enumerate(table.column("label").to_pylist()) if v >= 2]
        pq.write_table(table.take(keep), folder / "validation.parquet")
    with pytest.raises(error, match=message):
        load_classification_data(str(folder), **{"classes": "3-5", **kwargs})


def test_config_resolves_the_fraction_and_refuses_two_validation_splits(tmp_path):
    out = str(tmp_path / "o")
    plain = RefilledConfig(output_dir=out)
    assert plain.validation_fraction == DEFAULT_VALIDATION_FRACTION and plain.has_validation
    own = RefilledConfig(output_dir=out, validation_split="validation")
    assert own.validation_fraction == 0.0 and own.has_validation
    assert own.distill_weight_candidates() == [1.0, 10.0]  # lambda is still chosen on validation
    assert RefilledConfig(output_dir=out, validation_split="none").validation_split is None
    assert not RefilledConfig(output_dir=out, validation_fraction=0.0).has_validation
    assert RefilledConfig(output_dir=out, validation_split="validation", validation_fraction=0.0).has_validation
    with pytest.raises(ConfigError, match="--validation_split 'validation' and --validation_fraction 0.2 both"):
        RefilledConfig(output_dir=out, validation_split="validation", validation_fraction=0.2)
    for split, which in (("train", "train"), ("test", "test")):
        with pytest.raises(ConfigError, match=f"--validation_split '{split}' is the {which} split"):
            RefilledConfig(output_dir=out, validation_split=split)
    # what needs a validation split accepts this one
    RefilledConfig(output_dir=out, validation_split="validation", load_best_model_at_end=True, eval_strategy="epoch",
                   save_strategy="epoch")  # fmt: skip


@pytest.mark.slow
def test_a_run_validates_on_the_split_and_evaluate_follows_its_record(three_splits, tmp_path, caplog):
    recipe = tiny_recipe(three_splits, tmp_path / "run", method="ce", stage2_epochs=1, validation_fraction=None,
                         validation_split="validation")  # fmt: skip
    results = run_distillation(RefilledConfig(**recipe))
    assert results["final"]["validation_samples"] == 12 and results["final"]["test_samples"] == 18
    assert results["data"]["validation_split"] == "validation" and results["data"]["train_images"] == 36
    model = tmp_path / "run" / "model"
    record = json.loads((model / "config.json").read_text())["refilled_hf_training_data"]
    assert record["validation_split"] == "validation" and record["validation_fraction"] == 0.0
    card = (model / "README.md").read_text()
    assert "12 validation images from the `validation` split" in card and "carved" not in card

    # evaluate --split validation with no validation field given: the record's split, the run's number
    plain = {k: v for k, v in recipe.items() if k not in ("validation_fraction", "validation_split", "classes")}
    config = RefilledConfig(**{**plain, "output_dir": str(tmp_path / "e")})
    with caplog.at_level(logging.INFO, logger="refilled_hf.evaluation"):
        metrics = evaluate_model(f"local-dir:{model}", config, split="validation")
    assert "(--validation_split validation, from its record)" in caplog.text
    assert metrics["validation_samples"] == 12 and metrics["data"]["split"] == "validation"
    assert metrics["validation_top1"] == pytest.approx(results["final"]["validation_top1"])
    # a carve is not the split it was selected on; its own split as the test split is optimistic
    carve = RefilledConfig(**{**plain, "output_dir": str(tmp_path / "e"), "validation_fraction": 0.25})
    with pytest.raises(ConfigError, match="pass --validation_split validation with the data set"):
        evaluate_model(f"local-dir:{model}", carve, split="validation")
    own_as_test = RefilledConfig(**{**plain, "output_dir": str(tmp_path / "e"), "test_split": "validation"})
    with pytest.raises(ConfigError, match=r"is the split .* was selected on \(its --validation_split\)"):
        evaluate_model(f"local-dir:{model}", own_as_test)


def test_probe_leaves_out_the_images_a_teacher_trained_on_in_the_validation_split(three_splits):
    # a teacher trained on the `validation` split's classes 3-5; the student validates on that split
    teacher = load_classification_data(str(three_splits), classes="3-5", train_split="validation",
                                       test_split=None, validation_fraction=0.0, seed=0)  # fmt: skip
    record = teacher.selection_record()
    student = load_classification_data(str(three_splits), classes="3-5", validation_fraction=0.0,
                                       validation_split="validation", seed=0)  # fmt: skip
    taught = teacher_training_rows(record, student, student.validation_source)
    assert taught is not None and np.isin(student.source_rows["validation"], taught).all()
    assert teacher_training_rows(record, student) is None  # it never saw the training split


@pytest.mark.slow
def test_probe_teacher_runs_on_the_validation_split(three_splits, tmp_path):
    teacher = write_random_teacher(tmp_path / "t")
    recipe = tiny_recipe(three_splits, tmp_path / "p", validation_fraction=None, validation_split="validation",
                         teacher=f"local-dir:{teacher}")  # fmt: skip
    result = probe_teacher(RefilledConfig(**recipe))
    assert result["validation_images"] == 12 and result["left_out_teacher_training_images"] == 0
    assert result["validation_split"] == "validation"
    assert result["train_images"] == 36


@pytest.mark.parametrize(
    ("split", "kwargs", "fix"),
    [
        ("validation", dict(validation_split="validation", validation_fraction=0.0),
         r"Name a labelled split with --validation_split, or drop --validation_split\.$"),
        ("test", dict(), r"Name a labelled split with --test_split, or pass `--test_split none`\.$"),
    ],
)  # fmt: skip
def test_an_unlabelled_split_is_refused_naming_the_option_that_chose_it(split, kwargs, fix, three_splits, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(three_splits, folder)
    table = pq.read_table(folder / f"{split}.parquet")
    index = table.schema.get_field_index("label")
    table = table.set_column(index, table.schema.field("label"), [[-1] * table.num_rows])  # the Hub's "no label"
    pq.write_table(table, folder / f"{split}.parquet")
    with pytest.raises(DataError, match=rf"Split '{split}' is unlabelled: every label in 'label' is -1.*{fix}"):
        load_classification_data(str(folder), classes="3-5", **kwargs)


@pytest.mark.slow
def test_a_carved_model_is_measured_on_another_split_as_a_test_split(three_splits, tmp_path):
    recipe = tiny_recipe(three_splits, tmp_path / "run", method="ce", stage2_epochs=1)  # validation carved
    run_distillation(RefilledConfig(**recipe))
    model = f"local-dir:{tmp_path / 'run' / 'model'}"
    other = RefilledConfig(**{**recipe, "output_dir": str(tmp_path / "e"), "validation_fraction": None,
                              "validation_split": "validation"})  # fmt: skip
    with pytest.raises(ConfigError, match="not the validation accuracy .* with --split test --test_split validation"):
        evaluate_model(model, other, split="validation")
    held_out = evaluate_model(model, RefilledConfig(**{**recipe, "output_dir": str(tmp_path / "e"),
                                                       "test_split": "validation"}))  # fmt: skip
    assert held_out["test_samples"] == 12 and held_out["data"]["split"] == "validation"


def test_a_carving_run_says_the_data_sets_own_validation_split_is_unused(three_splits, caplog):
    with caplog.at_level(logging.INFO, logger="refilled_hf.data"):
        load_classification_data(str(three_splits), classes="3-5", validation_fraction=0.25, decode=False)
    assert "has a 'validation' split, which this run does not use" in caplog.text
    assert "Pass --validation_split validation to validate on it instead." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="refilled_hf.data"):
        load_classification_data(str(three_splits), classes="3-5", validation_fraction=0.0,
                                 validation_split="validation", decode=False)  # fmt: skip
        load_classification_data(str(three_splits), classes="3-5", validation_fraction=0.0, decode=False)
    assert "which this run does not use" not in caplog.text
