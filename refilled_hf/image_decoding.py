"""A split's images decoded to upright ``uint8`` RGB arrays, with the digests that identify
them, in order; in several processes where decoding them one by one would take long.

Every run decode-checks each image of its splits before training (a broken file is refused
before any long work starts, and the pixels fingerprint the data). CIFAR-sized images decode
in about 0.06 ms, but a photo of ImageNet's size (500 x 375 px, a 90 kB JPEG) takes about 2 ms
with its digests, at every launch and resume, while the GPUs wait. When the first images say
that decoding the rest one by one would take longer than :data:`PARALLEL_AFTER_SECONDS`, the
rest are decoded by a pool of forked processes (:func:`decode_workers`: the cores this process
may use, shared with the other training processes on the machine; Linux only), and the results
come back in the split's order, identical to a decoding in one process. The main process still
receives and hashes every image (the split's content digest is one SHA-256 over all its pixels,
in order): about 0.8 ms of its CPU per such photo, against about 2.3 ms for the whole
decode-check in one process, which bounds the gain near 3x however many cores there are
(``benchmarks/decoding.py``).

Hand-written rather than a DataLoader: the decode-check must see every image once, in order,
and name each broken one, which a loader's collation and worker errors do not give.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import logging
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .messages import error_text
from .worker_processes import cores_per_process, end_with_parent, fork_context

__all__ = [
    "ARRAY_CHANNELS",
    "Decoded",
    "SIXTEEN_BIT_MODES",
    "UnreadablePixelsError",
    "add_to_content_digest",
    "array_png",
    "decode_in_order",
    "decode_workers",
    "pixel_digest",
    "rgb_array",
]

logger = logging.getLogger(__name__)

#: images decoded in this process first, to time them
PROBE_IMAGES = 64
#: the rest go to a pool of processes when decoding them here would take longer than this
PARALLEL_AFTER_SECONDS = 5.0
#: at most this many decoding processes: the main process, which receives and hashes every image,
#: keeps up with about 3 of them (benchmarks/decoding.py); more would only take cores from training
MAX_DECODE_WORKERS = 8
#: images per task sent to a worker: at most this many, and about CHUNK_BYTES of decoded pixels
#: (with two tasks per worker in flight, the pool holds about 2 x workers x CHUNK_BYTES)
CHUNK_IMAGES = 32
CHUNK_BYTES = 8 << 20


class UnreadablePixelsError(ValueError):
    """An image whose pixel values have no one 8-bit reading (floating-point pixels)."""


#: Pillow's modes of one 16-bit channel (a 16-bit PNG or TIFF; "I", 32 bits, is how Pillow 10.0
#: opens a 16-bit PNG)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_array(image: Image.Image) -> np.ndarray:
    """The image as an ``(H, W, 3)`` uint8 array, upright: turned as its EXIF orientation says
    (a phone's photo), as ``datasets`` decodes it and transformers' ``load_image`` reads it.
    One 16-bit channel is scaled to 8 bits over its full range (``round(v / 257)``) and
    repeated in R, G and B: Pillow's ``convert("RGB")`` clips it at 255, which turns every
    pixel above 255 (nearly all of a 16-bit image) white. Floating-point pixels (mode ``F``)
    are refused: their range is unknown. A 32-bit integer image (mode ``I``, not a PNG, which
    holds at most 16 bits) whose values all lie in 0..255 holds 8-bit values, read as they are,
    as ``convert("RGB")`` reads them: ``datasets`` stores a gray integer array so (a TIFF)."""
    container = image.format  # (exif_transpose returns a copy that has none)
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise UnreadablePixelsError(
                f"32-bit integer pixels (Pillow mode {image.mode}) outside 0..65535; convert the images to 8 bits."
            )
        if image.mode == "I" and container != "PNG" and high <= 255:
            gray = values.astype(np.uint8)
        else:
            gray = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        raise UnreadablePixelsError(
            "floating-point pixels (Pillow mode F), whose range is unknown; convert the images to 8-bit "
            "(or 16-bit) ones, with the scaling that suits them."
        )
    return np.asarray(image.convert("RGB"))


#: the channel counts an image given as an ``(H, W, C)`` array may have (gray, RGB, RGBA)
ARRAY_CHANNELS = (1, 3, 4)


def array_png(values: Any) -> bytes:
    """An image given as an array of integer pixels (``(H, W)``, or ``(H, W, C)`` with C in
    :data:`ARRAY_CHANNELS`; values 0..255, of any integer type) as PNG bytes, which hold the
    same pixels. Arrays of another shape or range raise :class:`UnreadablePixelsError`.

    Hand-written rather than ``datasets``' cast of such a column to an ``Image`` feature: that
    cast reads each row's nested lists as int64 and stores a gray image as 32-bit pixels, which
    read back as a 16-bit image (near black: ``0..255`` scaled over ``0..65535``), and wraps a
    colour image's values above 255 to 8 bits, silently."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        what = "rows of unequal lengths" if array.dtype == object else f"{array.dtype} values"
        raise UnreadablePixelsError(
            f"an array of {what}, not of integer pixels; store each image as a uint8 (height, width) or "
            "(height, width, channels) array, or as an image file."
        )
    shape = array.shape
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in ARRAY_CHANNELS)) or not array.size:
        channels_first = len(shape) == 3 and shape[0] in ARRAY_CHANNELS
        raise UnreadablePixelsError(
            f"an array of shape {shape}: an image is (height, width) or (height, width, channels) with "
            f"{', '.join(map(str, ARRAY_CHANNELS[:-1]))} or {ARRAY_CHANNELS[-1]} channels"
            + ("; this one has its channels first: store array.transpose(1, 2, 0)." if channels_first else ".")
        )
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise UnreadablePixelsError(
            f"integer pixels from {low} to {high}, outside 0..255, whose bit depth nothing states; scale the "
            "arrays to uint8 (0..255), or store the images as 16-bit PNG files (read over their full range)."
        )
    pixels = array.astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is the fastest
    return buffer.getvalue()


def decode_source(source: bytes | str | None) -> np.ndarray:
    """The image in ``source`` (its encoded bytes, or its file's path) as :func:`rgb_array` gives it."""
    if not source:
        raise ValueError("no image")
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return rgb_array(image)


def add_to_content_digest(content: Any, array: np.ndarray) -> None:
    """Add one decoded image (its size and pixels) to ``content``, a hashlib digest of a
    sequence of images (:attr:`ImageClassificationDataset.content_digest`)."""
    content.update(np.asarray(array.shape, dtype=np.int64).tobytes())
    content.update(np.ascontiguousarray(array).data)


def pixel_digest(array: np.ndarray) -> int:
    """A 64-bit digest of an image's size and pixels, equal for the same image stored twice,
    in every process: BLAKE2b (about 4 us for a 32-px image; Python's own hash is faster but
    differs between processes, and runs compare their images' digests across processes:
    :meth:`ClassificationData.source_fingerprint`)."""
    image = hashlib.blake2b(digest_size=8)
    add_to_content_digest(image, array)
    return int.from_bytes(image.digest(), "little")


class Decoded(NamedTuple):
    """One image decoded (``array`` and its :func:`pixel_digest`), or why it could not be:
    ``problem`` is ``"unreadable"`` (pixels with no 8-bit reading: ``text`` says why),
    ``"missing"`` (no such file) or ``"broken"`` (missing data, truncated, corrupt), and
    ``text`` the reason as a refusal names it."""

    array: np.ndarray | None
    digest: int = 0
    problem: str | None = None
    text: str = ""


def decode_checked(source: bytes | str | None, path: str | None = None) -> Decoded:
    """Decode one image, never raising for a bad one. ``path``: the image's path as its data
    set names it (None for encoded bytes), which a refusal of a missing file quotes."""
    try:
        array = decode_source(source)
    except UnreadablePixelsError as err:
        return Decoded(None, problem="unreadable", text=str(err))
    except FileNotFoundError:
        return Decoded(None, problem="missing", text=f"no file {path}")
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds on bad data
        # (named by its file in a folder data set; Pillow names bytes by their buffer's address, which says nothing)
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", error_text(err, limit=80))
        return Decoded(None, problem="broken", text=f"{source}: {reason}" if path else reason)
    return Decoded(array, pixel_digest(array))


def decode_workers() -> int:
    """Decoding processes for this process: :func:`~refilled_hf.worker_processes.cores_per_process`,
    at most :data:`MAX_DECODE_WORKERS`; 1 (no pool) where processes are not forked
    (:func:`~refilled_hf.worker_processes.fork_context`)."""
    if fork_context() is None:
        return 1
    return min(cores_per_process(), MAX_DECODE_WORKERS)


def decode_in_order(
    sources: Iterable[tuple[bytes | str | None, str | None]],
    count: int,
    *,
    what: str = "images",
    workers: int | None = None,
    probe: int | None = None,
    parallel_after_seconds: float | None = None,
) -> Iterator[Decoded]:
    """Each of ``count`` images (``(source, path)`` pairs, see :func:`decode_checked`)
    decoded, in order. The first ``probe`` (default :data:`PROBE_IMAGES`) are decoded here;
    where the rest would take longer than ``parallel_after_seconds`` (default
    :data:`PARALLEL_AFTER_SECONDS`) here, they are decoded by ``workers`` processes (default
    :func:`decode_workers`). Close the iterator (or exhaust it) to stop the pool."""
    sources = iter(sources)
    workers = decode_workers() if workers is None else workers
    probe = PROBE_IMAGES if probe is None else probe
    parallel_after_seconds = PARALLEL_AFTER_SECONDS if parallel_after_seconds is None else parallel_after_seconds
    start, done, pixels = time.perf_counter(), 0, 0
    for source, path in itertools.islice(sources, probe):
        image = decode_checked(source, path)
        pixels += image.array.nbytes if image.array is not None else 0
        yield image
        done += 1
    left = count - done
    if left > 0 and workers > 1:
        serial = (time.perf_counter() - start) / max(done, 1) * left
        if serial > parallel_after_seconds:
            logger.info(
                "Decoding and checking the other %d %s in %d processes (about %.0f s in one).",
                left, what, workers, serial,
            )  # fmt: skip
            # tasks of about CHUNK_BYTES of pixels (one 12-megapixel photo is 36 MB decoded)
            chunk = max(1, min(CHUNK_IMAGES, round(CHUNK_BYTES / max(pixels / max(done, 1), 1))))
            yield from _decode_in_pool(sources, workers, chunk)
            return
    for source, path in sources:
        yield decode_checked(source, path)


def _start_worker(parent: int) -> None:
    """A decoding worker leaves signals to the main process (``parent``): a Ctrl-C at the
    terminal (sent to the whole process group) stops the main process, which then stops the
    pool, and a SIGTERM ends the worker as it would any process (not the handler the main
    process had set). It ends with the main process: killed alone (``kill``, the kernel's
    out-of-memory killer), the main process would otherwise leave its workers waiting forever
    on a queue that their own inherited copy of it keeps open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    end_with_parent(parent)


def _decode_chunk(chunk: list[tuple[bytes | str | None, str | None]]) -> list[Decoded]:
    return [decode_checked(source, path) for source, path in chunk]


def _decode_in_pool(sources: Iterator[tuple[bytes | str | None, str | None]], workers: int,
                    chunk_images: int) -> Iterator[Decoded]:  # fmt: skip
    """The rest of ``sources`` decoded by ``workers`` processes, ``chunk_images`` per task, in
    order, with at most two tasks per worker under way or waiting to be taken (so memory stays
    bounded however slowly the results are taken). A pool that breaks (a worker killed) leaves
    the images it had not returned to this process."""
    chunks = iter(lambda: list(itertools.islice(sources, chunk_images)), [])
    pool = ProcessPoolExecutor(workers, mp_context=fork_context(), initializer=_start_worker, initargs=(os.getpid(),))
    pending: collections.deque[list] = collections.deque()  # [chunk, its future], in order, none yielded yet

    def send(chunk: list) -> None:
        pending.append([chunk, None])  # (kept, should the pool refuse it)
        pending[-1][1] = pool.submit(_decode_chunk, chunk)

    try:
        for chunk in itertools.islice(chunks, 2 * workers):
            send(chunk)
        while pending:
            results = pending[0][1].result()
            pending.popleft()
            yield from results  # (before the next task is sent: a pool that breaks then has not lost them)
            following = next(chunks, None)
            if following is not None:
                send(following)
    except BrokenProcessPool:
        logger.warning("A decoding process ended unexpectedly: the other images are decoded in this one.")
        for chunk in itertools.chain([c for c, _ in pending], chunks):
            yield from _decode_chunk(chunk)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
