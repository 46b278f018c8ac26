"""`--distill_weight_search`: stage 2 once per lambda, the pick made on validation.

Each candidate must be exactly the run a user would get with that `--distill_weight`
alone, the export must be the pick, the test split must not be seen by the unpicked
candidates, and an interrupted search must resume to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_recipe, write_random_teacher
from safetensors.torch import load_file
from test_pipeline import Interrupt

from refilled_hf.candidates import pick_candidate
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.pipeline import RunError, RunInterrupted, run_distillation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return write_random_teacher(tmp_path_factory.mktemp("teacher") / "model", name="cifar_wrn_16_2")


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].equal(wb[key]), key


def test_search_matches_separate_runs_picks_on_validation_and_resumes(data_dir, teacher_dir, tmp_path):
    base = dict(method="refilled", teacher=f"local-dir:{teacher_dir}", stage1_epochs=2, stage2_epochs=3)
    lambdas = (20.0, 0.5)  # the better one (on this data) second: the pick is not just the first
    separate = {}
    for value in lambdas:
        out = tmp_path / f"alone-{value:g}"
        separate[value] = run_distillation(RefilledConfig(**tiny_recipe(data_dir, out, distill_weight=value, **base)))

    # the student-alone candidate off: it has tests/test_student_alone.py
    recipe = tiny_recipe(data_dir, tmp_path / "search", distill_weight=None, distill_weight_search="20, 0.5",
                         student_alone_candidate=False, **base)  # fmt: skip
    # in the second candidate, after its first checkpoint (3 steps per epoch), which the message names
    stopped = r"stage2 \(stage2-lambda0\.5\) stopped at step 4 of 9\. .* newest checkpoint, .*lambda0\.5/checkpoint-3 "
    with pytest.raises(RunInterrupted, match=stopped):
        run_distillation(RefilledConfig(**recipe), callbacks=[Interrupt("stage2-lambda0.5", 4)])
    first_final = tmp_path / "search" / "stage2-lambda20" / "final" / "model.safetensors"
    mtime = first_final.stat().st_mtime_ns
    finished_checkpoint = min((tmp_path / "search" / "stage2-lambda20").glob("checkpoint-*"))
    with pytest.raises(RunError, match="stage2-lambda20 of this run has finished"):
        run_distillation(RefilledConfig(**recipe, resume_from_checkpoint=str(finished_checkpoint)))
    results = run_distillation(RefilledConfig(**recipe, resume_from_checkpoint="true"))
    assert first_final.stat().st_mtime_ns == mtime  # the finished candidate is kept, not trained again

    search = results["distill_weight_search"]
    assert [c["distill_weight"] for c in search["candidates"]] == list(lambdas)
    for candidate, value in zip(search["candidates"], lambdas):
        alone = separate[value]
        # each candidate is the run with that lambda alone: same weights, same validation accuracy
        _assert_same_weights(
            tmp_path / "search" / candidate["stage_dir"] / "final" / "model.safetensors",
            tmp_path / f"alone-{value:g}" / "model" / "model.safetensors",
        )
        assert candidate["validation_top1"] == alone["final"]["validation_top1"]
        assert not any(k.startswith("test_") for k in candidate)  # the test split chose nothing
    val = [separate[v]["final"]["validation_top1"] for v in lambdas]
    expected = lambdas[val.index(max(val))]  # ties: the first listed
    assert search["selected"] == expected
    assert results["final"]["test_top1"] == separate[expected]["final"]["test_top1"]
    assert results["final"]["validation_top1"] == max(val)
    _assert_same_weights(
        tmp_path / "search" / "model" / "model.safetensors",
        tmp_path / f"alone-{expected:g}" / "model" / "model.safetensors",
    )
    assert results["stage1"]["test_ncm_top1"] == separate[lambdas[0]]["stage1"]["test_ncm_top1"]
    assert json.loads((tmp_path / "search" / "results.json").read_text())["distill_weight_search"] == search
    # the run's training time counts both candidates' stage 2, not only the chosen one's
    seconds = [c["train_seconds"] for c in search["candidates"]]
    assert min(seconds) > 0 and results["final"]["train_seconds"] in seconds
    assert results["train_seconds"] == pytest.approx(results["stage1"]["train_seconds"] + sum(seconds))
    alone = separate[lambdas[0]]
    assert alone["train_seconds"] == pytest.approx(alone["stage1"]["train_seconds"] + alone["final"]["train_seconds"])

    card = (tmp_path / "search" / "model" / "README.md").read_text()
    assert f"lambda {expected:g} x the" in card and "chosen on the validation split" in card
    for candidate in search["candidates"]:
        assert f"lambda {candidate['distill_weight']:g}: {candidate['validation_top1']:.2f}" in card
    assert "chosen on the validation split among 20, 0.5" in card
    assert "distill_weight_search: 20, 0.5" in card  # the recipe reproduces the search


def test_a_diverging_candidate_is_skipped_and_named(data_dir, teacher_dir, tmp_path):
    recipe = tiny_recipe(
        data_dir, tmp_path / "run", method="refilled", teacher=f"local-dir:{teacher_dir}", stage1_epochs=1,
        stage2_epochs=2, distill_weight=None, distill_weight_search="1e30,1", student_alone_candidate=False,
    )  # fmt: skip
    results = run_distillation(RefilledConfig(**recipe))
    first, second = results["distill_weight_search"]["candidates"]
    assert "diverged" in first and "validation_top1" not in first
    assert results["distill_weight_search"]["selected"] == 1.0
    assert results["final"]["validation_top1"] == second["validation_top1"]
    assert "lambda 1e+30: diverged" in (tmp_path / "run" / "model" / "README.md").read_text()

    # with the student-alone candidate, it is exported: tests/test_student_alone.py
    everything = tiny_recipe(
        data_dir, tmp_path / "all", method="refilled", teacher=f"local-dir:{teacher_dir}", stage1_epochs=1,
        stage2_epochs=2, distill_weight=None, distill_weight_search="1e30", student_alone_candidate=False,
    )  # fmt: skip
    with pytest.raises(RunError, match="Every --distill_weight_search candidate diverged"):
        run_distillation(RefilledConfig(**everything))
    assert not (tmp_path / "all" / "model").exists()


def test_unset_lambda_searches_1_and_10_by_default(data_dir, teacher_dir, tmp_path, caplog):
    recipe = tiny_recipe(
        data_dir, tmp_path / "run", method="refilled", teacher=f"local-dir:{teacher_dir}", stage1_epochs=1,
        stage2_epochs=1, distill_weight=None,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="refilled_hf.pipeline"):
        results = run_distillation(RefilledConfig(**recipe))
    search = results["distill_weight_search"]
    assert [c["distill_weight"] for c in search["candidates"]] == [1.0, 10.0]
    assert results["distill_weight"] == search["selected"] in (1.0, 10.0)
    assert sorted(p.name for p in (tmp_path / "run").glob("stage2*")) == ["stage2-lambda1", "stage2-lambda10"]
    assert "--distill_weight is unset: stage 2 will run once per lambda in 1, 10" in caplog.text
    # and the student alone, for both stages' epochs: a candidate too, by default
    assert results["student_alone"]["epochs"] == 2 and (tmp_path / "run" / "student-alone" / "final").is_dir()


def test_which_lambdas_run(tmp_path):
    def config(**overrides) -> RefilledConfig:
        return RefilledConfig(teacher="x", output_dir=str(tmp_path), **overrides)

    assert config().distill_weight_candidates() == [1.0, 10.0]  # the default: chosen on validation
    for one in (config(distill_weight=5.0), config(validation_fraction=0.0), config(method="rkd")):
        assert one.distill_weight_candidates() is None
    assert config(distill_weight=5.0).resolved_distill_weight() == 5.0
    assert config(validation_fraction=0.0).resolved_distill_weight() == 1.0  # nothing to choose on
    with pytest.raises(ConfigError, match="contradict"):
        config(distill_weight=5.0, distill_weight_search="1,10")


def test_pick_is_the_best_validation_top1_first_on_ties_never_a_diverged_one():
    def c(top1=None):
        return {"diverged": "x"} if top1 is None else {"validation_top1": top1}

    assert pick_candidate([c(50.0), c(60.0), c(55.0)]) == 1
    assert pick_candidate([c(60.0), c(50.0), c(60.0)]) == 0
    assert pick_candidate([c(), c(40.0), c(40.0)]) == 1
    with pytest.raises(RunError, match="Every --distill_weight_search candidate diverged"):
        pick_candidate([c(), c()])
    with pytest.raises(RunError, match="diverged, and so did the student-alone candidate"):
        pick_candidate([c(), c(), c()], last_is_student_alone=True)
    assert pick_candidate([c(), c(), c(30.0)], last_is_student_alone=True) == 2


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"distill_weight_search": "1,x"}, "distinct comma-separated lambdas"),
        ({"distill_weight_search": "1,1"}, "distinct comma-separated lambdas"),
        ({"distill_weight_search": "-1,2"}, "distinct comma-separated lambdas"),
        ({"distill_weight_search": "1,10", "method": "kd"}, "no stage 2"),
        ({"distill_weight_search": "1,10", "validation_fraction": 0.0}, "validation_fraction > 0"),
    ],
)
def test_bad_searches_are_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RefilledConfig(teacher="x", output_dir=str(tmp_path), **overrides)


def test_search_values_parse_in_order(tmp_path):
    config = RefilledConfig(teacher="x", output_dir=str(tmp_path), distill_weight_search=" 10, 1 ,0.5")
    assert config.distill_weight_candidates() == [10.0, 1.0, 0.5]
    off = RefilledConfig(teacher="x", output_dir=str(tmp_path), distill_weight_search="none", distill_weight=3)
    assert off.distill_weight_search is None and off.distill_weight_candidates() is None
