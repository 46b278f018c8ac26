"""`--student_alone_candidate`: with the lambda search, the student trained alone (cross-
entropy for both stages' epochs) is one more candidate, exported only when it is better
on validation.

The candidate must be exactly the `--method ce` run a user would get with its schedule,
the export must be whichever candidate won on validation (and say so in results.json,
the summary and the card), the test split must be evaluated for the export only, and an
interrupted run must resume to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe, write_random_teacher
from safetensors.torch import load_file
from test_pipeline import Interrupt

from refilled_hf import candidates, pipeline
from refilled_hf.config import RefilledConfig
from refilled_hf.pipeline import DivergedError, RunInterrupted, run_distillation, training_seconds
from refilled_hf.trainer import RefilledTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return write_random_teacher(tmp_path_factory.mktemp("teacher") / "model", name="cifar_wrn_16_2")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


@pytest.fixture
def validation_bias(monkeypatch):
    """Add ``bias[stage]`` points to the validation top-1 a trainer of that stage reports,
    so a test can decide which candidate wins while every candidate really trains."""
    bias: dict[str, float] = {}
    evaluate = RefilledTrainer.evaluate

    def biased(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = evaluate(self, eval_dataset, ignore_keys, metric_key_prefix)
        key = f"{metric_key_prefix}_top1"
        if metric_key_prefix == "validation" and key in metrics:
            metrics[key] += bias.get(self.stage, 0.0)
        return metrics

    monkeypatch.setattr(RefilledTrainer, "evaluate", biased)
    return bias


def _recipe(data_dir, teacher_dir, out: Path, **overrides) -> dict:
    base = dict(method="refilled", teacher=f"local-dir:{teacher_dir}", stage1_epochs=2, stage2_epochs=2,
                stage2_milestones="1", distill_weight=None, distill_weight_search="1,10")  # fmt: skip
    return tiny_recipe(data_dir, out, **{**base, **overrides})


@pytest.mark.parametrize("winner", ["ce", "stage2"])
def test_the_candidate_is_the_ce_run_and_the_better_one_is_exported(winner, data_dir, teacher_dir, tmp_path,
                                                                    validation_bias, caplog):  # fmt: skip
    # the same images, seed and initial weights, for as many epochs as both stages, milestones stretched
    ce = run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "ce", method="ce", stage2_epochs=4,
                                                       stage2_milestones="2")))  # fmt: skip
    validation_bias[winner] = 50.0  # (after the ce run: its own numbers stay unbiased)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
        results = run_distillation(RefilledConfig(**_recipe(data_dir, teacher_dir, out)))
    assert "The student alone (cross-entropy, 4 epochs, milestones 2) will train as one more candidate" in caplog.text

    alone = results["student_alone"]
    assert alone["epochs"] == 4 and alone["stage2_milestones"] == "2" and alone["stage_dir"] == "student-alone"
    assert _same_weights(out / "student-alone" / "final" / "model.safetensors", tmp_path / "ce" / "model" /
                         "model.safetensors")  # fmt: skip
    assert alone["validation_top1"] == ce["final"]["validation_top1"] + validation_bias.get("ce", 0.0)
    assert not any(k.startswith("test_") for k in alone)  # the test split chose nothing
    assert alone["train_metrics"]["epoch"] == 4

    search = results["distill_weight_search"]
    best = max(search["candidates"], key=lambda c: c["validation_top1"])
    assert search["selected"] == results["distill_weight"] == best["distill_weight"]  # REFILLED's own pick
    exported = alone if winner == "ce" else best
    assert alone["exported"] is (winner == "ce")
    assert results["final"]["validation_top1"] == exported["validation_top1"]
    assert _same_weights(out / "model" / "model.safetensors", out / exported["stage_dir"] / "final" /
                         "model.safetensors")  # fmt: skip
    if winner == "ce":  # the test top-1 is the ce run's: the same model on the same images
        assert results["final"]["test_top1"] == ce["final"]["test_top1"]
        assert "beat every REFILLED candidate on the validation split" in caplog.text
    else:
        assert "beat every REFILLED candidate" not in caplog.text
    assert json.loads((out / "results.json").read_text())["student_alone"] == alone
    seconds = results["stage1"]["train_seconds"] + sum(c["train_seconds"] for c in search["candidates"])
    assert results["train_seconds"] == pytest.approx(seconds + alone["train_seconds"]) == training_seconds(results)

    card = (out / "model" / "README.md").read_text()
    scores = f"lambda 1: {search['candidates'][0]['validation_top1']:.2f}"
    if winner == "ce":
        assert "It is the student-alone candidate of a REFILLED run" in card
        assert "| ce (the student-alone candidate, this model) | 4 |" in card
        assert "- Method: **ce**, 4 epochs" in card and "x0.2 at epoch 2" in card
        assert f"({scores}, " in card and f"student alone: {alone['validation_top1']:.2f})" in card
        # its row: no top-5 (3 classes) and no stage-1 NCM accuracy (it has no stage 1)
        top1 = results["final"]["test_top1"]
        assert f"| ce (the student-alone candidate, this model) | 4 | {top1:.2f} | - | - |" in card
        assert "- Teacher: none" in card
        assert "tags:\n- image-classification\n- timm\n- refilled-hf\n" in card and "- refilled\n" not in card
        # as another run's baseline, the row names the model it exported, and that model's epochs
        other = tiny_recipe(data_dir, tmp_path / "other", method="ce", stage2_epochs=1, compare_runs=str(out))
        run_distillation(RefilledConfig(**other))
        other_card = (tmp_path / "other" / "model" / "README.md").read_text()
        assert "| refilled (its student-alone candidate, exported) | 4 |" in other_card
    else:
        assert "- Method: **refilled**" in card and "It is the student-alone candidate" not in card
        assert "| refilled (this model) | 2 + 2 x 2 |" in card
        assert f"was a candidate too: validation top-1 {alone['validation_top1']:.2f}, not above the pick's" in card
    assert "distill_weight_search: 1,10" in card and "stage1_epochs: 2" in card  # the recipe: the whole run's


def test_an_interrupted_candidate_resumes_to_the_same_run(data_dir, teacher_dir, tmp_path, validation_bias):
    validation_bias["ce"] = 50.0  # the resumed candidate is the export: its weights are compared
    reference = run_distillation(RefilledConfig(**_recipe(data_dir, teacher_dir, tmp_path / "reference")))
    recipe = _recipe(data_dir, teacher_dir, tmp_path / "run")
    with pytest.raises(RunInterrupted):  # 27 images, batch 12: 3 steps per epoch; inside its second epoch
        run_distillation(RefilledConfig(**recipe), callbacks=[Interrupt("student-alone", 5)])
    lambda_final = tmp_path / "run" / "stage2-lambda10" / "final" / "model.safetensors"
    mtime = lambda_final.stat().st_mtime_ns
    resumed = run_distillation(RefilledConfig(**recipe, resume_from_checkpoint="true"))
    assert lambda_final.stat().st_mtime_ns == mtime  # finished candidates are kept
    assert resumed["student_alone"]["exported"] and reference["student_alone"]["exported"]
    assert resumed["final"]["test_top1"] == reference["final"]["test_top1"]
    assert _same_weights(tmp_path / "run" / "model" / "model.safetensors",
                         tmp_path / "reference" / "model" / "model.safetensors")  # fmt: skip


def _untimed(record):
    """``record`` without its wall times (two runs of the same recipe differ only there)."""
    if isinstance(record, dict):
        timed = ("seconds", "runtime", "per_second")
        return {k: _untimed(v) for k, v in record.items() if not any(t in k for t in timed)}
    if isinstance(record, list):
        return [_untimed(v) for v in record]
    return record


@pytest.mark.parametrize("winner", ["ce", "stage2"])
def test_a_crash_after_every_candidate_finished_resumes_without_training(winner, data_dir, teacher_dir, tmp_path,
                                                                         validation_bias, monkeypatch):  # fmt: skip
    # the process dies after the last candidate saved its final weights, before the export
    validation_bias[winner] = 50.0
    reference = run_distillation(RefilledConfig(**_recipe(data_dir, teacher_dir, tmp_path / "reference")))
    recipe = _recipe(data_dir, teacher_dir, tmp_path / "run")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the export")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_finish", crash)
        with pytest.raises(KeyboardInterrupt):
            run_distillation(RefilledConfig(**recipe))
    assert not (tmp_path / "run" / "model").exists()
    finals = sorted((tmp_path / "run").glob("*/final/model.safetensors"))
    assert [f.parent.parent.name for f in finals] == ["stage1", "stage2-lambda1", "stage2-lambda10", "student-alone"]
    mtimes = [f.stat().st_mtime_ns for f in finals]
    trained = []
    for module in (pipeline, candidates):  # (stage 1 and a single stage 2; the candidates)
        monkeypatch.setattr(module, "fit", lambda trainer, checkpoint: trained.append(trainer.stage))
    resumed = run_distillation(RefilledConfig(**recipe, resume_from_checkpoint="true"))
    assert trained == [] and [f.stat().st_mtime_ns for f in finals] == mtimes  # nothing trained again
    assert resumed["student_alone"]["exported"] is (winner == "ce")
    for key in ("distill_weight", "distill_weight_search", "student_alone"):
        assert _untimed(resumed[key]) == _untimed(reference[key])
    for key in ("validation_top1", "test_top1", "test_loss"):
        assert resumed["final"][key] == reference["final"][key]
    assert _same_weights(tmp_path / "run" / "model" / "model.safetensors",
                         tmp_path / "reference" / "model" / "model.safetensors")  # fmt: skip


def test_a_diverged_student_alone_cannot_be_chosen(data_dir, teacher_dir, tmp_path, monkeypatch):
    fit = candidates.fit

    def diverge_alone(trainer, checkpoint):
        if trainer.stage == "ce":
            raise DivergedError("Training diverged in ce (loss nan at step 1).")
        return fit(trainer, checkpoint)

    monkeypatch.setattr(candidates, "fit", diverge_alone)
    results = run_distillation(RefilledConfig(**_recipe(data_dir, teacher_dir, tmp_path / "r")))
    alone = results["student_alone"]
    assert alone["diverged"].startswith("Training diverged in ce") and alone["exported"] is False
    assert "validation_top1" not in alone
    picked = next(c for c in results["distill_weight_search"]["candidates"]
                  if c["distill_weight"] == results["distill_weight"])  # fmt: skip
    assert results["final"]["validation_top1"] == picked["validation_top1"]
    assert _same_weights(tmp_path / "r" / "model" / "model.safetensors",
                         tmp_path / "r" / picked["stage_dir"] / "final" / "model.safetensors")  # fmt: skip
    card = (tmp_path / "r" / "model" / "README.md").read_text()
    assert "was a candidate too: it diverged, so REFILLED's pick was exported." in card
    assert "It is the student-alone candidate" not in card


def test_all_lambdas_diverging_leaves_the_student_alone(data_dir, teacher_dir, tmp_path):
    results = run_distillation(RefilledConfig(**_recipe(data_dir, teacher_dir, tmp_path / "r", stage1_epochs=1,
                                                        distill_weight_search="1e30")))  # fmt: skip
    assert "diverged" in results["distill_weight_search"]["candidates"][0]
    assert results["distill_weight_search"]["selected"] is None and results["distill_weight"] is None
    assert results["student_alone"]["exported"]
    assert (tmp_path / "r" / "model" / "model.safetensors").is_file()


def test_off_or_without_the_search_there_is_no_candidate(data_dir, teacher_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
        off = run_distillation(RefilledConfig(**_recipe(data_dir, teacher_dir, tmp_path / "off", max_steps=1,
                                                        student_alone_candidate=False)))  # fmt: skip
    assert "student_alone" not in off and not (tmp_path / "off" / "student-alone").exists()
    assert "will train as one more candidate" not in caplog.text
    pinned = run_distillation(RefilledConfig(**_recipe(data_dir, teacher_dir, tmp_path / "pinned", max_steps=1,
                                                       distill_weight=1.0, distill_weight_search=None)))  # fmt: skip
    assert "student_alone" not in pinned and not (tmp_path / "pinned" / "student-alone").exists()


def test_which_runs_have_the_candidate_and_its_schedule(tmp_path):
    def config(**overrides) -> RefilledConfig:
        return RefilledConfig(teacher="x", output_dir=str(tmp_path), **overrides)

    assert config().student_alone_runs()  # the default: lambda chosen on validation, and the student alone
    assert config(distill_weight_search="10").student_alone_runs()
    for none in (config(distill_weight=10.0), config(validation_fraction=0.0), config(method="kd"),
                 config(student_alone_candidate=False)):  # fmt: skip
        assert not none.student_alone_runs()
    assert config().student_alone_schedule() == (400.0, "200,280,360")  # the paper's 200 + 200, 100,140,180
    assert config(stage1_epochs=10, stage2_epochs=10, stage2_milestones="5,7").student_alone_schedule() == (
        20.0, "10,14")  # fmt: skip
    assert config(stage1_epochs=0, stage2_epochs=8, stage2_milestones="").student_alone_schedule() == (8.0, "")
