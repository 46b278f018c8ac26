"""A checkpoint a refilled-hf run wrote is known by its run's record: as a teacher
(--teacher <timm name> --teacher_checkpoint <run>/<stage>/checkpoint-N/model.safetensors)
it gets the same label-space, teacher-class and probe checks as the run's export."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CLASS_NAMES, tiny_recipe

from refilled_hf.backbone import load_timm_model
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.pipeline import load_data, run_distillation, run_teacher_training
from refilled_hf.preflight import check_label_spaces, load_teacher
from refilled_hf.probe import probe_teacher
from refilled_hf.provenance import run_folder, weights_training_record

TEACHER_ONLY = ("teacher_classes", "distill_weight", "stage1_epochs", "stage1_learning_rate")


@pytest.fixture(scope="module")
def teacher_run(data_dir, tmp_path_factory) -> Path:
    """A teacher trained by refilled-hf on classes 2-4 (its validation carve: seed 0)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    recipe = tiny_recipe(data_dir, out, teacher="cifar_wrn_16_1", classes="2-4")
    run_teacher_training(RefilledConfig(**{k: v for k, v in recipe.items() if k not in TEACHER_ONLY}))
    return out


def _checkpoint(run: Path) -> Path:
    return max((run / "ce").glob("checkpoint-*/model.safetensors"), key=lambda p: int(p.parent.name.split("-")[1]))


def test_a_run_checkpoint_carries_its_run_record(teacher_run, tmp_path):
    checkpoint = _checkpoint(teacher_run)
    assert run_folder(checkpoint) == teacher_run.resolve()
    record = weights_training_record("cifar_wrn_16_1", checkpoint)
    assert record == weights_training_record(f"local-dir:{teacher_run / 'model'}")
    assert record["class_names"] == CLASS_NAMES[2:5]
    loose = tmp_path / "elsewhere" / "model.safetensors"  # the same file outside its run knows nothing
    loose.parent.mkdir()
    loose.write_bytes(checkpoint.read_bytes())
    assert weights_training_record("cifar_wrn_16_1", loose) is None


def test_a_run_written_into_a_teachers_export_folder_does_not_own_the_teachers_weights(teacher_run, data_dir,
                                                                                        tmp_path):  # fmt: skip
    """A distill run with --output_dir <teacher run>/model (allowed: it writes beside the
    export, not over it) made its own record the one of the teacher's weights there: the
    teacher's classes 2-4 became the student's 3-5, and KD's label-space check read those."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    recipe = tiny_recipe(data_dir, teacher / "model", method="ce", stage2_epochs=1)
    run_distillation(RefilledConfig(**{k: v for k, v in recipe.items() if k not in TEACHER_ONLY}))
    weights = teacher / "model" / "model.safetensors"
    assert (teacher / "model" / "run.json").is_file()  # the student's run, in the teacher's export folder
    assert run_folder(weights) == teacher.resolve()  # the teacher's run wrote them
    assert weights_training_record("cifar_wrn_16_1", weights)["class_names"] == CLASS_NAMES[2:5]
    student = teacher / "model" / "model" / "model.safetensors"
    assert run_folder(student) == (teacher / "model").resolve()
    assert weights_training_record("cifar_wrn_16_1", student)["class_names"] == CLASS_NAMES[3:6]


def test_kd_from_a_run_checkpoint_on_other_classes_is_refused(teacher_run, data_dir, tmp_path):
    """Three teacher classes (2-4) and three student classes (3-5): only the record tells
    the label spaces apart. KD would have mapped the teacher's class i onto the student's."""
    recipe = tiny_recipe(data_dir, tmp_path / "kd", method="kd", teacher="cifar_wrn_16_1",
                         teacher_checkpoint=str(_checkpoint(teacher_run)), teacher_classes=None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"teacher's 3 classes .* lack 1 of the student's 3: \['magenta'\]"):
        run_distillation(RefilledConfig(**{k: v for k, v in recipe.items() if k not in TEACHER_ONLY[1:]}))
    assert not (tmp_path / "kd").exists()


def test_teacher_classes_of_a_run_checkpoint_come_from_its_record(teacher_run, data_dir, tmp_path):
    common = {"method": "rkd", "teacher": "cifar_wrn_16_1", "teacher_checkpoint": str(_checkpoint(teacher_run)),
              "stage2_epochs": 1}  # fmt: skip
    with pytest.raises(ConfigError, match=r"is not what the teacher was trained on.*2-4 of"):
        run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "wrong", teacher_classes="0-2", **common)))
    assert not (tmp_path / "wrong").exists()
    results = run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "rkd", teacher_classes=None,
                                                            **common)))  # fmt: skip
    assert results["teacher_classes"] == "2-4"


def test_probe_with_a_run_checkpoint_leaves_out_what_the_teacher_trained_on(teacher_run, data_dir, tmp_path):
    """The student (classes 3-5, validation carved with seed 1) shares classes 3 and 4 with
    the teacher, whose training images (seed 0's carve) include some of its validation
    images: the checkpoint's probe leaves out the same images as the export's."""
    recipe = {k: v for k, v in tiny_recipe(data_dir, tmp_path / "p", seed=1).items() if k not in TEACHER_ONLY}
    by_export = probe_teacher(RefilledConfig(**recipe, teacher=f"local-dir:{teacher_run / 'model'}"))
    by_checkpoint = probe_teacher(RefilledConfig(**recipe, teacher="cifar_wrn_16_1",
                                                 teacher_checkpoint=str(_checkpoint(teacher_run))))  # fmt: skip
    assert by_export["left_out_teacher_training_images"] > 0
    assert by_checkpoint["left_out_teacher_training_images"] == by_export["left_out_teacher_training_images"]
    assert by_checkpoint["validation_images"] == by_export["validation_images"]


def test_kd_from_a_checkpoint_without_record_says_what_it_could_not_check(teacher_run, data_dir, tmp_path, caplog):
    """A checkpoint outside any run names no classes: KD runs, checked by class count only,
    and says so, unless --teacher_classes names them (then it is checked, and refused when
    they are not the student's)."""

    loose = tmp_path / "elsewhere" / "model.safetensors"
    loose.parent.mkdir()
    loose.write_bytes(_checkpoint(teacher_run).read_bytes())
    recipe = tiny_recipe(data_dir, tmp_path / "kd", method="kd", teacher="cifar_wrn_16_1",
                         teacher_checkpoint=str(loose), teacher_classes=None)  # fmt: skip
    config = RefilledConfig(**recipe)
    cfg = load_timm_model(config.student).pretrained_cfg
    data = load_data(config, config.classes, cfg)
    teacher = load_teacher(config, cfg)
    with caplog.at_level("WARNING", logger="refilled_hf.preflight"):
        check_label_spaces(config, teacher, data)
    assert "only its number of classes (3) could be checked" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="refilled_hf.preflight"):
        check_label_spaces(RefilledConfig(**{**recipe, "teacher_classes": "3-5"}), teacher, data)
    assert "could be checked" not in caplog.text
    with pytest.raises(ConfigError, match="needs the teacher to predict each of the student's classes"):
        check_label_spaces(RefilledConfig(**{**recipe, "teacher_classes": "2-4"}), teacher, data)
    # the run's own checkpoint names its classes: nothing to warn about, and refused (above)
    caplog.clear()
    with caplog.at_level("WARNING", logger="refilled_hf.preflight"), pytest.raises(ConfigError):
        check_label_spaces(RefilledConfig(**{**recipe, "teacher_checkpoint": str(_checkpoint(teacher_run))}),
                           teacher, data)  # fmt: skip
    assert "could be checked" not in caplog.text
