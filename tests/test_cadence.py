"""Evaluation and checkpoint cadence: long stages evaluate about --evaluations_per_stage
times, not every epoch; the final evaluation always runs; 0 restores every epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_recipe, write_image_dataset

from refilled_hf.config import RefilledConfig
from refilled_hf.pipeline import _set_cadence, run_distillation


def test_cadence_in_steps():
    args = RefilledConfig(output_dir="o", per_device_train_batch_size=10, evaluations_per_stage=20)
    _set_cadence(args, 200, images=95)  # 10 steps per epoch, every 10 epochs
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == ("steps", 100, "steps", 100)
    short = RefilledConfig(output_dir="o", evaluations_per_stage=20)
    _set_cadence(short, 15, images=95)
    assert str(short.eval_strategy.value) == "epoch"  # short stages still evaluate every epoch
    every = RefilledConfig(output_dir="o", evaluations_per_stage=0)
    _set_cadence(every, 400, images=95)
    assert str(every.eval_strategy.value) == "epoch"
    steps = RefilledConfig(output_dir="o", eval_strategy="steps", eval_steps=7, save_strategy="steps", save_steps=7)
    _set_cadence(steps, 400, images=95)
    assert steps.eval_steps == 7 and steps.save_steps == 7  # an explicit step cadence is the user's


@pytest.mark.slow
def test_a_stage_evaluates_and_saves_on_the_cadence_and_at_its_end(tmp_path):
    data = write_image_dataset(tmp_path / "data")
    recipe = tiny_recipe(data, tmp_path / "run", method="ce", stage2_epochs=4, evaluations_per_stage=2,
                         save_total_limit=5)  # fmt: skip
    results = run_distillation(RefilledConfig(**recipe))
    stage = Path(tmp_path / "run" / "ce")
    assert sorted(p.name for p in stage.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]  # 3 steps/epoch
    state = json.loads((stage / "checkpoint-12" / "trainer_state.json").read_text())
    evaluated = [e["epoch"] for e in state["log_history"] if "eval_top1" in e]
    assert evaluated == [2.0, 4.0]
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
