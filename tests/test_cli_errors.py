"""Bad input through the command line: exit code 2, one line naming the problem and the
fix, no traceback, nothing written, before any training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import CLASS_NAMES, deny_access, tiny_recipe, write_random_teacher

from refilled_hf.cli import main


def refused(capsys, argv: list[str], message: str, out: Path | None = None) -> str:
    """Run the CLI in-process: it must exit 2 with exactly one error line matching ``message``."""
    existed = out.exists() if out is not None else False
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1, err[-2000:]
    assert len(errors[0]) < 700, errors[0]
    assert __import__("re").search(message, errors[0]), errors[0]
    if out is not None and not existed:
        assert not out.exists(), f"{out} was written by a refused run"
    return errors[0]


def recipe_file(tmp_path: Path, data_dir: Path, **fields) -> str:
    recipe = tiny_recipe(data_dir, tmp_path / "out", method="ce", stage2_epochs=1)
    recipe.update(fields)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_corrupt_training_image(capsys, data_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(data_dir, folder)
    table = pq.read_table(folder / "train.parquet")
    images = table.column("image").to_pylist()
    row = table.column("label").to_pylist().index(4)  # a row of a selected class (3-5)
    images[row] = {"bytes": images[row]["bytes"][:30], "path": None}
    column = pa.array(images, type=table.schema.field("image").type)
    table = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"), column)
    pq.write_table(table, folder / "train.parquet")
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, folder)], rf"cannot be decoded.*row {row}",
            tmp_path / "out")  # fmt: skip


@pytest.mark.parametrize(
    "value,message",
    [([1, 2], "takes a single value, got a list"), ({"a": 1}, "takes a single value, got a dict"),
     ("abc", "invalid float value"), (None, "cannot be null")],
    ids=["list", "dict", "string", "null"],
)  # fmt: skip
def test_yaml_values_of_the_wrong_type(value, message, capsys, data_dir, tmp_path):
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir, stage2_epochs=value)], message,
            tmp_path / "out")  # fmt: skip


def test_unreadable_yaml(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: [unclosed\n  - x: :")
    refused(capsys, ["distill", "--config", str(path)], "not readable YAML")


def test_output_dir_that_is_a_file(capsys, data_dir, tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--output_dir", str(target)],
            "is a file, not a folder")  # fmt: skip
    assert target.read_text() == "mine"
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--output_dir", str(target / "run")],
            f"{target} is a file, not a folder")  # fmt: skip
    assert target.read_text() == "mine"


def test_output_dir_in_a_folder_this_user_cannot_write(capsys, data_dir, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    deny_access(monkeypatch, shared)
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--output_dir", str(shared / "run")],
            f"{shared} is not writable; choose a folder you can write to")  # fmt: skip
    assert list(shared.iterdir()) == []


def test_damaged_run_manifest_on_resume(capsys, data_dir, tmp_path):
    out = tmp_path / "out"
    (out / "ce").mkdir(parents=True)
    (out / "run.json").write_text("{not json")
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--resume_from_checkpoint", "true"],
            "run.json is damaged")  # fmt: skip


def test_huge_class_selection_gives_a_short_message(capsys, data_dir, tmp_path):
    line = refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--classes", "0-999999"],
                   "out of range", tmp_path / "out")  # fmt: skip
    assert "more)" in line


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--image_size", "100000"], r"image_size.*\[8, 1024\]"),
        (["--per_device_train_batch_size", "65536", "--image_size", "1024"], "GiB for its inputs alone"),
        (["--load_best_model_at_end", "true", "--eval_strategy", "no"], "needs evaluations"),
        (["--report_to", "tensorboard"], "not installed"),
        (["--stage2_milestones", "a,b"], "stage2_milestones"),
        (["--distill_weight", "inf"], "finite"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
        (["--learning_rate", "0.1"], "stage1_learning_rate"),
        (["--deepspeed", "ds.json"], "DDP"),
        (["--resume_from_checkpoint", "true", "--overwrite_output", "true"], "contradict"),
        (["--test_split", "train"], "is the training split"),
        (["--student", "inception_v3"], r"student cannot run on \(3, 16, 16\) inputs"),  # too deep for 16 px
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v)[:40],
)
def test_bad_flags(flags, message, capsys, data_dir, tmp_path):
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), *flags], message, tmp_path / "out")


@pytest.mark.parametrize(
    "baseline,message",
    [
        ({"classes": "0-2"}, "used other images than this one"),
        ({"seed": 1}, "used other images than this one"),  # same classes, another validation carve
        ({"validation_fraction": 0.5}, "used other images than this one"),
        ("earlier", r"earlier refilled-hf\): rerun it"),
    ],
    ids=["classes", "seed", "validation-fraction", "earlier-version"],
)
def test_compare_runs_on_other_images_fails_before_training(baseline, message, capsys, data_dir, tmp_path):
    other = tmp_path / "other"
    if baseline == "earlier":  # a results.json from before runs recorded their images
        other.mkdir()
        (other / "results.json").write_text(json.dumps({
            "method": "ce", "final": {"test_top1": 50.0}, "dataset": str(data_dir), "classes": "3-5",
            "class_names": ["3", "4", "5"], "data": {"shots_per_class": None},
        }))  # fmt: skip
    else:
        assert main(["distill", "--config", recipe_file(tmp_path, data_dir, output_dir=str(other), **baseline)]) == 0
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--compare_runs", str(other)],
            message, tmp_path / "out")  # fmt: skip


@pytest.mark.parametrize(
    "content,message",
    [
        (None, r"has no results\.json \(is that run finished\?\)"),
        ("{not json", r"results\.json is damaged \(Expecting property name.*pass finished runs only"),
        ("[1, 2]", r"results\.json is damaged \(not a refilled-hf results file\)"),
        ('{"method": "ce"}', r"results\.json is damaged \(not a refilled-hf results file\)"),
    ],
    ids=["missing", "not-json", "not-a-dict", "no-final"],
)
def test_compare_runs_that_are_not_finished_runs_are_refused(content, message, capsys, data_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    if content is not None:
        (other / "results.json").write_text(content)
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--compare_runs", str(other)],
            message, tmp_path / "out")  # fmt: skip


def test_evaluate_on_other_classes(capsys, data_dir, tmp_path, monkeypatch):
    from refilled_hf.data import ImageClassificationDataset

    def no_decoding(self):
        raise AssertionError("images were decoded before the classes were checked")

    monkeypatch.setattr(ImageClassificationDataset, "preload", no_decoding)
    model = write_random_teacher(tmp_path / "m", label_names=["yellow", "cyan", "magenta"])
    argv = ["evaluate", "--model", f"local-dir:{model}", "--dataset", str(data_dir), "--classes", "0-2",
            "--use_cpu", "true", "--image_size", "16", "--output_dir", str(tmp_path / "e")]  # fmt: skip
    refused(capsys, argv, "trained on the classes")


def test_evaluate_names_an_image_it_cannot_decode_as_such(capsys, data_dir, tmp_path):
    """Not as a class the data set lacks: the model's own classes are there, one image is not."""
    folder = tmp_path / "corrupt"
    shutil.copytree(data_dir, folder)
    table = pq.read_table(folder / "test.parquet")
    images = table.column("image").to_pylist()
    row = table.column("label").to_pylist().index(1)
    images[row] = {"bytes": images[row]["bytes"][:30], "path": None}
    column = pa.array(images, type=table.schema.field("image").type)
    pq.write_table(table.set_column(table.schema.get_field_index("image"), table.schema.field("image"), column),
                   folder / "test.parquet")  # fmt: skip
    model = write_random_teacher(tmp_path / "m", label_names=CLASS_NAMES[:3])
    argv = ["evaluate", "--model", f"local-dir:{model}", "--dataset", str(folder), "--use_cpu", "true",
            "--image_size", "16", "--output_dir", str(tmp_path / "e")]  # fmt: skip
    refused(capsys, argv, rf"error: 1 image of split 'test' cannot be decoded .*row {row} ")


def test_evaluate_refuses_a_timm_name_without_weights(capsys, data_dir, tmp_path):
    """A registered name without --checkpoint has no trained weights here (cifar_wrn_* has no
    pretrained ones): its top-1 would be a random initialization's, not a number to report."""
    argv = ["evaluate", "--model", "cifar_wrn_16_1", "--dataset", str(data_dir), "--classes", "0-5",
            "--use_cpu", "true", "--image_size", "16", "--output_dir", str(tmp_path / "e")]  # fmt: skip
    refused(capsys, argv, r"no --checkpoint was given.*pass the trained weights with --checkpoint", tmp_path / "e")


@pytest.mark.slow
def test_a_single_parquet_file_runs_without_a_test_split(data_dir, tmp_path):
    path = recipe_file(tmp_path, data_dir, dataset=str(data_dir / "train.parquet"), test_split="none")
    proc = subprocess.run([sys.executable, "-m", "refilled_hf.cli", "distill", "--config", path],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "test_top1" not in results["final"] and results["final"]["validation_samples"] == 9
    assert __import__("re").search(r"test top-1 \(%\) +- \(not measured\)\n", proc.stdout), proc.stdout[-800:]
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "Test top-1" not in card  # no test accuracy is claimed without a test split


def test_without_a_test_split_the_error_says_how_to_unset_it(capsys, data_dir, tmp_path):
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir, dataset=str(data_dir / "train.parquet"))],
            "--test_split none", tmp_path / "out")  # fmt: skip


def test_a_checkpoint_beside_a_model_that_brings_its_own_weights(capsys, data_dir, tmp_path):
    teacher = write_random_teacher(tmp_path / "t")
    flags = ["--method", "rkd", "--teacher", f"local-dir:{teacher}", "--teacher_checkpoint", str(tmp_path / "w.pt")]
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), *flags], "brings its own weights",
            tmp_path / "out")  # fmt: skip


def test_a_student_named_with_a_pretrained_tag_and_no_weights_is_refused(capsys, caplog, data_dir, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """`--student resnet18.a1_in1k` trained from random initialization with nothing said (a
    name gives the model, not its weights); so did train-teacher's `--teacher`. A run that
    started so (an earlier release) still resumes."""
    config = recipe_file(tmp_path, data_dir, student="resnet18.a1_in1k")
    refused(capsys, ["distill", "--config", config],
            r"--student resnet18\.a1_in1k names timm's pretrained weights 'a1_in1k'.*random initialization.*"
            r"--student hf-hub:timm/resnet18\.a1_in1k, or from a file with --student_checkpoint, or from random "
            r"initialization with --student resnet18\.$", tmp_path / "out")  # fmt: skip
    refused(capsys, ["train-teacher", "--dataset", str(data_dir), "--teacher", "resnet18.a1_in1k", "--output_dir",
                     str(tmp_path / "teacher")], r"--teacher resnet18\.a1_in1k names.*--teacher_checkpoint",
            tmp_path / "teacher")  # fmt: skip
    # with weights of its own, the tag only chooses timm's configuration of the model: trained
    weights = tmp_path / "w.safetensors"
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", num_classes=3).state_dict(), str(weights))
    assert main(["distill", "--config", config, "--student_checkpoint", str(weights)]) == 0
    # a run that started from a tagged name before this check was added goes on
    from refilled_hf import pipeline

    monkeypatch.setattr(pipeline, "check_student_start", lambda *args: None)
    assert main(["distill", "--config", config, "--output_dir", str(tmp_path / "earlier")]) == 0
    monkeypatch.undo()
    again = ["--output_dir", str(tmp_path / "earlier"), "--resume_from_checkpoint", "true"]
    assert main(["distill", "--config", config, *again]) == 0
    assert "holds this run, finished: nothing is trained again" in caplog.text


def test_a_data_file_that_is_not_a_table(capsys, data_dir, tmp_path):
    (tmp_path / "data.txt").write_text("image,label\n")
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--dataset", str(tmp_path / "data.txt")],
            r"is a file but not a table \(\.parquet, \.csv, \.jsonl, \.json\)", tmp_path / "out")  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["missing-teacher", "missing-teacher-probe", "kd-other-classes", "one-class", "student-size", "teacher-size-probe",
     "model-size-evaluate", "gray-teacher", "gray-model-evaluate"],
)  # fmt: skip
def test_a_bad_teacher_or_labels_are_refused_before_any_image_is_decoded(case, capsys, data_dir, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """Decoding every image is the long part of a start on a large data set: the checks that
    need only the teacher, the labels and the class names come before it."""
    from refilled_hf.data import ImageClassificationDataset

    def no_decoding(self):
        raise AssertionError("images were decoded before the input was checked")

    teacher = f"local-dir:{write_random_teacher(tmp_path / 'teacher')}"  # 3 classes, t0-t2
    command, flags, message = {
        "missing-teacher": ("distill", ["--method", "refilled", "--teacher", f"local-dir:{tmp_path}/none"],
                            r"no config\.json in .*none"),
        "missing-teacher-probe": ("probe-teacher", ["--teacher", f"local-dir:{tmp_path}/none"],
                                  r"no config\.json in .*none"),
        "kd-other-classes": ("distill", ["--method", "kd", "--teacher", teacher],
                             r"[Uu]se --method refilled \(or rkd\)"),
        "one-class": ("distill", ["--method", "refilled", "--teacher", teacher, "--classes", "3"],
                      "The class selection has one class"),
        "student-size": ("distill", ["--student", "inception_v3"],
                         r"student cannot run on \(3, 16, 16\) inputs"),
        "teacher-size-probe": ("probe-teacher", ["--teacher", "deep", "--teacher_input_size", "32"],
                               r"teacher cannot run on \(3, 32, 32\) inputs.*--teacher_input_size"),
        "model-size-evaluate": ("evaluate", ["--model", "deep", "--classes", "0-2"],
                                r"model cannot run on \(3, 16, 16\) inputs"),
        "gray-teacher": ("distill", ["--method", "refilled", "--teacher", "gray"],
                         r"The teacher takes 1-channel inputs, and refilled-hf gives every model RGB images"),
        "gray-model-evaluate": ("evaluate", ["--model", "gray", "--classes", "0-2"], r"The model takes 1-channel"),
    }[case]  # fmt: skip
    if "gray" in flags:  # a model for single-channel images
        gray = write_random_teacher(tmp_path / "gray", label_names=CLASS_NAMES[:3], in_chans=1)
        flags[flags.index("gray")] = f"local-dir:{gray}"
    if "deep" in flags:  # a model too deep for 32 px inputs (a ViT is built for the size asked: it runs)
        deep = write_random_teacher(tmp_path / "deep", name="inception_v3", label_names=CLASS_NAMES[:3])
        flags[flags.index("deep")] = f"local-dir:{deep}"
    monkeypatch.setattr(ImageClassificationDataset, "preload", no_decoding)
    if command == "evaluate":
        argv = [command, "--dataset", str(data_dir), "--use_cpu", "true", "--image_size", "16", "--output_dir",
                str(tmp_path / "out"), *flags]  # fmt: skip
    else:
        argv = [command, "--config", recipe_file(tmp_path, data_dir), *flags]
    refused(capsys, argv, message, tmp_path / "out")


def test_loading_the_teacher_leaves_the_global_rng_as_it_was(tmp_path):
    import torch

    from refilled_hf.config import RefilledConfig
    from refilled_hf.preflight import load_teacher

    teacher = write_random_teacher(tmp_path / "teacher")
    config = RefilledConfig(teacher=f"local-dir:{teacher}", output_dir=str(tmp_path / "o"))
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    load_teacher(config, cfg)
    assert torch.equal(torch.get_rng_state(), before)  # timm's weight init drew from a forked RNG


def test_an_install_without_its_card_template_fails_before_training(capsys, data_dir, tmp_path, monkeypatch):
    from refilled_hf import pipeline

    def missing():
        raise FileNotFoundError("refilled-hf's model card template (refilled_student.md) is missing: reinstall")

    monkeypatch.setattr(pipeline, "card_template", missing)
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir)], "model card template .* reinstall",
            tmp_path / "out")  # fmt: skip


#: how a local-dir: folder is damaged -> the error that names it
_DAMAGED_FOLDERS = {
    "truncated weights": r"its weights could not be loaded \(\w+: .*\)\. The folder is damaged or incomplete",
    "missing weights": r"its weights could not be loaded \(\w+: .*\)\. The folder is damaged or incomplete",
    "config not json": r"config\.json is not valid JSON \(JSONDecodeError: .*\)\. The folder is damaged or incomplete",
    "unknown architecture": r"config\.json names the architecture 'cifar_wrn_16_9', which timm does not know \(did you",
}


@pytest.mark.parametrize("damage", list(_DAMAGED_FOLDERS))
def test_a_damaged_local_model_folder_is_refused_in_one_line(damage, capsys, data_dir, tmp_path):
    model = write_random_teacher(tmp_path / "m", label_names=CLASS_NAMES[:3])
    weights, config = model / "model.safetensors", model / "config.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "config not json":
        config.write_text(config.read_text()[:40])
    else:
        config.write_text(config.read_text().replace('"cifar_wrn_16_1"', '"cifar_wrn_16_9"'))
    argv = ["evaluate", "--model", f"local-dir:{model}", "--dataset", str(data_dir), "--use_cpu", "true",
            "--image_size", "16", "--output_dir", str(tmp_path / "e")]  # fmt: skip
    refused(capsys, argv, _DAMAGED_FOLDERS[damage])
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--method", "rkd", "--teacher",
                     f"local-dir:{model}"], _DAMAGED_FOLDERS[damage], tmp_path / "out")  # fmt: skip


def test_a_truncated_parquet_file_is_named(capsys, data_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    (copy / "test.parquet").write_bytes((copy / "test.parquet").read_bytes()[:3000])
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, copy)],
            r"test\.parquet of .*data is not a readable parquet file \(ArrowInvalid: .*\): it is damaged",
            tmp_path / "out")  # fmt: skip


def test_a_checkpoint_that_is_not_a_state_dict_is_refused_in_one_line(capsys, data_dir, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"not a pickle at all")
    refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir), "--student_checkpoint",
                     str(tmp_path / "w.pt")], r"Checkpoint .*w\.pt' could not be read \(UnpicklingError: .*\)\. Pass a",
            tmp_path / "out")  # fmt: skip


def test_a_recipe_may_list_what_the_command_line_separates_by_commas(capsys, data_dir, tmp_path):
    from refilled_hf.cli import parse_config
    from refilled_hf.config import RefilledConfig

    path = recipe_file(tmp_path, data_dir, classes=[3, 4, "magenta"], stage2_milestones=[1, 1.5],
                       distill_weight_search=[1, 10], method="refilled", distill_weight=None)  # fmt: skip
    (config,) = parse_config((RefilledConfig,), ["--config", path], "t")
    assert (config.classes, config.stage2_milestones, config.distill_weight_search) == ("3,4,magenta", "1,1.5", "1,10")
    for bad in (["a,b"], [[3, 4]], [True]):
        refused(capsys, ["distill", "--config", recipe_file(tmp_path, data_dir, classes=bad)],
                "`classes` lists .* each item must be one number or name without a comma")  # fmt: skip
