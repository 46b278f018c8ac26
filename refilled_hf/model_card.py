"""The exported model's README.md (its Hub model card), and what may share its results
table: every sentence of the card is derived from the run's results.json and recipe, so
that it says how the model was trained and on which images its numbers were measured."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from .config import ConfigError, parse_milestones

__all__ = [
    "card_for_repo",
    "card_template",
    "check_comparable",
    "exported_student_alone",
    "render_model_card",
    "trainer_card",
]

CARD_TEMPLATE = "refilled_student.md"
#: a card's name (title, model-index) where the run named no Hub repo, by the command that ran
LOCAL_NAMES = {"distill": "refilled-hf student", "train-teacher": "refilled-hf teacher"}
#: where such a card's usage loads the model from (timm, transformers)
LOCAL_SPEC, LOCAL_PATH = "local-dir:<this folder>", "<this folder>"

#: results.json keys that decide whether two runs' numbers are measured on the same images
DATA_KEY = "data_fingerprint"
#: results.json's fingerprint of the data as earlier releases computed it (by path and file dates):
#: a run of theirs recorded it as its DATA_KEY
LEGACY_DATA_KEY = "data_fingerprint_legacy"


def card_template() -> Path:
    """The card template: ``model_cards/`` of the source tree (a checkout, an editable
    install), or the copy an installed wheel placed under ``<scheme>/share/refilled-hf/``,
    found through the distribution's record of its files, so any install scheme works
    (``--user``, ``--prefix``, a system Python installing under /usr/local). Raises
    ``FileNotFoundError`` naming the fix where neither exists."""
    import importlib.metadata as md

    candidates = [Path(__file__).resolve().parents[1] / "model_cards" / CARD_TEMPLATE]
    with contextlib.suppress(md.PackageNotFoundError):  # not installed: a source tree on sys.path
        candidates += [Path(f.locate()) for f in md.files("refilled-hf") or [] if f.name == CARD_TEMPLATE]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"refilled-hf's model card template ({CARD_TEMPLATE}) is missing from this install, so no run could write "
        "its model card: reinstall refilled-hf (pip install --force-reinstall refilled-hf, or pip install -e . in "
        "a checkout)."
    )


def is_hub_dataset(name: str) -> bool:
    """Whether ``name`` is a Hub data set id rather than a local path."""
    return not Path(name).exists() and "/" in name and not name.startswith((".", "/"))


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("refilled-hf", "torch", "timm", "transformers", "accelerate", "datasets", "huggingface_hub"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _num(value: float) -> str:
    """An epoch count or hyper-parameter as a person writes it: 100, 0.25, 1e-05."""
    return f"{round(value, 2):g}" if isinstance(value, float) and abs(value) >= 0.01 else f"{value:g}"


def _epochs(value: float) -> str:
    """``1 epoch``, ``0.5 epochs``, ``20 epochs``."""
    return f"{_num(value)} epoch{'' if value == 1 else 's'}"


# --------------------------------------------------------------------------- comparability


def same_images(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' results.json record the same images (selection, labels and pixels),
    also where one was written by an earlier refilled-hf (its fingerprint is the other's
    :data:`LEGACY_DATA_KEY`)."""
    if a.get(DATA_KEY) is None or b.get(DATA_KEY) is None:
        return False
    if a[DATA_KEY] == b[DATA_KEY]:
        return True
    if LEGACY_DATA_KEY in a and LEGACY_DATA_KEY in b:  # both fingerprinted by their pixels, which differ
        return False
    return a[DATA_KEY] == b.get(LEGACY_DATA_KEY) or b[DATA_KEY] == a.get(LEGACY_DATA_KEY)  # one is older


def check_comparable(results: dict[str, Any], baselines: list[dict[str, Any]]) -> None:
    """Refuse a ``--compare_runs`` baseline whose numbers are not measured on this run's
    images: the card's table promises the same training, validation and test images.
    Other differences (student, teacher, schedule, epochs) are allowed and stated."""
    for other in baselines:
        method = other.get("method")
        if other.get(DATA_KEY) is None:
            raise ConfigError(
                f"compare_runs: the {method} run's results.json does not record which images it trained and was "
                "evaluated on (it was written by an earlier refilled-hf): rerun it with this version to put it in "
                "this model's table."
            )
        if not same_images(other, results):
            raise ConfigError(
                f"compare_runs: the {method} run used other images than this one (data set, splits, classes, "
                "shots_per_class, validation_fraction or seed differ); only runs on the same images belong in the "
                "same table. Rerun it with this run's data fields."
            )


def _trained_epochs(stage: dict[str, Any] | None) -> float | None:
    return ((stage or {}).get("train_metrics") or {}).get("epoch")


def epochs_text(results: dict[str, Any]) -> str:
    """The epochs a run trained, per stage: ``20`` (a baseline), ``10 + 10`` (REFILLED),
    ``10 + 2 x 10`` (REFILLED whose stage 2 ran once per lambda candidate)."""
    final = _trained_epochs(results.get("final"))
    last = "-" if final is None else _num(final)
    if results.get("method") != "refilled" or exported_student_alone(results):
        return last  # a baseline, or the student alone exported by a REFILLED run: one stage
    candidates = (results.get("distill_weight_search") or {}).get("candidates") or []
    if len(candidates) > 1:
        lengths = {_trained_epochs(c) for c in candidates} - {None}
        last = (
            f"{len(candidates)} x {_num(lengths.pop())}"
            if len(lengths) == 1
            else " / ".join("-" if _trained_epochs(c) is None else _num(_trained_epochs(c)) for c in candidates)
        )
    first = _trained_epochs(results.get("stage1"))
    return f"{'0' if first is None else _num(first)} + {last}"


def _differences(this: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """How ``other``'s last stage trained differently from ``this`` run's (not counting epochs)."""
    mine, theirs = this.get("schedule") or {}, other.get("schedule") or {}
    out = []
    for key in mine:
        if theirs.get(key) != mine[key]:
            out.append(f"{key} {theirs.get(key)} (this model: {mine[key]})")
    return out


def exported_student_alone(results: dict[str, Any]) -> bool:
    """Whether a REFILLED run exported its student-alone candidate, not REFILLED's pick."""
    return bool((results.get("student_alone") or {}).get("exported"))


def student_alone_margin(alone: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How far the student-alone candidate beat the best REFILLED candidate on validation:
    ``points`` (top-1 %), ``images`` of ``samples``, and ``standard_error``, that of a top-1
    measured on that many images (in points: ``100 * sqrt(p (1 - p) / n)``, at least one
    image). ``clear``: a margin of at least two standard errors, a rough line below which
    the validation split cannot tell the two apart. None where no REFILLED candidate is usable
    (all diverged) or the student alone has no validation top-1."""
    usable = [c["validation_top1"] for c in candidates if c.get("validation_top1") is not None]
    n, top1 = alone.get("validation_samples"), alone.get("validation_top1")
    if not usable or not n or top1 is None:
        return None
    points = top1 - max(usable)
    p = min(max(top1 / 100, 0.0), 1.0)
    error = max(100 * math.sqrt(p * (1 - p) / n), 100 / n)
    return {"points": points, "images": round(points * n / 100), "samples": int(n), "standard_error": error,
            "clear": points >= 2 * error}  # fmt: skip


def margin_text(margin: dict[str, Any]) -> str:
    """``by 1 image of 50 (2.00 points)``."""
    images = margin["images"]
    return f"by {images} image{'s' if images != 1 else ''} of {margin['samples']} ({margin['points']:.2f} points)"


def _validation_text(candidate: dict[str, Any]) -> str:
    """``41.20``, or ``diverged``: a candidate's (lambda or student alone) validation top-1."""
    return "diverged" if "diverged" in candidate else _fmt(candidate.get("validation_top1"))


def _candidate_label(candidate: dict[str, Any]) -> str:
    """``lambda 10: 41.20`` (or ``diverged``): a lambda candidate's validation top-1."""
    return f"lambda {candidate['distill_weight']:g}: {_validation_text(candidate)}"


def _row(results: dict[str, Any], this: dict[str, Any] | None) -> dict[str, Any]:
    """A results-table row; ``this``: the model's own results when the row is a baseline. A
    REFILLED run that exported its student-alone candidate is shown as that model (no
    lambda, no teacher, no stage-1 NCM: none of them made it)."""
    alone_exported = exported_student_alone(results)
    final = results.get("final", {})
    stage1 = {} if alone_exported else results.get("stage1") or {}
    notes = []
    if this is None:  # the model's own row
        notes = ["the student-alone candidate", "this model"] if alone_exported else ["this model"]
    if this is not None:
        if alone_exported:
            notes.append("its student-alone candidate, exported")
        elif results.get("distill_weight") is not None:
            notes.append(f"lambda {results['distill_weight']:g}")
        if results.get("student") != this.get("student"):
            notes.append(f"student `{results.get('student')}`")
        if results.get("teacher") and results.get("teacher") != this.get("teacher") and not alone_exported:
            notes.append(f"teacher `{results['teacher']}`")
        if results.get("image_size") != this.get("image_size"):
            notes.append(f"{results.get('image_size')} px")
    label = results["method"] + (f" ({', '.join(notes)})" if notes else "")
    return {
        "method": label,
        "epochs": epochs_text(results),
        "top1": _fmt(final.get("test_top1")),
        "top5": _fmt(final.get("test_top5")),
        "ncm": _fmt(stage1.get("test_ncm_top1")),
        "validation": _fmt(final.get("validation_top1")),
        "differences": [] if this is None else _differences(this, results),
    }


# --------------------------------------------------------------------------- training summary


def _stage_epochs(results: dict[str, Any], stage: str, planned: float | None) -> str:
    """``100 epochs``, or ``0.5 of 100 planned epochs (--max_steps)`` for a stage cut short."""
    trained = _trained_epochs(results.get(stage))
    if planned is None or trained is None or abs(trained - planned) < 1e-6:
        return _epochs(planned if trained is None else trained)
    return f"{_num(trained)} of {_num(planned)} planned epochs (stopped by --max_steps)"


def _lr_steps(results: dict[str, Any], recipe: dict[str, Any]) -> str:
    """The learning-rate decays the last stage went through: a milestone at or beyond the
    epochs it trained (planned, or cut by --max_steps) never decayed it."""
    milestones = parse_milestones(recipe.get("stage2_milestones") or "")
    epochs = _trained_epochs(results.get("final"))
    epochs = recipe.get("stage2_epochs") if epochs is None else epochs
    reached = [_num(m) for m in milestones if epochs is None or m < epochs]
    beyond = [_num(m) for m in milestones if epochs is not None and m >= epochs]
    at = "epochs" if len(reached) > 1 else "epoch"
    text = f"x{recipe.get('stage2_gamma')} at {at} {','.join(reached)}" if reached else "constant"
    if beyond:
        plural = "s" if len(beyond) > 1 else ""
        text += f" (milestone{plural} {','.join(beyond)} never reached in its {_epochs(epochs)})"
    return text


def _lambda_text(results: dict[str, Any], recipe: dict[str, Any]) -> str | None:
    if "distill_weight" not in results:
        return None
    text = f"{results['distill_weight']:g}"
    schedule = recipe.get("distill_weight_schedule", "constant")
    if schedule != "constant":
        text += f" (decaying to 0 over stage 2, {schedule})"
    return text


def _optimizer_lines(results: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    schedule = results.get("schedule") or {}
    optim = schedule.get("optim", "sgd")
    momentum, decay = schedule.get("sgd_momentum"), schedule.get("weight_decay", recipe.get("weight_decay"))
    if optim == "sgd":
        text = f"SGD with Nesterov momentum {momentum}" if momentum else "SGD without momentum"
        text += f", coupled weight decay {decay}"
    else:
        text = f"transformers' `{optim}`, weight decay {decay}"
    per_device, world = recipe.get("per_device_train_batch_size"), results.get("world_size", 1)
    accumulation = recipe.get("gradient_accumulation_steps", 1)
    batch = f"{per_device} per device x {world} process(es)"
    if accumulation > 1:
        batch += f" x {accumulation} accumulation steps"
    lines = [f"Optimizer: {text}; global batch {schedule.get('global_batch', '-')} ({batch})."]
    extras = []
    warmup = schedule.get("warmup_steps") or 0
    if warmup:
        extras.append(
            f"linear learning-rate warm-up over the first {_num(warmup)} steps of each stage" if warmup >= 1
            else f"linear learning-rate warm-up over the first {warmup:.0%} of each stage"
        )  # fmt: skip
    if schedule.get("max_grad_norm"):
        extras.append(f"gradients clipped to norm {schedule['max_grad_norm']}")
    if schedule.get("label_smoothing_factor"):
        extras.append(f"label smoothing {schedule['label_smoothing_factor']}")
    if schedule.get("precision", "fp32") != "fp32":
        extras.append(f"{schedule['precision']} mixed precision")
    extras.append("random horizontal flips" if schedule.get("horizontal_flip", True) else "no horizontal flips")
    lines.append("Also: " + "; ".join(extras) + ".")
    if schedule.get("load_best_model_at_end"):
        lines.append(
            "The exported weights are the checkpoint with the best validation accuracy (--load_best_model_at_end), "
            "so the validation column is optimistic; the test column is not."
        )
    return lines


def _validation_source(recipe: dict[str, Any]) -> str:
    """Where the validation images came from, as the card says it."""
    split = recipe.get("validation_split")
    return f"from the `{split}` split" if split else "carved from the training split"


def class_list_text(names: list[str]) -> str:
    """Class names as a card lists them: separated by commas, or by semicolons where a name
    holds a comma itself (ImageNet's ``tench, Tinca tinca``), so that the list reads back."""
    return ("; " if any("," in name for name in names) else ", ").join(names)


def _results_intro(results: dict[str, Any], recipe: dict[str, Any], dataset_id: str) -> str:
    final = results.get("final", {})
    if final.get("test_samples"):
        split = recipe.get("test_split") or "test"
        text = (f"Measured by refilled-hf on the `{split}` split of `{dataset_id}` restricted to the classes above "
                f"({final['test_samples']} images), once, at the end of training.")  # fmt: skip
        missing = (results.get("data") or {}).get("test_classes_without_images")
        if missing:
            text += (f" The split has no image of {len(missing)} of the {len(results['class_names'])} classes "
                     f"({class_list_text(missing)}): its accuracy measures the others only.")  # fmt: skip
        seen = (results.get("data") or {}).get("test_images_in_training")
        if seen:
            text += (f" {seen} of these images have exactly the pixels of a training image of this run (the same "
                     "image in both splits).")  # fmt: skip
        return text
    return (
        f"This run had no test split: the only measurement is the validation top-1, on "
        f"{final.get('validation_samples', 0)} images {_validation_source(recipe)} of `{dataset_id}`"
        + (" (the split that also chose lambda, so it is optimistic)." if results.get("distill_weight_search") else ".")
    )


# --------------------------------------------------------------------------- the student-alone candidate


def _student_alone_note(results: dict[str, Any]) -> dict[str, Any] | None:
    """What the card says of a run's student-alone candidate (None: the run had none)."""
    alone = results.get("student_alone")
    if not alone:
        return None
    scores = [_candidate_label(c) for c in (results.get("distill_weight_search") or {}).get("candidates", [])]
    top1 = _validation_text(alone)
    margin = student_alone_margin(alone, (results.get("distill_weight_search") or {}).get("candidates", []))
    return {
        "exported": exported_student_alone(results),
        "margin": margin and {**margin, "text": margin_text(margin), "error_text": f"{margin['standard_error']:.1f}"},
        "diverged": "diverged" in alone,
        "epochs": _epochs(alone["epochs"]),
        "validation": top1,
        "scores": ", ".join(scores + [f"student alone: {top1}"]),
        "teacher": results.get("teacher"),
    }


def _teacher_architecture(teacher: str | None, architecture: str | None) -> str | None:
    """The teacher's architecture where its name does not say it: a ``local-dir:`` folder, a
    Hub repo, a name with a pretrained tag (``resnet50.a1_in1k``); None where the name is the
    architecture, or the run recorded none (an earlier refilled-hf)."""
    if not teacher or not architecture or teacher == architecture:
        return None
    return architecture


def _base_model(student: str | None, teacher: str | None) -> str | None:
    """The Hub repo the card names as ``base_model``: the one whose weights the model started
    from (a fine-tune of it, as the Hub reads ``base_model``), else the teacher it was distilled
    from, where either is on the Hub."""
    for spec in (student, teacher):
        if spec and spec.startswith("hf-hub:"):
            return spec[len("hf-hub:") :]
    return None


def _as_student_alone(results: dict[str, Any], recipe: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results and recipe of the exported student-alone candidate, as a cross-entropy
    run of its own length and milestones (the card's recipe block stays the whole run's)."""
    alone = results["student_alone"]
    milestones = alone["stage2_milestones"]
    shown = {**results, "method": "ce", "stage1": None, "teacher": None, "teacher_classes": None, "teacher_input": None,
             "teacher_architecture": None, "teacher_weights_origin": None,
             "schedule": {**(results.get("schedule") or {}), "milestones": milestones}}  # fmt: skip
    for key in ("distill_weight", "distill_weight_search"):
        shown.pop(key, None)
    return shown, {**recipe, "stage2_epochs": alone["epochs"], "stage2_milestones": milestones}


# --------------------------------------------------------------------------- the card


def render_model_card(
    results: dict[str, Any],
    recipe: dict[str, Any],
    *,
    architecture: str,
    repo_id: str | None = None,
    baselines: list[dict[str, Any]] | None = None,
    license: str = "apache-2.0",
) -> str:
    """The exported model's README.md: YAML metadata (library, tags, data set, ``base_model``
    (:func:`_base_model`), license, model-index with this model's measured
    test top-1 and top-5 accuracy), usage with timm and
    transformers, training details with the full recipe, the results table (with the
    baselines run in the same harness, each with its epochs and how its schedule differs)
    and framework versions. Every number comes from ``results`` (the run's results.json)
    and the baselines' results.json."""
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    full_recipe = recipe
    alone = _student_alone_note(results)
    if exported_student_alone(results):  # the card describes the model exported: that candidate
        results, recipe = _as_student_alone(results, recipe)
    method = results["method"]
    dataset = results["dataset"]
    final = results["final"]
    on_hub = is_hub_dataset(dataset)
    dataset_id = dataset if on_hub else Path(dataset).name
    as_teacher = results.get("command") == "train-teacher"
    name = repo_id or LOCAL_NAMES["train-teacher" if as_teacher else "distill"]
    classes = results.get("classes") or "all classes"
    metric = dict(
        task_type="image-classification",
        dataset_type=dataset_id,
        dataset_name=f"{dataset_id} ({classes})",
        dataset_split=recipe.get("test_split") or "test",
    )
    measured = [("accuracy", "Test top-1 accuracy", final.get("test_top1"))]
    measured.append(("top-5-accuracy", "Test top-5 accuracy", final.get("test_top5")))
    # (not stage 1's NCM accuracy: the Hub shows model-index entries as results of this model,
    # and that one measures other weights, the stage-1 student, with another classifier; the
    # results table gives it in its own column)
    evals = [
        EvalResult(metric_type=kind, metric_name=label, metric_value=round(value, 2), **metric)
        for kind, label, value in measured
        if value is not None
    ]
    teacher = results.get("teacher")
    tags = ["image-classification", "timm", "refilled-hf"]
    if method != "ce":
        tags.append("knowledge-distillation")
    if method == "refilled":
        tags += ["refilled", "cross-task-distillation"]
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        license=license,
        tags=tags,
        datasets=[dataset] if on_hub else None,
        base_model=_base_model(results.get("student"), teacher),
        model_name=name,
        eval_results=evals or None,  # no test split: no model-index at all, not an empty one
    )
    summary = {
        "refilled": f"A `{architecture}` image classifier distilled with REFILLED (relationship matching, then "
        "local-classifier distillation) from a teacher that may know other classes than these.",
        "ce": f"A `{architecture}` image classifier trained with cross-entropy by refilled-hf"
        + (
            "'s `train-teacher`, to teach REFILLED students (on these classes or on others: they learn from its "
            "embedding, not its classifier)."
            if as_teacher
            else "."
        ),
    }.get(method, f"A `{architecture}` image classifier distilled with {method.upper()} by refilled-hf.")
    if exported_student_alone(results):
        margin = alone and alone["margin"]
        summary += " It is the student-alone candidate of a REFILLED run: trained without the teacher, it beat every "
        if margin is None or margin["clear"]:
            summary += "REFILLED candidate on the validation split" + (f", {margin['text']}" if margin else "")
            summary += ", so the teacher's knowledge did not help on this task."
        else:
            summary += (
                f"REFILLED candidate on the validation split, {margin['text']}: less than two standard errors of a "
                f"top-1 measured on {margin['samples']} images (one is about {margin['error_text']} points), so "
                "this does not show that the teacher could not help."
            )
    rows = [_row(results, None)] + [_row(b, results) for b in baselines or []]
    search = results.get("distill_weight_search")
    if search:  # (none when the student alone is exported: _as_student_alone drops it)
        search = {
            "lambdas": ", ".join(f"{c['distill_weight']:g}" for c in search["candidates"]),
            "candidates": [{"label": _candidate_label(c)} for c in search["candidates"]],
        }
    timm_spec = f"hf-hub:{repo_id}" if repo_id else LOCAL_SPEC
    evaluate = f"refilled-hf evaluate --model {timm_spec}"
    evaluate += f" --dataset {dataset if on_hub else f'<your copy of {dataset_id}>'}"
    for flag in ("dataset_config", "test_split", "image_column", "label_column"):
        if recipe.get(flag) not in (None, "test" if flag == "test_split" else None):
            evaluate += f" --{flag} {recipe[flag]}"
    # the run measured under its mixed precision: the same command reproduces its numbers
    evaluate += "".join(f" --{flag} true" for flag in ("bf16", "fp16") if recipe.get(flag))
    has_test = bool(final.get("test_samples"))  # as the results' intro reads it
    if not has_test:  # `evaluate` measures the test split unless told otherwise
        evaluate += " --split validation"
    data = results.get("data", {})
    card = ModelCard.from_template(
        card_data,
        template_path=str(card_template()),
        model_id=name,
        summary=summary,
        class_names=results["class_names"],
        class_names_text=class_list_text(results["class_names"]),
        architecture=architecture,
        needs_refilled=architecture.startswith("cifar_wrn"),
        as_teacher=as_teacher,
        has_test=has_test,
        timm_spec=timm_spec,
        repo_or_path=repo_id or LOCAL_PATH,
        evaluate_command=evaluate,
        dataset=dataset_id,
        results_intro=_results_intro(results, recipe, dataset_id),
        result_rows=rows,
        method=method,
        teacher=f"`{teacher}`" if teacher else None,
        teacher_architecture=_teacher_architecture(teacher, results.get("teacher_architecture")),
        teacher_weights=results.get("teacher_weights_origin"),
        student_weights=results.get("student_weights_origin"),
        teacher_classes=results.get("teacher_classes"),
        teacher_input=results.get("teacher_input"),
        image_size=results.get("image_size"),
        config=recipe,
        stage1_epochs=_stage_epochs(results, "stage1", recipe.get("stage1_epochs")),
        stage2_epochs=_stage_epochs(results, "final", recipe.get("stage2_epochs")),
        lr_steps=_lr_steps(results, recipe),
        distill_weight=_lambda_text(results, recipe),
        teacher_correct_only=recipe.get("distill_images") == "teacher_correct",
        lambda_search=search,
        student_alone=alone,
        kd_columns=", ".join(map(str, results["kd_teacher_columns"])) if results.get("kd_teacher_columns") else None,
        train_images=data.get("train_images"),
        validation_images=data.get("validation_images"),
        validation_source=_validation_source(recipe),
        shots_per_class=data.get("shots_per_class"),
        optimizer_lines=_optimizer_lines(results, recipe),
        recipe_yaml=yaml.safe_dump(full_recipe, sort_keys=False),
        versions=_versions(),
    )
    return str(card)


#: what each RefilledTrainer stage trained, for the card of a student it saves
_TRAINER_STAGES = {
    "stage2": "REFILLED's stage 2 (local-classifier distillation)",
    "ce": "cross-entropy",
    "kd": "KD",
    "rkd": "RKD",
}


def trainer_card(architecture: str, stage: str, class_names: list[str], repo_id: str | None = None) -> str:
    """The model card of a student that :class:`~refilled_hf.trainer.RefilledTrainer` saves
    (``trainer.save_model()``, ``trainer.push_to_hub()``): what it is, its classes and how to
    load it. It states no result: the trainer keeps no record of the data or of the run's
    other stages (``refilled-hf distill`` writes a card with its measured numbers)."""
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id or LOCAL_NAMES["distill"]
    spec, path = (f"hf-hub:{repo_id}", repo_id) if repo_id else (LOCAL_SPEC, LOCAL_PATH)
    tags = ["image-classification", "timm", "refilled-hf"] + ([] if stage == "ce" else ["knowledge-distillation"])
    data = ModelCardData(library_name="timm", pipeline_tag="image-classification", tags=tags, model_name=name)
    register = (
        "import refilled_hf  # registers the CIFAR wide ResNets with timm\n" if "cifar_wrn" in architecture else ""
    )
    text = f"""---
{data.to_yaml()}
---

# {name}

A `{architecture}` image classifier trained with {_TRAINER_STAGES.get(stage, stage)} by refilled-hf's
`RefilledTrainer`, from Python. The trainer records no result, so this card states none (`refilled-hf
distill` writes a card with the numbers it measured, and on which images).

**Classes** ({len(class_names)}): {class_list_text(class_names)}

## How to use

With timm:

```python
{register}import timm

model = timm.create_model("{spec}", pretrained=True).eval()
```

With transformers:

```python
{register}from transformers import AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{path}")
```
"""
    return str(ModelCard(text))


def card_for_repo(text: str, repo_id: str) -> str:
    """The model card ``text`` (one :func:`render_model_card` wrote) as it reads in the Hub
    repo ``repo_id``: its name (title, model-index) and its usage (timm's ``hf-hub:``,
    transformers' repo id, the evaluate and distill commands) name that repo instead of the
    folder or repo it was rendered for. Another card is returned as it is."""
    import re

    import yaml
    from huggingface_hub import ModelCard

    if not text.startswith("---"):  # no metadata: not a card refilled-hf wrote
        return text
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError):  # metadata that is not a mapping: not a card refilled-hf wrote
        return text
    # the title, the first heading after the metadata, is the name the card was rendered with
    title = re.search(r"^# (.+)$", card.text, flags=re.MULTILINE)
    old = title.group(1) if title else None
    if old is None or old == repo_id:
        return text
    spec, path = (LOCAL_SPEC, LOCAL_PATH) if old in LOCAL_NAMES.values() else (f"hf-hub:{old}", old)
    if f'timm.create_model("{spec}"' not in card.text:  # not a card refilled-hf rendered: left alone
        return text
    body = card.text[: title.start()] + f"# {repo_id}" + card.text[title.end() :]
    for before, after in ((f'"{spec}"', f'"hf-hub:{repo_id}"'), (f'("{path}")', f'("{repo_id}")'),
                          (f"--model {spec} ", f"--model hf-hub:{repo_id} "),
                          (f"--teacher {spec} ", f"--teacher hf-hub:{repo_id} ")):  # fmt: skip
        body = body.replace(before, after)
    card.text = body
    if card.data.model_name == old:
        card.data.model_name = repo_id
    return str(card)
