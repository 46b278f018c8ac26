"""Export students (and teachers) as folders that are valid timm Hub repositories and
valid transformers image-classification models at once."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch.nn as nn
from timm.models import save_for_hf

__all__ = ["TRAINING_DATA_KEY", "export_model", "replace_dir_atomically", "write_json_atomically"]

#: ``config.json`` key of the record of the data a model was trained on
TRAINING_DATA_KEY = "refilled_hf_training_data"


def write_json_atomically(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir_atomically(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` folder to ``target``: an existing ``target`` is
    renamed away first and deleted only after the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    model: nn.Module,
    folder: str | Path,
    *,
    label_names: list[str],
    data_config: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    training_data: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` in timm's Hub layout (``config.json`` + ``model.safetensors``).

    ``training_data`` (``ClassificationData.selection_record()``) is written as the
    ``config.json`` key :data:`TRAINING_DATA_KEY`, which timm and transformers ignore;
    ``refilled-hf evaluate`` reads it to default the classes and to check that a
    validation split is the model's own.

    The folder is written to a staging folder beside ``folder`` and renamed into place,
    so a crash never leaves a folder that loads but is incomplete.

    timm records ``num_classes`` inside ``model_args``; transformers' ``TimmWrapper``
    passes ``num_classes`` itself and fails on the duplicate, so it is removed there
    (``num_classes`` stays at the top level, where both libraries read it).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.staging-{uuid.uuid4().hex}")
    save_for_hf(
        model,
        str(staging),
        model_config={"label_names": list(label_names)},
        safe_serialization=True,
        data_config=data_config,
    )
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    model_args = config.get("model_args")
    if isinstance(model_args, dict):
        model_args.pop("num_classes", None)
        if not model_args:
            config.pop("model_args")
    if training_data is not None:
        config[TRAINING_DATA_KEY] = training_data
    config_path.write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    replace_dir_atomically(staging, folder)
    return folder


# --------------------------------------------------------------------------- model card

CARD_TEMPLATE = "refilled_student.md"


def _template_path() -> Path:
    """The card template: ``model_cards/`` of the source tree, or the copy a wheel installs
    under ``<prefix>/share/refilled-hf/model_cards``."""
    import sys

    source_tree = Path(__file__).resolve().parents[1] / "model_cards"
    for base in (source_tree, Path(sys.prefix) / "share" / "refilled-hf" / "model_cards"):
        if (base / CARD_TEMPLATE).is_file():
            return base / CARD_TEMPLATE
    raise FileNotFoundError(f"Model card template {CARD_TEMPLATE} not found (reinstall refilled-hf).")


def _is_hub_dataset(name: str) -> bool:
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


def _result_row(results: dict[str, Any], this: bool) -> dict[str, Any]:
    final, stage1 = results.get("final", {}), results.get("stage1") or {}
    method = results["method"]
    return {
        "method": method,
        "this": this,
        "top1": _fmt(final.get("test_top1")),
        "top5": _fmt(final.get("test_top5")),
        "ncm": _fmt(stage1.get("test_ncm_top1")),
        "validation": _fmt(final.get("validation_top1")),
    }


def render_model_card(
    results: dict[str, Any],
    recipe: dict[str, Any],
    *,
    architecture: str,
    repo_id: str | None = None,
    baselines: list[dict[str, Any]] | None = None,
    license: str = "apache-2.0",
) -> str:
    """The exported model's README.md: YAML metadata (library, tags, data set, teacher as
    ``base_model`` when it is on the Hub, license, model-index with the measured test
    accuracy and, for REFILLED, the stage-1 NCM accuracy), usage with timm and
    transformers, training details with the full recipe, the results table (with the
    baselines run in the same harness) and framework versions. Every number comes from
    ``results`` (the run's results.json) and the baselines' results.json."""
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    method = results["method"]
    dataset = results["dataset"]
    final, stage1 = results["final"], results.get("stage1") or {}
    dataset_id = dataset if _is_hub_dataset(dataset) else Path(dataset).name
    name = repo_id or "refilled-hf student"
    classes = results.get("classes") or "all classes"
    metric = dict(
        task_type="image-classification",
        dataset_type=dataset_id,
        dataset_name=f"{dataset_id} ({classes})",
        dataset_split="test",
    )
    measured = [("accuracy", "Test top-1 accuracy", final.get("test_top1"))]
    measured.append(("top-5-accuracy", "Test top-5 accuracy", final.get("test_top5")))
    measured.append(("accuracy", "Stage-1 nearest-class-mean top-1 accuracy", stage1.get("test_ncm_top1")))
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
        datasets=[dataset] if _is_hub_dataset(dataset) else None,
        base_model=teacher[len("hf-hub:") :] if teacher and teacher.startswith("hf-hub:") else None,
        model_name=name,
        eval_results=evals,
    )
    summary = {
        "refilled": f"A `{architecture}` image classifier distilled with REFILLED (relationship matching, then "
        "local-classifier distillation) from a teacher that may know other classes than these.",
        "ce": f"A `{architecture}` image classifier trained with cross-entropy by refilled-hf.",
    }.get(method, f"A `{architecture}` image classifier distilled with {method.upper()} by refilled-hf.")
    rows = [_result_row(results, True)] + [_result_row(b, False) for b in baselines or []]
    search = results.get("distill_weight_search")
    if search:
        search = {
            "lambdas": ", ".join(f"{c['distill_weight']:g}" for c in search["candidates"]),
            "candidates": [
                {"label": f"lambda {c['distill_weight']:g}: " + ("diverged" if "diverged" in c else
                                                                  _fmt(c.get("validation_top1")))}
                for c in search["candidates"]
            ],
        }  # fmt: skip
    data = results.get("data", {})
    card = ModelCard.from_template(
        card_data,
        template_path=str(_template_path()),
        model_id=name,
        summary=summary,
        class_names=results["class_names"],
        architecture=architecture,
        needs_refilled=architecture.startswith("cifar_wrn"),
        timm_spec=f"hf-hub:{repo_id}" if repo_id else "local-dir:<this folder>",
        repo_or_path=repo_id or "<this folder>",
        dataset=dataset_id,
        test_images=final.get("test_samples"),
        result_rows=rows,
        method=method,
        teacher=f"`{teacher}`" if teacher else None,
        teacher_classes=results.get("teacher_classes"),
        config=recipe,
        lr_steps=(
            f"x{recipe.get('stage2_gamma')} at epochs {recipe['stage2_milestones']}"
            if recipe.get("stage2_milestones")
            else "constant"
        ),
        distill_weight=f"{results['distill_weight']:g}" if "distill_weight" in results else None,
        lambda_search=search,
        train_images=data.get("train_images"),
        validation_images=data.get("validation_images"),
        shots_per_class=data.get("shots_per_class"),
        world_size=results.get("world_size", 1),
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False),
        versions=_versions(),
    )
    return str(card)


# --------------------------------------------------------------------------- push


class HubPushError(RuntimeError):
    """A push that failed; the message says why and how to retry (never the token)."""


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL.

    Call from the main process only. The token is passed to `huggingface_hub` and never
    logged or included in errors."""
    from huggingface_hub import create_repo, upload_folder

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubPushError(f"{folder} is not an exported model (no config.json): nothing to push.")
    try:
        create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
        info = upload_folder(
            folder_path=str(folder), repo_id=repo_id, token=token, commit_message="Upload model from refilled-hf"
        )
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode alike
        message = f"{type(err).__name__}: {err}"
        if token:
            message = message.replace(token, "<token>")
        raise HubPushError(
            f"Could not push {folder} to the Hub repo {repo_id!r} ({message[:300]}). The local folder is complete; "
            f"retry with `refilled-hf push {folder} --repo-id {repo_id}` once online and logged in."
        ) from None
    return str(getattr(info, "commit_url", info))
