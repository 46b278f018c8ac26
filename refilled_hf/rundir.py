"""What a run owns in its output folder, and how it keeps other runs out.

One place for the safety of ``output_dir``, which the pipeline calls before any training:

* **an exclusive lock** (``.refilled-hf.lock``, ``flock``) held by the main process for
  the whole run: a second run into the same folder is refused at once, and the lock dies
  with its process (a SIGKILL leaves nothing stale);
* **the run's identity** (``run.json``): its resolved configuration minus what cannot
  change a result (logging, saving cadence, the Hub), the world size, and fingerprints of
  the teacher's weights, the student's initial weights, each model's setup (class, build
  arguments, input preparation) and the exact data (selected rows and labels of each split,
  and every image's pixels). A resume, and every cached artefact it reuses (stage-1
  results, the teacher's class centres), is allowed only for the same identity; the data
  may have moved (another ``--dataset`` path) or been copied again where its pixels are the
  same, and a model folder or checkpoint file where its weights and setup are the same;
* **ownership**: ``run.json`` lists what the run writes. ``--overwrite_output`` deletes
  exactly those entries of the earlier run, never anything else; an entry the run would
  write that exists without being listed (a user's ``model/`` folder, say) is refused;
* **checkpoints**: a resume point must be complete (weights, optimizer, scheduler, RNG
  state and ``trainer_state.json``, which transformers writes last) and readable, or the
  resume is refused; a checkpoint cut short by a kill (no parseable trainer state) is
  skipped with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .hub import write_json_atomically
from .messages import error_chain

__all__ = [
    "DiskFullError",
    "MANIFEST",
    "RunDirError",
    "RunDirectory",
    "names_a_place",
    "tensor_fingerprint",
]

logger = logging.getLogger(__name__)

MANIFEST = "run.json"
LOCK = ".refilled-hf.lock"

#: how DDP finds and buckets the gradients it averages, not what they are
DDP_TUNING_FIELDS = ("ddp_find_unused_parameters", "ddp_bucket_cap_mb")

#: Configuration fields that cannot change what a run computes: they may differ on resume.
NON_IDENTITY_FIELDS = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "overwrite_output", "logging_steps", "logging_strategy",
        "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node",
        "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
        "trackio_static_space_id", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_token", "compare_runs",
        "card_license", "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "skip_memory_metrics",
        "per_device_eval_batch_size", "dataloader_persistent_workers", "dataloader_pin_memory",
        "dataloader_prefetch_factor", "ddp_timeout", "local_rank",
        *DDP_TUNING_FIELDS,
        "teacher_cache", "teacher_cache_budget_gb",
        # compiling changes how the same computation runs, not what it computes
        "torch_compile", "torch_compile_backend", "torch_compile_mode", "channels_last",
    }
)  # fmt: skip


#: identity fields that say where the data lies, not what it is: a run whose images are the same
#: (its ``data`` fingerprint covers their pixels) continues from another path (a copy on a node's
#: local disk, a folder moved)
DATA_LOCATION_FIELDS = frozenset({"dataset"})

#: identity fields that say where a model was read from (a folder, a checkpoint file), each with
#: the fingerprints that say what the model is (its weights; its architecture, build arguments and
#: input preparation): a run whose model is the same continues from another folder or file (a
#: copy on a node's local disk, a folder moved). A registered timm name or an ``hf-hub:`` id
#: names the model rather than a place: it stays part of the identity.
MODEL_LOCATION_FIELDS = {
    "teacher": ("teacher_weights", "teacher_setup"),
    "teacher_checkpoint": ("teacher_weights", "teacher_setup"),
    "student": ("student_init", "student_setup"),
    "student_checkpoint": ("student_init", "student_setup"),
}


def names_a_place(key: str, value: Any) -> bool:
    """Whether identity field ``key`` (one of :data:`MODEL_LOCATION_FIELDS`) with ``value`` says
    where a model was read from (a checkpoint file, a ``local-dir:`` folder), rather than which
    model it is (a registered timm name, an ``hf-hub:`` id)."""
    return key.endswith("_checkpoint") or str(value).startswith("local-dir:")


#: identity fields later releases added: a run an earlier one recorded (without them) resumes, its
#: identity checked on the fields it has (without the setups it cannot change folders: nothing
#: shows the model moved; without ``random_draws`` it may change compiling, as it could then)
ADDED_IDENTITY_FIELDS = frozenset({"teacher_setup", "student_setup", "random_draws"})


#: identity fields earlier releases recorded that compute nothing (the loader workers, the
#: budget that chose the path, DDP's search for unused parameters and its buckets): a run
#: they recorded resumes without them
RETIRED_IDENTITY_FIELDS = frozenset({"device_data_budget_gb", "dataloader_num_workers", *DDP_TUNING_FIELDS})


class RunDirError(ValueError):
    """The output folder cannot be used as asked (the message says why and what to do)."""


class DiskFullError(OSError):
    """The disk filled up while a run wrote to it (the message says how to continue)."""


#: free space of the output folder's disk under which a failure while a run writes is put
#: down to a full disk (torch.save then fails with "unexpected pos 576 vs 534", no errno)
DISK_FULL_BYTES = 64 * 2**20


def disk_full_error(err: BaseException, out: Path, guess: bool = True) -> DiskFullError | None:
    """``err`` as a :class:`DiskFullError` where the disk is full: an error that says so (an
    ``ENOSPC``/``EDQUOT`` errno, safetensors' "No space left on device"), or, where ``guess``,
    any error while the output folder's disk has under :data:`DISK_FULL_BYTES` free. None
    otherwise."""
    chain = error_chain(err)
    said = any(
        getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "No space left on device" in str(e)
        or "Disk quota exceeded" in str(e)
        for e in chain
    )
    try:
        free: int | None = shutil.disk_usage(out).free
    except OSError:
        free = None
    if not said and (not guess or free is None or free >= DISK_FULL_BYTES):
        return None
    detail = " ".join(str(chain[0]).split())[:200]
    room = f"; {out} has {free / 2**20:.1f} MiB free" if free is not None else ""
    return DiskFullError(
        errno.ENOSPC,
        f"No space left on the disk while the run wrote its outputs ({type(chain[0]).__name__}: {detail}{room}). "
        "Free space, or copy the run folder to a larger disk, and continue it there with --resume_from_checkpoint "
        "true: each stage resumes from its last complete checkpoint, and a save cut short is skipped.",
    )


def nearest_existing(path: Path) -> Path:
    """``path`` where it exists, else the nearest folder above it that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def recorded_outputs(folder: Path) -> list[str] | None:
    """The entries of ``folder`` that the refilled-hf run there recorded writing (its
    ``run.json``'s ``outputs``); None where the folder holds no such record (no run, or a
    ``run.json`` that cannot be read or lists none)."""
    try:
        outputs = json.loads((folder / MANIFEST).read_text()).get("outputs")
    except (OSError, ValueError, AttributeError):  # none, unreadable, or not a JSON object
        return None
    return [str(name) for name in outputs] if isinstance(outputs, list) else None


def can_write_in(folder: Path) -> bool:
    """Whether this user can create files in ``folder``, or create it (in the nearest folder
    above it that exists)."""
    probe = nearest_existing(folder)
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def tensor_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


#: what the identity's fingerprints stand for, in a refused resume's message
_FINGERPRINT_MEANINGS = {
    "data": "the images selected, their labels or their pixels",
    "teacher_weights": "the teacher's weights",
    "student_init": "the student's initial weights",
    "teacher_setup": "the teacher's architecture, build arguments and input preparation",
    "student_setup": "the student's architecture, build arguments and input preparation",
}


#: what an identity field means, where its name and values do not say it, in a refused resume's message
_FIELD_MEANINGS = {
    "random_draws": (
        "who draws the student's dropout masks: inductor (--torch_compile) draws other ones than eager PyTorch; "
        "resume compiled as the run started"
    ),
}


def _difference_text(key: str, old: Any, new: Any) -> str:
    if key in _FIELD_MEANINGS:
        return f"{key} ({_FIELD_MEANINGS[key]}): {_short(old)} -> {_short(new)}"
    meaning = _FINGERPRINT_MEANINGS.get(key)
    if meaning:  # digests: their starts tell them apart

        def start(value: Any) -> str:
            return "none" if value is None else f'"{str(value)[:12]}..."'

        return f"{key} ({meaning}): {start(old)} -> {start(new)}"
    if isinstance(old, str) and isinstance(new, str) and max(len(old), len(new)) > 60:
        # two long texts (paths) shown from a little before where they part: their starts may be alike
        part = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        start = max(0, min(part - 20, max(len(old), len(new)) - 57))

        def cut(text: str) -> str:
            shown = text[start : start + 57]
            return json.dumps(("..." if start else "") + shown + ("..." if start + 57 < len(text) else ""))

        return f"{key}: {cut(old)} -> {cut(new)}"
    return f"{key}: {_short(old)} -> {_short(new)}"


def checkpoint_problem(path: Path, world_size: int = 1) -> str | None:
    """Why ``path`` cannot be resumed from exactly, or None when it can."""
    needed = ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"]
    needed += ["rng_state.pth"] if world_size == 1 else [f"rng_state_{i}.pth" for i in range(world_size)]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        return f"it has no {', '.join(missing)}"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json is unreadable ({type(err).__name__})"
    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means a damaged file
            return f"{name} is damaged ({type(err).__name__})"
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception as err:  # noqa: BLE001
        return f"model.safetensors is damaged ({type(err).__name__})"
    return None


def _checkpoint_step(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def last_complete_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished (its trainer_state.json, written last,
    parses); checkpoints cut short by a kill are skipped."""
    if not stage_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in stage_dir.iterdir() if p.is_dir() and _checkpoint_step(p) is not None),
        key=_checkpoint_step,
        reverse=True,
    )
    for path in candidates:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            logger.warning("Skipping checkpoint %s: its save did not finish (interrupted).", path)
    return None


class RunDirectory:
    """The output folder of one run.

    Args:
        out: the output folder.
        outputs: the entries (names directly under ``out``) this run writes.
        is_main: whether this process writes (takes the lock, writes run.json).
    """

    def __init__(self, out: str | Path, outputs: list[str], is_main: bool = True):
        self.out = Path(out)
        self.outputs = list(outputs) + [MANIFEST]
        self.is_main = is_main
        self._lock_file = None

    # ------------------------------------------------------------ checks that write nothing

    def check_usable(self) -> None:
        """The folder is a folder (or can be created) and is writable."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunDirError(f"--output_dir {out} is a file, not a folder: choose another --output_dir.")
        probe = nearest_existing(out)
        if not probe.is_dir():
            raise RunDirError(f"--output_dir {out}: {probe} is a file, not a folder; choose another --output_dir.")
        if not can_write_in(out):
            raise RunDirError(f"--output_dir {out}: {probe} is not writable; choose a folder you can write to.")

    def manifest(self) -> dict[str, Any] | None:
        path = self.out / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
                raise ValueError("not a run manifest")
            return data
        except (OSError, ValueError) as err:
            raise RunDirError(
                f"{path} is damaged ({type(err).__name__}): the run in {self.out} cannot be identified. Choose "
                "another --output_dir (or delete that folder yourself)."
            ) from None

    def present(self) -> list[str]:
        """This run's output names that exist in the folder now."""
        return [name for name in self.outputs if (self.out / name).exists()]

    def check_ownership(self) -> dict[str, Any] | None:
        """Refuse to touch entries that no earlier run of this folder recorded as its own.
        Returns the earlier run's manifest, if any."""
        manifest = self.manifest()
        owned = set(manifest.get("outputs", [])) if manifest else set()
        foreign = [name for name in self.present() if name not in owned and name != MANIFEST]
        if foreign:
            raise RunDirError(
                f"{self.out} already holds {', '.join(foreign)}, which no refilled-hf run recorded writing there "
                f"(no {MANIFEST} lists {'it' if len(foreign) == 1 else 'them'}). refilled-hf never replaces files it "
                "did not write: move them away or choose another --output_dir."
            )
        return manifest

    @staticmethod
    def identity_difference(
        old: dict[str, Any], new: dict[str, Any], legacy: dict[str, Any] | None = None
    ) -> list[str]:
        """The fields in which identity ``new`` differs from ``old`` (recorded), as ``field: old
        -> new``. ``legacy``: the values an earlier refilled-hf computed for ``new`` where it
        computed them otherwise (the data fingerprint by path and file dates), which ``old``
        may hold. Where the images are the same (``data``, by their pixels), the path they
        were read from (``dataset``) may differ; where a model is the same (its weights and
        setup), the folder or file it was read from (:data:`MODEL_LOCATION_FIELDS`)."""
        legacy = legacy or {}
        same_pixels = old.get("data") == new.get("data")

        def same_model(key: str) -> bool:
            fingerprints = MODEL_LOCATION_FIELDS[key]
            if any(old.get(f) is None or old.get(f) != new.get(f) for f in fingerprints):
                return False
            return names_a_place(key, old.get(key)) and names_a_place(key, new.get(key))

        def same(key: str) -> bool:
            if old.get(key) == new.get(key) or (key in legacy and old.get(key) == legacy[key]):
                return True
            if key in ADDED_IDENTITY_FIELDS and key not in old:
                return True
            if key in MODEL_LOCATION_FIELDS:
                return same_model(key)
            return key in DATA_LOCATION_FIELDS and same_pixels

        # a field an earlier refilled-hf recorded that this one no longer counts (here) is no difference
        keys = sorted(set(new) | (set(old) - RETIRED_IDENTITY_FIELDS))
        return [_difference_text(k, old.get(k), new.get(k)) for k in keys if not same(k)]

    def check_resume(self, identity: dict[str, Any], legacy: dict[str, Any] | None = None) -> None:
        """A resume must continue the same run: same configuration, teacher and data
        (``legacy``: see :meth:`identity_difference`)."""
        manifest = self.manifest()
        if manifest is None:
            raise RunDirError(
                f"Cannot resume in {self.out}: it has no {MANIFEST}, so nothing shows which run it holds. Start over "
                "in another --output_dir."
            )
        changed = self.identity_difference(manifest["identity"], identity, legacy)
        if changed:
            shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise RunDirError(
                f"Cannot resume: the run in {self.out} was started with another configuration, teacher or data "
                f"({shown}). Resume with the original settings, or start over with --overwrite_output true."
            )

    def check_inputs(self, inputs: list[tuple[str, str]]) -> None:
        """Refuse a run whose inputs (``(option, path)`` pairs: its teacher folder, a checkpoint, the
        data, a baseline's results) lie in an entry it writes: ``--overwrite_output`` would
        delete them first, or the export would replace them (a teacher folder then holds the
        student, and every record that names it lies)."""
        out = self.out.expanduser().resolve()
        for option, value in inputs:
            path = Path(value).expanduser().resolve()
            for name in self.outputs:
                entry = out / name
                if path.is_relative_to(entry):
                    raise RunDirError(
                        f"{option} {value} lies in {entry}, which this run writes (and --overwrite_output deletes "
                        "first): the run would replace its own input. Choose another --output_dir."
                    )

    # ------------------------------------------------------------ writing

    def acquire(self) -> None:
        """Create the folder and take its lock (main process; other processes return)."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / LOCK, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RunDirError(
                f"Another refilled-hf run (pid {holder}) is writing to {self.out}: wait for it to finish, or choose "
                "another --output_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def remove_earlier_run(self, manifest: dict[str, Any] | None) -> None:
        """``--overwrite_output``: delete what the earlier run recorded writing, only that."""
        if not self.is_main or manifest is None:
            return
        for name in manifest.get("outputs", []):
            path = self.out / name
            if Path(name).name != name or name in ("", ".", ".."):
                continue  # a manifest entry is a plain name directly under out
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def write_manifest(self, identity: dict[str, Any], export_options: dict[str, Any]) -> None:
        """Record the run's identity, what it writes, and the options outside the identity that
        shape its export (its card and repo), as the latest launch gave them."""
        if self.is_main:
            record = {"identity": identity, "outputs": self.outputs, "export_options": export_options}
            write_json_atomically(self.out / MANIFEST, record)
