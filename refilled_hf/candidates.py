"""REFILLED's stage-2 candidates: stage 2 once per ``--distill_weight_search`` lambda, and
the student trained alone (``--student_alone_candidate``); the one with the best validation
top-1 is exported."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import RefilledConfig
from .model_card import margin_text, student_alone_margin
from .stages import (
    DivergedError,
    RunError,
    barrier,
    fit,
    is_finished,
    load_final,
    make_trainer,
    read_final_metrics,
    save_final,
    split_metrics,
    stage2_trainer,
    state_copy,
)
from .trackers import KeepStageRunsOpen, end_stage_runs
from .trainer import RefilledTrainer, tracker_run_name

logger = logging.getLogger(__name__)

#: the student-alone candidate's folder
STUDENT_ALONE_DIR = "student-alone"


def search_distill_weight(config, stage2_dirs, points, student, teacher, data, centers_data, callbacks, results,
                          cache, initial=None) -> RefilledTrainer:  # fmt: skip
    """``--distill_weight_search``: stage 2 once per lambda, each from the same starting
    weights and seed in its own folder (finished candidates are kept on resume), then the
    candidate with the best validation top-1 (ties: the first listed) is loaded into
    ``student``. With ``initial`` (the weights stage 1 started from), the student trained
    alone is one more candidate (:func:`_student_alone`), chosen only when strictly better.
    Each candidate is evaluated on validation only; the returned trainer evaluates the pick,
    whose test metrics become ``results["final"]``."""
    start_state = state_copy(student)
    candidates, centers, trainer = [], None, None
    values = config.distill_weight_candidates()
    for value, stage_dir in zip(values, stage2_dirs):
        if is_finished(stage_dir) and config.resume_mode():
            metrics = read_final_metrics(stage_dir)
            logger.info("Stage 2 with lambda %g already finished: kept.", value)
        else:
            student.model.load_state_dict(start_state)
            trainer = stage2_trainer(config.stage_view(distill_weight=value), stage_dir, student, data, callbacks,
                                     teacher, cache, centers_data, results, known_centers=centers)  # fmt: skip
            centers = trainer.class_centers
            try:
                fit(trainer, points[stage_dir])
                metrics = split_metrics(trainer, data, {"validation": "validation"})
                metrics.update(train_seconds=trainer.train_seconds, train_metrics=trainer.train_metrics)
            except DivergedError as err:
                logger.warning("Stage 2 with lambda %g diverged; it cannot be chosen. %s", value, err)
                metrics = {"diverged": str(err)}
            save_final(stage_dir, student, metrics, trainer.is_world_process_zero())
            barrier(trainer)
        candidates.append({"distill_weight": value, "stage_dir": stage_dir.name, **metrics})
    alone = None
    if initial is not None:
        alone_trainer, alone = _student_alone(config, stage2_dirs[len(values)], points, student, data, callbacks,
                                              initial)  # fmt: skip
        trainer = alone_trainer or trainer
    # listed last, the student alone wins only when strictly better than every usable lambda
    pick = pick_candidate(candidates + ([alone] if alone is not None else []), last_is_student_alone=alone is not None)
    if pick == len(candidates):
        return _export_student_alone(config, alone, candidates, trainer, student, data, callbacks, results)
    chosen = candidates[pick]
    load_final(stage2_dirs[pick], student)
    logger.info(
        "Chose lambda %g (validation top-1 %.2f) among %s.",
        chosen["distill_weight"], chosen["validation_top1"], _candidates_text(candidates, alone),
    )  # fmt: skip
    results["distill_weight"] = chosen["distill_weight"]
    results["distill_weight_search"] = _search_record(chosen["distill_weight"], candidates)
    if alone is not None:
        results["student_alone"] = {**alone, "exported": False}
    if trainer is None or alone is not None:  # a stage-2 trainer for the evaluation (the last one may be another's)
        trainer = make_trainer(
            config.stage_view(distill_weight=chosen["distill_weight"]), "stage2", stage2_dirs[pick], student, data,
            callbacks, teacher=teacher, teacher_cache=cache,
        )  # fmt: skip
        _as_trained(trainer)
    if Path(trainer.args.output_dir) != stage2_dirs[pick] or alone is not None:  # not the pick's own trainer
        _final_evaluation_run(trainer, config)
    final = split_metrics(trainer, data, {"validation": "validation", "test": "test"})
    final.update(train_seconds=chosen["train_seconds"], train_metrics=chosen["train_metrics"])
    results["final"] = final
    return trainer


def _as_trained(trainer: RefilledTrainer) -> None:
    """A trainer made to evaluate a candidate that another trainer trained logs its metrics at
    the end of the stage's epochs, as the candidate's own would have, not at epoch 0."""
    trainer.state.epoch = float(trainer.args.num_train_epochs)


def _final_evaluation_run(trainer: RefilledTrainer, config: RefilledConfig) -> None:
    """A trainer that evaluates the exported candidate after others trained (its own is
    gone) reports to a tracker run of its own, ``<run>-final``, not to the last candidate's."""
    end_stage_runs(trainer.callback_handler.callbacks)
    trainer.args.run_name = tracker_run_name(config, "final")
    trainer.add_callback(KeepStageRunsOpen(trainer.callback_handler))


def _search_record(selected: float | None, candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return {"selected": selected, "selected_by": "validation_top1 (ties: the first listed)",
            "candidates": candidates}  # fmt: skip


def _candidates_text(candidates: list[dict[str, Any]], alone: dict[str, Any] | None) -> str:
    """``lambda 1: 40.20, lambda 10: 38.00`` and, with the student-alone candidate,
    ``, student alone: 41.00``."""

    def top1(c: dict[str, Any]) -> str:
        return "diverged" if "diverged" in c else f"{c['validation_top1']:.2f}"

    text = ", ".join(f"lambda {c['distill_weight']:g}: {top1(c)}" for c in candidates)
    return text + (f", student alone: {top1(alone)}" if alone is not None else "")


def _student_alone(config, stage_dir, points, student, data, callbacks, initial) -> tuple[RefilledTrainer | None, dict]:
    """The student-alone candidate: exactly the ``--method ce`` run with
    :meth:`RefilledConfig.student_alone_schedule` (same initial weights, seed and data),
    evaluated on validation only, its final weights kept in ``stage_dir/final``. Returns
    its trainer (None when a resumed run had finished it) and its record."""
    epochs, milestones = config.student_alone_schedule()
    schedule = {"epochs": epochs, "stage2_milestones": milestones}
    if is_finished(stage_dir) and config.resume_mode():
        logger.info("The student-alone candidate already finished: kept.")
        return None, {**schedule, "stage_dir": stage_dir.name, **read_final_metrics(stage_dir)}
    student.model.load_state_dict(initial)
    trainer = make_trainer(_student_alone_view(config), "ce", stage_dir, student, data, callbacks)
    try:
        fit(trainer, points[stage_dir])
        metrics = split_metrics(trainer, data, {"validation": "validation"})
        metrics.update(train_seconds=trainer.train_seconds, train_metrics=trainer.train_metrics)
    except DivergedError as err:
        logger.warning("The student-alone candidate diverged; it cannot be chosen. %s", err)
        metrics = {"diverged": str(err)}
    save_final(stage_dir, student, metrics, trainer.is_world_process_zero())
    barrier(trainer)
    return trainer, {**schedule, "stage_dir": stage_dir.name, **metrics}


def _student_alone_view(config: RefilledConfig) -> RefilledConfig:
    epochs, milestones = config.student_alone_schedule()
    return config.stage_view(method="ce", stage2_epochs=epochs, stage2_milestones=milestones)


def _export_student_alone(config, alone, candidates, trainer, student, data, callbacks, results) -> RefilledTrainer:
    """The student alone beat every REFILLED candidate on validation: it is the export
    (``results["final"]``), and the run says so loudly."""
    load_final(Path(config.output_dir) / alone["stage_dir"], student)
    margin = student_alone_margin(alone, candidates)
    if margin is None or margin["clear"]:
        verdict = (
            "The teacher did not help on this task; compare its probe (refilled-hf probe-teacher) with what the "
            "student reaches alone, or pass --student_alone_candidate false to export REFILLED's pick regardless."
        )
    else:
        verdict = (
            f"A margin this small does not show that the teacher could not help: one standard error of a top-1 "
            f"measured on {margin['samples']} images is about {margin['standard_error']:.1f} points. A larger "
            "validation split (--validation_fraction) tells the candidates apart; --student_alone_candidate false "
            "exports REFILLED's pick regardless."
        )
    logger.warning(
        "The student trained alone (cross-entropy, %g epochs, no teacher) beat every REFILLED candidate on the "
        "validation split%s (%s): it is the exported model. %s",
        alone["epochs"], f" {margin_text(margin)}" if margin else "", _candidates_text(candidates, alone), verdict,
    )  # fmt: skip
    usable = [c for c in candidates if "diverged" not in c]
    best = candidates[pick_candidate(candidates)] if usable else None
    results["distill_weight"] = best["distill_weight"] if best else None
    results["distill_weight_search"] = _search_record(results["distill_weight"], candidates)
    results["student_alone"] = {**alone, "exported": True}
    if trainer is None or trainer.stage != "ce":  # a trainer for the evaluation
        trainer = make_trainer(_student_alone_view(config), "ce", Path(config.output_dir) / alone["stage_dir"],
                               student, data, callbacks)  # fmt: skip
        _as_trained(trainer)
        _final_evaluation_run(trainer, config)
    final = split_metrics(trainer, data, {"validation": "validation", "test": "test"})
    final.update(train_seconds=alone["train_seconds"], train_metrics=alone["train_metrics"])
    results["final"] = final
    return trainer


def pick_candidate(candidates: list[dict[str, Any]], *, last_is_student_alone: bool = False) -> int:
    """Index of the candidate with the best ``validation_top1``; ties go to the first
    listed; diverged candidates (a ``diverged`` entry) cannot be chosen.
    ``last_is_student_alone``: the last candidate is the student-alone one (the error
    names it)."""
    usable = [i for i, c in enumerate(candidates) if "diverged" not in c]
    if not usable:
        alone = ", and so did the student-alone candidate (cross-entropy alone)" if last_is_student_alone else ""
        raise RunError(
            f"Every --distill_weight_search candidate diverged{alone} (see the warnings). Nothing was exported. "
            "Lower the learning rate (--stage2_learning_rate) or the lambdas, or clip gradients (--max_grad_norm 1)."
        )
    return max(usable, key=lambda i: (candidates[i]["validation_top1"], -i))
