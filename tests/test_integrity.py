"""Never a wrong number, never a lost file: each evaluation sees exactly its split, every
inherited option is honoured or refused, non-finite settings and diverged models stop
the run, labels that are not classes are refused, runs never mix, evaluation checks the
label space, and a user's files are never deleted."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import CLASS_NAMES, tiny_recipe, write_image_dataset, write_random_teacher
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainingArguments

from refilled_hf.backbone import FrozenTeacher, StudentModel
from refilled_hf.config import (
    INHERITED_FIELDS,
    REPLACED_FIELDS,
    UNSUPPORTED_FIELDS,
    ConfigError,
    RefilledConfig,
    option_name,
)
from refilled_hf.data import DataError, load_classification_data
from refilled_hf.evaluation import evaluate_model
from refilled_hf.hub import export_model
from refilled_hf.pipeline import RunError, RunInterrupted, run_distillation
from refilled_hf.preemption import StopOnSignal
from refilled_hf.probe import _carve_fix, probe_teacher
from refilled_hf.provenance import teacher_training_rows, training_data_record
from refilled_hf.rundir import RunDirectory, RunDirError, checkpoint_problem
from refilled_hf.trainer import RefilledTrainer


def run(recipe: dict, callbacks=None) -> dict:
    return run_distillation(RefilledConfig(**recipe), callbacks=callbacks)


def unfinish(out: Path) -> None:
    """Make a finished run look interrupted after its last checkpoint."""
    (out / "results.json").unlink()
    shutil.rmtree(out / "model")


def change_one_pixel(parquet: Path, row: int) -> None:
    """Invert the first pixel of the image at ``row`` of a parquet split, in place."""
    table = pq.read_table(parquet)
    images = table.column("image").to_pylist()
    pixels = np.array(Image.open(io.BytesIO(images[row]["bytes"])))
    pixels[0, 0] = 255 - pixels[0, 0]
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    images[row] = {"bytes": encoded.getvalue(), "path": None}
    column = pa.array(images, type=table.schema.field("image").type)
    pq.write_table(table.set_column(table.schema.get_field_index("image"), table.schema.field("image"), column),
                   parquet)  # fmt: skip


def checkpoints(stage_dir: Path) -> list[Path]:
    return sorted(stage_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


# ----------------------------------------------------------------- 1. each split is evaluated


@pytest.mark.slow
def test_persistent_workers_never_swap_the_test_split_for_validation(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="ce", stage2_epochs=1, dataloader_num_workers=1,
                         dataloader_persistent_workers=True)  # fmt: skip
    results = run(recipe)
    # 18 test images and 9 validation images: with the cached loader, test reported 9.
    assert results["final"]["test_samples"] == 18
    assert results["final"]["validation_samples"] == 9
    again = evaluate_model(
        f"local-dir:{tmp_path / 'run' / 'model'}", RefilledConfig(**{**recipe, "output_dir": str(tmp_path / "e")})
    )
    assert again["test_top1"] == pytest.approx(results["final"]["test_top1"])


@pytest.mark.slow
def test_drop_last_never_drops_evaluation_images(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="ce", stage2_epochs=1, dataloader_drop_last=True,
                         per_device_eval_batch_size=4)  # fmt: skip
    results = run(recipe)
    assert results["final"]["test_samples"] == 18 and results["final"]["validation_samples"] == 9


# ----------------------------------------------------------------- 2. inherited TrainingArguments


def test_every_inherited_field_has_a_decision():
    inherited = {f.name for f in TrainingArguments.__dataclass_fields__.values() if f.init}
    assert inherited == set(INHERITED_FIELDS), sorted(inherited ^ set(INHERITED_FIELDS))


@pytest.mark.parametrize("name", sorted(REPLACED_FIELDS))
def test_replaced_fields_are_refused_naming_the_field_to_use(name, tmp_path):
    value = {"learning_rate": 5e-5, "num_train_epochs": 3.0, "lr_scheduler_type": "linear"}[name]
    with pytest.raises(ConfigError, match=f"`{name}` is not used.*--stage"):
        RefilledConfig(output_dir=str(tmp_path), **{name: value})


#: A non-default value for every unsupported field.
UNSUPPORTED_VALUES = {
    "lr_scheduler_kwargs": {"power": 2}, "optim_target_modules": ["attn"], "average_tokens_across_devices": False,
    "bf16_full_eval": True, "fp16_full_eval": True, "activation_checkpointing": True,
    "activation_checkpointing_kwargs": {"use_reentrant": False}, "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False}, "use_liger_kernel": True,
    "liger_kernel_config": {"rope": True}, "use_cache": True, "neftune_noise_alpha": 5.0,
    "include_num_input_tokens_seen": "all", "auto_find_batch_size": True, "prediction_loss_only": True,
    "eval_do_concat_batches": False, "eval_use_gather_object": True, "eval_accumulation_steps": 2,
    "include_for_metrics": ["inputs"], "batch_eval_metrics": True, "metric_for_best_model": "loss",
    "greater_is_better": True, "hub_strategy": "end", "hub_always_push": True, "hub_revision": "dev",
    "ignore_data_skip": True, "dataloader_in_order": False, "enable_jit_checkpoint": True, "fsdp": "full_shard",
    "fsdp_config": {"min_num_params": 1}, "deepspeed": "ds.json", "label_names": ["labels"],
    "length_column_name": "n", "debug": "underflow_overflow", "parallelism_config": {"dp_shard_size": 2},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_FIELDS))
def test_unsupported_fields_are_refused(name, tmp_path):
    assert name in UNSUPPORTED_VALUES
    with pytest.raises((ConfigError, ValueError), match=name if name != "fsdp" else "fsdp|DDP"):
        RefilledConfig(output_dir=str(tmp_path), use_cpu=True, **{name: UNSUPPORTED_VALUES[name]})


def test_a_field_of_a_newer_transformers_is_refused_unless_left_at_its_default(tmp_path, monkeypatch, capsys):
    """A transformers release newer than the test above adds a field nobody decided on: it
    must not be silently ignored (simulated by forgetting the decision on `tf32`)."""
    from refilled_hf import config as config_module
    from refilled_hf.cli import main

    monkeypatch.delitem(config_module.INHERITED_FIELDS, "tf32")
    config_module.undecided_fields.cache_clear()
    try:
        assert config_module.undecided_fields() == ("tf32",)
        with pytest.raises(ConfigError, match=r"`tf32` is an option of transformers .* that refilled-hf .* does not "
                                              r"know.*leave it at its default, or upgrade refilled-hf"):  # fmt: skip
            RefilledConfig(output_dir=str(tmp_path), use_cpu=True, tf32=True)
        RefilledConfig(output_dir=str(tmp_path), use_cpu=True)  # left at its default: fine
        monkeypatch.setenv("COLUMNS", "2000")
        with pytest.raises(SystemExit):
            main(["distill", "--help"])
        assert "Not known to this refilled-hf release (a newer transformers option)" in capsys.readouterr().out
    finally:
        monkeypatch.undo()
        config_module.undecided_fields.cache_clear()
    assert config_module.undecided_fields() == ()


def test_help_says_which_inherited_options_are_refused_or_not_read(capsys, monkeypatch):
    """transformers' help for a refused option describes what it would do in a Trainer script."""
    from refilled_hf.cli import main

    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps (and hyphen-breaks) at the terminal's width
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    lines: dict[str, str] = {}  # each option's usage and help as one line (argparse may put the help below)
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            lines[flag] = " ".join(line.split())
        elif flag and line.startswith("   "):
            lines[flag] += " " + " ".join(line.split())
        else:
            flag = None
    for name, reason in UNSUPPORTED_FIELDS.items():
        assert f"Not supported by refilled-hf ({reason}): refused unless left at its default." in lines[f"--{name}"]
    # the fix they name holds for every command: train-teacher, which refuses --stage1_*, included
    assert (
        "Refused: set --stage2_learning_rate (the baselines', train-teacher's and REFILLED's stage 2) and, "
        "for --method refilled, --stage1_learning_rate." in lines["--learning_rate"]
    )
    assert "Refused: set --stage2_epochs (the baselines' and train-teacher's epochs" in lines["--num_train_epochs"]
    assert "Informational, as in transformers: refilled-hf does not read it" in lines["--do_eval"]
    assert "The target modules" not in lines["--optim_target_modules"]
    assert "'random' (default) or 'sequential' (the length-based samplers are refused)" in lines[
        "--train_sampling_strategy"]  # fmt: skip


def test_options_that_cannot_work_here_are_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match="--report_to tensorboard.*not installed.*--report_to none"):
        RefilledConfig(output_dir=str(tmp_path), report_to="tensorboard")
    with pytest.raises(ConfigError, match="load_best_model_at_end needs evaluations"):
        RefilledConfig(output_dir=str(tmp_path), load_best_model_at_end=True, eval_strategy="no")
    with pytest.raises(ConfigError, match="adam_beta1.*only applies"):
        RefilledConfig(output_dir=str(tmp_path), adam_beta1=0.5)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--fp16 needs a CUDA GPU"):
            RefilledConfig(output_dir=str(tmp_path), fp16=True)


@pytest.mark.parametrize("launch", [["--cpu", "--num_processes", "2"], ["--num_processes", "2"], ["--cpu"]])
def test_a_launch_asked_for_several_processes_that_started_one_is_named(launch, tmp_path):
    """`accelerate launch --num_processes 2` without --multi_gpu starts one process (several
    only through mpirun); the run trained alone with nothing said. The launched process
    reports what refilled-hf would warn, under the installed accelerate's own launcher."""
    script = tmp_path / "probe.py"
    script.write_text(
        "from refilled_hf.config import lone_process_launch_warning\nprint(lone_process_launch_warning())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout.strip().splitlines()
    if "--num_processes" in launch:
        assert len(said) == 1 and said[0].startswith("accelerate launch started this process alone"), said
        assert "--multi_gpu --num_processes N" in said[0] and "torchrun --nproc_per_node N" in said[0]
    else:
        assert said == ["None"]


def test_what_the_launcher_sets_is_what_the_run_records_or_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` autocasts the Trainer whatever --bf16 says, and
    --dynamo_backend compiles it: the run's records (results, card, teacher-cache key, identity)
    must say so; DeepSpeed and FSDP are refused."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = RefilledConfig(output_dir=str(tmp_path))
    assert config.bf16 and config.mixed_precision == "bf16"
    assert config.final_stage_schedule()["precision"] == "bf16" and config.to_recipe()["bf16"] is True
    assert config.stage_view(method="ce").bf16  # every stage's view too
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    config = RefilledConfig(output_dir=str(tmp_path))
    assert not config.bf16 and config.final_stage_schedule()["precision"] == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION=fp8 .*Launch with --mixed_precision bf16"):
        RefilledConfig(output_dir=str(tmp_path))
    if not torch.cuda.is_available():
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        with pytest.raises(ConfigError, match="--mixed_precision fp16 needs a CUDA GPU"):
            RefilledConfig(output_dir=str(tmp_path))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    for name, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP"),
                       ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):  # fmt: skip
        monkeypatch.setenv(name, "true")
        with pytest.raises(ConfigError, match=f"{name}=true: this launch asks for {what}.*DDP"):
            RefilledConfig(output_dir=str(tmp_path))
        monkeypatch.setenv(name, "false")
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "4")  # data parallelism: fine
    for kind in ("DP_SHARD", "TP", "CP", "SP"):
        monkeypatch.setenv(f"PARALLELISM_CONFIG_{kind}_SIZE", "1")
    RefilledConfig(output_dir=str(tmp_path))
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    with pytest.raises(ConfigError, match=r"tensor, context or sequence parallelism \(TP=2\).*DDP"):
        RefilledConfig(output_dir=str(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "false")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "reduce-overhead")
    config = RefilledConfig(output_dir=str(tmp_path))
    assert (config.torch_compile, config.torch_compile_backend, config.torch_compile_mode) == (
        True, "inductor", "reduce-overhead")  # fmt: skip
    assert RefilledConfig(output_dir=str(tmp_path), torch_compile_backend="aot_eager").torch_compile_mode is None


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(load_best_model_at_end=True, validation_fraction=0.0), "load_best_model_at_end selects on the valid"),
        (dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="no"),
         r"needs --save_strategy equal to --eval_strategy \(epoch\), got no"),
        (dict(save_strategy="best", validation_fraction=0.0), "--save_strategy best selects on the validation"),
        (dict(dataloader_prefetch_factor=2), "--dataloader_prefetch_factor needs --dataloader_num_workers > 0"),
        (dict(dataloader_persistent_workers=True), "--dataloader_persistent_workers needs --dataloader_num_work"),
        (dict(train_sampling_strategy="group_by_length"), "supports random or sequential"),
    ],
)  # fmt: skip
def test_options_that_contradict_each_other_are_refused_naming_the_fix(options, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(output_dir=str(tmp_path), **options)


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"split_batches": True}, "split_batches=true makes --per_device_train_batch_size the global batch"),
        ({"even_batches": False}, "even_batches=false gives the processes batches of different sizes"),
        ({"dispatch_batches": True}, "dispatch_batches=true has process 0 load every process's batches"),
        ({"use_seedable_sampler": False}, "use_seedable_sampler=false .* resumed inside an epoch trains on other"),
    ],
)
def test_data_loader_settings_that_change_what_a_run_trains_on_are_refused(setting, message, tmp_path):
    """A 2-process run with split_batches trained on global batches of 12 and its model card said
    24; even_batches=false crashed in the gather of global mining; a run resumed inside an epoch
    without the seedable sampler ended with another test loss than the uninterrupted run. Given
    as a dict, JSON text or a JSON file alike; the other settings pass."""
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(output_dir=str(tmp_path), accelerator_config=setting)
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(output_dir=str(tmp_path), accelerator_config=json.dumps(setting))
    path = tmp_path / "accelerator.json"
    path.write_text(json.dumps(setting))
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(output_dir=str(tmp_path), accelerator_config=str(path))
    (name,) = setting
    allowed = {name: None if name == "dispatch_batches" else not setting[name]}
    config = RefilledConfig(output_dir=str(tmp_path), accelerator_config=allowed)
    assert getattr(config.accelerator_config, name) is allowed[name]


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(optim="adamw_torch", optim_args="beta1=0.8"), r"--optim_args beta1=0.8 changes nothing in --optim adamw"),
        (dict(optim="rmsprop", adam_beta1=0.8), "--adam_beta1 0.8 changes nothing in --optim rmsprop"),
        (dict(optim="rmsprop", optim_args="mom=0.5"), "--optim_args mom=0.5 changes nothing"),
        (dict(optim="rmsprop", optim_args="momentum:0.5"), "cannot be built here.*key=value pairs"),
        (dict(optim="adamw_torch", sgd_momentum=0.5), "--sgd_momentum applies to --optim sgd"),
        (dict(optim="lion_32bit"), "--optim lion_32bit cannot be built here: .*bitsandbytes"),
    ],
)  # fmt: skip
def test_optimizer_settings_the_optimizer_does_not_read_are_refused(options, message, tmp_path):
    """transformers builds each optimizer from the few fields it knows and passes over the others in
    silence: `--optim adamw_torch --optim_args beta1=0.8` trained with beta1 0.9. An optimizer of a
    package that is not installed failed only once the data was loaded."""
    if options["optim"] == "lion_32bit" and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(output_dir=str(tmp_path), use_cpu=True, **options)


def test_optimizer_settings_the_optimizer_reads_reach_it(tmp_path):
    from transformers import Trainer

    probe = torch.nn.Linear(1, 1)
    for options, expected in (
        (dict(optim="rmsprop", optim_args="momentum=0.5"), {"momentum": 0.5}),
        (dict(optim="adamw_torch", adam_beta1=0.8, adam_epsilon=1e-6), {"betas": (0.8, 0.999), "eps": 1e-6}),
    ):
        config = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, **options)
        kwargs = Trainer.get_optimizer_cls_and_kwargs(config, probe)[1]
        assert {key: kwargs[key] for key in expected} == expected


def _optimizer_state_keys(stage_dir: Path) -> set[str]:
    state = torch.load(checkpoints(stage_dir)[-1] / "optimizer.pt", weights_only=True)
    return {key for per_param in state["state"].values() for key in per_param}


@pytest.mark.slow
def test_optim_chooses_the_optimizer_and_sgd_stays_the_default(data_dir, tmp_path):
    run(tiny_recipe(data_dir, tmp_path / "sgd", method="ce", stage2_epochs=1))
    run(tiny_recipe(data_dir, tmp_path / "adam", method="ce", stage2_epochs=1, optim="adamw_torch"))
    assert "momentum_buffer" in _optimizer_state_keys(tmp_path / "sgd" / "ce")
    assert "exp_avg" in _optimizer_state_keys(tmp_path / "adam" / "ce")


def _learning_rates(stage_dir: Path) -> list[float]:
    state = json.loads((checkpoints(stage_dir)[-1] / "trainer_state.json").read_text())
    return [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]


@pytest.mark.slow
def test_warmup_and_max_steps_act_on_every_stage_without_moving_the_schedule(data_dir, teacher_dir, tmp_path):
    teacher = f"local-dir:{teacher_dir}"
    full = tiny_recipe(data_dir, tmp_path / "full", method="refilled", teacher=teacher, stage1_epochs=2,
                       stage2_epochs=2, warmup_steps=2)  # fmt: skip
    reference = run(full)
    capped = {**full, "output_dir": str(tmp_path / "capped"), "max_steps": 2}
    run(capped)
    # a --max_steps beyond a stage's 6 steps stops nothing: the stage ends with its epochs, as the
    # full run (transformers trained on for 7 steps, past the schedule, and the card said "2.333 of
    # 2 planned epochs")
    beyond = run({**full, "output_dir": str(tmp_path / "beyond"), "max_steps": 7})
    assert beyond["final"]["train_metrics"]["epoch"] == beyond["stage1"]["train_metrics"]["epoch"] == 2
    assert beyond["final"]["test_loss"] == pytest.approx(reference["final"]["test_loss"], rel=1e-6)
    card = (tmp_path / "beyond" / "model" / "README.md").read_text()
    assert "margin 0.2, 2 epochs," in card and "centres), 2 epochs," in card and "planned" not in card
    for stage in ("stage1", "stage2"):
        lrs = _learning_rates(tmp_path / "full" / stage)
        peak = 0.05
        assert lrs[0] == pytest.approx(peak / 2)  # warm-up: step 1 of 2
        assert lrs[0] < lrs[1] <= peak
        assert max(lrs) <= peak + 1e-12
        # max_steps stops the stage after 2 steps, on the full run's schedule (not compressed into 2 steps)
        state = json.loads((checkpoints(tmp_path / "capped" / stage)[-1] / "trainer_state.json").read_text())
        assert state["global_step"] == 2
        assert _learning_rates(tmp_path / "capped" / stage) == pytest.approx(lrs[:2])
    # 3 steps per epoch: stage 2's milestone at epoch 1 falls after step 3, as in the full run
    assert _learning_rates(tmp_path / "full" / "stage2")[3] == pytest.approx(0.05 * 0.2)


def test_label_smoothing_applies_to_the_cross_entropy(tmp_path):
    student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=3))
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, label_smoothing_factor=0.2, eval_strategy="no",
                          save_strategy="no")  # fmt: skip
    trainer = RefilledTrainer(model=student, args=args, stage="ce", num_classes=3)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 0])}
    student.eval()
    loss = trainer.compute_loss(student, batch)
    logits = student(batch["pixel_values"])["logits"]
    smoothed = F.cross_entropy(logits, batch["labels"], label_smoothing=0.2)
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert abs(loss.item() - F.cross_entropy(logits, batch["labels"]).item()) > 1e-4


@pytest.mark.parametrize(
    "stage,student_classes,teacher_classes,message",
    [
        ("kd", 4, 10, "teacher predicts 10 classes and the student 4"),
        ("ce", 10, None, r"head predicts 10 classes but num_classes=4.*num_classes=4"),
        ("stage2", 10, 10, r"head predicts 10 classes but num_classes=4"),
        ("rkd", 3, 4, r"head predicts 3 classes"),
    ],
)
def test_the_trainer_refuses_label_spaces_its_stage_cannot_train_on_when_built(
    stage, student_classes, teacher_classes, message, tmp_path
):
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no")
    teacher = None
    if teacher_classes is not None:
        teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=teacher_classes))
    student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=student_classes))
    with pytest.raises(ValueError, match=message):
        RefilledTrainer(model=student, args=args, stage=stage, num_classes=4, teacher=teacher)


def test_the_trainer_accepts_the_label_spaces_each_stage_trains_on(tmp_path):
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no")
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=10))
    for stage in ("stage2", "rkd"):  # across tasks: any teacher head
        student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=4))
        RefilledTrainer(model=student, args=args, stage=stage, num_classes=4, teacher=teacher)
    headless = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=0))  # stage 1 never reads the head
    RefilledTrainer(model=headless, args=args, stage="stage1", num_classes=4, teacher=teacher, centers_dataset=[])
    same = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=10))
    RefilledTrainer(model=same, args=args, stage="kd", num_classes=10, teacher=teacher)


def test_kd_from_a_teacher_of_more_classes_matches_its_softmax_over_the_students_classes(tmp_path):
    """teacher_columns: the teacher's output of each student class; the KD term is Hinton's
    KD against the teacher's logits of those outputs, in the student's order."""
    from reference_losses import kd_reference

    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no",
                          kd_tau=3.0, kd_weight=0.7, ce_weight=0.0)  # fmt: skip
    torch.manual_seed(0)
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=10))
    student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=3))
    columns = [7, 2, 5]
    trainer = RefilledTrainer(model=student, args=args, stage="kd", num_classes=3, teacher=teacher,
                              teacher_columns=columns)  # fmt: skip
    batch = {"pixel_values": torch.randn(6, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    student.eval()  # (no dropout: the reference runs the same forward)
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        teacher_logits = teacher.model.eval()(batch["pixel_values"])
        student_logits = student.model(batch["pixel_values"])
    expected = 0.7 * kd_reference(student_logits, teacher_logits[:, columns], 3.0)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)

    for bad in ([7, 2], [7, 2, 2], [7, 2, 10]):
        with pytest.raises(ValueError, match="teacher_columns must name 3 distinct outputs of the teacher's 10"):
            RefilledTrainer(model=student, args=args, stage="kd", num_classes=3, teacher=teacher, teacher_columns=bad)
    with pytest.raises(ValueError, match="stage 'rkd' uses none"):
        RefilledTrainer(model=student, args=args, stage="rkd", num_classes=3, teacher=teacher, teacher_columns=columns)


def test_the_trainer_refuses_a_training_set_without_a_length_when_built(tmp_path):
    """Its schedules are laid out in epochs; it failed inside the first train() call (TypeError)."""
    from datasets import Dataset

    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no")
    rows = Dataset.from_dict({"pixel_values": [[[[0.0]]]] * 4, "labels": [0, 1, 0, 1]})
    student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=2))
    with pytest.raises(ValueError, match=r"train_dataset has no length .* streaming=True"):
        RefilledTrainer(model=student, args=args, stage="ce", num_classes=2, train_dataset=rows.to_iterable_dataset())
    RefilledTrainer(model=student, args=args, stage="ce", num_classes=2, train_dataset=rows)  # map-style: accepted


def test_the_trainer_takes_torchvision_style_pairs_and_refuses_items_it_cannot_batch_when_built(tmp_path):
    """(image, label) pairs, as torchvision's data sets give them, failed inside train() with
    transformers' collator's `TypeError: vars() argument must have __dict__ attribute`; items
    without transformed images failed there too (KeyError: 'pixel_values')."""
    from torch.utils.data import TensorDataset

    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no",
                          per_device_train_batch_size=4, per_device_eval_batch_size=3, stage2_epochs=1)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(10, 3, 16, 16, generator=g), torch.arange(10) % 3
    pairs = TensorDataset(images, labels)
    as_dicts = [{"pixel_values": images[i], "labels": int(labels[i])} for i in range(10)]
    torch.manual_seed(0)
    student = timm.create_model("cifar_wrn_16_1", num_classes=3)
    trainer = RefilledTrainer(model=student, args=args, stage="ce", num_classes=3, train_dataset=pairs)
    trainer.train()
    by_pairs, by_dicts = trainer.evaluate(pairs), trainer.evaluate(as_dicts)
    assert by_pairs["eval_samples"] == 10 and by_pairs["eval_top1"] == by_dicts["eval_top1"]
    assert by_pairs["eval_loss"] == pytest.approx(by_dicts["eval_loss"])

    def refused(match: str, **datasets):
        with pytest.raises(ValueError, match=match):
            RefilledTrainer(model=student, args=args, stage="ce", num_classes=3, **datasets)

    from PIL import Image

    untransformed = [(Image.new("RGB", (16, 16)), 0)] * 4
    refused(r"train_dataset's items are an image of type PIL\.Image\.Image, not a \(channels, height, width\) "
            r"tensor\. .*apply the model's transform", train_dataset=untransformed)  # fmt: skip
    refused(r"an image of torch\.uint8 pixels", train_dataset=[(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)])
    refused(r"an image of shape \(8, 8, 3\), channels last", train_dataset=[(torch.zeros(8, 8, 3), 0)])
    refused(r"eval_dataset\['b'\]'s items are a dict with the keys \['image', 'label'\]",
            train_dataset=pairs, eval_dataset={"a": pairs, "b": [{"image": images[0], "label": 0}]})  # fmt: skip
    refused(r"a label that is str, not a class id", train_dataset=[(images[0], "cat")])
    # a collator of the user's makes the batches from whatever its data set holds
    RefilledTrainer(model=student, args=args, stage="ce", num_classes=3, train_dataset=untransformed,
                    data_collator=lambda items: items)  # fmt: skip


def test_compute_metrics_sees_every_image_and_a_dict_of_sets_is_evaluated_set_by_set(tmp_path):
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no",
                          per_device_eval_batch_size=4)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(10)]

    def accuracy(prediction):
        hits = prediction.predictions.argmax(1) == prediction.label_ids
        return {"accuracy": 100.0 * float(hits.mean()), "count": len(prediction.label_ids)}

    teacher = timm.create_model("cifar_wrn_16_1", num_classes=5)
    for stage, top1 in (("ce", "top1"), ("stage1", "ncm_top1")):
        student = timm.create_model("cifar_wrn_16_1", num_classes=3)
        trainer = RefilledTrainer(model=student, args=args, stage=stage, num_classes=3, teacher=teacher,
                                  centers_dataset=images, compute_metrics=accuracy)  # fmt: skip
        metrics = trainer.evaluate(images)
        assert metrics["eval_count"] == 10 and metrics["eval_accuracy"] == pytest.approx(metrics[f"eval_{top1}"])
    both = trainer.evaluate({"a": images[:4], "b": images[4:]})
    assert (both["eval_a_count"], both["eval_b_count"]) == (4, 6)
    assert both["eval_a_samples"] == 4 and "eval_b_ncm_top1" in both
    trainer.compute_metrics = lambda prediction: {"ncm_top1": 0.0}
    with pytest.raises(ValueError, match="compute_metrics returned 'ncm_top1', a metric RefilledTrainer.evaluate"):
        trainer.evaluate(images)


def test_predict_returns_each_images_logits_in_order_with_evaluates_metrics(tmp_path):
    # transformers' predict() would return the model's (embeddings, logits) and the stage's loss
    # (cross-entropy + lambda * distillation, the teacher run on every batch): not what a user predicts
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no",
                          per_device_eval_batch_size=4, distill_weight=10.0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(10)]
    teacher = timm.create_model("cifar_wrn_16_1", num_classes=5)
    student = timm.create_model("cifar_wrn_16_1", num_classes=3).eval()
    trainer = RefilledTrainer(model=student, args=args, stage="stage2", num_classes=3, teacher=teacher,
                              class_centers=torch.nn.functional.normalize(torch.randn(3, 128), dim=1))  # fmt: skip
    output = trainer.predict(images)
    assert not student.training  # the model's own mode is kept
    with torch.no_grad():  # one image at a time, in the data set's order
        expected = torch.cat([student(image["pixel_values"][None]) for image in images])
    labels = torch.tensor([image["labels"] for image in images])
    assert output.predictions.shape == (10, 3)
    assert torch.allclose(torch.from_numpy(output.predictions), expected, atol=1e-4)
    assert output.label_ids.tolist() == labels.tolist()
    top1 = 100.0 * (expected.argmax(1) == labels).float().mean().item()
    assert output.metrics["test_top1"] == pytest.approx(top1)
    assert output.metrics["test_loss"] == pytest.approx(F.cross_entropy(expected, labels).item(), rel=1e-4)
    assert output.metrics["test_samples"] == 10
    evaluated = trainer.evaluate(images, metric_key_prefix="test")
    assert {k: v for k, v in evaluated.items() if k != "epoch"} == output.metrics

    unlabelled = [{"pixel_values": image["pixel_values"]} for image in images]
    bare = trainer.predict(unlabelled)
    assert bare.label_ids is None and bare.metrics == {"test_samples": 10}
    assert torch.allclose(torch.from_numpy(bare.predictions), expected, atol=1e-4)
    for compute_metrics in (None, lambda prediction: {}):  # (which keeps the scores, as predict() does)
        trainer.compute_metrics = compute_metrics
        with pytest.raises(ValueError, match=r"evaluate\(\) needs labels .* predict\(\) gives the predictions"):
            trainer.evaluate(unlabelled)

    stage1 = RefilledTrainer(model=student, args=args, stage="stage1", num_classes=3, teacher=teacher,
                             centers_dataset=images)  # fmt: skip
    scores = stage1.predict(images)
    with torch.no_grad():
        features = [student.forward_features(image["pixel_values"][None]) for image in images]
        embeddings = F.normalize(torch.cat([student.forward_head(f, pre_logits=True) for f in features]), dim=1)
    centers = F.normalize(torch.stack([embeddings[labels == c].sum(0) for c in range(3)]), dim=1)
    assert torch.allclose(torch.from_numpy(scores.predictions).argmax(1), (embeddings @ centers.T).argmax(1))
    ncm_top1 = 100.0 * ((embeddings @ centers.T).argmax(1) == labels).float().mean().item()
    assert scores.metrics == {"test_ncm_top1": pytest.approx(ncm_top1), "test_samples": 10}


@pytest.mark.parametrize("selection", [{"load_best_model_at_end": True}, {"save_strategy": "best"}])
def test_a_trainer_from_the_run_config_selects_the_best_checkpoint_on_its_stages_metric(tmp_path, selection):
    """--save_strategy best saves where the stage's metric improves (it failed at the first
    evaluation, transformers asking for a metric_for_best_model, which refilled-hf sets)."""
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(24)]
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, stage1_epochs=3, stage2_epochs=3,
                          per_device_train_batch_size=8, disable_tqdm=True, save_total_limit=None,
                          **selection)  # fmt: skip
    student, teacher = (timm.create_model("cifar_wrn_16_1", num_classes=n) for n in (3, 5))
    common = dict(num_classes=3, teacher=teacher, train_dataset=images, eval_dataset=images)
    stage1 = RefilledTrainer(model=student, args=dataclasses.replace(args, output_dir=str(tmp_path / "stage1")),
                             stage="stage1", centers_dataset=images, **common)  # fmt: skip
    stage1.train()
    stage2 = RefilledTrainer(model=student, args=dataclasses.replace(args, output_dir=str(tmp_path / "stage2")),
                             stage="stage2", **common)  # fmt: skip
    stage2.compute_teacher_centers(images)
    stage2.train()
    for trainer, metric in ((stage1, "eval_ncm_top1"), (stage2, "eval_top1")):
        logged = [entry[metric] for entry in trainer.state.log_history if metric in entry]
        assert len(logged) == 3 and trainer.state.best_metric == max(logged)
        saved = sorted(int(c.name.split("-")[1]) for c in Path(trainer.args.output_dir).glob("checkpoint-*"))
        if "save_strategy" in selection:  # a checkpoint at each evaluation that beat the ones before it (3 steps)
            assert saved == [3 * (i + 1) for i, value in enumerate(logged) if value > max(logged[:i], default=-1.0)]
        else:
            assert saved == [3, 6, 9]


class BestCheckpointOnResume(TrainerCallback):
    """Records the best checkpoint the resumed state names when training goes on."""

    def __init__(self):
        self.seen = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.seen.append(state.best_model_checkpoint)


@pytest.mark.parametrize("how", ["moved", "copied", "best gone"])
def test_a_resumed_stage_selects_the_best_checkpoint_of_its_own_folder(tmp_path, how, caplog):
    """A checkpoint's state names the best checkpoint by the path it was saved under: in a run
    folder moved (or resumed from another working directory) transformers forgot the best, and
    --load_best_model_at_end ended with the last weights unless a later evaluation beat it; in
    a copied one it took the other folder's checkpoint, and rotated this folder's away."""
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(24)]

    def trainer(folder, **kwargs):
        args = RefilledConfig(output_dir=str(folder), use_cpu=True, stage2_epochs=3, per_device_train_batch_size=8,
                              load_best_model_at_end=True, save_total_limit=5, disable_tqdm=True, **kwargs)  # fmt: skip
        return RefilledTrainer(model=timm.create_model("cifar_wrn_16_1", num_classes=3), args=args, stage="ce",
                               num_classes=3, train_dataset=images, eval_dataset=images)  # fmt: skip

    first = tmp_path / "first"
    trainer(first).train()  # an epoch is 3 steps: checkpoints 3, 6 and 9
    moved = tmp_path / "moved"
    (moved / "ce").mkdir(parents=True)
    resume_from = "checkpoint-6" if how == "best gone" else "checkpoint-3"
    shutil.copytree(first / "ce" / resume_from, moved / "ce" / resume_from)
    state_file = moved / "ce" / resume_from / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["best_model_checkpoint"] == str(first / "ce" / "checkpoint-3") or how == "best gone"
    if how == "best gone":  # the best (step 3) was before the checkpoint resumed, and is not in this folder
        state.update(best_global_step=3, best_metric=101.0, best_model_checkpoint=str(first / "ce" / "checkpoint-3"))
        state_file.write_text(json.dumps(state))
    if how != "copied":
        shutil.rmtree(first)
    watch = BestCheckpointOnResume()
    resumed = trainer(moved, resume_from_checkpoint="true")
    resumed.add_callback(watch)
    with caplog.at_level(logging.INFO):
        resumed.train()
    if how == "best gone":
        assert watch.seen[0] is None
        assert "The best checkpoint so far (step 3, eval_top1 101.0) is no longer in" in caplog.text
        assert resumed.state.best_model_checkpoint is None  # no evaluation beats 101 %: the last weights stay
    else:
        assert watch.seen[0] == str(moved / "ce" / "checkpoint-3")
        assert f"The best checkpoint so far (step 3) is {moved / 'ce' / 'checkpoint-3'}" in caplog.text
        assert resumed.state.best_model_checkpoint.startswith(str(moved / "ce"))
    assert "does not exist anymore" not in caplog.text


def test_a_config_selecting_the_best_checkpoint_can_be_copied_and_validated_again(tmp_path, data_dir):
    """transformers derives metric_for_best_model "loss" from --load_best_model_at_end; a copy
    validated again (train-teacher's, evaluate --split validation's) refused it as the user's:
    "`metric_for_best_model` is not supported by refilled-hf"."""
    config = RefilledConfig(output_dir=str(tmp_path / "o"), load_best_model_at_end=True)
    assert config.metric_for_best_model is None and config.greater_is_better is None
    again = dataclasses.replace(config, seed=1)
    assert again.load_best_model_at_end and again.metric_for_best_model is None
    with pytest.raises(ConfigError, match="`metric_for_best_model` is not supported"):  # the user's own: refused
        RefilledConfig(output_dir=str(tmp_path / "o"), load_best_model_at_end=True, metric_for_best_model="loss")
    from helpers import tiny_recipe

    from refilled_hf.pipeline import run_teacher_training

    recipe = tiny_recipe(data_dir, tmp_path / "t", teacher="cifar_wrn_16_1", classes="0-2", stage2_epochs=2,
                         load_best_model_at_end=True)  # fmt: skip
    for name in ("student", "teacher_classes", "distill_weight", "stage1_epochs", "stage1_learning_rate"):
        recipe.pop(name)
    results = run_teacher_training(RefilledConfig(**recipe))
    assert results["final"]["validation_samples"] == 9 and results["schedule"]["load_best_model_at_end"]


def test_the_trainer_honours_or_refuses_transformers_trainer_arguments(tmp_path):
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no",
                          per_device_eval_batch_size=4)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(10)]
    student = timm.create_model("cifar_wrn_16_1", num_classes=3).eval()
    # optimizer_cls_and_kwargs: that optimizer (the default --optim sgd built SGD over it)
    adam = RefilledTrainer(model=student, args=args, stage="ce", num_classes=3,
                           optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.0}))  # fmt: skip
    optimizer = adam.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 1e-3
    mine = torch.optim.Adagrad(student.parameters(), lr=0.5)
    given = RefilledTrainer(model=student, args=args, stage="ce", num_classes=3, optimizers=(mine, None))
    assert given.create_optimizer() is mine
    # compute_loss_func: never called, since the stage decides the loss
    with pytest.raises(ValueError, match="compute_loss_func would never be called: subclass RefilledTrainer"):
        RefilledTrainer(model=student, args=args, stage="ce", num_classes=3, compute_loss_func=lambda *a, **k: 0)
    # preprocess_logits_for_metrics: applied to what predict() returns and compute_metrics receives
    seen = {}

    def remember(prediction):
        seen["predictions"] = prediction.predictions
        return {"n": len(prediction.predictions)}

    classes = RefilledTrainer(model=student, args=args, stage="ce", num_classes=3, compute_metrics=remember,
                              preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))  # fmt: skip
    output = classes.predict(images)
    with torch.no_grad():
        expected = torch.cat([student(image["pixel_values"][None]) for image in images]).argmax(-1)
    assert output.predictions.tolist() == expected.tolist() == seen["predictions"].tolist()
    assert output.metrics["test_n"] == 10 and "test_top1" in output.metrics  # its own metrics: from the logits


def test_how_often_a_stage_evaluates_does_not_change_what_it_trains(tmp_path):
    # iterating a DataLoader draws its base seed from the global RNG unless it has a generator of
    # its own: each evaluation shifted the next epoch's shuffle and augmentations
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(24)]
    teacher = timm.create_model("cifar_wrn_16_1", num_classes=5)
    trained = {}
    for evaluations in (None, 6):
        torch.manual_seed(0)
        student = timm.create_model("cifar_wrn_16_1", num_classes=3)
        args = RefilledConfig(output_dir=str(tmp_path / str(evaluations)), use_cpu=True, stage1_epochs=2,
                              stage2_epochs=2, per_device_train_batch_size=8, evaluations_per_stage=evaluations or 1,
                              save_strategy="no", disable_tqdm=True, report_to=[])  # fmt: skip
        common = dict(args=args, num_classes=3, teacher=teacher, train_dataset=images,
                      eval_dataset=images if evaluations else None)  # fmt: skip
        stage1 = RefilledTrainer(model=student, stage="stage1", centers_dataset=images, **common)
        stage1.train()
        stage2 = RefilledTrainer(model=student, stage="rkd", **common)
        stage2.train()
        evaluated = [e for t in (stage1, stage2) for e in t.state.log_history if "eval_samples" in e]
        assert (len(evaluated) >= 4) if evaluations else not evaluated
        trained[evaluations] = {k: v.clone() for k, v in student.state_dict().items()}
    for key, value in trained[None].items():
        assert torch.equal(trained[6][key], value), key


def test_a_trainer_without_an_eval_dataset_does_not_evaluate_unless_it_must_select(tmp_path):
    images = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 3} for i in range(6)]
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True)
    trainer = RefilledTrainer(model=timm.create_model("cifar_wrn_16_1", num_classes=3), args=args, stage="ce",
                              num_classes=3, train_dataset=images)  # fmt: skip
    assert option_name(trainer.args.eval_strategy) == "no" and option_name(args.eval_strategy) == "epoch"
    selecting = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, load_best_model_at_end=True)
    with pytest.raises(ValueError, match="load_best_model_at_end=True selects on evaluations: pass an eval_dataset"):
        RefilledTrainer(model=timm.create_model("cifar_wrn_16_1", num_classes=3), args=selecting, stage="ce",
                        num_classes=3, train_dataset=images)  # fmt: skip
    # several eval sets: transformers would stop at the first evaluation, asking for a metric_for_best_model
    # that refilled-hf sets itself
    sets = {"val": images, "other": images}
    with pytest.raises(ValueError, match=r"selects on one evaluation set's top-1, but eval_dataset holds 2 \('val', "
                                         r"'other'\): pass the set to select on as eval_dataset"):  # fmt: skip
        RefilledTrainer(model=timm.create_model("cifar_wrn_16_1", num_classes=3), args=selecting, stage="ce",
                        num_classes=3, train_dataset=images, eval_dataset=sets)  # fmt: skip
    both = RefilledConfig(output_dir=str(tmp_path / "both"), use_cpu=True, stage2_epochs=1, report_to=[])
    trainer = RefilledTrainer(model=timm.create_model("cifar_wrn_16_1", num_classes=3), args=both, stage="ce",
                              num_classes=3, train_dataset=images, eval_dataset=sets)  # fmt: skip
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"eval_val_top1", "eval_other_top1"} <= logged


def test_a_trainer_names_the_config_fields_it_does_not_read(tmp_path, caplog):
    student = timm.create_model("cifar_wrn_16_1", num_classes=3)
    for fields, named in (({}, None), ({"classes": "0-4", "shots_per_class": 5}, "--classes 0-4, --shots_per_class 5"),
                          ({"validation_split": "val"}, "--validation_split val")):  # fmt: skip
        caplog.clear()
        args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", tau2=3.0, **fields)
        with caplog.at_level("WARNING", logger="refilled_hf.trainer"):
            RefilledTrainer(model=student, args=args, stage="ce", num_classes=3)
        warned = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
        if named is None:
            assert warned == []  # tau2, which the trainer reads, is not named; nor the resolved defaults
        else:
            assert len(warned) == 1 and f"does not read {named}:" in warned[0]


def test_stage_two_without_the_teachers_class_centres_is_refused_before_training(tmp_path):
    args = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no")
    images = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 3} for i in range(6)]
    student, teacher = (timm.create_model("cifar_wrn_16_1", num_classes=n) for n in (3, 5))
    trainer = RefilledTrainer(model=student, args=args, stage="stage2", num_classes=3, teacher=teacher,
                              train_dataset=images)  # fmt: skip
    with pytest.raises(ValueError, match=r"call trainer.compute_teacher_centers\(.*\) before train\(\)"):
        trainer.train()
    assert trainer.state.global_step == 0


# ----------------------------------------------------------------- 3. numbers in range, finite results


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("distill_weight", math.inf, "finite"),
        ("ce_weight", math.nan, "finite"),
        ("tau2", math.inf, "finite"),
        ("stage1_learning_rate", -0.1, "> 0"),
        ("stage1_min_lr_ratio", -0.5, r"in \[0, 1\]"),
        ("stage2_gamma", -0.2, r"in \(0, 1\]"),
        ("stage2_milestones", "100,-5", ">= 0"),
        ("stage2_milestones", "nan", ">= 0"),
        ("image_size", 0, r"in \[8, 1024\]"),
        ("image_size", 100000, r"in \[8, 1024\]"),
        ("per_device_train_batch_size", -5, "per_device_train_batch_size"),
        ("dataloader_num_workers", -1, "dataloader_num_workers"),
        ("seed", -1, "seed"),
        ("save_total_limit", 0, "save_total_limit"),
        ("label_smoothing_factor", 1.5, "label_smoothing_factor"),
        ("warmup_steps", -1, "warmup_steps"),
        ("validation_fraction", math.nan, "finite"),
        ("stage2_epochs", math.inf, "finite"),
    ],
)
def test_out_of_range_or_non_finite_numbers_are_refused(field, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(output_dir=str(tmp_path), **{field: value})


@pytest.mark.slow
def test_a_diverged_run_exports_nothing_and_claims_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(data_dir, out, method="ce", stage2_epochs=2, stage2_learning_rate=1e30, max_grad_norm=0)
    with pytest.raises(RunError, match="diverged.*Nothing was exported"):
        run(recipe)
    assert not (out / "model").exists() and not (out / "results.json").exists()


# ----------------------------------------------------------------- 4. labels that are not classes


def _rewrite_labels(src: Path, dst: Path, labels: list) -> Path:
    """Copy a generated data set, replacing the training labels (keeping HF metadata)."""
    shutil.copytree(src, dst)
    table = pq.read_table(dst / "train.parquet")
    import pyarrow as pa

    column = pa.array(labels)
    index = table.schema.get_field_index("label")
    table = table.set_column(index, pa.field("label", column.type), column)
    pq.write_table(table.replace_schema_metadata(pq.read_schema(src / "train.parquet").metadata), dst / "train.parquet")
    return dst


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            -1,
            r"Split 'train' has labels that are not class ids \(negative, fractional or NaN\) in 1 row \(row 5\) "
            r"\(e.g. \[-1\]\)",
        ),
        (2.5, r"not class ids .* in 1 row \(row 5\) \(e.g. \[2.5\]\)"),
        (None, r"Split 'train' has no label in 'label' in 1 row \(row 5\)"),
        (6, r"Split 'train' has label ids beyond the 6 classes in 1 row \(row 5\)"),
        (
            "all-1",
            r"Split 'train' is unlabelled: every label in 'label' is -1.* Name a labelled split with "
            r"--train_split\.$",
        ),
    ],
    ids=["negative", "fractional", "null", "beyond-names", "unlabelled"],
)
def test_labels_that_are_not_classes_are_refused(bad, message, data_dir, tmp_path):
    labels = pq.read_table(data_dir / "train.parquet").column("label").to_pylist()
    labels[5] = bad
    if bad == "all-1":  # how the Hub marks a split without labels (ImageNet's test split)
        labels = [-1] * len(labels)
    if isinstance(bad, float):
        labels = [float(v) for v in labels]
    folder = _rewrite_labels(data_dir, tmp_path / "bad", labels)
    with pytest.raises(DataError, match=message):
        load_classification_data(str(folder), classes="3-5")


def _plain_parquet(src: Path, dst: Path, as_strings: bool) -> Path:
    """The generated images as plain pandas parquet: no Hugging Face metadata at all."""
    dst.mkdir(parents=True)
    for split in ("train", "test"):
        table = pq.read_table(src / f"{split}.parquet")
        frame = pd.DataFrame({"image": [row["bytes"] for row in table.column("image").to_pylist()]})
        labels = table.column("label").to_pylist()
        frame["label"] = [CLASS_NAMES[v] for v in labels] if as_strings else labels
        frame.to_parquet(dst / f"{split}.parquet")
        assert b"huggingface" not in (pq.read_schema(dst / f"{split}.parquet").metadata or {})
    return dst


@pytest.mark.parametrize("as_strings", [False, True], ids=["int-labels", "string-labels"])
def test_plain_pandas_parquet_is_accepted(as_strings, data_dir, tmp_path):
    folder = _plain_parquet(data_dir, tmp_path / "plain", as_strings)
    data = load_classification_data(str(folder), classes=None)
    expected = sorted(CLASS_NAMES) if as_strings else [str(i) for i in range(6)]
    assert data.class_names == expected
    assert len(data.test) == 36 and data.num_classes == 6
    image = data.train[0]["pixel_values"]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8


def test_string_labels_unknown_to_training_are_refused_in_test(data_dir, tmp_path):
    folder = _plain_parquet(data_dir, tmp_path / "plain", True)
    frame = pd.read_parquet(folder / "test.parquet")
    frame.loc[0, "label"] = "purple"
    frame.to_parquet(folder / "test.parquet")
    with pytest.raises(
        DataError,
        match=r"Split 'test' has labels that are not classes of the training split in 1 row \(row 0\).*'purple'",
    ):
        load_classification_data(str(folder))


def test_undecodable_images_are_refused_before_training_with_their_rows(data_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(data_dir, folder)
    table = pq.read_table(folder / "test.parquet")
    images = table.column("image").to_pylist()
    images[2] = {"bytes": images[2]["bytes"][:40], "path": None}  # truncated PNG
    images[7] = {"bytes": b"not an image at all", "path": None}
    import pyarrow as pa

    column = pa.array(images, type=table.schema.field("image").type)
    table = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"), column)
    pq.write_table(table, folder / "test.parquet")
    with pytest.raises(DataError, match=r"2 images of split 'test' cannot be decoded.*row 2.*row 7"):
        load_classification_data(str(folder))


# ----------------------------------------------------------------- 5. runs never mix


@pytest.mark.slow
def test_overwrite_removes_the_earlier_runs_outputs_and_caches(data_dir, tmp_path):
    first = write_random_teacher(tmp_path / "t1", seed=1)
    second = write_random_teacher(tmp_path / "t2", seed=2)
    out = tmp_path / "run"
    base = tiny_recipe(data_dir, out, method="refilled", stage1_epochs=2, stage2_epochs=1)
    run({**base, "teacher": f"local-dir:{first}", "save_total_limit": 5})
    (out / "stage1" / "checkpoint-999").mkdir()  # an old checkpoint the new run would never write
    (out / "notes.txt").write_text("mine")
    run({**base, "teacher": f"local-dir:{second}", "overwrite_output": True})
    run({**base, "teacher": f"local-dir:{second}", "output_dir": str(tmp_path / "fresh")})
    centres = [
        load_file(str(d / "stage2" / "teacher_centers.safetensors"))["centers"] for d in (out, tmp_path / "fresh")
    ]
    torch.testing.assert_close(centres[0], centres[1])  # recomputed with the new teacher, not reused
    assert not (out / "stage1" / "checkpoint-999").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: untouched


def test_overwrite_deletes_only_plain_names_under_the_folder_and_never_follows_a_link(tmp_path):
    """A manifest edited by hand (or damaged) cannot make --overwrite_output delete anything
    outside the run folder, nor inside a folder a link points to."""
    out, outside = tmp_path / "run", tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "inner.txt").write_text("keep")
    (out / "stage1").mkdir()
    (out / "stage1" / "weights").write_text("old run")
    (out / "results.json").write_text("{}")
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    (tmp_path / "sibling.txt").write_text("keep")
    (out / "link").symlink_to(outside, target_is_directory=True)
    names = ["../sibling.txt", "../outside", "sub/inner.txt", "", ".", "..", str(outside), "link", "stage1",
             "results.json", "never-written"]  # fmt: skip
    RunDirectory(out, ["stage1"]).remove_earlier_run({"identity": {}, "outputs": names})
    assert not (out / "stage1").exists() and not (out / "results.json").exists()
    assert not (out / "link").is_symlink() and (outside / "precious.txt").read_text() == "keep"  # the link only
    assert (out / "sub" / "inner.txt").read_text() == "keep" and (tmp_path / "sibling.txt").read_text() == "keep"
    assert out.is_dir()


def test_resuming_into_a_folder_without_a_run_starts_it_and_says_so(data_dir, tmp_path, caplog):
    recipe = tiny_recipe(data_dir, tmp_path / "new", method="ce", stage2_epochs=1)
    with caplog.at_level("WARNING", logger="refilled_hf.pipeline"):
        results = run({**recipe, "resume_from_checkpoint": "true"})
    assert f"--resume_from_checkpoint true: {tmp_path / 'new'} holds no run yet, so this one starts" in caplog.text
    assert results["final"]["test_samples"] == 18 and (tmp_path / "new" / "model" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def unfinished_ce_run(data_dir, tmp_path_factory) -> tuple[dict, Path]:
    """A finished 3-epoch ce run (checkpoints at steps 3, 6, 9) kept as a template."""
    folder = tmp_path_factory.mktemp("ce")
    recipe = tiny_recipe(data_dir, folder / "reference", method="ce", stage2_epochs=3, stage2_milestones="2")
    reference = run(recipe)
    return recipe, reference


def _copy_unfinished(recipe: dict, tmp_path: Path) -> tuple[dict, Path]:
    out = tmp_path / "run"
    shutil.copytree(recipe["output_dir"], out)
    unfinish(out)
    return {**recipe, "output_dir": str(out)}, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "change,value",
    [("classes", "2-4"), ("shots_per_class", 5), ("stage2_learning_rate", 0.01), ("seed", 1), ("data_path", "workers")],
)
def test_resume_with_another_configuration_or_data_is_refused(change, value, unfinished_ce_run, tmp_path):
    recipe, _ = unfinished_ce_run
    recipe, out = _copy_unfinished(recipe, tmp_path)
    with pytest.raises(RunDirError, match=f"another configuration, teacher or data.*{change}"):
        run({**recipe, change: value, "resume_from_checkpoint": "true"})
    assert not (out / "results.json").exists()


def test_a_model_may_move_only_where_its_weights_and_setup_are_recorded_and_the_same():
    base = {"teacher": "local-dir:/data/jobs/1234/teacher", "teacher_checkpoint": None, "teacher_weights": "w" * 64,
            "teacher_setup": "s" * 64, "student": "resnet18", "student_init": "i" * 64, "student_setup": "u" * 64,
            "student_checkpoint": "/old/student.safetensors"}  # fmt: skip
    moved = {**base, "teacher": "local-dir:/scratch/node-7/teacher", "student_checkpoint": "/new/student.safetensors"}
    assert RunDirectory.identity_difference(base, moved) == []
    for change in ({"teacher_setup": "x" * 64}, {"teacher_weights": "x" * 64}):
        changed = [d.split(" ")[0].rstrip(":") for d in RunDirectory.identity_difference(base, {**moved, **change})]
        assert changed == ["teacher", *change]  # another teacher: its folder is named too
    assert "student:" in " ".join(RunDirectory.identity_difference(base, {**base, "student": "resnet18d"}))
    hub = RunDirectory.identity_difference({**base, "teacher": "hf-hub:a/b"}, {**base, "teacher": "hf-hub:a/c"})
    assert hub == ['teacher: "hf-hub:a/b" -> "hf-hub:a/c"']
    earlier = {k: v for k, v in base.items() if not k.endswith("_setup")}  # an earlier release's record
    assert RunDirectory.identity_difference(earlier, base) == []
    assert [d.split(":")[0] for d in RunDirectory.identity_difference(earlier, moved)] == [
        "student_checkpoint", "teacher"]  # fmt: skip


def test_a_refused_resume_shows_two_long_paths_from_where_they_part():
    old, new = "/home/someone/experiments/cifar100/run-a/data", "/home/someone/experiments/cifar100/run-a/data-copy"
    changed = RunDirectory.identity_difference(
        {"data": "a", "dataset": "/p" * 40 + old}, {"data": "b", "dataset": "/p" * 40 + new}
    )
    text = changed[1]
    shown_old, shown_new = text.split(" -> ")
    assert shown_old.endswith('run-a/data"') and shown_new.endswith('run-a/data-copy"') and len(text) < 160


@pytest.mark.slow
def test_a_resume_follows_the_teachers_weights_and_setup_not_its_folder(data_dir, tmp_path):
    """A teacher folder moved (a job's copy on its node's disk) resumes, and ends as the
    uninterrupted run; retrained in place, or its config changed (what the teacher computes
    with: here the mean its inputs are normalized to), it is refused. A run an earlier release
    recorded (without the teacher's setup) still resumes where it started."""
    teacher = write_random_teacher(tmp_path / "teacher")
    recipe = tiny_recipe(data_dir, tmp_path / "reference", method="rkd", teacher=f"local-dir:{teacher}",
                         stage2_epochs=2)  # fmt: skip
    reference = run(recipe)

    def unfinished(name: str) -> dict:
        shutil.copytree(tmp_path / "reference", tmp_path / name)
        unfinish(tmp_path / name)
        return {**recipe, "output_dir": str(tmp_path / name), "resume_from_checkpoint": "true"}

    moved = tmp_path / "node-local" / "teacher"
    shutil.copytree(teacher, moved, copy_function=shutil.copyfile)
    shutil.rmtree(teacher)
    results = run({**unfinished("moved"), "teacher": f"local-dir:{moved}"})
    assert results["final"]["test_top1"] == reference["final"]["test_top1"]
    assert results["final"]["validation_loss"] == pytest.approx(reference["final"]["validation_loss"], rel=1e-5)
    assert results["teacher"] == f"local-dir:{moved}"
    assert json.loads((tmp_path / "moved" / "run.json").read_text())["identity"]["teacher"] == f"local-dir:{moved}"

    config = json.loads((moved / "config.json").read_text())
    config["pretrained_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match="teacher_setup"):
        run({**unfinished("edited"), "teacher": f"local-dir:{moved}"})
    write_random_teacher(moved, seed=7)  # retrained in place
    with pytest.raises(RunDirError, match="teacher_weights"):
        run({**unfinished("retrained"), "teacher": f"local-dir:{moved}"})

    write_random_teacher(teacher)  # back where the run started (the same weights), as an earlier release recorded it
    earlier = unfinished("earlier")
    manifest = json.loads((tmp_path / "earlier" / "run.json").read_text())
    del manifest["identity"]["teacher_setup"], manifest["identity"]["student_setup"]
    (tmp_path / "earlier" / "run.json").write_text(json.dumps(manifest))
    copy = shutil.copytree(teacher, tmp_path / "copy")
    with pytest.raises(RunDirError, match=r"\(teacher: "):  # its record cannot show the copy is the same teacher
        run({**earlier, "teacher": f"local-dir:{copy}"})
    assert run(earlier)["final"]["test_top1"] == reference["final"]["test_top1"]


@pytest.mark.slow
def test_a_resume_follows_the_images_not_their_path_or_file_dates(unfinished_ce_run, data_dir, tmp_path):
    """The data set copied again (new file dates change datasets' own fingerprint, which the
    run's identity held) to another path (a job's copy on its node's disk) resumes, and ends as
    the uninterrupted run; one image's pixels changed, it is refused. A run an earlier release
    recorded (its data fingerprint by path and file dates) still resumes where it started."""

    recipe, reference = unfinished_ce_run
    template = Path(recipe["output_dir"])
    recipe, out = _copy_unfinished(recipe, tmp_path)
    copied = tmp_path / "node-local"
    shutil.copytree(data_dir, copied, copy_function=shutil.copyfile)  # new files, new dates
    results = run({**recipe, "dataset": str(copied), "resume_from_checkpoint": "true"})
    assert results["final"]["test_top1"] == reference["final"]["test_top1"]
    assert results["final"]["validation_loss"] == pytest.approx(reference["final"]["validation_loss"], rel=1e-5)
    assert results["data_fingerprint"] == reference["data_fingerprint"]
    assert results["data_fingerprint_legacy"] != reference["data_fingerprint_legacy"]
    assert json.loads((out / "run.json").read_text())["identity"]["dataset"] == str(copied)

    labels = pq.read_table(copied / "train.parquet").column("label").to_pylist()
    change_one_pixel(copied / "train.parquet", labels.index(4))  # a training image of a selected class (3-5)
    again = tmp_path / "again"
    shutil.copytree(template, again)
    unfinish(again)
    refused = {**recipe, "output_dir": str(again), "dataset": str(copied), "resume_from_checkpoint": "true"}
    with pytest.raises(RunDirError, match=r"data \(the images selected, their labels or their pixels\)"):
        run(refused)

    manifest = json.loads((again / "run.json").read_text())  # as earlier releases recorded it
    manifest["identity"]["data"] = reference["data_fingerprint_legacy"]
    (again / "run.json").write_text(json.dumps(manifest))
    results = run({**recipe, "output_dir": str(again), "resume_from_checkpoint": "true"})
    assert results["final"]["test_top1"] == reference["final"]["test_top1"]


def test_the_data_source_fingerprint_is_the_data_set_whatever_seed_drew_it(data_dir, tmp_path):
    """Equal for every seed's validation carve and for a copy at another path; other classes,
    one changed pixel or a seed's few-shot draw (None) are not the same source."""

    def source(path: Path, classes: str = "3-5", **options) -> str | None:
        options = {"validation_fraction": 0.25, **options}
        return load_classification_data(str(path), classes=classes, **options).source_fingerprint

    copied = shutil.copytree(data_dir, tmp_path / "copy", copy_function=shutil.copyfile)
    first = source(data_dir, seed=0)
    assert first is not None and source(data_dir, seed=1) == first == source(copied, seed=3)
    assert source(data_dir, seed=0, validation_fraction=0.5) == first
    assert source(data_dir, "3-4") != first and source(data_dir, shots_per_class=2) is None
    labels = pq.read_table(copied / "test.parquet").column("label").to_pylist()
    change_one_pixel(copied / "test.parquet", labels.index(4))
    assert source(copied, seed=0) != first


@pytest.mark.slow
def test_a_checkpoint_without_optimizer_state_is_not_resumed_silently(unfinished_ce_run, tmp_path):
    recipe, _ = unfinished_ce_run
    recipe, out = _copy_unfinished(recipe, tmp_path)
    (checkpoints(out / "ce")[-1] / "optimizer.pt").unlink()
    with pytest.raises(RunError, match="Cannot resume exactly.*optimizer.pt"):
        run({**recipe, "resume_from_checkpoint": "true"})
    (checkpoints(out / "ce")[-1] / "scheduler.pt").write_bytes(b"garbage")
    (checkpoints(out / "ce")[-2] / "scheduler.pt").write_bytes(b"garbage")
    with pytest.raises(RunError, match="scheduler.pt is damaged"):
        run({**recipe, "resume_from_checkpoint": str(checkpoints(out / "ce")[-2])})


@pytest.mark.slow
def test_an_explicit_checkpoint_path_is_honoured_and_exact(unfinished_ce_run, tmp_path):
    recipe, reference = unfinished_ce_run
    recipe, out = _copy_unfinished(recipe, tmp_path)
    first = checkpoints(out / "ce")[0]  # step 3 of 9
    (checkpoints(out / "ce")[-1] / "optimizer.pt").unlink()  # the newest cannot resume: "true" would refuse
    results = run({**recipe, "resume_from_checkpoint": str(first)})
    assert results["final"]["test_top1"] == reference["final"]["test_top1"]
    assert results["final"]["validation_loss"] == pytest.approx(reference["final"]["validation_loss"], rel=1e-5)
    with pytest.raises(RunError, match="not a checkpoint of the run"):
        run({**recipe, "output_dir": str(tmp_path / "other"), "resume_from_checkpoint": str(first)})


@pytest.mark.slow
def test_a_resume_may_change_what_only_chose_the_device_path_or_its_loader_workers(unfinished_ce_run, tmp_path):
    """On the device path every loader runs in the main process, so its workers compute
    nothing, nor does the budget or --data_path once the path is the same, nor how DDP
    finds and buckets gradients: a resume on another machine may change them, and ends as
    the uninterrupted run."""
    recipe, reference = unfinished_ce_run
    assert reference["data"]["data_path"] == "device"
    recipe, out = _copy_unfinished(recipe, tmp_path)
    manifest = json.loads((out / "run.json").read_text())  # as earlier releases recorded it, with them
    manifest["identity"].update(dataloader_num_workers=0, device_data_budget_gb=4.0, ddp_find_unused_parameters=True)
    (out / "run.json").write_text(json.dumps(manifest))
    changed = {"dataloader_num_workers": 2, "device_data_budget_gb": 1.0, "data_path": "device",
               "ddp_find_unused_parameters": False, "ddp_bucket_cap_mb": 10}  # fmt: skip
    results = run({**recipe, **changed, "resume_from_checkpoint": str(checkpoints(out / "ce")[0])})
    assert results["final"]["test_top1"] == reference["final"]["test_top1"]
    assert results["final"]["validation_loss"] == pytest.approx(reference["final"]["validation_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_resume_may_not_change_who_draws_the_students_dropout_masks(unfinished_ce_run, tmp_path):
    """Inductor draws dropout masks from a generator of its own (other masks than eager
    PyTorch's from the same seed): an eager run of a student with dropout resumed under
    --torch_compile would continue as another run; refused before anything compiles. A
    backend that draws eager's masks (aot_eager) resumes exactly."""
    recipe, reference = unfinished_ce_run
    recipe, out = _copy_unfinished(recipe, tmp_path)
    assert json.loads((out / "run.json").read_text())["identity"]["random_draws"] == "eager"
    with pytest.raises(RunDirError, match=r"random_draws \(who draws the student's dropout masks.*\): \"eager\" -> "
                                          r"\"inductor\""):  # fmt: skip
        run({**recipe, "torch_compile": True, "resume_from_checkpoint": "true"})
    first = str(checkpoints(out / "ce")[0])
    results = run({**recipe, "torch_compile_backend": "aot_eager", "resume_from_checkpoint": first})
    assert results["final"]["test_top1"] == reference["final"]["test_top1"]
    assert results["final"]["validation_loss"] == pytest.approx(reference["final"]["validation_loss"], rel=1e-5)


def test_only_inductor_compiling_a_student_with_dropout_draws_its_own_random_numbers(tmp_path):
    from refilled_hf.pipeline import _random_draws

    def draws(student: str, **options) -> str:
        config = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, **options)
        return _random_draws(config, StudentModel(timm.create_model(student, num_classes=3)))

    assert draws("cifar_wrn_16_1", torch_compile=True) == "inductor"  # dropout 0.3
    assert draws("cifar_wrn_16_1", torch_compile_mode="reduce-overhead") == "inductor"
    assert draws("cifar_wrn_16_1") == draws("cifar_wrn_16_1", torch_compile_backend="aot_eager") == "eager"
    assert draws("resnet18", torch_compile=True) == "eager"  # no dropout: compiling may change on resume


@pytest.mark.slow
def test_the_worker_path_trains_the_same_with_any_loader_workers_and_resumes_exactly_mid_epoch(
    data_dir, tmp_path, monkeypatch, caplog
):
    """Each image's augmentation is seeded by the run's seed, the stage, the epoch and the image
    (refilled_hf.augmentation_seeds): 0 and 2 loader workers train the same run, and a SIGTERM's
    checkpoint mid-epoch resumes exactly, also with another worker count (here the default of
    another machine). Before, the draws came from each process's generators: another count
    trained another run, and a mid-epoch resume was off even without workers (the loader reads
    a batch ahead, so the generators a checkpoint saved had drawn the next batch already)."""
    import refilled_hf.config as config_module

    recipe = tiny_recipe(data_dir, tmp_path / "reference", method="ce", stage2_epochs=3, stage2_milestones="2",
                         data_path="workers", save_total_limit=5)  # fmt: skip
    monkeypatch.setattr(config_module, "default_loader_workers", lambda on_accelerator: 2)
    with caplog.at_level(logging.INFO, logger="refilled_hf"):
        reference = run(recipe)
    assert "2 DataLoader workers read and transform the batches (--dataloader_num_workers 2)" in caplog.text
    alone = run({**recipe, "output_dir": str(tmp_path / "no-workers"), "dataloader_num_workers": 0})
    assert_same_run_end(alone, reference, tmp_path / "no-workers", tmp_path / "reference")
    out = tmp_path / "run"
    notice = SignalAt("ce", 4, every_process=True)  # mid-epoch 2 (3 steps per epoch), to the workers too, as SLURM
    with pytest.raises(RunInterrupted, match="stopped at step 4 of 9, after a checkpoint"):
        run({**recipe, "output_dir": str(out)}, callbacks=[notice])  # (workers that died of it: RuntimeError)
    assert notice.workers_signalled == 2
    monkeypatch.setattr(config_module, "default_loader_workers", lambda on_accelerator: 1)  # another machine
    resumed = run({**recipe, "output_dir": str(out), "resume_from_checkpoint": "true"})
    assert_same_run_end(resumed, reference, out, tmp_path / "reference")
    assert "\ndataloader_num_workers: null\n" in (out / "model" / "README.md").read_text()  # each machine's own


@pytest.mark.slow
def test_refilled_on_the_worker_path_resumes_exactly_from_a_notice_mid_epoch_in_stage_2(data_dir, teacher_dir,
                                                                                      tmp_path):  # fmt: skip
    """Stage 2 after stage 1, each seeding its own draws (stream stage1, stage2): a notice to every
    process mid-epoch in stage 2 with 2 loader workers, the resume with none."""
    recipe = tiny_recipe(data_dir, tmp_path / "reference", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         stage1_epochs=2, stage2_epochs=3, save_total_limit=5, data_path="workers",
                         dataloader_num_workers=2)  # fmt: skip
    reference = run(recipe)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="stage2 stopped at step 4 of 9, after a checkpoint"):
        run({**recipe, "output_dir": str(out)}, callbacks=[SignalAt("stage2", 4, every_process=True)])
    resumed = run({**recipe, "output_dir": str(out), "resume_from_checkpoint": "true", "dataloader_num_workers": 0})
    assert resumed["stage1"]["test_ncm_top1"] == reference["stage1"]["test_ncm_top1"]
    assert_same_run_end(resumed, reference, out, tmp_path / "reference")


def assert_same_run_end(resumed: dict, reference: dict, out: Path, reference_out: Path) -> None:
    """A resumed run ends as the uninterrupted one: its test top-1, validation loss and exported weights."""
    assert resumed["final"]["test_top1"] == reference["final"]["test_top1"]
    assert resumed["final"]["validation_loss"] == pytest.approx(reference["final"]["validation_loss"], rel=1e-5)
    exported = load_file(str(out / "model" / "model.safetensors"))
    for key, value in load_file(str(reference_out / "model" / "model.safetensors")).items():
        torch.testing.assert_close(exported[key], value, rtol=1e-4, atol=1e-5)


class CrashAt(TrainerCallback):
    """A Ctrl-C (KeyboardInterrupt) once a stage reaches a step: an interruption before any checkpoint of it."""

    def __init__(self, stage_dir_name: str, step: int):
        self.stage_dir_name, self.step = stage_dir_name, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == self.stage_dir_name and state.global_step == self.step:
            raise KeyboardInterrupt("simulated Ctrl-C")


class SignalAt(TrainerCallback):
    """Sends this process a SIGTERM (a cluster's notice before a kill) once, when a stage
    reaches a step; ``every_process``: its DataLoader workers too, first (SLURM signals every
    process of a job step)."""

    def __init__(self, stage_dir_name: str, step: int, every_process: bool = False):
        self.stage_dir_name, self.step, self.sent = stage_dir_name, step, False
        self.every_process, self.workers_signalled = every_process, 0

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == self.stage_dir_name and state.global_step == self.step and not self.sent:
            self.sent = True
            if self.every_process:
                import multiprocessing

                workers = [str(w.pid) for w in multiprocessing.active_children()]  # (the loader's workers)
                # from another process, as SLURM's: PyTorch ends a worker quietly on its parent's SIGTERM
                subprocess.run(["kill", "-s", "TERM", *workers], check=True)
                self.workers_signalled = len(workers)
                time.sleep(0.5)  # (a worker that dies of it is reaped meanwhile)
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_sigterm_checkpoints_the_step_stops_the_run_and_the_resume_is_exact(data_dir, teacher_dir, tmp_path):
    """The notice comes mid-epoch in stage 1: a checkpoint of that step, a stop that exports
    nothing and says where to resume, the handler given back; the resumed run ends as the
    uninterrupted one."""
    recipe = tiny_recipe(data_dir, tmp_path / "reference", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         stage1_epochs=3, stage2_epochs=2, save_total_limit=5)  # fmt: skip
    reference = run(recipe)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match=r"SIGTERM received: stage1 stopped at step 4 of \d+, after a checkpoint"):
        run({**recipe, "output_dir": str(out)}, callbacks=[SignalAt("stage1", 4)])
    assert signal.getsignal(signal.SIGTERM) is before
    assert (
        checkpoints(out / "stage1")[-1].name == "checkpoint-4"
        and checkpoint_problem(checkpoints(out / "stage1")[-1]) is None
    )
    assert not (out / "results.json").exists() and not (out / "model").exists() and not (out / "stage2").exists()
    resumed = run({**recipe, "output_dir": str(out), "resume_from_checkpoint": "true"})
    assert resumed["stage1"]["test_ncm_top1"] == reference["stage1"]["test_ncm_top1"]
    assert_same_run_end(resumed, reference, out, tmp_path / "reference")
    # the resumed stage's training record is the whole stage's: its loss over every step (it was the resumed
    # call's own), its time and speed over both calls
    whole, alone = resumed["stage1"]["train_metrics"], reference["stage1"]["train_metrics"]
    assert whole["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-6)
    assert whole["train_samples_per_second"] == pytest.approx(
        alone["train_samples_per_second"] * alone["train_runtime"] / whole["train_runtime"], rel=0.05
    )


@pytest.mark.slow
def test_a_run_killed_after_a_stage_ends_reports_that_stages_training_not_a_call_that_trained_nothing(
    data_dir, tmp_path
):
    """Killed after its stage's last checkpoint, before its results (the final evaluation, the export): the
    resume trains no step, and its results said train_loss 0.0, no samples, and a fraction of a second."""
    recipe = tiny_recipe(data_dir, tmp_path / "reference", method="ce", stage2_epochs=2)
    reference = run(recipe)
    shutil.rmtree(tmp_path / "reference" / "model")
    (tmp_path / "reference" / "results.json").unlink()  # as a kill before the export leaves the folder

    class EndOfTraining(TrainerCallback):  # what the console and the trackers get
        logged: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "train_runtime" in logs:
                self.logged.append(dict(logs))

    resumed = run({**recipe, "resume_from_checkpoint": "true"}, callbacks=[EndOfTraining()])
    whole, alone = resumed["final"]["train_metrics"], reference["final"]["train_metrics"]
    assert whole["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-6) and whole["train_loss"] > 0
    assert [log["train_loss"] for log in EndOfTraining.logged] == [whole["train_loss"]]
    assert EndOfTraining.logged[0]["train_runtime"] == whole["train_runtime"]
    # (the time of the call that trained, not the resumed call's fraction of a second)
    assert whole["train_samples_per_second"] > 0 and whole["train_runtime"] > 0.5 * alone["train_runtime"]
    assert resumed["final"]["train_seconds"] > 0.5 * reference["final"]["train_seconds"]
    assert resumed["final"]["test_top1"] == reference["final"]["test_top1"]


def test_an_interrupted_run_exits_with_128_plus_the_signal(monkeypatch, capsys):
    from refilled_hf import cli

    def interrupted(*args, **kwargs):
        raise RunInterrupted("SIGTERM received: stage1 stopped at step 4 of 9", "Run ...", signal.SIGTERM)

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert cli.main(["distill", "--output_dir", "x"]) == 143
    assert "SIGTERM received: stage1 stopped" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # every process of a launch stops alike: the main one says so, once
    assert cli.main(["distill", "--output_dir", "x"]) == 143
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_an_interruption_in_stage2_before_its_first_checkpoint_resumes_exactly(data_dir, teacher_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "reference", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         stage1_epochs=2, stage2_epochs=2)  # fmt: skip
    reference = run(recipe)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted, match=r"stage2 stopped at step 1 of \d+\. Nothing was exported\. The same "
                       r"command with --resume_from_checkpoint true starts stage2 again \(it had written no checkpoint "
                       r"yet\)"):  # fmt: skip
        run({**recipe, "output_dir": str(out)}, callbacks=[CrashAt("stage2", 1)])
    assert not checkpoints(out / "stage2")
    resumed = run({**recipe, "output_dir": str(out), "resume_from_checkpoint": "true"})
    assert_same_run_end(resumed, reference, out, tmp_path / "reference")


def test_two_runs_into_one_folder_at_once_are_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    holder = RunDirectory(out, ["ce"])
    holder.acquire()  # another run holds the folder
    try:
        with pytest.raises(RunDirError, match="Another refilled-hf run .* is writing to"):
            run(tiny_recipe(data_dir, out, method="ce", stage2_epochs=1))
    finally:
        holder.release()
    assert not (out / "ce").exists()


# ----------------------------------------------------------------- 6. evaluate checks the label space


def test_evaluate_refuses_other_classes_or_another_order(data_dir, tmp_path):
    model = export_model(timm.create_model("cifar_wrn_16_1", num_classes=3), tmp_path / "m",
                         label_names=CLASS_NAMES[3:6])  # fmt: skip
    config = dict(dataset=str(data_dir), output_dir=str(tmp_path / "e"), use_cpu=True, image_size=16,
                  validation_fraction=0.25)  # fmt: skip
    for classes in ("0-2", "5,4,3"):
        with pytest.raises(ConfigError, match="trained on the classes .*'yellow', 'cyan', 'magenta'.*same order"):
            evaluate_model(f"local-dir:{model}", RefilledConfig(**config, classes=classes))
    with pytest.raises(ConfigError, match="predicts 3 classes but the selection has 2.*in the output's test_per_class"):
        evaluate_model(f"local-dir:{model}", RefilledConfig(**config, classes="3,4"))
    metrics = evaluate_model(f"local-dir:{model}", RefilledConfig(**config, classes="3-5"))
    assert metrics["test_samples"] == 18


def test_evaluate_finds_a_models_classes_by_name_where_names_are_numbers_other_than_ids(data_dir, tmp_path):
    """Classes named as an image folder names them (10, 2, 3, ... sorted as text): the model
    trained on the classes named 3 and 10 is evaluated on those, not on ids 3 and 10."""
    import datasets

    names = ["10", "2", "3", "4", "5", "6"]
    numbered = tmp_path / "numbered"
    for split in ("train", "test"):
        table = datasets.Dataset.from_parquet(str(data_dir / f"{split}.parquet"))
        numbered.mkdir(exist_ok=True)
        table.cast_column("label", datasets.ClassLabel(names=names)).to_parquet(str(numbered / f"{split}.parquet"))
    model = export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "m", label_names=["3", "10"])
    config = RefilledConfig(dataset=str(numbered), output_dir=str(tmp_path / "e"), use_cpu=True, image_size=16)
    metrics = evaluate_model(f"local-dir:{model}", config)
    assert list(metrics["test_per_class"]) == ["3", "10"] and metrics["test_samples"] == 12
    with pytest.raises(DataError, match="'3' is ambiguous"):  # a bare 3 could be id 3 (named 4) or the name
        evaluate_model(f"local-dir:{model}", dataclasses.replace(config, classes="3,name:10"))
    chosen = evaluate_model(f"local-dir:{model}", dataclasses.replace(config, classes="name:3,id:0"))
    assert chosen["test_top1"] == metrics["test_top1"]


def _model_with_record(data_dir, folder, **selection):
    """A model exported with the training-data record of the given selection."""
    data = load_classification_data(str(data_dir), classes="3-5", splits=(), **selection)
    return export_model(timm.create_model("cifar_wrn_16_1", num_classes=3), folder, label_names=CLASS_NAMES[3:6],
                        training_data=data.selection_record())  # fmt: skip


def test_evaluate_reads_a_relative_recorded_dataset_only_where_it_is_that_data_set(data_dir, tmp_path, monkeypatch):
    """A model trained on ``--dataset data`` (a relative path) records "data": evaluated from
    another working directory, that name was tried on the Hub (a minute of retries offline)
    where no such folder was there, and where one was (another project's "data"), evaluated on
    it as "the data set the model was trained on"."""
    started, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(data_dir, started / "data")
    elsewhere.mkdir()
    monkeypatch.chdir(started)
    model = _model_with_record("data", started / "m", validation_fraction=0.25, seed=0)
    record = json.loads((model / "config.json").read_text())["refilled_hf_training_data"]
    assert record["dataset"] == "data" and record["dataset_is_local"] is True
    config = dict(dataset=None, output_dir=str(tmp_path / "e"), use_cpu=True, image_size=16)
    where_it_started = evaluate_model(f"local-dir:{model}", RefilledConfig(**config))
    monkeypatch.chdir(elsewhere)
    hub = []
    monkeypatch.setattr("refilled_hf.data.datasets.load_dataset", lambda *a, **k: hub.append(a) or 1 / 0)
    with pytest.raises(ConfigError, match=r"trained on the data set at 'data', which is not here .*--dataset"):
        evaluate_model(f"local-dir:{model}", RefilledConfig(**config))
    assert hub == []  # refused at once, not looked up on the Hub
    monkeypatch.undo()
    monkeypatch.chdir(elsewhere)
    write_image_dataset(elsewhere / "data", seed=1)  # another data set of the same classes and layout
    refusal = r"'data' here \(.*elsewhere/data\) is not that data set: the model's training rows do not draw again"
    with pytest.raises(ConfigError, match=refusal):
        evaluate_model(f"local-dir:{model}", RefilledConfig(**config))
    shutil.rmtree(elsewhere / "data")
    shutil.copytree(data_dir, elsewhere / "data")  # a copy of the one it trained on
    assert evaluate_model(f"local-dir:{model}", RefilledConfig(**config)) == where_it_started


def test_evaluate_defaults_to_the_models_own_classes_and_validation_split(data_dir, tmp_path, caplog):
    model = _model_with_record(data_dir, tmp_path / "m", validation_fraction=0.25, seed=0)
    config = dict(dataset=str(data_dir), output_dir=str(tmp_path / "e"), use_cpu=True, image_size=16)
    with caplog.at_level("WARNING", logger="refilled_hf.evaluation"):
        metrics = evaluate_model(f"local-dir:{model}", RefilledConfig(**config))  # no --classes
    assert metrics["test_samples"] == 18
    per_class = metrics["test_per_class"]  # by the model's class names, every test image once
    assert list(per_class) == CLASS_NAMES[3:6] and sum(c["samples"] for c in per_class.values()) == 18
    assert sum(c["top1"] * c["samples"] for c in per_class.values()) / 18 == pytest.approx(metrics["test_top1"])
    # the model was exported at timm's 32 px: evaluating at 16 is allowed, and said
    assert "--image_size 16: " in caplog.text and "trained at 32 px" in caplog.text
    # no --seed / --validation_fraction: the split it was selected on (0.25 of 12 per class)
    own = evaluate_model(f"local-dir:{model}", RefilledConfig(**config), split="validation")
    assert own["validation_samples"] == 9
    assert own["data"] == {"dataset": str(data_dir), "split": "train (validation part)",
                           "class_names": CLASS_NAMES[3:6], "validation_fraction": 0.25, "data_seed": 0}  # fmt: skip
    assert metrics["data"] == {"dataset": str(data_dir), "split": "test", "class_names": CLASS_NAMES[3:6]}
    strangers = export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "s",
                             label_names=["cat", "dog"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"label names \['cat', 'dog'\].*pass --classes"):
        evaluate_model(f"local-dir:{strangers}", RefilledConfig(**config))


def test_evaluate_without_a_dataset_reads_the_one_the_model_records(data_dir, tmp_path, caplog, monkeypatch):
    from refilled_hf.cli import parse_command
    from refilled_hf.config import DEFAULT_DATASET
    from refilled_hf.evaluation import _recorded_dataset

    model = _model_with_record(data_dir, tmp_path / "m", validation_fraction=0.25, seed=0)
    config = dict(output_dir=str(tmp_path / "e"), use_cpu=True, image_size=16)
    given = evaluate_model(f"local-dir:{model}", RefilledConfig(dataset=str(data_dir), **config))
    with caplog.at_level("INFO", logger="refilled_hf.evaluation"):
        unset = evaluate_model(f"local-dir:{model}", RefilledConfig(dataset=None, **config))
    assert unset == given and unset["data"]["dataset"] == str(data_dir)
    assert f"--dataset is unset: evaluating on {data_dir}, the data set local-dir:{model} was trained on" in caplog.text
    # the command line leaves it unset unless a flag or the recipe sets it
    assert parse_command("evaluate", ["--model", "m"])[1].dataset is None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {data_dir}\n")
    assert parse_command("evaluate", ["--model", "m", "--config", str(recipe)])[1].dataset == str(data_dir)
    assert parse_command("distill", [])[0].dataset == DEFAULT_DATASET  # the training commands keep theirs
    # a recorded path that is not here is refused, not replaced by another data set
    moved = json.loads((model / "config.json").read_text())
    moved["refilled_hf_training_data"]["dataset"] = str(tmp_path / "gone" / "data")
    (model / "config.json").write_text(json.dumps(moved))
    with pytest.raises(ConfigError, match=r"--dataset is unset and .* was trained on the data set at '.*gone/data', "
                                          r"which is not here .*pass --dataset <your copy of it>"):  # fmt: skip
        evaluate_model(f"local-dir:{model}", RefilledConfig(dataset=None, **config))
    # a Hub id, or no record: read as such (the Hub's default where nothing is recorded)
    hub = {"dataset": "someone/flowers", "image_column": "picture", "test_split": "test"}
    read = _recorded_dataset(RefilledConfig(dataset=None, **config), hub, "m")
    assert (read.dataset, read.image_column, read.test_split) == ("someone/flowers", "picture", "test")
    assert _recorded_dataset(RefilledConfig(dataset=None, **config), None, "m").dataset == DEFAULT_DATASET
    kept = _recorded_dataset(RefilledConfig(dataset=None, image_column="img", **config), hub, "m")
    assert kept.image_column == "img"  # what the user set stays


def test_evaluate_refuses_a_validation_split_that_can_hold_training_images(data_dir, tmp_path, caplog):
    model = f"local-dir:{_model_with_record(data_dir, tmp_path / 'm', validation_fraction=0.25, seed=0)}"
    config = dict(dataset=str(data_dir), output_dir=str(tmp_path / "e"), use_cpu=True, image_size=16, seed=0,
                  validation_fraction=0.25)  # fmt: skip
    own = evaluate_model(model, RefilledConfig(**config), split="validation")
    assert own["validation_samples"] == 9
    for change in ({"seed": 1}, {"data_seed": 1}, {"validation_fraction": 0.5}):
        with pytest.raises(ConfigError, match=r"not the one .* --validation_fraction 0.25 --data_seed 0"):
            evaluate_model(model, RefilledConfig(**{**config, **change}), split="validation")
    # the test split does not depend on the seed; the model's training split is no test split
    assert evaluate_model(model, RefilledConfig(**{**config, "seed": 1}))["test_samples"] == 18
    with pytest.raises(ConfigError, match="is the split .* was trained on"):
        evaluate_model(model, RefilledConfig(**config, train_split="test", test_split="train"))
    with pytest.raises(ConfigError, match="is the split .* was trained on"):  # the split named as both
        evaluate_model(model, RefilledConfig(**config, test_split="train"))
    # a copy of the data set elsewhere holds the same training images: its rows, drawn again, reproduce the
    # record's digest, and (where the record has them, as every export now) the pixels tell a copy from
    # another data set laid out alike
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    on_copy = RefilledConfig(**{**config, "dataset": str(copy), "test_split": "train"})
    with pytest.raises(ConfigError, match=r"was trained on \(its training rows and labels in .* are these: a copy of "
                                          r"it, as far as its record, written by an earlier release"):  # fmt: skip
        evaluate_model(model, on_copy)  # (this record was made without decoding: no pixels)
    decoded = load_classification_data(str(data_dir), classes="3-5", validation_fraction=0.25, seed=0)
    exported = export_model(timm.create_model("cifar_wrn_16_1", num_classes=3), tmp_path / "exported",
                            label_names=CLASS_NAMES[3:6], training_data=decoded.selection_record())  # fmt: skip
    with pytest.raises(ConfigError, match=r"is the split .* was trained on \(a copy of its data set .*\): its"):
        evaluate_model(f"local-dir:{exported}", on_copy)
    change_one_pixel(copy / "train.parquet", int(decoded.source_rows["train"][0]))  # another data set, laid out alike
    assert evaluate_model(f"local-dir:{exported}", on_copy)["test_samples"] == 36  # the same layout, held out
    # trained on every training image: no validation split of that data is clean
    everything = f"local-dir:{_model_with_record(data_dir, tmp_path / 'all', validation_fraction=0.0, seed=0)}"
    with pytest.raises(ConfigError, match="trained without a validation split, on every image of its.*--split test"):
        evaluate_model(everything, RefilledConfig(**config), split="validation")
    # (on a few images per class: the message says which, not "every image")
    some = _model_with_record(data_dir, tmp_path / "some", validation_fraction=0.0, shots_per_class=4, seed=0)
    with pytest.raises(ConfigError, match="validation split, on 4 images per class, drawn with seed 0, of its"):
        evaluate_model(f"local-dir:{some}", RefilledConfig(**config), split="validation")
    # a model without a record (not exported by refilled-hf) is evaluated, with a warning
    bare = export_model(timm.create_model("cifar_wrn_16_1", num_classes=3), tmp_path / "b",
                        label_names=CLASS_NAMES[3:6])  # fmt: skip
    with caplog.at_level("WARNING", logger="refilled_hf.evaluation"):
        unchecked = evaluate_model(f"local-dir:{bare}", RefilledConfig(**config), split="validation")
    assert unchecked["validation_samples"] == 9
    assert "cannot check that this validation split holds none of its training images" in caplog.text


def test_a_teachers_training_rows_are_drawn_again_from_its_record(data_dir, tmp_path, caplog):
    def teacher(name, classes, **selection):
        data = load_classification_data(str(data_dir), classes=classes, splits=("train",), **selection)
        record = data.selection_record()
        return data, export_model(timm.create_model("cifar_wrn_16_1", num_classes=data.num_classes), tmp_path / name,
                                  label_names=data.class_names, training_data=record)  # fmt: skip

    student = load_classification_data(str(data_dir), classes="3-5", validation_fraction=0.25, seed=0, splits=())
    for classes, selection in (("2-4", {"seed": 1, "shots_per_class": 5}), ("0-2", {"seed": 0})):
        data, folder = teacher(classes, classes, validation_fraction=0.25, **selection)
        rows = teacher_training_rows(training_data_record(f"local-dir:{folder}"), student)
        assert rows.tolist() == data.train.source_rows.tolist()
    # a record that does not reproduce (edited seed) gives no rows, and says so
    record = training_data_record(f"local-dir:{folder}")
    with caplog.at_level("WARNING", logger="refilled_hf.provenance"):
        assert teacher_training_rows({**record, "seed": 5}, student) is None
    assert "could not be drawn again" in caplog.text
    # the same data under another name (a Hub id, a copy) is recognised by its rows and labels
    renamed = teacher_training_rows({**record, "dataset": "someone/colors"}, student)
    assert renamed.tolist() == data.train.source_rows.tolist()
    # other data (the same classes and sizes, other images and labels): nothing to leave out, no warning
    caplog.clear()
    other = load_classification_data(str(write_image_dataset(tmp_path / "other", seed=1)), classes="3-5",
                                     validation_fraction=0.25, seed=0, splits=())  # fmt: skip
    with caplog.at_level("WARNING", logger="refilled_hf.provenance"):
        assert teacher_training_rows({**record, "dataset": "someone/colors"}, other) is None
    assert not caplog.text
    # a teacher that trained on every validation image of the student leaves nothing to probe
    _, everything = teacher("all", "3-5", validation_fraction=0.0, seed=0)
    config = RefilledConfig(
        dataset=str(data_dir),
        classes="3-5",
        teacher=f"local-dir:{everything}",
        use_cpu=True,
        image_size=16,
        validation_fraction=0.25,
        seed=0,
        output_dir=str(tmp_path / "p"),
    )
    with pytest.raises(ConfigError, match="trained on every image of the student's validation split.*"
                       r"The teacher trained on the whole split: .*\(--validation_split\)"):  # fmt: skip
        probe_teacher(config)
    # the fix it names is one that can work: the teacher's carve where it can be repeated, else another split
    record = training_data_record(f"local-dir:{everything}")
    carved = {**record, "validation_fraction": 0.25, "seed": 3}
    assert (
        _carve_fix(config, carved, student) == "Carve the validation split as the teacher's was: "
        "--validation_fraction 0.25 --data_seed 3"
    )
    reordered = {**carved, "source_class_ids": [5, 4, 3], "class_names": ["5", "4", "3"]}
    assert "depends on the classes selected and their order" in _carve_fix(config, reordered, student)
    assert "(--validation_split)" in _carve_fix(config, reordered, student)


# ----------------------------------------------------------------- 7. nothing of a user's is deleted


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_model_folder_the_run_did_not_write_is_never_replaced(overwrite, data_dir, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "keep.txt").write_text("precious")
    with pytest.raises(RunDirError, match="model, which no refilled-hf run recorded"):
        run(tiny_recipe(data_dir, out, method="ce", stage2_epochs=1, overwrite_output=overwrite))
    assert (out / "model" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["model"]


@pytest.mark.slow
def test_damaged_stage_outputs_stop_a_resume_with_one_clear_error(data_dir, teacher_dir, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(data_dir, out, method="refilled", teacher=f"local-dir:{teacher_dir}", stage1_epochs=1,
                         stage2_epochs=1)  # fmt: skip
    run(recipe)
    unfinish(out)
    shutil.rmtree(out / "stage2")
    (out / "stage2").mkdir()
    (out / "stage2" / "teacher_centers.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunError, match="teacher_centers.safetensors is damaged"):
        run({**recipe, "resume_from_checkpoint": "true"})
    for centers in (torch.zeros(2, 8), torch.full((3, 8), float("nan")), torch.zeros(3)):  # 3 classes, 8 dims
        save_file({"centers": centers}, str(out / "stage2" / "teacher_centers.safetensors"))
        with pytest.raises(RunError, match="does not hold this run's class centres. Delete it"):
            run({**recipe, "resume_from_checkpoint": "true"})
    (out / "stage1" / "final" / "metrics.json").write_text("{")
    with pytest.raises(RunError, match="final is damaged"):
        run({**recipe, "resume_from_checkpoint": "true"})


def test_evaluate_reads_a_stage_checkpoint_and_refuses_one_of_stage_1(data_dir, tmp_path, caplog):
    from refilled_hf.backbone import ModelLoadError

    teacher = write_random_teacher(tmp_path / "t")
    results = run(tiny_recipe(data_dir, tmp_path / "run", method="refilled", teacher=f"local-dir:{teacher}"))
    config = RefilledConfig(**{**tiny_recipe(data_dir, tmp_path / "e"), "classes": None})
    # a Trainer checkpoint holds the StudentModel wrapper's names ("model.*"): its last one is the exported student;
    # its classes and validation split come from the run's record
    last = checkpoints(tmp_path / "run" / "stage2")[-1] / "model.safetensors"
    assert all(k.startswith("model.") for k in load_file(str(last)))
    again = evaluate_model("cifar_wrn_16_1", config, checkpoint=str(last))
    assert again["test_samples"] == 18 and again["test_top1"] == pytest.approx(results["final"]["test_top1"])
    assert again["data"]["class_names"] == results["class_names"]
    # without --image_size: the run's (16 px; cifar_wrn_16_1's own is 32, which measured another input)
    unsized = RefilledConfig(**{**tiny_recipe(data_dir, tmp_path / "e"), "classes": None, "image_size": None})
    with caplog.at_level("INFO", logger="refilled_hf.evaluation"):
        at_run_size = evaluate_model("cifar_wrn_16_1", unsized, checkpoint=str(last))
    assert at_run_size["test_top1"] == pytest.approx(results["final"]["test_top1"])
    assert "Evaluating at 16 px, the --image_size of the run that wrote" in caplog.text
    own = evaluate_model("cifar_wrn_16_1", config, checkpoint=str(last), split="validation")
    assert own["validation_top1"] == pytest.approx(results["final"]["validation_top1"])
    with pytest.raises(ConfigError, match=r"not the one .* --data_seed 0"):  # another seed: another split, refused
        evaluate_model("cifar_wrn_16_1", dataclasses.replace(config, seed=5, data_seed=5), checkpoint=str(last),
                       split="validation")  # fmt: skip
    # stage 1 trains the embedding only: its classifier is the initial one, so a top-1 of it would mean nothing
    for stage1 in (tmp_path / "run" / "stage1" / "final", checkpoints(tmp_path / "run" / "stage1")[-1]):
        with pytest.raises(ConfigError, match=r"checkpoint of REFILLED's stage 1.*stage1\.test_ncm_top1"):
            evaluate_model("cifar_wrn_16_1", config, checkpoint=str(stage1 / "model.safetensors"))
    # another architecture: a short message that counts the keys instead of listing them all
    message = r"does not match .*cifar_wrn_16_2.*keys of another shape .*in all\)"
    with pytest.raises(ModelLoadError, match=message) as err:
        evaluate_model("cifar_wrn_16_2", config, checkpoint=str(last))
    assert len(str(err.value)) < 500


def test_sigterm_and_sigusr1_are_taken_as_notices_only_while_installed():
    for number in (signal.SIGTERM, signal.SIGUSR1):
        before = signal.getsignal(number)
        notice = StopOnSignal()
        with notice.installed():
            os.kill(os.getpid(), number)
            assert notice.received == number
        assert signal.getsignal(number) is before and notice.stopped_at is None


def test_a_finished_runs_model_is_exported_again_only_from_the_weights_it_exported(tmp_path):
    """A stage that kept neither its final weights nor a checkpoint of its last step (and, under
    --load_best_model_at_end, of its best step) cannot give the exported model back without training."""
    from safetensors.torch import save_file

    from refilled_hf.pipeline import _export_restore_problem

    def checkpoint(stage_dir: Path, step: int, last: int, best: int | None = None) -> None:
        folder = stage_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.save({}, folder / name)
        state = {"global_step": step, "max_steps": last, "best_global_step": best}
        (folder / "trainer_state.json").write_text(json.dumps(state))

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    (stage1 / "final").mkdir(parents=True)
    (stage1 / "final" / "metrics.json").write_text("{}")
    config = RefilledConfig(output_dir=str(tmp_path), use_cpu=True)
    assert _export_restore_problem(config, [stage1, stage2]) == f"{stage2} holds no checkpoint"
    checkpoint(stage2, 4, last=6)
    assert "(checkpoint-4) is not of the stage's last step (6)" in _export_restore_problem(config, [stage1, stage2])
    checkpoint(stage2, 6, last=6, best=2)
    assert _export_restore_problem(config, [stage1, stage2]) is None  # (the best is not what the stage ends with)
    best = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, load_best_model_at_end=True)
    assert "(step 2, which the stage ended with) is gone" in _export_restore_problem(best, [stage1, stage2])
    (stage2 / "checkpoint-2").mkdir()
    assert _export_restore_problem(best, [stage1, stage2]) is None
    (stage2 / "checkpoint-6" / "optimizer.pt").unlink()
    assert "checkpoint-6: it has no optimizer.pt" in _export_restore_problem(config, [stage1, stage2])
    shutil.rmtree(stage1 / "final")  # stage 1 must have finished too, unless the run trains none
    assert "stage1 holds no checkpoint" in _export_restore_problem(config, [stage1, stage2])
    ablation = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, stage1_epochs=0)
    assert "checkpoint-6: it has no optimizer.pt" in _export_restore_problem(ablation, [stage1, stage2])


def test_evaluate_warns_where_the_recorded_test_split_changed_since_the_model_was_trained(data_dir, tmp_path, caplog):
    """A model's card states its test top-1; `evaluate` of the same data set, split and classes
    later gives another number where the files were changed (a pixel, a label) or replaced: it
    says so, naming what changed, and not where they are as they were."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    decoded = load_classification_data(str(data), classes="3-5", validation_fraction=0.25, seed=0)
    assert decoded.selection_record()["test_content_digest"] == decoded.content_digests["test"]
    model = export_model(timm.create_model("cifar_wrn_16_1", num_classes=3), tmp_path / "model",
                         label_names=CLASS_NAMES[3:6], training_data=decoded.selection_record())  # fmt: skip
    config = RefilledConfig(dataset=None, use_cpu=True, per_device_eval_batch_size=16)  # (as evaluate leaves it)
    changed = "holds other"
    with caplog.at_level("WARNING", logger="refilled_hf.evaluation"):
        evaluate_model(f"local-dir:{model}", config)  # (the data set of its record)
    assert changed not in caplog.text
    test_rows = decoded.source_rows["test"]
    change_one_pixel(data / "test.parquet", int(test_rows[0]))
    caplog.clear()
    with caplog.at_level("WARNING", logger="refilled_hf.evaluation"):
        evaluate_model(f"local-dir:{model}", config)
    assert f"Split 'test' of {data} holds other pixels than when local-dir:{model} was trained" in caplog.text
    table = pq.read_table(data / "test.parquet")  # a label of a selected image moved to another selected class
    labels = table.column("label").to_pylist()
    labels[int(test_rows[0])] = 4 if labels[int(test_rows[0])] != 4 else 5
    column = pa.array(labels, type=table.schema.field("label").type)
    table = table.set_column(table.schema.get_field_index("label"), table.schema.field("label"), column)
    pq.write_table(table, data / "test.parquet")
    caplog.clear()
    with caplog.at_level("WARNING", logger="refilled_hf.evaluation"):
        evaluate_model(f"local-dir:{model}", config)
    assert "holds other rows or labels and pixels than when" in caplog.text
    # another data set (a copy at another path) is the user's choice of images: nothing to say
    caplog.clear()
    with caplog.at_level("WARNING", logger="refilled_hf.evaluation"):
        evaluate_model(f"local-dir:{model}", config.with_changes(dataset=str(data_dir)))
    assert changed not in caplog.text


def test_a_finished_runs_record_is_kept_only_where_the_weights_measure_what_it_records(tmp_path):
    from refilled_hf.pipeline import _confirmed_record

    measured = {"final": {"test_top1": 40.0, "test_top5": 90.0, "test_samples": 18, "test_loss": 1.2}}
    same = {"final": {"test_top1": 40.0, "test_top5": 90.0, "test_samples": 18, "test_loss": 1.1}, "seconds": 3}
    assert _confirmed_record(same, measured, tmp_path) is same  # (a loss may differ in its last digits)
    earlier = {"final": {"test_top1": 40.0, "test_samples": 18}}  # an earlier release recorded no top-5
    assert _confirmed_record(earlier, measured, tmp_path) is earlier
    with pytest.raises(RunError, match=r"\(test_top1 41.0 -> 40.0\)"):
        _confirmed_record({"final": {"test_top1": 41.0, "test_samples": 18}}, measured, tmp_path)
    with pytest.raises(RunError, match="its results record no top-1 to compare the weights its stages kept with"):
        _confirmed_record({"final": {}}, measured, tmp_path)
