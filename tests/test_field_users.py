"""Fields only some runs use: the others ignore them, say so, and train-teacher refuses them."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import torch
from helpers import CLASS_NAMES, tiny_recipe, write_random_teacher
from safetensors.torch import load_file
from transformers import TrainingArguments

from refilled_hf.cli import main
from refilled_hf.config import EVERY_COMMAND_FIELDS, FIELD_USERS, METHODS, ConfigError, RefilledConfig
from refilled_hf.evaluation import evaluate_model
from refilled_hf.pipeline import run_distillation, run_teacher_training

#: A value for every field of FIELD_USERS that would change a run that used it.
#: distill_weight_search is not here: every method but refilled refuses it (no stage 2 to choose).
CHANGED = {
    "teacher": "local-dir:/nonexistent/teacher",
    "teacher_checkpoint": "/nonexistent/teacher.safetensors",
    "teacher_input_size": 24,
    "teacher_classes": "0-1",
    "teacher_cache": "{tmp}/cache",
    "teacher_cache_dtype": "float32",
    "teacher_cache_budget_gb": 0.5,
    "stage1_variant": "triplet",
    "tau1": 1.5,
    "margin": 0.5,
    "stage1_weight": 10.0,
    "mining_scope": "local",
    "stage1_epochs": 1,
    "stage1_learning_rate": 0.3,
    "stage1_min_lr_ratio": 0.5,
    "tau2": 5.0,
    "distill_weight": 50.0,
    "distill_weight_schedule": "linear",
    "distill_images": "teacher_correct",
    "centers": "batch",
    "confidence_weights": True,
    "student_alone_candidate": False,
    "kd_tau": 1.0,
    "kd_weight": 0.1,
    "rkd_distance_weight": 1.0,
    "rkd_angle_weight": 2.0,
}

#: Inherited TrainingArguments fields only a training run reads, each changed (evaluate and
#: probe-teacher must measure the same with them, and name them). --optim_args is in
#: OTHER_OPTIMIZER: no optimizer installed here reads both it and AdamW's fields, and a setting
#: the optimizer does not read is refused (test_integrity).
TRAINING_ONLY = {
    "max_steps": 3, "warmup_steps": 2, "optim": "adamw_torch", "adam_beta1": 0.8,
    "adam_beta2": 0.99, "adam_epsilon": 1e-6, "weight_decay": 0.01, "gradient_accumulation_steps": 2,
    "max_grad_norm": 1.0, "label_smoothing_factor": 0.1, "torch_empty_cache_steps": 5,
    "per_device_train_batch_size": 4, "dataloader_drop_last": True, "train_sampling_strategy": "sequential",
    "eval_strategy": "steps", "eval_steps": 5, "eval_delay": 1, "eval_on_start": True,
    "load_best_model_at_end": True, "save_strategy": "steps", "save_steps": 5, "save_total_limit": 1,
    "save_only_model": True, "save_on_each_node": True, "restore_callback_states_from_checkpoint": True,
    "resume_from_checkpoint": "true", "push_to_hub": True, "hub_model_id": "me/never-pushed", "hub_private_repo": True,
    "output_dir": "never-written",
}  # fmt: skip
OTHER_OPTIMIZER = {
    **{name: value for name, value in TRAINING_ONLY.items() if not name.startswith("adam_")},
    "optim": "rmsprop", "optim_args": "momentum=0.5",
}  # fmt: skip


def test_every_field_only_training_reads_is_listed():
    training_only = {name for name, users in FIELD_USERS.items() if users == (*METHODS, "train-teacher")}
    inherited = {f.name for f in fields(TrainingArguments)}
    assert training_only & inherited == set(TRAINING_ONLY) | set(OTHER_OPTIMIZER)
    assert "hub_token" not in FIELD_USERS  # a warning lists values: the token must never be one


def test_every_own_field_says_who_uses_it():
    """A new field gets a decision: the commands that read it (FIELD_USERS), or every one."""
    own = {f.name for f in fields(RefilledConfig)} - {f.name for f in fields(TrainingArguments)}
    assert own - set(FIELD_USERS) == set(EVERY_COMMAND_FIELDS)
    assert not set(EVERY_COMMAND_FIELDS) & set(FIELD_USERS)


def _ignored_by(method: str) -> set[str]:
    return {name for name, users in FIELD_USERS.items() if method not in users} - {"distill_weight_search"}


@pytest.mark.parametrize("method", ["ce", "kd", "rkd"])
def test_fields_a_method_does_not_use_change_nothing_and_are_named(method, data_dir, teacher_dir, tmp_path, caplog):
    """A run with every field its method does not use changed trains the same student, to
    the bit, as one without, and its warning names each of them."""
    ignored = _ignored_by(method)
    assert ignored <= set(CHANGED), f"give CHANGED a value for {sorted(ignored - set(CHANGED))}"
    teacher = f"local-dir:{teacher_dir}"
    if method == "kd":  # KD needs a teacher over the student's own classes
        teacher = f"local-dir:{write_random_teacher(tmp_path / 'kd-teacher', label_names=CLASS_NAMES[3:6])}"
    defaults = {"teacher_classes": None, "distill_weight": None, "stage1_epochs": 200, "stage1_learning_rate": 0.1}
    base = tiny_recipe(data_dir, tmp_path / "plain", method=method, teacher=teacher, stage2_epochs=1, **defaults)
    changed = {name: str(CHANGED[name]).format(tmp=tmp_path) if name == "teacher_cache" else CHANGED[name]
               for name in ignored}  # fmt: skip
    if method == "ce":
        base.pop("teacher")  # ce runs without a teacher
    assert RefilledConfig(**base).fields_unused_by(method) == {}  # the baseline sets none of them
    first = run_distillation(RefilledConfig(**base))
    with caplog.at_level("WARNING", logger="refilled_hf.pipeline"):
        second = run_distillation(RefilledConfig(**{**base, **changed, "output_dir": str(tmp_path / "changed")}))
    warning = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warning) == 1 and warning[0].startswith(f"--method {method} does not use ")
    for name in changed:
        assert f"--{name} " in warning[0]
    for key in ("test_top1", "test_loss", "validation_top1", "validation_loss"):
        assert first["final"][key] == second["final"][key]
    weights = [load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("plain", "changed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # evaluate uses none of the training fields either, and says so
    for training_only in (TRAINING_ONLY, OTHER_OPTIMIZER):
        caplog.clear()
        with caplog.at_level("WARNING", logger="refilled_hf.pipeline"):
            config = RefilledConfig(**{**base, **changed, **training_only, "output_dir": str(tmp_path / "eval")})
            metrics = evaluate_model(f"local-dir:{tmp_path / 'changed' / 'model'}", config)
        assert metrics["test_top1"] == first["final"]["test_top1"]
        assert metrics["test_loss"] == first["final"]["test_loss"]  # label smoothing never reaches evaluation
        assert "evaluate does not use " in caplog.text and "--stage2_epochs " in caplog.text
        for name, value in {**training_only, "output_dir": tmp_path / "eval"}.items():
            assert f"--{name} {value}," in caplog.text or f"--{name} {value}:" in caplog.text
        assert not (tmp_path / "eval").exists()  # nothing trained, nothing written (it gained an empty evaluate/)


def test_a_method_warns_about_nothing_it_uses(data_dir, teacher_dir):
    """The warning is not noise: a refilled recipe names nothing under refilled, and only what
    REFILLED alone uses under rkd."""
    recipe = tiny_recipe(data_dir, "o", teacher=f"local-dir:{teacher_dir}", tau1=2.0, kd_weight=0.5)
    assert RefilledConfig(**recipe).fields_unused_by("refilled") == {"kd_weight": 0.5}
    assert set(RefilledConfig(**{**recipe, "method": "rkd"}).fields_unused_by("rkd")) == {
        "tau1", "stage1_epochs", "stage1_learning_rate", "distill_weight", "kd_weight"}  # fmt: skip
    with pytest.raises(ValueError, match="unknown user"):
        RefilledConfig(**recipe).fields_unused_by("distill")


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("teacher_classes", "0-2", "The teacher trains on --classes"),
        ("student", "resnet18", "The model trained is --teacher"),
        ("method", "kd", "always trains with cross-entropy"),
        ("distill_weight", 10.0, "remove it. It trains with cross-entropy on stage 2's schedule: --stage2_epochs"),
        ("stage1_epochs", 3.0, "remove it. It trains with cross-entropy on stage 2's schedule: --stage2_epochs"),
        ("teacher_cache", "cache", "remove it."),
    ],
)
def test_train_teacher_refuses_what_it_does_not_use(field, value, hint, data_dir, tmp_path):
    """train-teacher has no method to switch: a distillation field there is a mistake (with
    --teacher_classes 0-2 the teacher trained on every class), refused before any work."""
    recipe = {k: v for k, v in tiny_recipe(data_dir, tmp_path / "t", teacher="cifar_wrn_16_1").items()
              if k not in ("teacher_classes", "distill_weight", "stage1_epochs", "stage1_learning_rate")}  # fmt: skip
    with pytest.raises(ConfigError, match=rf"train-teacher does not use --{field} {value}: .*{hint}"):
        run_teacher_training(RefilledConfig(**{**recipe, field: value}))
    assert not (tmp_path / "t").exists()


def test_help_says_who_uses_a_field(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps (and hyphen-breaks) at the terminal's width
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "KD: weight of the distillation term. [used by distill --method kd; the others warn" in text
    assert "Stage-1 temperature. [used by distill --method refilled; the others warn that they ignore it, " \
           "train-teacher refuses it]" in text  # fmt: skip
    assert "[used by distill --method refilled/kd/rkd, train-teacher, probe-teacher; the others warn" in text
    assert "each stage: steps (>= 1) or a fraction of it (< 1). [used by distill, train-teacher; the others warn " \
           "that they ignore it]" in text  # fmt: skip
    # where train-teacher reads a student's option, for the teacher it trains, the help says so
    for option in ("--classes CLASSES The student's classes (train-teacher: the teacher's)",
                   "Input size of the student (train-teacher: of the teacher it trains;",
                   "timm.create_model for the student (train-teacher: for the teacher it trains)",
                   "the model trained (the student; train-teacher's teacher)",
                   "Stage-2 epochs; the baselines' and train-teacher's epochs."):  # fmt: skip
        assert option in text, option


@pytest.mark.parametrize(
    "command,shown,hidden",
    [
        ("evaluate", ["--model", "--classes", "--per_device_eval_batch_size", "--seed"],
         ["--stage1_epochs", "--tau1", "--optim", "--deepspeed", "--learning_rate", "--do_eval"]),
        ("probe-teacher", ["--teacher", "--shots_per_class", "--classes"],
         ["--stage2_epochs", "--kd_weight", "--push_to_hub", "--fsdp"]),
        ("train-teacher", ["--teacher", "--stage2_epochs", "--optim", "--deepspeed"],
         ["--tau1", "--teacher_classes", "--method"]),
        ("distill", ["--tau1", "--kd_weight", "--deepspeed", "--learning_rate"], []),
    ],
)  # fmt: skip
def test_help_lists_the_options_a_command_reads(command, shown, hidden, capsys):
    """`evaluate --help` is not 1,000 lines of training options it ignores; they still parse."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    flags = set(re.findall(r"^  (--[a-z0-9_]+)", capsys.readouterr().out, flags=re.M))
    assert set(shown) <= flags and not set(hidden) & flags, (set(shown) - flags, set(hidden) & flags)


def test_the_command_line_refuses_train_teacher_options(data_dir, tmp_path, capsys):
    code = main(["train-teacher", "--teacher", "cifar_wrn_16_1", "--dataset", str(data_dir), "--teacher_classes",
                 "0-2", "--output_dir", str(tmp_path / "t"), "--use_cpu", "true"])  # fmt: skip
    assert code != 0
    assert "train-teacher does not use --teacher_classes 0-2" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_probe_teacher_names_what_it_does_not_use(data_dir, teacher_dir, tmp_path, caplog):
    from refilled_hf.probe import probe_teacher

    recipe = tiny_recipe(data_dir, tmp_path / "p", teacher=f"local-dir:{teacher_dir}", teacher_classes=None,
                         distill_weight=None, stage1_epochs=200, stage1_learning_rate=0.1, kd_weight=0.5)  # fmt: skip
    with caplog.at_level("WARNING", logger="refilled_hf.pipeline"):
        result = probe_teacher(RefilledConfig(**recipe))
    assert result["validation_images"] == 9
    warning = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    # the probe uses the teacher, the student's input size and the data; not the schedules
    assert len(warning) == 1 and warning[0].startswith("probe-teacher does not use ")
    named = warning[0].split(": ignored")[0].removeprefix("probe-teacher does not use ").split(", ")
    expected = ["--kd_weight 0.5", "--stage2_epochs 2", "--stage2_learning_rate 0.05", "--stage2_milestones 1",
                "--per_device_train_batch_size 12", "--save_total_limit 3"]  # fmt: skip
    assert named == [*expected, f"--output_dir {tmp_path / 'p'}"]
    assert not (tmp_path / "p").exists()  # the probe writes nothing (it left an empty probe/ folder)

    # nor the options only training reads: the same probe, and each named
    caplog.clear()
    with caplog.at_level("WARNING", logger="refilled_hf.pipeline"):
        result_with_training_options = probe_teacher(
            RefilledConfig(**{**recipe, **TRAINING_ONLY, "output_dir": str(tmp_path / "never-written")})
        )
    assert result_with_training_options["probe_ncm_top1"] == result["probe_ncm_top1"]
    assert "--optim adamw_torch, " in caplog.text and "--per_device_train_batch_size 4, " in caplog.text
