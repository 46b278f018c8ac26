"""Evaluation and checkpoint cadence: long stages evaluate about --evaluations_per_stage
times, not every epoch; the final evaluation always runs; 0 restores every epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import tiny_recipe, write_image_dataset

from refilled_hf.backbone import FrozenTeacher, StudentModel
from refilled_hf.config import RefilledConfig, option_name
from refilled_hf.pipeline import run_distillation
from refilled_hf.trainer import RefilledTrainer, set_evaluation_cadence


def test_cadence_in_steps():
    args = RefilledConfig(output_dir="o", per_device_train_batch_size=10, evaluations_per_stage=20)
    set_evaluation_cadence(args, 200, images=95)  # 10 steps per epoch, every 10 epochs
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == ("steps", 100, "steps", 100)
    short = RefilledConfig(output_dir="o", evaluations_per_stage=20)
    set_evaluation_cadence(short, 15, images=95)
    assert str(short.eval_strategy.value) == "epoch"  # short stages still evaluate every epoch
    every = RefilledConfig(output_dir="o", evaluations_per_stage=0)
    set_evaluation_cadence(every, 400, images=95)
    assert str(every.eval_strategy.value) == "epoch"
    steps = RefilledConfig(output_dir="o", eval_strategy="steps", eval_steps=7, save_strategy="steps", save_steps=7,
                           eval_delay=30)  # fmt: skip
    set_evaluation_cadence(steps, 400, images=95)
    assert steps.eval_steps == 7 and steps.save_steps == 7  # an explicit step cadence is the user's
    assert steps.eval_delay == 30  # in steps, as given
    delayed = RefilledConfig(output_dir="o", per_device_train_batch_size=10, eval_delay=15)
    set_evaluation_cadence(delayed, 200, images=95)
    assert delayed.eval_delay == 150  # 15 epochs, counted in steps as the cadence now is


@pytest.mark.slow
@pytest.mark.parametrize("eval_delay,evaluated", [(0, [2.0, 4.0]), (3, [4.0])])
def test_a_stage_evaluates_and_saves_on_the_cadence_and_at_its_end(tmp_path, eval_delay, evaluated):
    """--eval_delay 3 (epochs) evaluated at epoch 2 too: the cadence counts steps, and the delay
    was read as 3 steps."""
    data = write_image_dataset(tmp_path / "data")
    recipe = tiny_recipe(data, tmp_path / "run", method="ce", stage2_epochs=4, evaluations_per_stage=2,
                         save_total_limit=5, eval_delay=eval_delay)  # fmt: skip
    results = run_distillation(RefilledConfig(**recipe))
    stage = Path(tmp_path / "run" / "ce")
    assert sorted(p.name for p in stage.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]  # 3 steps/epoch
    state = json.loads((stage / "checkpoint-12" / "trainer_state.json").read_text())
    assert [e["epoch"] for e in state["log_history"] if "eval_top1" in e] == evaluated
    assert results["final"]["test_samples"] == 18


@pytest.mark.slow
@pytest.mark.parametrize(
    "max_grad_norm,logging,expected_norms,expected_logs",
    [
        (0.0, "steps", 3, [5, 10]),
        (1.0, "steps", 12, [5, 10]),
        (0.0, "epoch", 4, [3, 6, 9, 12]),
        (0.0, "no", 0, []),
        (0.0, "no+first", 1, [1]),
    ],  # fmt: skip
)
def test_the_gradient_norm_is_computed_only_for_the_steps_that_log(
    tmp_path, monkeypatch, max_grad_norm, logging, expected_norms, expected_logs
):
    from accelerate import Accelerator
    from transformers import TrainerCallback

    calls = []
    original = Accelerator.clip_grad_norm_

    def counting(self, parameters, max_norm, norm_type=2):
        calls.append(max_norm)
        return original(self, parameters, max_norm, norm_type)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", counting)
    data = write_image_dataset(tmp_path / "data")
    recipe = tiny_recipe(data, tmp_path / "run", method="ce", stage2_epochs=4, logging_steps=5,
                         max_grad_norm=max_grad_norm, save_strategy="no", eval_strategy="no",
                         logging_strategy=logging.split("+")[0], logging_first_step="+first" in logging)  # fmt: skip
    logged = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                logged.append((state.global_step, logs.get("grad_norm")))

    run_distillation(RefilledConfig(**recipe), callbacks=[Logs()])
    # 12 steps (3 per epoch): without clipping, the norm is computed for the logs (every 5 steps
    # and the last step; each epoch's last step; none) and nowhere else; with clipping, the clip
    # computes it at every step
    assert len(calls) == expected_norms
    assert [step for step, _ in logged] == expected_logs
    assert all(norm is not None and norm > 0 for _, norm in logged)


def test_a_trainer_built_from_the_run_config_has_its_stage_schedule_cadence_and_folder(tmp_path):
    config = RefilledConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=10,
        stage1_epochs=100,
        stage2_epochs=200,
        stage1_learning_rate=0.2,
        stage2_learning_rate=0.05,
        use_cpu=True,
    )
    images = [{"pixel_values": torch.zeros(3, 8, 8), "labels": i % 3} for i in range(95)]  # 10 steps per epoch
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=5))
    for stage, epochs, lr, every in (("ce", 200, 0.05, 100), ("stage1", 100, 0.2, 50)):
        student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=3))
        trainer = RefilledTrainer(
            model=student,
            args=config,
            stage=stage,
            num_classes=3,
            teacher=teacher,
            train_dataset=images,
            eval_dataset=images,
            centers_dataset=images if stage == "stage1" else None,
        )
        args = trainer.args
        assert (args.num_train_epochs, args.learning_rate) == (epochs, lr)
        assert (option_name(args.eval_strategy), args.eval_steps) == ("steps", every)
        assert (option_name(args.save_strategy), args.save_steps) == ("steps", every)
        assert Path(args.output_dir) == tmp_path / stage
    # the user's config is left as it was
    assert option_name(config.eval_strategy) == "epoch" and Path(config.output_dir) == tmp_path
    assert config.learning_rate is None
