"""Small generated data sets and models for pipeline tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import timm
import torch
from PIL import Image

import refilled_hf  # noqa: F401  (registers cifar_wrn_*)
from refilled_hf.hub import export_model

CLASS_NAMES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
_COLORS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40], [40, 220, 220], [220, 40, 220]])


def write_image_dataset(folder: Path, per_class_train: int = 12, per_class_test: int = 6, size: int = 16,
                        seed: int = 0, image_column: str = "image", label_column: str = "label") -> Path:  # fmt: skip
    """Six colour classes with noise and a class-dependent stripe, as train/test parquet."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=CLASS_NAMES)})
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = [], []
        for c, color in enumerate(_COLORS):
            for _ in range(per_class):
                img = np.clip(color + rng.normal(0, 60, (size, size, 3)), 0, 255)
                img[(c * 2) % size : (c * 2) % size + 2] = 255 - img[(c * 2) % size : (c * 2) % size + 2]
                buf = io.BytesIO()
                Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
                labels.append(c)
        order = rng.permutation(len(labels))
        rows = {image_column: [images[i] for i in order], label_column: [labels[i] for i in order]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def write_random_teacher(folder: Path, name: str = "cifar_wrn_16_1", label_names: list[str] | None = None,
                         seed: int = 0, **kwargs) -> Path:  # fmt: skip
    """An untrained timm model exported as a local-dir: folder (a teacher stand-in), its
    weights drawn with ``seed`` (the same in every process: a run with it is reproducible
    across test sessions)."""
    label_names = label_names or ["t0", "t1", "t2", "t3"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, num_classes=len(label_names), **kwargs)
    return export_model(model, folder, label_names=label_names)


def tiny_recipe(data_dir: Path, out: Path, **overrides) -> dict:
    """A recipe that trains in seconds on the generated data."""
    recipe = {
        "dataset": str(data_dir),
        "output_dir": str(out),
        "student": "cifar_wrn_16_1",
        "image_size": 16,
        "classes": "3-5",
        "teacher_classes": "0-2",
        "per_device_train_batch_size": 12,
        "per_device_eval_batch_size": 16,
        "validation_fraction": 0.25,
        "stage1_epochs": 2,
        "stage2_epochs": 2,
        "distill_weight": 1.0,  # one stage 2 (unset, REFILLED searches lambda: tests/test_distill_weight_search.py)
        "stage2_milestones": "1",
        "stage1_learning_rate": 0.05,
        "stage2_learning_rate": 0.05,
        "logging_steps": 1,
        "save_total_limit": 3,
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    recipe.update(overrides)
    return recipe


def logged_losses(run_dir: Path, stage: str) -> list[float]:
    """The training losses a stage logged, from its newest checkpoint's trainer state."""
    state = json.loads(max((run_dir / stage).glob("checkpoint-*/trainer_state.json")).read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def deny_access(monkeypatch, path: Path) -> None:
    """Make ``os.access`` answer that this user may not read, write or enter ``path`` (the
    tests run as root, whom no file mode stops)."""
    import os

    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p) != Path(path))
