"""Tracker runs (TensorBoard, W&B, MLflow, ...): what each stage of a run reports, and where.
W&B and MLflow are stood in for by fakes of the calls transformers' callbacks make (CI has
neither installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_recipe
from transformers import TrainerCallback

from refilled_hf.config import RefilledConfig
from refilled_hf.pipeline import run_distillation

pytestmark = pytest.mark.slow


def run(recipe: dict, callbacks=None) -> dict:
    return run_distillation(RefilledConfig(**recipe), callbacks=callbacks)


class RecordLogs(TrainerCallback):
    """What the trackers (TensorBoard, W&B, ...) are given, stage by stage."""

    def __init__(self):
        self.logs: list[tuple[str, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((Path(args.output_dir).name, dict(logs or {})))


def test_trackers_file_the_final_validation_under_eval_and_the_test_under_test(data_dir, teacher_dir, tmp_path):
    """transformers' trackers put every key but eval_* and test_* under train/: the
    validation measured after a stage trained went there as train/validation_top1."""
    from transformers.integrations.integration_utils import rewrite_logs

    recorder = RecordLogs()
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="refilled", teacher=f"local-dir:{teacher_dir}")
    results = run(recipe, callbacks=[recorder])
    tracked = [(stage, rewrite_logs(logs)) for stage, logs in recorder.logs]
    filed_under_train = {key for _, logs in tracked for key in logs if key.startswith("train/")}
    assert not {key for key in filed_under_train if "validation" in key or "test" in key}, filed_under_train
    last = {stage: logs for stage, logs in tracked if "eval/samples" in logs}  # each stage's last evaluation
    assert last["stage1"]["eval/ncm_top1"] == results["stage1"]["validation_ncm_top1"]
    assert last["stage2"]["eval/top1"] == results["final"]["validation_top1"]
    assert any(logs.get("test/top1") == results["final"]["test_top1"] for _, logs in tracked)
    assert "validation_top1" in results["final"]  # what a run reports keeps its name


def _fake_wandb(monkeypatch):
    """A stand-in for the ``wandb`` module, as far as transformers' WandbCallback uses it:
    it records the runs started and what each was given."""
    import importlib.machinery
    import itertools
    import sys
    import types

    ids = itertools.count()

    class Run:
        def __init__(self, name):
            self.id, self.name, self.url, self.summary, self.logged = f"run{next(ids)}", name, "", {}, []

        def _label(self, **kwargs):
            pass

    class Config(dict):
        def update(self, values, allow_val_change=False):
            super().update(values)

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.run, module.runs, module.config, module.summary = None, [], Config(), {}

    def init(project=None, name=None, **kwargs):
        module.run = Run(name)
        module.runs.append(module.run)
        return module.run

    def log(values):
        if module.run is None:
            raise RuntimeError("wandb.log() before wandb.init()")
        module.run.logged.append(dict(values))

    module.init, module.log, module.finish = init, log, lambda: setattr(module, "run", None)
    module.define_metric = module.termwarn = lambda *args, **kwargs: None
    config_util = types.ModuleType("wandb.sdk.lib.config_util")
    config_util.ConfigError = type("ConfigError", (Exception,), {})
    monkeypatch.setitem(sys.modules, "wandb", module)
    for name in ("wandb.sdk", "wandb.sdk.lib"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "wandb.sdk.lib.config_util", config_util)
    return module


def _fake_mlflow(monkeypatch):
    """A stand-in for ``mlflow``, as far as transformers' MLflowCallback uses it; like MLflow,
    a metric logged without an active run starts one."""
    import importlib.machinery
    import itertools
    import sys
    import types

    ids = itertools.count()

    class Run:
        def __init__(self, name):
            self.info = types.SimpleNamespace(run_id=f"run{next(ids)}")
            self.name, self.logged, self.ended = name, [], False

    module = types.ModuleType("mlflow")
    module.__spec__, module.__version__ = importlib.machinery.ModuleSpec("mlflow", None), "3.0.0"
    validation = types.SimpleNamespace(MAX_PARAM_VAL_LENGTH=6000, MAX_PARAMS_TAGS_PER_BATCH=100)
    module.utils = types.SimpleNamespace(validation=validation)
    module.runs, module.active = [], None

    def start_run(run_name=None, nested=False):
        module.active = Run(run_name)
        module.runs.append(module.active)
        return module.active

    def end_run():
        module.active.ended, module.active = True, None

    def log_metrics(metrics, step=None, synchronous=None):
        (module.active or start_run())
        module.active.logged.append({**metrics, "step": step})

    module.start_run, module.end_run, module.log_metrics, module.active_run = (start_run, end_run, log_metrics,
                                                                               lambda: module.active)  # fmt: skip
    module.log_params = module.set_tags = module.set_tracking_uri = module.set_experiment = lambda *a, **k: None
    module.is_tracking_uri_set, module.get_tracking_uri = (lambda: True), (lambda: "memory")
    monkeypatch.setitem(sys.modules, "mlflow", module)
    return module


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_each_stage_reports_to_a_tracker_run_of_its_own(tracker, data_dir, teacher_dir, tmp_path, monkeypatch):
    """W&B: transformers' callback left its run open, so stage 2 and each candidate logged
    into stage 1's run, their steps from 0 again over its curves. MLflow: the callback ended
    its run when training ended, so the stage's final validation and test started a stray
    run, into which every later stage logged. Each stage now has a run of its own, named
    after the run and the stage, with its final metrics; the exported candidate evaluated
    after others trained, a run ``-final``; a run the user started is used as it is."""
    fake = (_fake_wandb if tracker == "wandb" else _fake_mlflow)(monkeypatch)
    out = tmp_path / "run"
    recipe = tiny_recipe(data_dir, out, method="refilled", teacher=f"local-dir:{teacher_dir}", report_to=[tracker],
                         distill_weight=None, distill_weight_search="1,10", logging_steps=1)  # fmt: skip
    results = run(recipe)
    alone_exported = results["student_alone"]["exported"]
    stages = ["stage1", "stage2-lambda1", "stage2-lambda10", "student-alone"] + ([] if alone_exported else ["final"])
    assert [r.name for r in fake.runs] == [f"{out}-{stage}" for stage in stages]
    step, test = ("train/global_step", "test/top1") if tracker == "wandb" else ("step", "test_top1")
    for stage_run in fake.runs:
        steps = [entry[step] for entry in stage_run.logged]
        assert steps == sorted(steps) and steps[0] <= 1, (stage_run.name, steps)  # each run's steps from the start
    logged = [{key: value for entry in r.logged for key, value in entry.items()} for r in fake.runs]
    stage1_test = "test/ncm_top1" if tracker == "wandb" else "test_ncm_top1"
    assert logged[0][stage1_test] == results["stage1"]["test_ncm_top1"]
    assert [test in metrics for metrics in logged] == [False] * (len(stages) - 1) + [True]  # the export's, once
    assert logged[-1][test] == results["final"]["test_top1"]
    if tracker == "mlflow":
        assert all(r.ended for r in fake.runs)  # the last one too, when the run ended

    mine = fake.init(name="my sweep") if tracker == "wandb" else fake.start_run(run_name="my sweep")
    run({**recipe, "output_dir": str(tmp_path / "again")})  # started by the user: every stage logs into it
    assert fake.runs[len(stages) :] == [mine] and len(mine.logged) > len(fake.runs[0].logged)
    assert (fake.run if tracker == "wandb" else fake.active) is mine  # and it stays open


def test_the_exported_lambda_measured_after_another_trained_has_a_run_of_its_own(data_dir, teacher_dir, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    """Without the student-alone candidate, the pick is measured by the last candidate's
    trainer: where the pick is another lambda, its test went into that candidate's run."""
    wandb = _fake_wandb(monkeypatch)
    for search in ("1,10", "10,1"):  # the pick is the first candidate in one order or the other
        out = tmp_path / search.replace(",", "-")
        results = run(tiny_recipe(data_dir, out, method="refilled", teacher=f"local-dir:{teacher_dir}",
                                  report_to=["wandb"], distill_weight=None, distill_weight_search=search,
                                  student_alone_candidate=False))  # fmt: skip
        runs = [r for r in wandb.runs if r.name.startswith(f"{out}-")]
        pick_last = f"{results['distill_weight']:g}" == search.split(",")[-1]
        lambdas = [f"stage2-lambda{value}" for value in search.split(",")]
        assert [r.name for r in runs] == [f"{out}-{stage}" for stage in ["stage1", *lambdas]] + (
            [] if pick_last else [f"{out}-final"]
        )
        tests = [entry["test/top1"] for r in runs for entry in r.logged if "test/top1" in entry]
        assert tests == [results["final"]["test_top1"]] and "test/top1" in runs[-1].logged[-1]


def test_the_pick_measured_by_a_trainer_made_for_it_logs_at_its_last_epoch(data_dir, teacher_dir, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """A lambda picked over the student alone (trained last) is measured by a trainer made for
    the evaluation: its validation and test reached the -final run at epoch 0."""
    import refilled_hf.candidates as candidates

    wandb = _fake_wandb(monkeypatch)
    monkeypatch.setattr(candidates, "pick_candidate", lambda candidates, **kwargs: 0)  # lambda 1, whatever measured
    out = tmp_path / "run"
    results = run(tiny_recipe(data_dir, out, method="refilled", teacher=f"local-dir:{teacher_dir}",
                              report_to=["wandb"], distill_weight=None, distill_weight_search="1,10"))  # fmt: skip
    assert results["distill_weight"] == 1 and not results["student_alone"]["exported"]
    (final,) = [r for r in wandb.runs if r.name == f"{out}-final"]
    assert [entry["train/epoch"] for entry in final.logged] == [2, 2] and "test/top1" in final.logged[-1]
