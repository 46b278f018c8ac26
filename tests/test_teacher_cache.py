"""The teacher-output cache: every (image, crop, flip) against the teacher run on pixels
cropped by hand; keyed, written once, refused when damaged; a seeded run with the cache
equals the run without it."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import timm
import torch
from helpers import deny_access, tiny_recipe, write_random_teacher

import refilled_hf  # noqa: F401  (registers cifar_wrn_*)
from refilled_hf.backbone import FrozenTeacher
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.data_device import DeviceImages
from refilled_hf.pipeline import run_distillation
from refilled_hf.teacher_cache import TeacherCacheError, load_or_build, variant_count, variant_index

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _store(seed: int = 0, count: int = 5, size: int = 8, padding: int = 1) -> DeviceImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=g)
    return DeviceImages(images, MEAN, STD, padding=padding, flip=True, device="cpu")


def _teacher(seed: int = 0) -> FrozenTeacher:
    torch.manual_seed(seed)
    return FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=4))


def _by_hand(store: DeviceImages, i: int, top: int, left: int, flip: bool) -> torch.Tensor:
    """One image cropped, flipped and normalized with numpy, one step at a time."""
    p, size = store.padding, store.images.shape[-1]
    image = store.images[i].numpy().astype(np.float64) / 255.0
    padded = np.zeros((3, size + 2 * p, size + 2 * p))
    padded[:, p : p + size, p : p + size] = image
    crop = padded[:, top : top + size, left : left + size]
    if flip:
        crop = crop[:, :, ::-1]
    crop = (crop - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    return torch.tensor(crop.copy(), dtype=torch.float32)


def test_every_variant_holds_the_teachers_output_for_that_crop(tmp_path):
    store, teacher = _store(), _teacher()
    cache, info = load_or_build(tmp_path, teacher, "w", store, precision="fp32", dtype="float32", with_logits=True,
                                batch_size=2)  # fmt: skip
    span = 2 * store.padding + 1
    assert info["built"] and variant_count(store) == span * span * 2 == 18
    assert cache.embeddings.shape[:2] == (5, 18) and cache.logits.shape == (5, 18, 4)
    seen = set()
    for top in range(span):
        for left in range(span):
            for flip in (False, True):
                t, lf, f = torch.tensor([top] * 5), torch.tensor([left] * 5), torch.tensor([flip] * 5)
                seen.add(int(variant_index(store, t, lf, f)[0]))
                emb, logits = cache.lookup(torch.arange(5), t, lf, f)
                pixels = torch.stack([_by_hand(store, i, top, left, flip) for i in range(5)])
                ref_emb, ref_logits = teacher(pixels)
                torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert seen == set(range(18))  # one slot per variant, none shared


def test_lookup_follows_each_images_own_draw(tmp_path):
    store, teacher = _store(), _teacher()
    cache, _ = load_or_build(tmp_path, teacher, "w", store, precision="fp32", dtype="float16", with_logits=False,
                             batch_size=5)  # fmt: skip
    assert cache.logits is None and cache.embeddings.dtype == torch.float16
    torch.manual_seed(3)
    index = torch.tensor([4, 0, 2, 2])
    pixels, draws = store.augmented(index)
    emb, logits = cache.lookup(index, *draws)
    assert logits is None
    torch.testing.assert_close(emb, teacher(pixels)[0], atol=2e-3, rtol=2e-3)  # float16 storage


def test_written_once_then_read_and_keyed_by_what_it_depends_on(tmp_path):
    store, teacher = _store(), _teacher()
    kwargs = {"precision": "fp32", "dtype": "float32", "with_logits": False, "batch_size": 5}
    _, first = load_or_build(tmp_path, teacher, "w", store, **kwargs)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{first['key']}.safetensors"]  # no temporary file left behind
    cache, again = load_or_build(tmp_path, teacher, "w", store, **kwargs)
    assert not again["built"] and again["key"] == first["key"]
    keys = {first["key"]}
    for other in (
        dict(teacher_fingerprint="other weights"),
        dict(images=_store(seed=1)),
        dict(images=_store(padding=2)),
        dict(precision="bf16"),
        dict(dtype="float16"),
        dict(with_logits=True),
    ):
        call = {"teacher_fingerprint": "w", "images": store, **kwargs, **other}
        _, info = load_or_build(tmp_path, teacher, call.pop("teacher_fingerprint"), call.pop("images"), **call)
        assert info["built"], other
        keys.add(info["key"])
    assert len(keys) == 7


def test_builders_of_one_key_that_share_a_process_id_each_write_a_whole_file(tmp_path, monkeypatch):
    """Two runs on machines that share the cache folder, whose processes have the same id
    (containers count from 1), build the same key at once: a builder whose file the other
    renamed into place failed with FileNotFoundError, after its whole build. Here the second
    builds while the first writes (one process: one id)."""
    from refilled_hf import teacher_cache

    store, teacher = _store(), _teacher()
    kwargs = {"precision": "fp32", "dtype": "float32", "with_logits": False, "batch_size": 5}
    save, inner = teacher_cache.save_safetensors, []

    def save_while_another_builds(tensors, path, metadata=None):
        save(tensors, path, metadata=metadata)
        if not inner:  # the other builder, between this one's write and its rename
            inner.append(None)
            inner[0] = load_or_build(tmp_path, teacher, "w", store, **kwargs)

    monkeypatch.setattr(teacher_cache, "save_safetensors", save_while_another_builds)
    cache, info = load_or_build(tmp_path, teacher, "w", store, **kwargs)
    monkeypatch.setattr(teacher_cache, "save_safetensors", save)
    assert info["built"] and inner[0][1]["built"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{info['key']}.safetensors"]  # no staging file left
    read, again = load_or_build(tmp_path, teacher, "w", store, **kwargs)
    assert not again["built"] and torch.equal(read.embeddings, cache.embeddings)


def test_a_stopped_build_leaves_no_file_and_a_killed_ones_are_named_not_deleted(tmp_path, monkeypatch, caplog):
    """A build stopped while writing its cache (each file as large as the cache: GBs) left its
    staging file in the shared folder, and no later run said so."""
    import errno

    from refilled_hf import teacher_cache

    store, teacher = _store(), _teacher()
    kwargs = {"precision": "fp32", "dtype": "float32", "with_logits": False, "batch_size": 5}

    def full_disk(tensors, path, metadata=None):
        path.write_bytes(b"half a cache")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(teacher_cache, "save_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        load_or_build(tmp_path, teacher, "w", store, **kwargs)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # its own staging file went with it

    killed = tmp_path / ".0123abcd.safetensors.1a2b3c.tmp"  # a build killed hours ago
    killed.write_bytes(b"x" * 3000)
    hours_ago = killed.stat().st_mtime - 2 * teacher_cache.STALE_STAGING_SECONDS
    os.utime(killed, (hours_ago, hours_ago))
    writing = tmp_path / ".0123abcd.safetensors.4d5e6f.tmp"  # another run's build, writing now
    writing.write_bytes(b"x")
    with caplog.at_level("WARNING", logger="refilled_hf.teacher_cache"):
        _, info = load_or_build(tmp_path, teacher, "w", store, **kwargs)
    assert info["built"] and killed.is_file() and writing.is_file()
    said = [r.getMessage() for r in caplog.records if r.name == "refilled_hf.teacher_cache"]
    assert said == [
        f"The teacher cache folder {tmp_path} holds 1 unfinished cache file(s) (2.9 KiB) that builds stopped while "
        f"writing left: {killed.name}. Delete them unless a run is writing there now."
    ]


def test_a_damaged_cache_is_refused_with_the_fix(tmp_path):
    store, teacher = _store(), _teacher()
    kwargs = {"precision": "fp32", "dtype": "float32", "with_logits": False, "batch_size": 5}
    _, info = load_or_build(tmp_path, teacher, "w", store, **kwargs)
    path = tmp_path / f"{info['key']}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TeacherCacheError, match="damaged.*Delete that file"):
        load_or_build(tmp_path, teacher, "w", store, **kwargs)


def test_a_cache_this_user_cannot_read_is_named_not_called_damaged(tmp_path, monkeypatch):
    """A teammate's cache in a shared folder: deleting it, as a damaged one should be, is not
    this user's to do."""
    store, teacher = _store(), _teacher()
    kwargs = {"precision": "fp32", "dtype": "float32", "with_logits": False, "batch_size": 5}
    _, info = load_or_build(tmp_path, teacher, "w", store, **kwargs)
    deny_access(monkeypatch, tmp_path / f"{info['key']}.safetensors")
    with pytest.raises(
        TeacherCacheError, match=r"exists but this user cannot read it .*chmod a\+r.*--teacher_cache none"
    ):
        load_or_build(tmp_path, teacher, "w", store, **kwargs)


def test_a_cache_folder_this_user_cannot_write_serves_the_run_and_says_it_is_not_kept(tmp_path, monkeypatch, caplog):
    """A shared folder, readable but not writable: the cache used to be built (the long part)
    and its write then failed the run."""
    store, teacher = _store(), _teacher()
    kwargs = {"precision": "fp32", "dtype": "float32", "with_logits": False, "batch_size": 5}
    shared = tmp_path / "shared"
    shared.mkdir()
    deny_access(monkeypatch, shared)
    with caplog.at_level("WARNING", logger="refilled_hf.teacher_cache"):
        cache, info = load_or_build(shared / "sub", teacher, "w", store, **kwargs)
    assert info["built"] and info["written"] is False and not (shared / "sub").exists()
    assert "cannot be written by this user: the cache is built for this run only" in caplog.text
    reference, _ = load_or_build(tmp_path / "own", teacher, "w", store, **kwargs)
    assert torch.equal(cache.embeddings, reference.embeddings)


def _run(recipe: dict) -> dict:
    return run_distillation(RefilledConfig(**recipe))


@pytest.fixture
def umask_022():
    """The usual umask, so that a file readable by its writer alone stands out."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["refilled", "kd"])
def test_a_seeded_run_with_the_cache_equals_the_run_without(data_dir, teacher_dir, tmp_path, method, umask_022):
    teacher = teacher_dir
    if method == "kd":  # KD needs a teacher over the student's classes, and the cache then holds logits
        teacher = write_random_teacher(tmp_path / "kd-teacher", label_names=["yellow", "cyan", "magenta"])
    base = tiny_recipe(data_dir, tmp_path / "plain", method=method, teacher=f"local-dir:{teacher}",
                       data_path="device", **({"teacher_classes": "3-5"} if method == "kd" else {}))  # fmt: skip
    plain = _run(base)
    cached_recipe = {**base, "output_dir": str(tmp_path / "cached"), "teacher_cache": str(tmp_path / "cache"),
                     "teacher_cache_dtype": "float32"}  # fmt: skip
    cached = _run(cached_recipe)
    assert cached["teacher_cache"]["built"]
    runs = [cached]
    if method == "refilled":
        again = _run({**cached_recipe, "output_dir": str(tmp_path / "again")})
        assert not again["teacher_cache"]["built"]  # the second run reads the file the first one wrote
        runs.append(again)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    for run in runs:
        assert run["final"]["test_top1"] == plain["final"]["test_top1"]
        assert run["final"]["validation_top1"] == plain["final"]["validation_top1"]
        assert run["final"]["train_metrics"]["train_loss"] == pytest.approx(
            plain["final"]["train_metrics"]["train_loss"], rel=1e-5
        )
        if method == "refilled":
            assert run["stage1"]["test_ncm_top1"] == plain["stage1"]["test_ncm_top1"]
            assert run["stage1"]["train_metrics"]["train_loss"] == pytest.approx(
                plain["stage1"]["train_metrics"]["train_loss"], rel=1e-5
            )
    # every file written (export, checkpoints, class centres, the cache) can be read by the others
    # as any new file can: safetensors writes its own readable by their writer alone
    files = [f for f in [*(tmp_path / "cached").rglob("*"), *(tmp_path / "cache").rglob("*")] if f.is_file()]
    assert {f.suffix for f in files} >= {".safetensors", ".json", ".md", ".pt"}
    modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert modes == dict.fromkeys(modes, "0o644")
    if method == "refilled":  # a finished run's model exported again trains nothing: no cache is built again
        shutil.rmtree(tmp_path / "cache")
        shutil.rmtree(tmp_path / "again" / "model")
        assert _run({**cached_recipe, "output_dir": str(tmp_path / "again"), "resume_from_checkpoint": "true"}) == again
        assert not (tmp_path / "cache").exists() and (tmp_path / "again" / "model" / "model.safetensors").is_file()
    for stage in ["stage1", "stage2"] if method == "refilled" else [method]:
        state = json.loads(max((tmp_path / "cached" / stage).glob("checkpoint-*/trainer_state.json")).read_text())
        reference = json.loads(max((tmp_path / "plain" / stage).glob("checkpoint-*/trainer_state.json")).read_text())
        losses = [e["loss"] for e in state["log_history"] if "loss" in e]
        expected = [e["loss"] for e in reference["log_history"] if "loss" in e]
        assert losses == pytest.approx(expected, rel=1e-5)


def test_the_cache_is_refused_where_it_cannot_work(data_dir, teacher_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "r", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         teacher_cache=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(ConfigError, match="needs the device data path"):
        RefilledConfig(**{**recipe, "data_path": "workers"})
    with pytest.raises(ConfigError, match="teacher_cache_dtype"):
        RefilledConfig(**{**recipe, "teacher_cache_dtype": "int8"})
    with pytest.raises(ConfigError, match="over --teacher_cache_budget_gb"):
        _run({**recipe, "teacher_cache_budget_gb": 1e-6})
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r" / "stage1").exists()
    assert RefilledConfig(**{**recipe, "teacher_cache": "none"}).teacher_cache is None
