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

__all__ = ["export_model", "replace_dir_atomically", "write_json_atomically"]


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
) -> Path:
    """Write ``model`` in timm's Hub layout (``config.json`` + ``model.safetensors``).

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
    config_path.write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    replace_dir_atomically(staging, folder)
    return folder
