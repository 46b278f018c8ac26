"""End-to-end runs of every method on small generated images (CPU, seconds each)."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import CLASS_NAMES, tiny_recipe, write_random_teacher
from safetensors.torch import load_file
from transformers import TrainerCallback

from refilled_hf.backbone import FrozenTeacher
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.evaluation import evaluate_model
from refilled_hf.hub import TRAINING_DATA_KEY
from refilled_hf.pipeline import (
    RunError,
    RunInterrupted,
    _scaled_paper_milestones,
    run_distillation,
    run_teacher_training,
)
from refilled_hf.rundir import RunDirError

pytestmark = pytest.mark.slow

STUDENT_CLASSES = CLASS_NAMES[3:]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return write_random_teacher(tmp_path_factory.mktemp("teacher") / "model", name="cifar_wrn_16_2")


def run(recipe: dict, callbacks=None) -> dict:
    return run_distillation(RefilledConfig(**recipe), callbacks=callbacks)


def log_history(stage_dir: Path) -> list[dict]:
    last = max(stage_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())["log_history"]


def logged_keys(stage_dir: Path) -> set[str]:
    return {k for entry in log_history(stage_dir) if "loss" in entry for k in entry}


@pytest.mark.parametrize("method", ["ce", "kd", "rkd", "refilled"])
def test_every_method_end_to_end(method, data_dir, teacher_dir, tmp_path):
    extra = {"teacher": f"local-dir:{teacher_dir}"}
    if method == "kd":  # KD needs a teacher over the student's own classes
        kd_teacher = write_random_teacher(tmp_path / "kd-teacher", label_names=STUDENT_CLASSES)
        extra = {"teacher": f"local-dir:{kd_teacher}", "teacher_classes": "3,4,5"}  # the classes, another notation
    out = tmp_path / method
    results = run(tiny_recipe(data_dir, out, method=method, **extra))

    # 3 classes x 6 test images; 25% of 12 training images per class held out.
    assert results["final"]["test_samples"] == 18
    assert results["final"]["validation_samples"] == 9
    assert results["data"]["train_images"] == 27
    assert 0 <= results["final"]["test_top1"] <= 100
    assert results["class_names"] == STUDENT_CLASSES
    assert json.loads((out / "results.json").read_text())["final"] == results["final"]
    card = (out / "model" / "README.md").read_text()
    # where the weights came from: the student's drawn at random, the teacher's a local-dir: folder's own
    assert results["student_weights_origin"] == "random initialization" and results["teacher_weights_origin"] is None
    assert "- Student: `cifar_wrn_16_1` at 16 px, trained from random initialization; classes" in card
    if method == "ce":  # no teacher: the card names none, and no teacher classes
        assert results["teacher"] is None and results["teacher_classes"] is None and "- Teacher: none.\n" in card
    else:
        assert results["teacher_classes"] == {"kd": "3-5"}.get(method, "0-2")
        assert f"trained on classes `{results['teacher_classes']}`" in card

    config = json.loads((out / "model" / "config.json").read_text())
    assert config["label_names"] == STUDENT_CLASSES and config["num_classes"] == 3
    record = config[TRAINING_DATA_KEY]
    assert (record["class_names"], record["train_images"], record["validation_images"]) == (STUDENT_CLASSES, 27, 9)
    # evaluating the export on its own validation split (found from its record) reproduces the run's number
    eval_config = RefilledConfig(**{**tiny_recipe(data_dir, tmp_path / "e"), "classes": None})
    again = evaluate_model(f"local-dir:{out / 'model'}", eval_config, split="validation")
    assert again["validation_samples"] == 9
    assert again["validation_top1"] == pytest.approx(results["final"]["validation_top1"])
    exported = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    assert exported.num_classes == 3

    head_stage = out / ("stage2" if method == "refilled" else method)
    keys = logged_keys(head_stage)
    assert "ce" in keys
    assert ("distill" in keys) == (method != "ce")
    if method == "refilled":
        assert {"local_classes"} <= keys
        assert {"relationship", "tuples", "triplets"} <= logged_keys(out / "stage1")
        stage1 = results["stage1"]
        assert stage1["test_samples"] == 18 and 0 <= stage1["test_ncm_top1"] <= 100
        assert (out / "stage1" / "final" / "model.safetensors").is_file()
        centers = load_file(str(out / "stage2" / "teacher_centers.safetensors"))["centers"]
        assert centers.shape == (3, 128)  # WRN-16-2 teacher embedding, one centre per student class
        torch.testing.assert_close(centers.norm(dim=1), torch.ones(3))
        evals = [e for e in log_history(out / "stage1") if "eval_ncm_top1" in e]
        assert len(evals) == 2  # NCM evaluation every epoch


def test_refilled_variants(data_dir, teacher_dir, tmp_path):
    recipe = tiny_recipe(
        data_dir,
        tmp_path / "variants",
        method="refilled",
        teacher=f"local-dir:{teacher_dir}",
        stage1_variant="triplet",
        centers="batch",
        confidence_weights=True,
        validation_fraction=0.0,
    )
    results = run(recipe)
    assert results["final"]["test_samples"] == 18
    assert "validation_top1" not in results["final"]
    assert not (tmp_path / "variants" / "stage2" / "teacher_centers.safetensors").exists()
    assert "distill" in logged_keys(tmp_path / "variants" / "stage2")


def test_kd_across_label_spaces_is_rejected_before_training(data_dir, teacher_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "kd", method="kd", teacher=f"local-dir:{teacher_dir}")
    with pytest.raises(ConfigError, match="refilled"):
        run(recipe)
    assert not (tmp_path / "kd" / "kd").exists()


def test_finished_run_is_not_overwritten(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "ce", method="ce", stage2_epochs=1)
    first = run(recipe)
    before = (tmp_path / "ce" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(RunError, match="finished run"):
        run(recipe)
    assert (tmp_path / "ce" / "model" / "model.safetensors").read_bytes() == before
    again = run({**recipe, "overwrite_output": True})
    assert again["final"]["test_samples"] == first["final"]["test_samples"]


@pytest.mark.slow
def test_resuming_a_finished_run_returns_its_results_and_trains_nothing(data_dir, tmp_path, monkeypatch, caplog):
    """A job script run again after its run ended (`--resume_from_checkpoint true`) exits 0 with
    the run's results, if it is the same run made with the same card options; else refused."""
    import shutil

    from refilled_hf import pipeline
    from refilled_hf.cli import main

    recipe = tiny_recipe(data_dir, tmp_path / "ce", method="ce", stage2_epochs=1, card_license="apache-2.0")
    first = run(recipe)
    folder = tmp_path / "ce"
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".refilled-hf.lock"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(pipeline, "_run_stages", no_training)
    with caplog.at_level(logging.WARNING, logger="refilled_hf.pipeline"):
        assert run({**recipe, "resume_from_checkpoint": "true"}) == first
    assert "holds this run, finished: nothing is trained again" in caplog.text
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert main(["distill", "--config", str(recipe_file), "--resume_from_checkpoint", "true"]) == 0
    assert {p: p.read_bytes() for p in files} == files, "nothing in the folder changed"
    with pytest.raises(RunDirError, match="seed: 0 -> 1"):  # another run
        run({**recipe, "resume_from_checkpoint": "true", "seed": 1})
    with pytest.raises(RunError, match="card_license: 'apache-2.0' -> 'mit'.*refilled-hf push"):
        run({**recipe, "resume_from_checkpoint": "true", "card_license": "mit"})

    # its model removed: exported again from the stage's last checkpoint, nothing trained, the same
    # results (its training's timings, not the call's), weights and card (the card's recipe adds the resume)
    monkeypatch.undo()
    from refilled_hf.trainer import RefilledTrainer

    def no_step(*args, **kwargs):
        raise AssertionError("a step was trained to export a finished run again")

    monkeypatch.setattr(RefilledTrainer, "training_step", no_step)
    shutil.rmtree(folder / "model")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refilled_hf.pipeline"):
        assert run({**recipe, "resume_from_checkpoint": "true"}) == first
    assert "its model (" in caplog.text and "is exported again from the weights its stages kept" in caplog.text
    changed = {p for p in files if p.read_bytes() != files[p]}
    assert changed == {folder / "model" / "README.md"}, changed
    card_before = files[folder / "model" / "README.md"].decode().splitlines()
    card_after = (folder / "model" / "README.md").read_text().splitlines()
    assert [line for line in card_after if line not in card_before] == ["resume_from_checkpoint: 'true'"]
    (folder / "model" / "README.md").unlink()  # a model folder without its card is made again too
    for left in (".model.staging-0a1b", ".model.old-2c3d"):  # and what killed exports left is removed
        (folder / left).mkdir()
        (folder / left / "model.safetensors").write_bytes(b"partial")
    assert run({**recipe, "resume_from_checkpoint": "true"}) == first
    assert (folder / "model" / "README.md").read_text().splitlines() == card_after
    assert sorted(p.name for p in folder.iterdir()) == [".refilled-hf.lock", "ce", "model", "results.json", "run.json"]
    # files of yours in model/ are never lost to an export: not to this one, nor to --overwrite_output's
    (folder / "model" / "model.onnx").write_bytes(b"yours")
    (folder / "model" / "README.md").unlink()
    for again in ({"resume_from_checkpoint": "true"}, {"overwrite_output": True}):
        with pytest.raises(RunError, match=r"model holds files an export does not write \(\['model.onnx'\]\).*Move"):
            run({**recipe, **again})
        assert (folder / "model" / "model.onnx").read_bytes() == b"yours"
    (folder / "model" / "model.onnx").unlink()
    # weights that do not measure what the results record are not exported as the run's
    record = json.loads((folder / "results.json").read_text())
    record["final"]["test_top1"] += 1.0
    (folder / "results.json").write_text(json.dumps(record))
    shutil.rmtree(folder / "model")
    with pytest.raises(RunError, match=r"do not measure what its results record \(test_top1 .* -> "):
        run({**recipe, "resume_from_checkpoint": "true"})
    assert not (folder / "model").exists()
    for checkpoint in folder.glob("ce/checkpoint-*"):  # nothing left to export it again from
        shutil.rmtree(checkpoint)
    with pytest.raises(RunError, match=r"its model .* is missing, and cannot be exported again without training: "
                                       r".*ce holds no checkpoint. Pass --overwrite_output true"):  # fmt: skip
        run({**recipe, "resume_from_checkpoint": "true"})


def test_a_finished_run_whose_checkpoints_or_baselines_are_gone_still_gives_its_results(data_dir, tmp_path):
    """--save_only_model checkpoints hold no optimizer: resuming a finished run of them (a job
    script run again) was refused as a resume ("Pass an earlier checkpoint"), though it trains nothing;
    one whose --compare_runs baseline folder was since removed was refused for it."""
    import shutil

    baseline = run(tiny_recipe(data_dir, tmp_path / "baseline", method="ce", stage2_epochs=1))
    recipe = tiny_recipe(data_dir, tmp_path / "ce", method="ce", stage2_epochs=1, save_only_model=True, seed=1,
                         data_seed=0, compare_runs=str(tmp_path / "baseline"))  # fmt: skip
    first = run(recipe)
    assert first["final"]["test_samples"] == baseline["final"]["test_samples"]
    shutil.rmtree(tmp_path / "baseline")
    assert run({**recipe, "resume_from_checkpoint": "true"}) == first
    shutil.rmtree(tmp_path / "ce" / "model")  # its model cannot be had again from such a checkpoint
    with pytest.raises(RunError, match=r"cannot be exported again without training: .*checkpoint-\d+: it has no "
                                       r"optimizer.pt"):  # fmt: skip
        run({**recipe, "resume_from_checkpoint": "true"})


def test_a_run_into_the_folder_of_its_own_teacher_or_baseline_is_refused_and_deletes_nothing(data_dir, tmp_path):
    """--overwrite_output into the teacher's run folder used to delete the teacher, export the
    student in its place and record ``--teacher local-dir:<that folder>``: a lost file and a
    false record. Any input inside an entry the run writes is refused before anything runs."""
    teacher_run = tmp_path / "teacher"
    teacher_recipe = tiny_recipe(data_dir, teacher_run, teacher="cifar_wrn_16_1", classes="0-2", stage2_epochs=1)
    for distillation_only in ("teacher_classes", "distill_weight", "stage1_epochs", "stage1_learning_rate"):
        del teacher_recipe[distillation_only]
    run_teacher_training(RefilledConfig(**teacher_recipe))
    before = {p: p.read_bytes() for p in sorted(teacher_run.rglob("*")) if p.is_file()}
    recipe = tiny_recipe(data_dir, teacher_run, method="refilled", teacher=f"local-dir:{teacher_run / 'model'}",
                         overwrite_output=True)  # fmt: skip
    with pytest.raises(RunDirError, match=r"--teacher .*teacher/model lies in .*which this run writes"):
        run(recipe)
    baseline = {**recipe, "teacher": None, "method": "ce", "compare_runs": str(teacher_run)}
    with pytest.raises(RunDirError, match=r"--compare_runs .*results.json lies in"):
        run(baseline)
    assert {p: p.read_bytes() for p in sorted(teacher_run.rglob("*")) if p.is_file()} == before


class Interrupt(TrainerCallback):
    """A Ctrl-C (KeyboardInterrupt) at a given global step of a given stage."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == self.stage and state.global_step == self.step:
            raise KeyboardInterrupt(f"interrupted at {self.stage} step {self.step}")


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_resume_after_interruption(stage, data_dir, teacher_dir, tmp_path, caplog):
    # 27 training images, batch 12: 3 steps per epoch, a checkpoint after each epoch.
    base = dict(method="refilled", teacher=f"local-dir:{teacher_dir}", stage1_epochs=3, stage2_epochs=3)
    with caplog.at_level("INFO", logger="refilled_hf.stages"):
        reference = run(tiny_recipe(data_dir, tmp_path / "reference", **base))
    # the log names each stage as it starts (neither its progress bar nor its metrics do)
    assert [r.getMessage() for r in caplog.records if r.name == "refilled_hf.stages"] == [
        f"stage1: training 9 steps (3 epochs) in {tmp_path / 'reference' / 'stage1'}.",
        f"stage2: training 9 steps (3 epochs) in {tmp_path / 'reference' / 'stage2'}.",
    ]
    recipe = tiny_recipe(data_dir, tmp_path / "run", **base)
    with pytest.raises(RunInterrupted, match=rf"interrupted \(SIGINT\): {stage} stopped at step 5 of 9\. Nothing was "
                       rf"exported\. The same command with --resume_from_checkpoint true continues from its newest "
                       rf"checkpoint, .*{stage}/checkpoint-3 \(step 3\)\.") as stopped:  # fmt: skip
        run(recipe, callbacks=[Interrupt(stage, 5)])
    assert stopped.value.signal_number == signal.SIGINT  # the command line exits 130, as for any Ctrl-C
    assert not (tmp_path / "run" / "results.json").exists()
    with pytest.raises(RunError, match="unfinished run"):
        run(recipe)
    stage1_final = tmp_path / "run" / "stage1" / "final" / "model.safetensors"
    mtime = stage1_final.stat().st_mtime_ns if stage == "stage2" else None
    caplog.clear()
    with caplog.at_level("INFO", logger="refilled_hf.stages"):
        resumed = run({**recipe, "resume_from_checkpoint": "true"})
    said = [r.getMessage() for r in caplog.records if r.name == "refilled_hf.stages"]
    checkpoint = tmp_path / "run" / stage / "checkpoint-3"
    assert said[0] == f"{stage}: continuing from {checkpoint}, at step 3 of 9 steps (3 epochs)."
    assert len(said) == (2 if stage == "stage1" else 1)  # then stage 2 starts; or stage 1 had finished
    if stage == "stage2":  # stage 1 was finished: it is not trained again
        assert stage1_final.stat().st_mtime_ns == mtime
    assert resumed["final"]["test_top1"] == reference["final"]["test_top1"]
    assert resumed["stage1"]["test_ncm_top1"] == reference["stage1"]["test_ncm_top1"]
    ours = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    ref = load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-5)


def test_teacher_with_other_input_size_and_normalization(data_dir, tmp_path, caplog):
    imagenet = {"input_size": (3, 32, 32), "mean": timm.data.IMAGENET_DEFAULT_MEAN,
                "std": timm.data.IMAGENET_DEFAULT_STD, "interpolation": "bilinear"}  # fmt: skip
    model = timm.create_model("cifar_wrn_16_1", num_classes=4, pretrained_cfg_overlay=imagenet)
    student_cfg = timm.create_model("cifar_wrn_16_1").pretrained_cfg | {"input_size": (3, 16, 16)}
    teacher = FrozenTeacher(model, student_cfg)
    assert teacher.renormalize and teacher.input_size == 32
    assert teacher.adaptation_text() == (
        "each student batch re-normalized from the student's mean/std to the teacher's and resized from 16 to 32 px "
        "(bilinear)"
    )
    assert FrozenTeacher(model, model.pretrained_cfg).adaptation_text().startswith("the student's batches as they are")
    raw = torch.rand(2, 3, 16, 16)
    s_mean, s_std = (torch.tensor(student_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    t_mean, t_std = (torch.tensor(imagenet[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    expected = (torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear") - t_mean) / t_std
    torch.testing.assert_close(teacher.adapt((raw - s_mean) / s_std), expected, rtol=1e-5, atol=1e-5)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    emb, logits = teacher(torch.rand(2, 3, 16, 16))
    assert emb.is_inference() and logits.is_inference()  # the teacher runs in inference mode

    from refilled_hf.hub import export_model

    teacher_dir = export_model(model, tmp_path / "imagenet-teacher", label_names=["a", "b", "c", "d"])
    assert json.loads((teacher_dir / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 32, 32]
    with caplog.at_level("INFO", logger="refilled_hf.preflight"):
        results = run(tiny_recipe(data_dir, tmp_path / "run", method="refilled", teacher=f"local-dir:{teacher_dir}"))
    assert results["final"]["test_samples"] == 18
    assert "Teacher input: each student batch re-normalized" in caplog.text  # the run says what it does
    adapted = ("each student batch re-normalized from the student's mean/std to the teacher's and resized from 16 "
               "to 32 px (bilinear)")  # fmt: skip
    assert results["teacher_input"] == adapted
    card = (tmp_path / "run" / "model" / "README.md").read_text()  # and so does the card
    assert f"; its inputs: {adapted}.\n" in card
    assert "- Student: `cifar_wrn_16_1` at 16 px, trained from random initialization; classes" in card


def test_models_of_fixed_input_size_train_and_evaluate_at_the_run_s_sizes(data_dir, tmp_path):
    """A ViT student at --image_size 16 and a ViT teacher (exported at 160 px) at
    --teacher_input_size 32: each is built for its size (the run stopped with "Input height
    (16) doesn't match model (160)"), and the export loads at 16 px through timm and evaluate."""
    from refilled_hf.hub import export_model

    torch.manual_seed(0)  # the teacher's random weights: the same run in every process
    teacher = export_model(timm.create_model("test_vit3", num_classes=4), tmp_path / "t", label_names=list("abcd"))
    # (clipped: a random ViT teacher and student at stage 1's weight 1000 may diverge)
    recipe = tiny_recipe(data_dir, tmp_path / "run", student="test_vit3", teacher=f"local-dir:{teacher}",
                         teacher_input_size=32, max_grad_norm=1.0)  # fmt: skip
    results = run(recipe)
    assert results["image_size"] == 16 and results["final"]["test_samples"] == 18
    assert results["teacher_input"].endswith("resized from 16 to 32 px (bicubic)")
    exported = tmp_path / "run" / "model"
    config = json.loads((exported / "config.json").read_text())
    assert config["model_args"]["img_size"] == [16, 16] and config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    from transformers import AutoModelForImageClassification

    wrapped = AutoModelForImageClassification.from_pretrained(str(exported)).eval()
    torch.testing.assert_close(wrapped(pixel_values=x).logits, model(x))
    again = RefilledConfig(**{**recipe, "output_dir": str(tmp_path / "e"), "image_size": None})
    metrics = evaluate_model(f"local-dir:{exported}", again)  # at its own size, from its config
    assert metrics["test_top1"] == pytest.approx(results["final"]["test_top1"])


def test_train_teacher_exports_a_local_dir_model(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "teacher", teacher="cifar_wrn_16_1", classes="0-2")
    for distillation_only in ("teacher_classes", "distill_weight", "stage1_epochs", "stage1_learning_rate"):
        del recipe[distillation_only]  # train-teacher refuses them (tests/test_field_users.py)
    results = run_teacher_training(RefilledConfig(**recipe))
    assert results["method"] == "ce" and results["class_names"] == CLASS_NAMES[:3]
    model = timm.create_model(f"local-dir:{tmp_path / 'teacher' / 'model'}", pretrained=True)
    assert model.num_classes == 3
    # it can teach straight away
    student = run(tiny_recipe(data_dir, tmp_path / "student", method="refilled",
                              teacher=f"local-dir:{tmp_path / 'teacher' / 'model'}"))  # fmt: skip
    assert student["teacher"].startswith("local-dir:") and student["command"] == "distill"
    student_card = (tmp_path / "student" / "model" / "README.md").read_text()
    assert "\n# refilled-hf student\n" in student_card and "- Student: `cifar_wrn_16_1`" in student_card
    assert "- Teacher: `local-dir:" in student_card and "To distill it" not in student_card
    # what a folder's name does not say, for readers of the card on the Hub
    assert student["teacher_architecture"] == "cifar_wrn_16_1" and "/model` (a `cifar_wrn_16_1`)," in student_card
    card = (tmp_path / "teacher" / "model" / "README.md").read_text()
    # a teacher's card: named and described as one, with how to distill it; no student, no teacher of its own
    assert results["command"] == "train-teacher"
    assert "\n# refilled-hf teacher\n" in card and "- name: refilled-hf teacher\n" in card  # title, model-index
    assert "by refilled-hf's `train-teacher`, to teach REFILLED students" in card
    assert "refilled-hf distill --teacher local-dir:<this folder> --student <a timm model>" in card
    assert "- Model: `cifar_wrn_16_1` at 16 px" in card and "- Teacher:" not in card and "- Student:" not in card
    assert "`train-teacher` trains\nits `--teacher` as the `student` of a `--method ce` run" in card
    # the card's recipe reruns it with `distill --config`: the model trained is its student, and no teacher is
    # named that the ce run would ignore with a warning
    shown = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert shown["method"] == "ce" and shown["student"] == "cifar_wrn_16_1" and shown["teacher"] is None
    assert RefilledConfig(**{k: v for k, v in shown.items() if v is not None}).fields_unused_by("ce") == {}
    # the teacher's export records its classes: unset, the student's card states them; a contradiction is refused
    teacher = f"local-dir:{tmp_path / 'teacher' / 'model'}"
    unset = run(tiny_recipe(data_dir, tmp_path / "unset", method="rkd", teacher=teacher, teacher_classes=None,
                            stage2_epochs=1))  # fmt: skip
    assert unset["teacher_classes"] == "0-2"
    assert "trained on classes `0-2`" in (tmp_path / "unset" / "model" / "README.md").read_text()
    for wrong in ("1-3", "0,2,1"):
        with pytest.raises(ConfigError, match=r"is not what the teacher was trained on.*0-2 of"):
            run(tiny_recipe(data_dir, tmp_path / "wrong", method="rkd", teacher=teacher, teacher_classes=wrong))
        assert not (tmp_path / "wrong").exists()


CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.mark.skipif(not (CIFAR10 / "train.parquet").is_file(), reason="needs ../shared/data/cifar10")
def test_real_cifar10_slice_through_the_hub_code_path(monkeypatch, teacher_dir, tmp_path):
    """A Hub id goes through datasets.load_dataset exactly as uoft-cs/cifar100 would;
    here the call is answered with the local CIFAR-10 copy (no network)."""
    import datasets

    real_load = datasets.load_dataset
    calls = []

    def offline_hub(path, *args, **kwargs):
        if path == "uoft-cs/cifar10":
            calls.append(path)
            files = {"train": str(CIFAR10 / "train.parquet"), "test": str(CIFAR10 / "test.parquet")}
            return real_load("parquet", data_files=files)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    recipe = tiny_recipe(
        CIFAR10,
        tmp_path / "cifar",
        dataset="uoft-cs/cifar10",
        method="refilled",
        teacher=f"local-dir:{teacher_dir}",
        image_size=None,  # the WRN's own 32x32
        classes="cat,dog",
        teacher_classes="airplane,automobile",
        shots_per_class=12,
        validation_fraction=0.005,
        stage1_epochs=1,
        stage2_epochs=1,
        per_device_eval_batch_size=500,
    )
    results = run(recipe)
    assert calls == ["uoft-cs/cifar10"]
    assert results["class_names"] == ["cat", "dog"]
    assert results["data"]["train_images"] == 24
    assert results["data"]["validation_images"] == 50  # 0.5% of 5,000 per class
    assert results["final"]["test_samples"] == 2000  # every test image of the two classes, once
    assert results["stage1"]["test_samples"] == 2000
    config = json.loads((tmp_path / "cifar" / "model" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["license"] == "apache-2.0"  # the card's (--card_license)


@pytest.mark.parametrize(
    ("epochs", "expected"),
    [(200, "100,140,180"), (20, "10,14,18"), (10, "5,7,9"), (3, "1.5,2.1,2.7"), (1, "0.5,0.7,0.9")],
)
def test_the_suggested_milestones_are_the_papers_scaled_and_inside_even_a_one_epoch_stage(epochs, expected):
    """A short stage gets fractional milestones (they become optimizer steps), never an empty
    suggestion: a 1-epoch stage used to be told to set ''."""
    assert _scaled_paper_milestones(epochs) == expected
    assert all(0 < float(m) < epochs for m in expected.split(","))


def test_milestones_beyond_the_stage_are_named_with_a_fix_and_the_card_says_none_applied(data_dir, tmp_path, caplog):
    """The paper's milestones (100,140,180) in a 20-epoch stage never decay the learning
    rate: the run warns with the scaled schedule to use, and the card does not claim decays."""
    recipe = tiny_recipe(data_dir, tmp_path / "ce", method="ce", stage2_epochs=20, stage2_milestones="100,140,180",
                         max_steps=1)  # fmt: skip
    with caplog.at_level("WARNING", logger="refilled_hf.pipeline"):
        run(recipe)
    assert ("--stage2_milestones 100,140,180: 100,140,180 lie at or beyond --stage2_epochs 20, so the learning "
            "rate never decays there; set milestones inside the stage (the paper's schedule, scaled: "
            "--stage2_milestones 10,14,18)") in caplog.text  # fmt: skip
    card = (tmp_path / "ce" / "model" / "README.md").read_text()
    assert "x0.2 at epochs" not in card and "constant (milestones 100,140,180 never reached in its" in card
    caplog.clear()
    with caplog.at_level("WARNING", logger="refilled_hf.pipeline"):
        run({**recipe, "output_dir": str(tmp_path / "inside"), "stage2_milestones": "10,14,18"})
    assert "stage2_milestones" not in caplog.text


def test_unreached_milestones_are_named_once_before_training_even_with_two_stage2_runs(data_dir, teacher_dir, tmp_path,
                                                                                      caplog):  # fmt: skip
    """The lambda search trains stage 2 once per candidate: the warning is the run's, said
    once, before stage 1 trains (it used to come per candidate, after stage 1)."""
    recipe = tiny_recipe(data_dir, tmp_path / "refilled", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         stage2_epochs=1, stage2_milestones="1", distill_weight=None, max_steps=1)  # fmt: skip

    class Seen(logging.Handler):  # each message, and whether stage 1 had started when it was logged
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append((record.getMessage(), (tmp_path / "refilled" / "stage1").exists()))

    seen, pipeline_logger = Seen(), logging.getLogger("refilled_hf.pipeline")
    level = pipeline_logger.level
    pipeline_logger.addHandler(seen)
    pipeline_logger.setLevel(logging.INFO)
    try:
        run(recipe)
    finally:
        pipeline_logger.removeHandler(seen)
        pipeline_logger.setLevel(level)
    warned = [(m, started) for m, started in seen.messages if "lie at or beyond --stage2_epochs 1," in m]
    assert len(warned) == 1 and "scaled: --stage2_milestones 0.5,0.7,0.9" in warned[0][0]
    announced = [(m, started) for m, started in seen.messages if "stage 2 will run once per lambda in 1, 10" in m]
    assert len(announced) == 1
    assert not warned[0][1] and not announced[0][1]  # both before stage 1 trains


def test_without_a_validation_split_the_run_says_which_lambda_it_uses(data_dir, teacher_dir, tmp_path, caplog):
    recipe = tiny_recipe(data_dir, tmp_path / "r", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         distill_weight=None, validation_fraction=0, max_steps=1)  # fmt: skip
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
        results = run(recipe)
    assert results["distill_weight"] == 1.0
    assert "no validation split to choose it on (--validation_fraction 0, no --validation_split): stage 2 runs " \
           "once with lambda 1 " in caplog.text  # fmt: skip


def test_a_refused_run_says_only_why(data_dir, tmp_path, caplog):
    """The schedule's notes wait for the checks: a run refused on its data is told only that."""
    recipe = tiny_recipe(data_dir, tmp_path / "ce", method="ce", stage2_epochs=1, classes="3-5,nonexistent")
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"), pytest.raises(Exception, match="nonexistent"):
        run(recipe)
    assert "stage2_milestones" not in caplog.text


@pytest.mark.parametrize("num_classes", [3, 5, 6, 9])
def test_top5_is_reported_only_where_it_can_be_below_100(num_classes, tmp_path):
    """With <= 5 classes every label is in the top 5: the number would be 100 % for any
    model, so it is left out (results, card, model-index) rather than reported."""
    from refilled_hf.pipeline import inference_trainer

    torch.manual_seed(num_classes)
    model = timm.create_model("cifar_wrn_16_1", num_classes=num_classes).eval()
    n = 30
    images, labels = torch.randn(n, 3, 16, 16), torch.randint(0, num_classes, (n,))
    dataset = [{"pixel_values": images[i], "labels": int(labels[i])} for i in range(n)]
    config = RefilledConfig(output_dir=str(tmp_path), method="ce", use_cpu=True, per_device_eval_batch_size=7)
    # reference: the label's rank among each image's logits, one image at a time
    with torch.no_grad():
        rows = [model(images[i : i + 1])[0] for i in range(n)]
    ranks = [int((row > row[label]).sum()) for row, label in zip(rows, labels)]
    metrics = inference_trainer(model, config, num_classes).evaluate(dataset, metric_key_prefix="test")
    assert metrics["test_top1"] == pytest.approx(100.0 * sum(r == 0 for r in ranks) / n)
    assert metrics["test_samples"] == n
    if num_classes <= 5:
        assert "test_top5" not in metrics
    else:
        assert metrics["test_top5"] == pytest.approx(100.0 * sum(r < 5 for r in ranks) / n)


def test_per_class_top1_counts_every_image_of_each_class_once(tmp_path):
    """evaluate's per-class numbers against a per-image reference: each class's hits over its images,
    a class without images None; the totals are their weighted mean."""
    from refilled_hf.pipeline import inference_trainer

    torch.manual_seed(1)
    model = timm.create_model("cifar_wrn_16_1", num_classes=4).eval()
    n = 23  # not a multiple of the batch: the last batch is short
    images, labels = torch.randn(n, 3, 16, 16), torch.tensor([0, 1, 3] * 7 + [0, 0])  # class 2: no image
    with torch.no_grad():
        predicted = [int(model(images[i : i + 1])[0].argmax()) for i in range(n)]
    dataset = [{"pixel_values": images[i], "labels": int(labels[i])} for i in range(n)]
    config = RefilledConfig(output_dir=str(tmp_path), method="ce", use_cpu=True, per_device_eval_batch_size=5)
    trainer = inference_trainer(model, config, 4)
    trainer.per_class_metrics = True
    metrics = trainer.evaluate(dataset, metric_key_prefix="test")
    expected = []
    for c in range(4):
        rows = [i for i in range(n) if labels[i] == c]
        expected.append(100.0 * sum(predicted[i] == c for i in rows) / len(rows) if rows else None)
    assert metrics["test_per_class_samples"] == [9, 7, 0, 7]
    assert metrics["test_per_class_top1"] == pytest.approx(expected)
    weighted = sum(t * k for t, k in zip(expected, [9, 7, 0, 7]) if t is not None) / n
    assert metrics["test_top1"] == pytest.approx(weighted)


@pytest.mark.slow
@pytest.mark.parametrize("source_names", [CLASS_NAMES[3:6], ["c0", "c1", "c2"], ["c0", "c1", "c2", "c3", "c4"]])
def test_a_student_given_as_a_folder_or_a_checkpoint_starts_from_its_weights(data_dir, tmp_path, source_names):
    """What --student's help says: local-dir: and --student_checkpoint start from their
    weights; a classifier for other classes than the selection (3-5) is new: another count,
    or, for a folder (which names its classes), other names."""
    source_classes = len(source_names)
    from safetensors.torch import save_file

    from refilled_hf.hub import export_model

    torch.manual_seed(123)
    source = timm.create_model("cifar_wrn_16_1", num_classes=source_classes)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    export_model(source, tmp_path / "source", label_names=source_names)
    save_file(source.state_dict(), str(tmp_path / "source.safetensors"))
    expected = source.state_dict()

    class FirstWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.append({k.removeprefix("model."): v.detach().clone() for k, v in model.state_dict().items()})

    for name, student in (("dir", {"student": f"local-dir:{tmp_path / 'source'}"}),
                          ("ckpt", {"student_checkpoint": str(tmp_path / "source.safetensors")})):  # fmt: skip
        seen: list[dict[str, torch.Tensor]] = []
        run(tiny_recipe(data_dir, tmp_path / name, method="ce", stage2_epochs=1, max_steps=1, **student),
            callbacks=[FirstWeights()])  # fmt: skip
        first = seen[0]
        for key, value in expected.items():
            if key.startswith("fc."):
                kept = source_names == CLASS_NAMES[3:6] or (name == "ckpt" and source_classes == 3)
                assert first[key].shape[0] == 3 and torch.equal(first[key], value) == kept, (name, key)
            else:
                assert torch.equal(first[key], value), (name, key)
