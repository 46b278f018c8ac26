"""Bad input is rejected before any training, with a message naming the problem and the fix.
One test per case; each also checks that no stage was started."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import timm
import torch
import yaml
from helpers import CLASS_NAMES, deny_access, tiny_recipe, write_image_dataset, write_random_teacher
from safetensors.torch import save_file

from refilled_hf.backbone import ModelLoadError, load_timm_model
from refilled_hf.cli import CliError, parse_config
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.data import DataError, load_classification_data
from refilled_hf.evaluation import evaluate_model
from refilled_hf.hub import export_model
from refilled_hf.pipeline import load_data, run_distillation
from refilled_hf.preflight import check_mining
from refilled_hf.probe import probe_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return f"local-dir:{write_random_teacher(tmp_path_factory.mktemp('t') / 'model')}"


def rejected(recipe: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        run_distillation(RefilledConfig(**recipe))
    out = Path(recipe["output_dir"])
    started = [p for p in out.rglob("*") if p.is_dir()] if out.exists() else []
    assert not started, f"work started before the error: {started}"


def test_unknown_student_model(data_dir, tmp_path):
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="ce", student="resnet19"), ModelLoadError,
             r"Unknown timm model 'resnet19'\. Did you mean .*resnet18")  # fmt: skip


def test_unknown_teacher_model(data_dir, tmp_path):
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher="cifar_wrn_16_3"), ModelLoadError,
             "Unknown timm model 'cifar_wrn_16_3'")  # fmt: skip


def test_a_folder_or_file_given_as_a_model_name_is_told_how_to_pass_it(data_dir, tmp_path, teacher):
    folder = teacher[len("local-dir:") :]
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=folder), ModelLoadError,
             f"'{folder}' is a folder, not a timm model name: pass it as 'local-dir:{folder}'")  # fmt: skip
    weights = f"{folder}/model.safetensors"
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="ce", student=weights), ModelLoadError,
             "is a file, not a timm model name: give the model's timm name")  # fmt: skip
    # a run's output_dir, with or without local-dir:, is named with its export (it was told to pass
    # the run folder itself as local-dir:, which then had no config.json)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=str(run)), ModelLoadError,
             f"'{run}' is a run folder, not a timm model name: its model is 'local-dir:{run / 'model'}'")  # fmt: skip
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=f"local-dir:{run}"), ModelLoadError,
             f"no config.json in .* It is a run folder: its model is 'local-dir:{run / 'model'}'")  # fmt: skip


def test_a_transformers_model_folder_is_refused_as_not_a_timm_model(data_dir, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, image_size=16,
                       patch_size=8, num_labels=3)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    for spec in (f"local-dir:{tmp_path / 'vit'}", str(tmp_path / "vit")):  # (the prefix forgotten: said the same)
        recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=spec)
        rejected(recipe, ModelLoadError, r"holds a transformers model \(ViTForImageClassification\), not a timm one")


def test_a_model_folder_given_as_a_checkpoint_is_told_to_be_a_local_dir_model(data_dir, tmp_path, teacher):
    folder = teacher[len("local-dir:") :]
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher="cifar_wrn_16_2",
                         teacher_checkpoint=folder)  # fmt: skip
    rejected(recipe, ModelLoadError, f"is a folder; a checkpoint is one weights file .* 'local-dir:{folder}'")
    # a run folder: its export; a stage's checkpoint-N folder: the weights file in it
    import shutil

    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    checkpoint = run / "stage2" / "checkpoint-9"
    checkpoint.mkdir(parents=True)
    shutil.copy(run / "model" / "model.safetensors", checkpoint)
    for given, fix in ((run, f"pass it as 'local-dir:{run / 'model'}', with no checkpoint"),
                       (checkpoint, f"pass its weights file, {checkpoint / 'model.safetensors'}")):  # fmt: skip
        recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher="cifar_wrn_16_2",
                             teacher_checkpoint=str(given))  # fmt: skip
        rejected(recipe, ModelLoadError, re.escape(fix))


def test_a_model_or_checkpoint_this_user_cannot_read_is_named_with_its_mode_owner_and_fix(
    data_dir, tmp_path, teacher, monkeypatch
):
    """safetensors reports a file it may not open as missing; exported weights are often
    readable by their owner alone (safetensors 0.8 writes them so)."""
    weights = Path(teacher[len("local-dir:") :]) / "model.safetensors"
    deny_access(monkeypatch, weights)
    fix = r"exists but this user cannot read it \(mode -rw\S+, owner \S+; .*\): ask its owner .*\(chmod a\+r\)"
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=teacher), ModelLoadError,
             f"model.safetensors {fix}")  # fmt: skip
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher="cifar_wrn_16_2",
                         teacher_checkpoint=str(weights))  # fmt: skip
    rejected(recipe, ModelLoadError, f"Checkpoint .*model.safetensors {fix}")


def test_teacher_checkpoint_missing(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher="cifar_wrn_16_1",
                         teacher_checkpoint=str(tmp_path / "missing.safetensors"))  # fmt: skip
    rejected(recipe, ModelLoadError, "does not exist: check the path")


def test_teacher_checkpoint_unreadable(data_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher="cifar_wrn_16_1",
                         teacher_checkpoint=str(bad))  # fmt: skip
    rejected(recipe, ModelLoadError, "could not be read")


def test_teacher_checkpoint_of_another_architecture(data_dir, tmp_path):
    path = tmp_path / "wrn16_1.safetensors"
    save_file(timm.create_model("cifar_wrn_16_1", num_classes=3).state_dict(), str(path))
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher="cifar_wrn_16_2",
                         teacher_checkpoint=str(path))  # fmt: skip
    rejected(recipe, ModelLoadError, "does not match the architecture 'cifar_wrn_16_2'")


def test_data_set_not_found(tmp_path):
    rejected(tiny_recipe(tmp_path / "no-such-folder", tmp_path / "o", method="ce"), DataError, "not found")


def test_image_column_missing(tmp_path):
    odd = write_image_dataset(tmp_path / "odd", per_class_train=4, per_class_test=1, image_column="pixels")
    rejected(tiny_recipe(odd, tmp_path / "o", method="ce"), DataError, "No image column found.*--image_column")


def test_label_column_ambiguous(tmp_path):
    both = write_image_dataset(tmp_path / "both", per_class_train=4, per_class_test=1, label_column="fine_label")
    import datasets

    for split in ("train", "test"):
        path = both / f"{split}.parquet"
        ds = datasets.load_dataset("parquet", data_files=str(path))["train"]
        ds.add_column("label", ds["fine_label"]).to_parquet(str(path))
    rejected(tiny_recipe(both, tmp_path / "o", method="ce"), DataError, "Ambiguous label column.*--label_column")


@pytest.mark.parametrize(
    "classes,message",
    [(" ", "class selection is empty"), ("3-9", r"out of range"), ("red,unicorn", "Unknown class 'unicorn'")],
    ids=["empty", "out-of-range", "unknown-name"],
)
def test_bad_class_selection(classes, message, data_dir, tmp_path):
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="ce", classes=classes), DataError, message)


def test_shots_per_class_larger_than_a_class(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="ce", shots_per_class=10)  # 9 left after validation
    rejected(recipe, DataError, "shots_per_class=10.*lower it")


def test_validation_fraction_leaving_a_class_empty(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="ce", validation_fraction=0.99)
    rejected(recipe, DataError, r"--validation_fraction 0.99 leaves no training image to 3 classes .*'(\w+) \(12\)'.*"
             "at least 2; lower --validation_fraction, set it to 0")  # fmt: skip


@pytest.fixture(scope="module")
def partial_test_split(tmp_path_factory) -> Path:
    """The generated data with a test split that holds no image of classes 4 and 5."""
    folder = write_image_dataset(tmp_path_factory.mktemp("partial") / "data")
    table = pq.read_table(folder / "test.parquet")
    pq.write_table(table.filter(pc.less(table.column("label"), 4)), folder / "test.parquet")
    return folder


def test_a_test_split_without_the_classes_is_refused(partial_test_split, tmp_path):
    """Its top-1 would read 0 % over 0 images (it did, exit 0)."""
    recipe = tiny_recipe(partial_test_split, tmp_path / "o", method="ce", classes="4-5")
    rejected(recipe, DataError, r"Split 'test' has no image of the selected classes.*--test_split none")
    model = write_random_teacher(tmp_path / "m", label_names=["cyan", "magenta"])
    config = RefilledConfig(**{**recipe, "classes": None, "output_dir": str(tmp_path / "e")})
    with pytest.raises(DataError, match=r"^Split 'test' has no image of the selected classes"):
        evaluate_model(f"local-dir:{model}", config)


def test_a_test_split_missing_some_classes_says_so(partial_test_split, tmp_path, caplog):
    recipe = tiny_recipe(partial_test_split, tmp_path / "o", method="ce", classes="3-5",
                         stage2_epochs=1)  # fmt: skip
    with caplog.at_level("WARNING", logger="refilled_hf.data"):
        results = run_distillation(RefilledConfig(**recipe))
    assert "Split 'test' has no image of 2 of the 3 selected classes (['cyan', 'magenta'])" in caplog.text
    assert results["final"]["test_samples"] == 6  # the class that is there, every image counted
    # results.json and the model card say which classes the test accuracy leaves out
    assert results["data"]["test_classes_without_images"] == ["cyan", "magenta"]
    card = (tmp_path / "o" / "model" / "README.md").read_text()
    assert (
        "(6 images), once, at the end of training. The split has no image of 2 of the 3 classes (cyan, "
        "magenta): its accuracy measures the others only." in card
    )
    complete = run_distillation(RefilledConfig(**{**recipe, "classes": "1-3", "output_dir": str(tmp_path / "c")}))
    assert "test_classes_without_images" not in complete["data"]


@pytest.mark.parametrize(
    "selection,message",
    [
        ("purple", "--teacher_classes 'purple': Unknown class"),
        ("0-9", "--teacher_classes '0-9': Classes .* out of range"),
    ],
)
def test_teacher_classes_that_are_not_classes_of_the_data(selection, message, data_dir, teacher, tmp_path):
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="rkd", teacher=teacher, teacher_classes=selection),
             ConfigError, message)  # fmt: skip


def test_kd_across_label_spaces(data_dir, teacher, tmp_path):
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="kd", teacher=teacher, teacher_classes=None), ConfigError,
             r"needs the teacher to predict each of the student's classes, but the teacher's 4 classes .* lack 3 of "
             r"the student's 3: \['yellow', 'cyan', 'magenta'\]\. .*--method refilled")  # fmt: skip
    named = f"local-dir:{write_random_teacher(tmp_path / 'named', label_names=CLASS_NAMES[2:6])}"
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="kd", teacher=named), ConfigError,
             r"--teacher_classes '0-2' names \['red', 'green', 'blue'\], but the teacher predicts \['blue', 'yellow', "
             r"'cyan', 'magenta'\]: leave --teacher_classes unset")  # fmt: skip


def test_kd_from_a_teacher_without_classifier_says_it_has_no_logits(data_dir, tmp_path):
    headless = export_model(timm.create_model("cifar_wrn_16_1", num_classes=0), tmp_path / "t", label_names=[])
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="kd", teacher=f"local-dir:{headless}"), ConfigError,
             r"needs the teacher's logits, but .* has no classifier \(num_classes=0.*--method refilled")  # fmt: skip


def test_evaluating_a_model_without_classifier_points_to_probe_teacher(data_dir, tmp_path):
    headless = export_model(timm.create_model("cifar_wrn_16_1", num_classes=0), tmp_path / "t", label_names=[])
    config = RefilledConfig(**tiny_recipe(data_dir, tmp_path / "e", method="ce", classes=None))
    with pytest.raises(ConfigError, match=r"has no classifier \(num_classes=0.*refilled-hf probe-teacher --teacher"):
        evaluate_model(f"local-dir:{headless}", config)


def test_kd_matches_a_teacher_of_the_same_classes_in_another_order_or_of_more_classes(data_dir, tmp_path):
    """KD pairs each student class with the teacher's output of that name: a teacher of the
    same classes in another order (refused before, with the --classes to pass), and one of
    more classes (refused before, as another label space), train with KD on those outputs."""
    names = [CLASS_NAMES[5], CLASS_NAMES[3], CLASS_NAMES[4]]
    permuted = f"local-dir:{write_random_teacher(tmp_path / 't', label_names=names)}"
    common = dict(method="kd", teacher_classes=None, max_steps=1)
    results = run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "o", teacher=permuted, **common)))
    assert results["class_names"] == CLASS_NAMES[3:6] and results["kd_teacher_columns"] == [1, 2, 0]
    card = (tmp_path / "o" / "model" / "README.md").read_text()
    assert "KD matched its softmax over its outputs for the student's classes (1, 2, 0, in the student's order)" in card
    in_order = run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "ok", teacher=permuted,
                                                             classes="5,3,4", **common)))  # fmt: skip
    assert in_order["class_names"] == names and "kd_teacher_columns" not in in_order
    wide = f"local-dir:{write_random_teacher(tmp_path / 'w', label_names=CLASS_NAMES)}"  # all six classes
    results = run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "wide", teacher=wide, **common)))
    assert results["kd_teacher_columns"] == [3, 4, 5]
    assert json.loads((tmp_path / "wide" / "run.json").read_text())["identity"]["kd_teacher_columns"] == [3, 4, 5]
    # a checkpoint that names no classes: --teacher_classes says which outputs are which, or the run is refused
    loose = tmp_path / "loose.safetensors"
    save_file(timm.create_model("cifar_wrn_16_1", num_classes=6).state_dict(), str(loose))
    nameless = dict(common, teacher="cifar_wrn_16_1", teacher_checkpoint=str(loose))
    named_by_ids = {**nameless, "teacher_classes": "5,4,3,2,1,0"}
    results = run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "nameless", **named_by_ids)))
    assert results["kd_teacher_columns"] == [2, 1, 0]
    rejected(tiny_recipe(data_dir, tmp_path / "unknown", **nameless), ConfigError,
             r"the teacher predicts 6 classes and the student 3, and nothing says which of the teacher's outputs are "
             r"the student's classes .* Pass --teacher_classes")  # fmt: skip


@pytest.mark.parametrize("field", ["tau1", "tau2", "kd_tau", "margin", "distill_weight", "stage1_weight"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_positive_temperature_margin_or_weight(field, value, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=f"`{field}` must be > 0"):
        RefilledConfig(**tiny_recipe(data_dir, tmp_path / "o", **{field: value}))


def test_batch_too_small_to_mine(data_dir, teacher, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=teacher, per_device_train_batch_size=2)
    rejected(recipe, ConfigError, "can never hold a semi-hard triplet")


def test_fewer_than_two_images_per_class(data_dir, teacher, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=teacher, shots_per_class=1)
    rejected(recipe, ConfigError, "fewer than 2 training images.*shots_per_class")
    recipe = tiny_recipe(data_dir, tmp_path / "o", method="refilled", teacher=teacher, validation_fraction=0.95)
    rejected(recipe, ConfigError, r"fewer than 2 training images.*carve \(--validation_fraction 0.95\) leaves too few")


@pytest.mark.parametrize("method", ["refilled", "ce", "kd"])
def test_single_class(data_dir, teacher, tmp_path, method):
    """A one-class classifier (ce reported 100 % test top-1 and exited 0) or probe is refused."""
    recipe = tiny_recipe(data_dir, tmp_path / "o", method=method, teacher=teacher, classes="4")
    if method == "kd":
        recipe["teacher_classes"] = None
    rejected(recipe, DataError, r"The class selection has one class \(cyan\): .* Select at least two classes")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("method", "fitnet", "Unknown method 'fitnet'"),
        ("stage1_variant", "quadruplet", "Unknown stage1_variant 'quadruplet'"),
        ("centers", "local", "Unknown centers 'local'"),
    ],
)
def test_unknown_names(field, value, message, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(**tiny_recipe(data_dir, tmp_path / "o", **{field: value}))


def test_yaml_key_that_is_not_a_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "refilled", "lamda": 10}))
    with pytest.raises(CliError, match="'lamda'"):
        parse_config((RefilledConfig,), ["--config", str(path)], "t")


def test_missing_teacher(data_dir, tmp_path):
    rejected(tiny_recipe(data_dir, tmp_path / "o", method="rkd"), ConfigError, "needs a teacher")


def test_labels_are_checked_against_the_model_head():
    from refilled_hf.losses import local_classifier_loss

    with pytest.raises(ValueError, match="labels"):
        local_classifier_loss(torch.randn(2, 3), torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 3]))


@pytest.mark.parametrize(
    ("batch", "accumulation", "images", "warned"),
    [
        (512, 1, 2500, "give 5 optimizer step(s)"),
        (128, 4, 2500, "give 5"),
        (128, 1, 2500, None),
        (64, 1, 50, None),  # the quickstart: one step per epoch, at a batch the measurements support
        (256, 1, 500, "give 2 optimizer step(s)"),
    ],
)
def test_few_optimizer_steps_per_epoch_are_warned(batch, accumulation, images, warned, tmp_path, caplog):
    from refilled_hf.preflight import warn_few_steps

    sizes = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation}
    config = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, **sizes)
    with caplog.at_level("WARNING", logger="refilled_hf.preflight"):
        warn_few_steps(config, images)
    if warned:
        assert f"{images} training images at a global batch of {batch * accumulation} {warned}" in caplog.text
        assert "--per_device_train_batch_size" in caplog.text
    else:
        assert caplog.text == ""


@pytest.mark.parametrize(("method", "accumulation", "warned"), [("refilled", 4, True), ("refilled", 1, False),
                                                                ("rkd", 4, False)])  # fmt: skip
def test_accumulation_under_refilled_says_mining_sees_micro_batches(method, accumulation, warned, data_dir, tmp_path,
                                                                     caplog):  # fmt: skip
    """Gradient accumulation emulates a larger batch for the gradient, not for REFILLED's
    mining and local classes: a run that accumulates is told so, with the sizes."""
    config = RefilledConfig(**tiny_recipe(data_dir, tmp_path / "o", method=method,
                                          gradient_accumulation_steps=accumulation))  # fmt: skip
    data = load_data(config, config.classes, load_timm_model(config.student).pretrained_cfg, splits=("train",))
    with caplog.at_level("WARNING", logger="refilled_hf.preflight"):
        check_mining(config, data)
    expected = ("--gradient_accumulation_steps 4: REFILLED mines stage 1's semi-hard tuples within each micro-batch "
                "(12 images) and takes stage 2's local classes from each per-device micro-batch (12 images), not from "
                "the 48 images of an optimizer step")  # fmt: skip
    assert (expected in caplog.text) == warned, caplog.text


@pytest.mark.parametrize(("counts", "batch"), [([3, 3, 3], 3), ([5, 1, 2, 4], 3), ([2, 2, 2, 2], 4), ([6, 1], 2),
                                               ([4, 4, 4], 4), ([1, 1, 3], 5), ([3, 0, 2], 2)])  # fmt: skip
def test_the_chance_of_a_batch_without_a_pair_is_exact(counts, batch):
    """Against every possible batch, enumerated: the share whose images are all of different classes."""
    from itertools import combinations

    from refilled_hf.preflight import batch_without_pair_probability

    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    batches = list(combinations(range(len(labels)), min(batch, len(labels))))
    expected = sum(len({labels[i] for i in b}) == len(b) for b in batches) / len(batches)
    assert batch_without_pair_probability(counts, batch) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize(("batch", "scope", "warned"), [(3, "auto", "about 25% of them"), (3, "local", "about 25%"),
                                                        (12, "auto", None)])  # fmt: skip
def test_batches_that_often_hold_nothing_to_mine_are_warned(batch, scope, warned, data_dir, tmp_path, caplog):
    """3 classes of 9 training images: a batch of 3 is all of different classes in
    9^3 / C(27, 3) = 24.9% of draws, and then stage 1 learns nothing from it."""
    config = RefilledConfig(**tiny_recipe(data_dir, tmp_path / "o", per_device_train_batch_size=batch,
                                          mining_scope=scope))  # fmt: skip
    data = load_data(config, config.classes, load_timm_model(config.student).pretrained_cfg, splits=("train",))
    assert sorted(np.bincount(data.train.labels).tolist()) == [9, 9, 9]
    with caplog.at_level("WARNING", logger="refilled_hf.preflight"):
        check_mining(config, data)
    if warned is None:
        assert "train nothing" not in caplog.text
    else:
        assert f"batches of {batch} images over 3 classes: {warned}" in caplog.text
        assert "Raise --per_device_train_batch_size" in caplog.text
        assert ("add processes" in caplog.text) == (scope != "local")


def test_evaluate_on_a_data_set_without_a_test_split(data_dir, tmp_path):
    """Only a training split (an image folder of train/<class>/ alone): --split validation needs
    no test split, --split test names the splits there are, and only a class the data set lacks
    is reported as one (a missing split read "the model's classes are not all classes of ...");
    probe-teacher needs no test split either."""
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "train.parquet").write_bytes((data_dir / "train.parquet").read_bytes())
    model = f"local-dir:{write_random_teacher(tmp_path / 'model', label_names=CLASS_NAMES[3:])}"
    config = RefilledConfig(output_dir=str(tmp_path / "e"), dataset=str(train_only), validation_fraction=0.25,
                            use_cpu=True, per_device_eval_batch_size=7)  # fmt: skip
    metrics = evaluate_model(model, config, split="validation")
    per_class = metrics["validation_per_class"]
    assert list(per_class) == CLASS_NAMES[3:] and [c["samples"] for c in per_class.values()] == [3, 3, 3]
    assert metrics["validation_samples"] == 9 and metrics["data"]["split"] == "train (validation part)"
    missing = r"Split 'test' not in .* \(splits: \['train'\]\): name the split to evaluate with --test_split"
    with pytest.raises(ConfigError, match=missing + r" .* or .* with --split validation\."):
        evaluate_model(model, config)
    with pytest.raises(ConfigError, match="--split test with --test_split none: name the split"):
        evaluate_model(model, RefilledConfig(**{**config.to_recipe(), "test_split": None}))
    other = f"local-dir:{write_random_teacher(tmp_path / 'other', label_names=['red', 'teal', 'blue'])}"
    with pytest.raises(ConfigError, match=r"The model's classes .* are not all classes of .*Unknown class "
                                          r"'name:teal'.*pass --classes"):  # fmt: skip
        evaluate_model(other, config, split="validation")
    # probe-teacher reads the training and validation splits only
    probe = probe_teacher(RefilledConfig(**{**config.to_recipe(), "teacher": other, "classes": "3-5"}))
    assert probe["validation_images"] == 9 and probe["train_images"] == 27 and probe["classes_probed"] == 3


def test_evaluate_measures_a_data_set_of_held_out_images_alone(data_dir, tmp_path, caplog):
    """evaluate reads only the split it measures: a data set of a test split alone, or of one
    split that datasets names train (a folder of class folders), was refused for lacking a
    training split or for naming it as the test split, with no way out."""
    model = f"local-dir:{write_random_teacher(tmp_path / 'model', label_names=CLASS_NAMES[3:])}"
    test_only = tmp_path / "test_only"
    test_only.mkdir()
    (test_only / "test.parquet").write_bytes((data_dir / "test.parquet").read_bytes())
    config = dict(output_dir=str(tmp_path / "e"), use_cpu=True)
    metrics = evaluate_model(model, RefilledConfig(**config, dataset=str(test_only)))
    assert metrics["test_samples"] == 18 and metrics["data"]["split"] == "test"
    assert [c["samples"] for c in metrics["test_per_class"].values()] == [6, 6, 6]

    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "train.parquet").write_bytes((data_dir / "train.parquet").read_bytes())
    with caplog.at_level(logging.WARNING, logger="refilled_hf"):
        metrics = evaluate_model(model, RefilledConfig(**config, dataset=str(train_only), test_split="train"))
    assert metrics["test_samples"] == 36 and metrics["data"]["split"] == "train"  # every image: no carve
    assert "cannot check that the model was not trained on these images" in caplog.text
    with pytest.raises(DataError, match="'train' is the training split"):  # training runs still refuse it
        load_classification_data(str(train_only), test_split="train")

    # a folder of held-out images of two of the model's three classes: the third is measured as a class
    # without images (it was refused as a class unknown to the data set, whose classes are its folders)
    from PIL import Image

    for name in CLASS_NAMES[3:5]:
        (tmp_path / "two" / "test" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "two" / "test" / name / f"{i}.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refilled_hf"):
        metrics = evaluate_model(model, RefilledConfig(**config, dataset=str(tmp_path / "two")))
    assert {name: c["samples"] for name, c in metrics["test_per_class"].items()} == {"yellow": 2, "cyan": 2,
                                                                                    "magenta": 0}  # fmt: skip
    assert metrics["test_samples"] == 4 and "has no image of 1 of the 3 selected classes" in caplog.text
