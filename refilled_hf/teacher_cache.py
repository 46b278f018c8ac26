"""A teacher-output cache that later runs reuse: the frozen teacher's embeddings (and
logits where a method needs them) for every training image under every augmentation
the device data path can draw.

CIFAR-style augmentation (crop offsets in ``[0, 2p]`` on each axis of the zero-padded
image, and a horizontal flip) has ``(2p + 1)^2 x 2`` variants per image: 162 for 32-px
inputs. The cache holds all of them, so a run that reads it sees exactly the teacher
outputs it would have computed, for the same random draws: the augmentation
distribution does not change and a seeded run takes the same steps (to the storage
precision; ``float32`` storage reproduces the run without the cache).

A cache of K pre-drawn augmentations per image (FKD) would serve other transforms but
would change the augmentation distribution; it is not implemented, and the cache is
refused where the device path does not run.

The file (``<folder>/<key>.safetensors``) is keyed by everything its content depends
on: the teacher's weights and input adaptation, the training images' pixels, the
augmentation (size, padding, flip, normalization), the precision and device type the
teacher ran on, the storage dtype and what is stored. It is written once, atomically (a temporary file
renamed into place), and only read afterwards; concurrent builders of the same key
each write a complete file, and the last rename wins.

safetensors + a hand-written lookup: no library keeps per-(image, augmentation) model
outputs for a training loop, and the lookup is one index into a device tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .backbone import FrozenTeacher
from .data_device import DeviceImages, crop_and_flip
from .hub import save_safetensors
from .messages import byte_size, error_text, unreadable_file_text
from .rundir import can_write_in

__all__ = ["CACHE_DTYPES", "TeacherCache", "TeacherCacheError", "cache_bytes", "cache_key", "load_or_build"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class TeacherCacheError(RuntimeError):
    """The cache cannot be used (the message says why and what to do)."""


def variant_count(images: DeviceImages) -> int:
    """Augmentation variants per image: crop offsets x flips."""
    return (2 * images.padding + 1) ** 2 * (2 if images.flip else 1)


def variant_index(images: DeviceImages, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The variant number of each drawn ``(top, left, flip)``."""
    span = 2 * images.padding + 1
    index = top * span + left
    return index * 2 + flip.long() if images.flip else index


def cache_bytes(images: DeviceImages, embedding_dim: int, logit_dim: int, dtype: str) -> int:
    """Memory (and file size) of the cache for ``images``."""
    item = torch.empty((), dtype=CACHE_DTYPES[dtype]).element_size()
    return len(images) * variant_count(images) * (embedding_dim + logit_dim) * item


def cache_key(
    teacher: FrozenTeacher,
    teacher_fingerprint: str,
    images: DeviceImages,
    *,
    precision: str,
    dtype: str,
    with_logits: bool,
) -> tuple[str, dict[str, Any]]:
    """The cache's key (SHA-256 hex) and the description it hashes."""
    pixels = hashlib.sha256(images.images.cpu().contiguous().numpy().tobytes()).hexdigest()
    description = {
        "format": CACHE_FORMAT,
        "teacher_weights": teacher_fingerprint,
        "teacher_adapt": teacher.input_setup(),
        "images": pixels,
        "shape": list(images.images.shape),
        "padding": images.padding,
        "flip": images.flip,
        "mean": images.mean.flatten().tolist(),
        "std": images.std.flatten().tolist(),
        "precision": precision,
        "device": images.device.type,  # kernels differ between CPU and GPU: exact means same device type
        "dtype": dtype,
        "with_logits": with_logits,
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return key, description


class TeacherCache:
    """The teacher's outputs ``[N, V, D]`` (and ``[N, V, K]`` logits) for every image and
    augmentation variant, on the training device."""

    def __init__(self, images: DeviceImages, embeddings: torch.Tensor, logits: torch.Tensor | None):
        self.images = images
        self.embeddings = embeddings.to(images.device)
        self.logits = logits.to(images.device) if logits is not None else None

    def lookup(
        self, index: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embedding, logits)`` in float32 of the images at ``index`` under the drawn
        crops and flips (``logits`` is ``None`` when the cache holds none)."""
        index = index.to(self.images.device)
        variant = variant_index(self.images, top, left, flip)
        emb = self.embeddings[index, variant].float()
        logits = self.logits[index, variant].float() if self.logits is not None else None
        return emb, logits


@torch.no_grad()
def build(
    teacher: FrozenTeacher,
    images: DeviceImages,
    *,
    with_logits: bool,
    dtype: str,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``teacher`` on every image under every variant (under ``autocast``, as in
    training). Returns ``embeddings [N, V, D]`` and ``logits [N, V, K]`` (or ``None``)."""
    span = 2 * images.padding + 1
    flips = (False, True) if images.flip else (False,)
    variants = [(top, left, f) for top in range(span) for left in range(span) for f in flips]
    count, store = len(images), CACHE_DTYPES[dtype]
    embeddings = logits = None
    for v, (top, left, f) in enumerate(variants):
        for start in range(0, count, batch_size):
            raw = images.images[start : start + batch_size]
            n = raw.shape[0]
            device = images.device
            pixels = crop_and_flip(
                raw,
                torch.full((n,), top, device=device),
                torch.full((n,), left, device=device),
                torch.full((n,), f, dtype=torch.bool, device=device),
                images.padding,
            )
            pixels = images.normalize(pixels)  # the training batches' own normalization
            with autocast():
                emb, out = teacher(pixels)
            if embeddings is None:
                embeddings = torch.empty(count, len(variants), emb.shape[1], dtype=store, device=device)
                if with_logits:
                    logits = torch.empty(count, len(variants), out.shape[1], dtype=store, device=device)
            embeddings[start : start + n, v] = emb.to(store)
            if logits is not None:
                logits[start : start + n, v] = out.to(store)
    return embeddings, logits


#: a cache's staging file this much older than now is a stopped build's: a write under way
#: keeps moving its modification time
STALE_STAGING_SECONDS = 3600


def warn_about_stopped_builds(folder: Path) -> list[Path]:
    """Name, in a warning, the staging files that cache builds killed while writing left in
    ``folder`` (a build that fails otherwise removes its own), each as large as a cache;
    returns them. They are not deleted: runs share the folder, and no run removes what it did
    not write."""
    now, stale = time.time(), []
    for candidate in sorted(folder.glob(".*.safetensors.*.tmp")):
        try:
            status = candidate.stat()
        except OSError:  # renamed or removed meanwhile
            continue
        if now - status.st_mtime > STALE_STAGING_SECONDS:
            stale.append((candidate, status.st_size))
    if stale:
        logger.warning(
            "The teacher cache folder %s holds %d unfinished cache file(s) (%s) that builds stopped while writing "
            "left: %s. Delete them unless a run is writing there now.",
            folder, len(stale), byte_size(sum(size for _, size in stale)), ", ".join(p.name for p, _ in stale),
        )  # fmt: skip
    return [p for p, _ in stale]


def load_or_build(
    folder: str | Path,
    teacher: FrozenTeacher,
    teacher_fingerprint: str,
    images: DeviceImages,
    *,
    precision: str,
    dtype: str,
    with_logits: bool,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    write: bool = True,
) -> tuple[TeacherCache, dict[str, Any]]:
    """The cache for this teacher, data and augmentation: read from ``folder`` when an
    earlier run wrote it, else built (and written when ``write``). Returns the cache and
    ``{"key", "path", "built", "seconds", "bytes"}`` (and, when built, ``"written"``: False where
    the folder cannot be written, the cache then kept in memory for this run only)."""
    key, description = cache_key(
        teacher, teacher_fingerprint, images, precision=precision, dtype=dtype, with_logits=with_logits
    )
    path = Path(folder) / f"{key}.safetensors"
    start = time.perf_counter()
    if path.parent.is_dir():
        warn_about_stopped_builds(path.parent)
    if path.is_file():
        unreadable = unreadable_file_text(path)
        if unreadable:
            raise TeacherCacheError(f"The teacher cache {unreadable}; or turn the cache off (--teacher_cache none).")
        try:
            tensors = load_file(str(path), device=str(images.device))
            embeddings, logits = tensors["embeddings"], tensors.get("logits")
            expected = (len(images), variant_count(images))
            if tuple(embeddings.shape[:2]) != expected or (logits is None) == with_logits:
                raise ValueError(f"shape {tuple(embeddings.shape)} for {expected}")
        except Exception as err:  # noqa: BLE001 - any failure means a damaged file
            raise TeacherCacheError(
                f"The teacher cache {path} is damaged ({error_text(err)}). Delete that file (it is "
                "rebuilt) or turn the cache off (--teacher_cache none)."
            ) from None
        info = {"key": key, "path": str(path), "built": False, "seconds": time.perf_counter() - start}
        logger.info("Teacher cache read from %s (%.1f s).", path, info["seconds"])
    else:
        if write and not can_write_in(path.parent):
            logger.warning(
                "The teacher cache folder %s cannot be written by this user: the cache is built for this run only, "
                "and not kept for later runs (point --teacher_cache at a folder you can write to).", path.parent,
            )  # fmt: skip
            write = False
        logger.info(
            "Building the teacher cache: %d images x %d augmentation variants (%s).",
            len(images), variant_count(images), f"written to {path}" if write else "kept in memory only",
        )  # fmt: skip
        embeddings, logits = build(
            teacher, images, with_logits=with_logits, dtype=dtype, batch_size=batch_size, autocast=autocast
        )
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            # a name no other builder can hold: process ids repeat across machines sharing the
            # folder (each container's processes count from 1), and two builders sharing one
            # staging file moved each other's file away (the second rename found none)
            staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tensors = {"embeddings": embeddings.cpu().contiguous()}
            if logits is not None:
                tensors["logits"] = logits.cpu().contiguous()
            try:
                save_safetensors(tensors, staging, metadata={"description": json.dumps(description, sort_keys=True)})
                os.replace(staging, path)
            except BaseException:  # a full disk, a Ctrl-C: this build's own staging file goes (a kill's stays)
                staging.unlink(missing_ok=True)
                raise
        info = {"key": key, "path": str(path), "built": True, "written": write, "seconds": time.perf_counter() - start}
        logger.info("Teacher cache built in %.1f s.", info["seconds"])
    cache = TeacherCache(images, embeddings, logits)
    info["bytes"] = cache.embeddings.numel() * cache.embeddings.element_size() + (
        cache.logits.numel() * cache.logits.element_size() if cache.logits is not None else 0
    )
    return cache, info
