"""Decoding a split's images: in a pool of processes where that pays, with results identical
to decoding them one by one, in the same order, broken images named the same way."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import refilled_hf.image_decoding as decoding
from refilled_hf.data import DataError, load_classification_data, load_raw_dataset


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _sources(tmp_path) -> list[tuple[bytes | str | None, str | None]]:
    """One of each kind of item a split holds, good and bad, twice over (so that they span
    several of the pool's tasks)."""
    rng = np.random.default_rng(0)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(jpeg, quality=90)
    Image.fromarray(rng.integers(0, 65536, (5, 6), dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rng.random((5, 6), dtype=np.float32)).save(tmp_path / "float.tiff")
    items = [
        (_png(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)), None),  # encoded bytes in a table
        (str(jpeg), "photo.jpg"),  # a file, read where its data set lies
        (_png(rng.integers(0, 256, (7, 7), dtype=np.uint8)), None),  # grayscale
        (str(tmp_path / "deep.png"), "deep.png"),  # one 16-bit channel
        (str(tmp_path / "gone.png"), "gone.png"),  # missing
        (b"\x89PNG\r\n\x1a\n broken", None),  # corrupt
        (None, None),  # no image at all
        (str(tmp_path / "float.tiff"), "float.tiff"),  # pixels without an 8-bit reading
    ]
    return items + [(_png(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)), None) for _ in range(9)] + items


def _same(one: list[decoding.Decoded], other: list[decoding.Decoded]) -> None:
    assert len(one) == len(other)
    for a, b in zip(one, other):
        assert (a.problem, a.text, a.digest) == (b.problem, b.text, b.digest)
        assert (a.array is None and b.array is None) or np.array_equal(a.array, b.array)


def test_the_pool_decodes_exactly_what_one_process_decodes_in_the_same_order(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(decoding, "CHUNK_IMAGES", 3)  # many tasks in flight, returned out of order
    others = set(multiprocessing.active_children())  # (any an earlier test left running)
    sources = _sources(tmp_path)
    alone = list(decoding.decode_in_order(sources, len(sources), workers=1, parallel_after_seconds=0))
    with caplog.at_level(logging.INFO, logger="refilled_hf.image_decoding"):
        pooled = list(decoding.decode_in_order(sources, len(sources), workers=2, probe=1, parallel_after_seconds=0))
    assert f"Decoding and checking the other {len(sources) - 1} images in 2 processes" in caplog.text
    _same(pooled, alone)
    # what each kind of item gives, as a refusal names it
    kinds = [(d.problem, d.text) for d in alone[:8]]
    assert [k[0] for k in kinds] == [None, None, None, None, "missing", "broken", "broken", "unreadable"]
    assert kinds[4][1] == "no file gone.png"
    assert kinds[5][1] == "UnidentifiedImageError: cannot identify image file" and kinds[6][1] == "ValueError: no image"
    assert "floating-point pixels (Pillow mode F)" in kinds[7][1]
    assert alone[1].array.shape == (40, 30, 3) and alone[2].array.shape == (7, 7, 3)
    assert alone[0].digest == decoding.pixel_digest(alone[0].array)
    assert set(multiprocessing.active_children()) <= others  # the pool is gone once the results are


def test_images_quick_to_decode_stay_in_this_process(tmp_path, caplog):
    """CIFAR-sized images decode in microseconds: a pool would only add its start-up."""
    sources = [(_png(np.full((32, 32, 3), i, np.uint8)), None) for i in range(200)]
    with caplog.at_level(logging.INFO, logger="refilled_hf.image_decoding"):
        decoded = list(decoding.decode_in_order(sources, len(sources), workers=2))
    assert len(decoded) == 200 and "processes" not in caplog.text
    assert [int(d.array[0, 0, 0]) for d in decoded] == list(range(200))


def test_a_task_holds_about_chunk_bytes_of_pixels(monkeypatch):
    """Large photos go to the workers a few at a time, so that the pool's tasks in flight stay
    within memory (a 12-megapixel photo is 36 MB decoded)."""
    sizes = []
    pool = decoding._decode_in_pool

    def spied(sources, workers, chunk_images):
        sizes.append(chunk_images)
        return pool(sources, workers, chunk_images)

    monkeypatch.setattr(decoding, "_decode_in_pool", spied)
    sources = [(_png(np.full((16, 16, 3), i, np.uint8)), None) for i in range(40)]  # 768 bytes decoded each
    for chunk_bytes in (1600, 1 << 30):
        monkeypatch.setattr(decoding, "CHUNK_BYTES", chunk_bytes)
        decoded = list(decoding.decode_in_order(sources, len(sources), workers=2, probe=2, parallel_after_seconds=0))
        assert [int(d.array[0, 0, 0]) for d in decoded] == list(range(40))
    assert sizes == [2, decoding.CHUNK_IMAGES]


def test_stopping_early_stops_the_pool(tmp_path):
    sources = [(_png(np.full((4, 4, 3), i % 256, np.uint8)), None) for i in range(300)]
    others = set(multiprocessing.active_children())
    images = decoding.decode_in_order(sources, len(sources), workers=2, probe=1, parallel_after_seconds=0)
    assert [int(next(images).array[0, 0, 0]) for _ in range(5)] == [0, 1, 2, 3, 4]
    images.close()  # (a refused image ends the caller's loop so)
    assert set(multiprocessing.active_children()) <= others


_TEST_PROCESS, _DECODE_CHUNK = os.getpid(), decoding._decode_chunk


def _dies_in_a_worker(chunk):
    if os.getpid() != _TEST_PROCESS and any(path == "poison" for _, path in chunk):
        os._exit(1)  # as a worker the kernel's out-of-memory killer ends
    return _DECODE_CHUNK(chunk)


def test_a_worker_that_dies_leaves_its_images_to_this_process(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(decoding, "CHUNK_IMAGES", 4)
    sources = [(_png(np.full((4, 4, 3), i, np.uint8)), None) for i in range(60)]
    sources[30] = (sources[30][0], "poison")  # (the path only marks it: bytes are decoded)
    monkeypatch.setattr(decoding, "_decode_chunk", _dies_in_a_worker)
    with caplog.at_level(logging.WARNING, logger="refilled_hf.image_decoding"):
        decoded = list(decoding.decode_in_order(sources, len(sources), workers=2, probe=1, parallel_after_seconds=0))
    assert "A decoding process ended unexpectedly" in caplog.text
    assert [int(d.array[0, 0, 0]) for d in decoded] == list(range(60))


def test_workers_share_the_cores_with_the_other_processes_of_the_launch(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decoding.decode_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun / accelerate launch, 4 processes on this machine
    assert decoding.decode_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert decoding.decode_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    assert decoding.decode_workers() == decoding.MAX_DECODE_WORKERS
    # where processes are not forked (macOS, Windows), a worker would import the library anew and
    # run a user's script without a __main__ guard again: no pool there
    monkeypatch.setattr(sys, "platform", "darwin")
    assert decoding.decode_workers() == 1


def _photo_folder(root, broken: bool = False):
    rng = np.random.default_rng(1)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=85)
    if broken:
        (root / "train" / "dog" / "3.jpg").write_bytes(b"not a jpeg")
    return root


def test_a_split_decoded_by_the_pool_is_the_split_decoded_in_one_process(tmp_path, monkeypatch):
    """Same pixels, digests and fingerprints; the same refusal of a broken file."""
    folder = _photo_folder(tmp_path / "photos")

    def loaded(pool: bool):
        monkeypatch.setattr(decoding, "decode_workers", lambda: 2 if pool else 1)
        monkeypatch.setattr(decoding, "PROBE_IMAGES", 1)
        monkeypatch.setattr(decoding, "PARALLEL_AFTER_SECONDS", 0.0)
        monkeypatch.setattr(decoding, "CHUNK_IMAGES", 2)
        load_raw_dataset.cache_clear()
        return load_classification_data(str(folder), validation_fraction=0.25, seed=3)

    alone, pooled = loaded(pool=False), loaded(pool=True)
    assert pooled.fingerprint == alone.fingerprint and pooled.source_fingerprint == alone.source_fingerprint
    for split in ("train", "validation", "test"):
        one, other = getattr(alone, split), getattr(pooled, split)
        assert other.content_digest == one.content_digest
        assert np.array_equal(other.pixel_digests, one.pixel_digests)
        assert other.side_range == one.side_range
        assert all(np.array_equal(a, b) for a, b in zip(other._decoded, one._decoded, strict=True))

    broken = _photo_folder(tmp_path / "broken", broken=True)
    refusals = []
    for pool in (False, True):
        monkeypatch.setattr(decoding, "decode_workers", lambda pool=pool: 2 if pool else 1)
        load_raw_dataset.cache_clear()
        with pytest.raises(DataError, match=r"1 image of split 'train' cannot be decoded") as raised:
            load_classification_data(str(broken), validation_fraction=0.0)
        refusals.append(str(raised.value))
    assert refusals[0] == refusals[1] and "3.jpg: UnidentifiedImageError" in refusals[0]
    assert "remove those files" in refusals[0]


_KILLED_MID_POOL = """
import io, multiprocessing, os, signal
import numpy as np
from PIL import Image
import refilled_hf.image_decoding as decoding

buffer = io.BytesIO()
Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
sources = [(buffer.getvalue(), None)] * 5000
images = decoding.decode_in_order(sources, len(sources), workers=2, probe=1, parallel_after_seconds=0)
next(images), next(images)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # (a zombie has ended)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool runs on Linux only")
def test_workers_end_with_a_main_process_killed_mid_pool():
    """A kill of the main process alone (the out-of-memory killer, `kill -9`) must not leave its
    decoding workers waiting forever."""
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_POOL], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in workers)
