"""Export students (and teachers) as folders that are valid timm Hub repositories and
valid transformers image-classification models at once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import save_for_hf

from .messages import error_text

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FILES",
    "TRAINING_DATA_KEY",
    "check_hub_access",
    "export_model",
    "push_folder",
    "replace_dir_atomically",
    "save_safetensors",
    "with_usual_permissions",
    "write_json_atomically",
]

#: ``config.json`` key of the record of the data a model was trained on
TRAINING_DATA_KEY = "refilled_hf_training_data"


def write_json_atomically(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a value JSON cannot hold: no half-written file is left
        tmp.unlink(missing_ok=True)
        raise


def usual_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process's umask."""
    try:  # Linux 4.7+ states it; reading it there leaves the umask of other threads alone
        status = Path("/proc/self/status").read_text()
        mask = next(int(line.split()[1], 8) for line in status.splitlines() if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o077)  # elsewhere: read by setting it (restrictive meanwhile), then put back
        os.umask(mask)
    return 0o666 & ~mask


def with_usual_permissions(*paths: str | Path) -> None:
    """Give the ``.safetensors`` files among ``paths`` (files, or the files in folders) the
    permissions of any other new file.

    safetensors (0.8) writes through a temporary file that it creates with mode ``0o600``
    whatever the umask, then renames it (safetensors issue #782, open): its files, unlike the
    ``config.json`` and model card beside them, could be read by their writer alone, so a
    teammate, or a container running as another user, could not load an export, a
    checkpoint or a shared teacher cache."""
    mode = usual_file_mode()
    for path in map(Path, paths):
        for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
            with contextlib.suppress(FileNotFoundError):  # (another process's, renamed meanwhile)
                os.chmod(file, mode)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with the permissions of any other new file
    (:func:`with_usual_permissions`)."""
    save_file(tensors, str(path), metadata=metadata)
    with_usual_permissions(path)


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


def remove_unfinished_exports(folder: Path) -> list[Path]:
    """Remove what an export to ``folder`` that was killed left beside it: its staging folder
    (``.<name>.staging-<id>``, a whole model, one per attempt) or the earlier export it had renamed
    away (``.<name>.old-<id>``). For a caller that holds ``folder``'s run lock (no export to it
    runs at the same time). Returns what was removed."""
    removed = []
    for pattern in (f".{folder.name}.staging-*", f".{folder.name}.old-*"):
        for path in folder.parent.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


#: the files :func:`export_model` writes (with a model card); a folder holding others is not an export
EXPORT_FILES = ("config.json", "model.safetensors", "README.md")


def files_not_exported(folder: Path) -> list[str]:
    """The entries of ``folder`` an export does not write (an export over it would delete
    them); ``[folder.name]`` where it is not a folder; none where it does not exist."""
    if folder.is_dir():
        return sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES)
    return [folder.name] if folder.exists() or folder.is_symlink() else []


def export_model(
    model: nn.Module,
    folder: str | Path,
    *,
    label_names: list[str],
    data_config: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    training_data: dict[str, Any] | None = None,
    license: str | None = None,
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

    ``pretrained_cfg`` describes these weights, not the ones timm's registry names for the
    architecture: its ``tag`` (e.g. ``augreg_in21k_ft_in1k``, the weights a registered name
    would download) is removed, and its ``license`` is ``license`` (the card's), or removed.
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
    with_usual_permissions(staging)
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    model_args = config.get("model_args")
    if isinstance(model_args, dict):
        model_args.pop("num_classes", None)
        if not model_args:
            config.pop("model_args")
    pretrained_cfg = config.get("pretrained_cfg")
    if isinstance(pretrained_cfg, dict):
        pretrained_cfg.pop("tag", None)
        pretrained_cfg.pop("license", None)
        if license:
            pretrained_cfg["license"] = license
    if training_data is not None:
        config[TRAINING_DATA_KEY] = training_data
    config_path.write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    replace_dir_atomically(staging, folder)
    return folder


# --------------------------------------------------------------------------- push


class HubPushError(RuntimeError):
    """A push that failed; the message says why and how to retry (never the token)."""


def _redacted(err: Exception, token: str | None) -> str:
    return error_text(err, limit=300, redact=token)


def check_hub_access(repo_id: str, token: str | None = None) -> None:
    """Before a run that ends with a push: the Hub answers and accepts the login
    (``whoami``), so that a run that could not push is refused now, not after training.
    Nothing is created on the Hub."""
    from huggingface_hub import whoami

    try:
        whoami(token=token)
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode alike
        raise HubPushError(
            f"--push_to_hub: the Hub did not accept this login ({_redacted(err, token)}), so the model could not be "
            "pushed after training. Log in (`hf auth login`, HF_TOKEN or --hub_token), or train without "
            f"--push_to_hub and push later with `refilled-hf push <output_dir>/model --repo-id {repo_id}`."
        ) from None


def pushed_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The files of the export ``folder`` that a push uploads, and what it leaves out, said
    why: hidden entries (a run's lock file, the staging folder of a killed export, an editor's
    or a notebook's files) and, where a refilled-hf run was written into the folder (its
    ``run.json`` lists what it wrote), that run's outputs: its checkpoints are not the model."""
    from .rundir import recorded_outputs  # (rundir imports this module)

    written = set(recorded_outputs(folder) or [])
    files, hidden, run_outputs = [], [], set()
    for path in sorted(folder.rglob("*")):  # one walk: what goes, and what does not
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in parts):
            if not any(part.startswith(".") for part in parts[:-1]):  # each hidden entry, not what it holds
                hidden.append("/".join(parts))
        elif parts[0] in written:
            run_outputs.add(parts[0])
        elif path.is_file():
            files.append(path)
    left_out = [f"hidden entries ({', '.join(hidden)})"] if hidden else []
    if run_outputs:
        left_out.append(f"the outputs of the refilled-hf run written there ({', '.join(sorted(run_outputs))})")
    return files, left_out


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload model from refilled-hf") -> str:  # fmt: skip
    """Create ``repo_id`` if needed and upload ``folder`` to it in one commit; returns the
    commit URL. The model card is uploaded as it reads in ``repo_id`` (see
    :func:`~refilled_hf.model_card.card_for_repo`: a card rendered for the folder, or for
    another repo, names this one); the folder itself is not changed.

    Call from the main process only. The token is passed to `huggingface_hub` and never
    logged or included in errors."""
    from huggingface_hub import CommitOperationAdd, create_commit, create_repo

    from .model_card import card_for_repo

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        export = folder / "model"
        hint = f" It is a run folder: push its export, {export}." if (export / "config.json").is_file() else ""
        raise HubPushError(f"{folder} is not an exported model (no config.json): nothing to push.{hint}")
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise HubPushError(
            f"{folder} has a config.json but no weights (model.safetensors): it is not a complete export, so it is "
            "not pushed. Push the `model` folder a finished run wrote."
        )
    # one commit of the folder's files, the model card as it reads in this repo (the folder is not changed)
    files, left_out = pushed_files(folder)
    if left_out:
        logger.info("Not pushed from %s: %s.", folder, "; ".join(left_out))
    operations = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        content: str | bytes = str(path)
        if name == "README.md":
            with contextlib.suppress(UnicodeDecodeError):  # (a card refilled-hf wrote is UTF-8)
                content = card_for_repo(path.read_text(encoding="utf-8"), repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    try:
        create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
        info = create_commit(repo_id, operations, commit_message=commit_message, token=token, repo_type="model")
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode alike
        raise HubPushError(
            f"Could not push {folder} to the Hub repo {repo_id!r} ({_redacted(err, token)}). The local folder is "
            f"complete; retry with `refilled-hf push {folder} --repo-id {repo_id}` once online and logged in."
        ) from None
    return str(getattr(info, "commit_url", info))
