"""Numerical safety, interruption (SIGKILL) and resume, atomic writes, safe loading."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import tiny_recipe
from safetensors.torch import load_file
from transformers import TrainerCallback

from refilled_hf.backbone import FrozenTeacher, ModelLoadError, StudentModel, load_timm_model
from refilled_hf.config import RefilledConfig
from refilled_hf.hub import export_model
from refilled_hf.losses import local_classifier_loss, relationship_loss
from refilled_hf.pipeline import DivergedError, run_distillation
from refilled_hf.rundir import last_complete_checkpoint
from refilled_hf.trainer import RefilledTrainer

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_refilled_losses_under_autocast_match_float32(dtype):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 32, generator=g), torch.randn(64, 48, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    logits, centers = torch.randn(64, 5, generator=g), torch.nn.functional.normalize(torch.randn(5, 48), dim=1)
    reference = [relationship_loss(s, t, y, variant=v) for v in ("tuple", "triplet")]
    reference.append(local_classifier_loss(logits, t, centers, y))
    layer = torch.nn.Linear(32, 32)  # a half-precision producer in front, as in a model
    with torch.autocast("cpu", dtype=dtype):
        s_half = layer(s)
        assert s_half.dtype == dtype
        ref_half = [relationship_loss(s_half.float(), t, y, variant=v) for v in ("tuple", "triplet")]
        under = [relationship_loss(s_half, t, y, variant=v) for v in ("tuple", "triplet")]
        under.append(local_classifier_loss(logits, t, centers, y))
        ref_half.append(reference[2])
    for value, expected in zip(under, ref_half):
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, expected)


def test_a_batch_with_nothing_to_mine_changes_nothing(tmp_path):
    student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=3, drop_rate=0.0))
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=2), student.model.pretrained_cfg)
    args = RefilledConfig(teacher="x", output_dir=str(tmp_path), use_cpu=True, weight_decay=0.0,
                          eval_strategy="no", save_strategy="no")  # fmt: skip
    batch = {"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.zeros(8, dtype=torch.long)}  # one class
    images = [{"pixel_values": image, "labels": 0} for image in batch["pixel_values"]]
    trainer = RefilledTrainer(model=student, args=args, stage="stage1", num_classes=3, teacher=teacher,
                              centers_dataset=images)  # fmt: skip
    optimizer = trainer.create_optimizer()
    before = {k: v.clone() for k, v in student.state_dict().items() if "running" not in k and "num_batches" not in k}
    student.train()
    loss = trainer.compute_loss(student, batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in student.parameters())
    optimizer.step()
    after = student.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert trainer._components["tuples"] == 0


@pytest.mark.slow
def test_bf16_training_on_cpu_has_finite_losses(data_dir, teacher_dir, tmp_path):
    # one epoch a stage (3 steps): bf16 is slow on a CPU
    recipe = tiny_recipe(data_dir, tmp_path / "bf16", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         bf16=True, stage1_epochs=1, stage2_epochs=1)  # fmt: skip
    results = run_distillation(RefilledConfig(**recipe))
    assert math.isfinite(results["final"]["test_top1"])
    for stage in ("stage1", "stage2"):
        state = max((tmp_path / "bf16" / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        losses = [
            e["loss"] for e in json.loads((state / "trainer_state.json").read_text())["log_history"] if "loss" in e
        ]
        assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_a_bf16_run_measures_under_bf16_and_the_cards_evaluate_command_repeats_it(data_dir, tmp_path, caplog):
    """Evaluation runs under the training precision, as the card's `evaluate ... --bf16 true`
    says: it ran in float32 (the student's forward was called past Accelerate's autocast), and
    `evaluate --bf16 true` did too, so the flag did nothing."""
    from refilled_hf.evaluation import evaluate_model

    recipe = tiny_recipe(data_dir, tmp_path / "bf16", method="ce", bf16=True, stage2_epochs=1)
    results = run_distillation(RefilledConfig(**recipe))
    assert "--bf16 true" in (tmp_path / "bf16" / "model" / "README.md").read_text()
    model = f"local-dir:{tmp_path / 'bf16' / 'model'}"

    def config(**precision):  # made just before its use: transformers sets Accelerate's state up as it is made
        return RefilledConfig(dataset=recipe["dataset"], output_dir=str(tmp_path / "e"), use_cpu=True, **precision)

    for split in ("test", "validation"):
        reported = results["final"][f"{split}_loss"]
        caplog.clear()
        under_bf16 = evaluate_model(model, config(bf16=True), split=split)[f"{split}_loss"]
        assert "evaluated in" not in caplog.text
        in_float32 = evaluate_model(model, config(), split=split)[f"{split}_loss"]
        assert under_bf16 == pytest.approx(reported, rel=1e-7), split
        assert in_float32 != pytest.approx(reported, rel=1e-5), split  # the precision did change the measure
        # the export records its precision: evaluating in another says so, naming the flag
        assert "was measured in bf16 by the run that trained it" in caplog.text and "Pass --bf16 true" in caplog.text


# ----------------------------------------------------------------- kill and resume


def _distill(recipe_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "refilled_hf.cli", "distill", "--config", str(recipe_path), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_in_each_stage_then_resume_gives_the_same_result(data_dir, teacher_dir, tmp_path):
    """Killed (SIGKILL, no clean-up) once stage 1 has written its second checkpoint, resumed,
    killed again once stage 2 has written its second, resumed again: the run ends with
    exactly the metrics and weights of an uninterrupted run with the same seed. (One run
    killed twice: each launch of the command line costs seconds of imports on 2 cores.)"""
    recipe = tiny_recipe(data_dir, tmp_path / "unused", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         stage1_epochs=6, stage2_epochs=6, stage2_milestones="4")  # fmt: skip
    recipe.pop("output_dir")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    reference_dir, run = tmp_path / "reference", tmp_path / "run"
    reference = _distill(path, "--output_dir", str(reference_dir))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    for stage, extra in (("stage1", ()), ("stage2", ("--resume_from_checkpoint", "true"))):
        proc = _distill(path, "--output_dir", str(run), *extra)
        marker = run / stage / "checkpoint-6" / "trainer_state.json"  # 3 steps per epoch: the end of epoch 2
        deadline = time.time() + 600
        while not marker.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed in {stage}"
        assert not (run / "results.json").exists()
        assert not (run / "stage2").exists() if stage == "stage1" else (run / "stage1" / "final").is_dir()

    resumed = _distill(path, "--output_dir", str(run), "--resume_from_checkpoint", "true")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    ours = json.loads((run / "results.json").read_text())
    ref = json.loads((reference_dir / "results.json").read_text())
    assert ours["final"]["test_top1"] == ref["final"]["test_top1"]
    assert ours["final"]["validation_loss"] == pytest.approx(ref["final"]["validation_loss"], rel=1e-5)
    assert ours["stage1"]["test_ncm_top1"] == ref["stage1"]["test_ncm_top1"]
    a, b = (
        load_file(str(run / "model" / "model.safetensors")),
        load_file(str(reference_dir / "model" / "model.safetensors")),
    )
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


class _Steps(TrainerCallback):
    """Counts the optimizer steps a trainer takes; stops the run the hard way once the
    checkpoint of ``crash_at`` is on disk."""

    def __init__(self, crash_at: int | None = None):
        self.crash_at, self.taken = crash_at, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.taken += 1

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.crash_at:
            raise KeyboardInterrupt(f"crash after checkpoint-{self.crash_at}")


def _trainer_script(out: Path, crash_at: int | None = None, **config) -> tuple[dict, dict[str, int]]:
    """A user's script: REFILLED's two stages with RefilledTrainer from one config; returns
    the student's final weights and the optimizer steps each stage took in this call."""
    torch.manual_seed(0)
    student = timm.create_model("cifar_wrn_16_1", num_classes=3)
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=4))
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(24)]
    args = RefilledConfig(output_dir=str(out), stage1_epochs=2, stage2_epochs=2, per_device_train_batch_size=8,
                          eval_strategy="no", use_cpu=True, disable_tqdm=True, **config)  # fmt: skip
    common = dict(args=args, num_classes=3, teacher=teacher, train_dataset=images)
    steps = {"stage1": _Steps(), "stage2": _Steps(crash_at)}
    RefilledTrainer(model=StudentModel(student), stage="stage1", centers_dataset=images, callbacks=[steps["stage1"]],
                    **common).train()  # fmt: skip
    stage2 = RefilledTrainer(model=StudentModel(student), stage="stage2", callbacks=[steps["stage2"]], **common)
    stage2.compute_teacher_centers(images)
    stage2.train()
    return {k: v.clone() for k, v in student.state_dict().items()}, {k: v.taken for k, v in steps.items()}


def test_a_trainer_script_rerun_with_resume_true_continues_each_stage_where_it_stopped(tmp_path):
    reference, taken = _trainer_script(tmp_path / "reference")
    assert taken == {"stage1": 6, "stage2": 6}  # 24 images, batch 8, 2 epochs
    with pytest.raises(KeyboardInterrupt):
        _trainer_script(tmp_path / "run", crash_at=3)  # in stage 2, after its first epoch
    assert last_complete_checkpoint(tmp_path / "run" / "stage2").name == "checkpoint-3"
    stage1_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "stage1").rglob("*")}
    resumed, taken = _trainer_script(tmp_path / "run", resume_from_checkpoint="true")
    # stage 1 had finished: it reloaded its last checkpoint and wrote nothing; stage 2 took its 3 last steps
    assert taken == {"stage1": 0, "stage2": 3}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "stage1").rglob("*")} == stage1_files
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    # a path in the config would apply to both stages' trainers: refused
    with pytest.raises(ValueError, match="would apply to every stage's trainer"):
        _trainer_script(tmp_path / "run", resume_from_checkpoint=str(tmp_path / "run" / "stage2" / "checkpoint-3"))
    # in a folder without checkpoints, 'true' starts from the start
    _, taken = _trainer_script(tmp_path / "new", resume_from_checkpoint="true")
    assert taken == {"stage1": 6, "stage2": 6}


def test_resume_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    stage = tmp_path / "stage1"
    for step, complete in ((3, True), (6, True), (9, False)):
        folder = stage / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (stage / "checkpoint-12").mkdir()
    (stage / "checkpoint-12" / "model.safetensors").write_bytes(b"x")
    (stage / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_complete_checkpoint(stage) == stage / "checkpoint-6"


class _DiskFullAtSave(TrainerCallback):
    """The disk fills up as the stage saves its second checkpoint: torch.save then fails
    with a message that names no cause (what it raised on a full tmpfs)."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 6:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


class _DivergesAtSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise DivergedError("stage ce: the loss went non-finite (a stand-in)")


@pytest.mark.slow
def test_a_full_disk_says_so_and_the_run_continues_from_its_last_checkpoint(data_dir, tmp_path, monkeypatch):
    import shutil as shutil_module

    from refilled_hf.rundir import DiskFullError, disk_full_error

    recipe = tiny_recipe(data_dir, tmp_path / "run", method="ce", stage2_epochs=3, stage2_milestones="2")
    reference = run_distillation(RefilledConfig(**{**recipe, "output_dir": str(tmp_path / "reference")}))
    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: real(path)._replace(free=5 * 2**20))
    with pytest.raises(DiskFullError, match=r"No space left on the disk .*unexpected pos .*5\.0 MiB free.*"
                                            r"--resume_from_checkpoint true"):  # fmt: skip
        run_distillation(RefilledConfig(**recipe), callbacks=[_DiskFullAtSave()])
    monkeypatch.setattr(shutil_module, "disk_usage", real)
    assert not (tmp_path / "run" / "results.json").exists()
    results = run_distillation(RefilledConfig(**{**recipe, "resume_from_checkpoint": "true"}))
    assert results["final"]["test_top1"] == reference["final"]["test_top1"]
    # an error that names the cause is one whatever the free space; another, with room, is itself
    assert disk_full_error(OSError(28, "No space left on device"), tmp_path) is not None
    assert disk_full_error(RuntimeError("a bug"), tmp_path) is None
    # refilled-hf's own errors (a diverged stage) keep their message on an almost full disk
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: real(path)._replace(free=5 * 2**20))
    with pytest.raises(DivergedError, match="went non-finite"):
        run_distillation(RefilledConfig(**{**recipe, "output_dir": str(tmp_path / "diverged")}),
                         callbacks=[_DivergesAtSave()])  # fmt: skip
    assert disk_full_error(OSError(28, "No space left on device"), tmp_path, guess=False) is not None


def test_export_is_atomic(tmp_path, monkeypatch):
    model = timm.create_model("cifar_wrn_16_1", num_classes=2)
    folder = export_model(model, tmp_path / "model", label_names=["a", "b"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    import refilled_hf.hub as hub

    def crash(model, directory, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(hub, "save_for_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), folder, label_names=["a", "b"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old export is untouched
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).num_classes == 2


def test_a_json_write_that_fails_keeps_the_file_it_replaces_and_leaves_no_other(tmp_path):
    from refilled_hf.hub import write_json_atomically

    path = tmp_path / "results.json"
    write_json_atomically(path, {"top1": 1.0})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomically(path, {"top1": 2.0, "bad": circular})
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # its half-written file went
    assert json.loads(path.read_text()) == {"top1": 1.0}


# ----------------------------------------------------------------- safe loading


def test_legacy_pt_checkpoints_load_with_weights_only(tmp_path):
    model = timm.create_model("cifar_wrn_16_1", num_classes=3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "teacher.pth")
    loaded = load_timm_model("cifar_wrn_16_1", checkpoint=tmp_path / "teacher.pth")
    assert loaded.num_classes == 3
    assert torch.equal(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"])

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_timm_model("cifar_wrn_16_1", checkpoint=tmp_path / "evil.pth")


def test_no_remote_code_is_ever_trusted():
    sources = "".join(p.read_text() for p in (REPO / "refilled_hf").rglob("*.py"))
    assert "trust_remote_code" not in sources


@pytest.mark.slow
def test_hub_token_is_never_written(data_dir, tmp_path, caplog):
    token = "hf_NEVER_WRITE_THIS_TOKEN"
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="ce", stage2_epochs=1, hub_token=token)
    with caplog.at_level("DEBUG"):
        run_distillation(RefilledConfig(**recipe))
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)
    for path in files:
        assert token.encode() not in path.read_bytes(), path
    assert token not in caplog.text


def test_transformers_mtime_warning_is_dropped_and_nothing_else():
    import logging

    import refilled_hf.trainer  # noqa: F401  (installs the filter)

    log = logging.getLogger("transformers.trainer_utils")

    def record(message: str) -> logging.LogRecord:
        return log.makeRecord(log.name, logging.WARNING, __file__, 1, message, None, None)

    assert not log.filter(record("mtime may not be reliable on this filesystem, falling back to numerical ordering"))
    assert log.filter(record("Deleting older checkpoint [run/ce/checkpoint-1] due to args.save_total_limit"))


def test_accelerator_detection_also_works_without_torch_accelerator(monkeypatch):
    """torch.accelerator is torch >= 2.6; pyproject admits torch 2.4: the check falls back."""
    from refilled_hf.config import _has_accelerator

    monkeypatch.delattr(torch, "accelerator", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert _has_accelerator() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _has_accelerator() is True
