"""Stage 2's distillation options: `--distill_weight_schedule` (lambda over stage 2) and
`--distill_images`, checked against the formula and a loss written out by hand."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from reference_losses import local_classifier_reference

import refilled_hf  # noqa: F401  (registers cifar_wrn_*)
from refilled_hf.backbone import FrozenTeacher, StudentModel
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.trainer import RefilledTrainer

LAMBDA = 8.0


def _stage2_trainer(tmp_path, schedule: str, **overrides) -> RefilledTrainer:
    torch.manual_seed(0)
    student = StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=3, drop_rate=0.0))
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=2), student.model.pretrained_cfg)
    args = RefilledConfig(teacher="x", output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no",
                          distill_weight=LAMBDA, distill_weight_schedule=schedule, stage2_epochs=2.0,
                          **overrides)  # fmt: skip
    centers = F.normalize(torch.randn(3, 64), dim=1)
    trainer = RefilledTrainer(model=student, args=args, stage="stage2", num_classes=3, teacher=teacher,
                              class_centers=centers)  # fmt: skip
    trainer._train_batches = 5  # 5 steps per epoch: 10 steps in the stage
    return trainer


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", lambda t: LAMBDA),
        ("linear", lambda t: LAMBDA * (1 - t)),
        ("cosine", lambda t: LAMBDA * 0.5 * (1 + math.cos(math.pi * t))),
    ],
)
def test_lambda_follows_the_schedule_over_the_whole_stage(tmp_path, schedule, expected):
    """The stage's 10 optimizer steps train with global_step 0 to 9: lambda at the first, 0 at
    the last (the option's promise: stage 2 ends on cross-entropy alone)."""
    trainer = _stage2_trainer(tmp_path, schedule)
    steps = (0, 3, 4.5, 9, 12)  # 12: past the end (max_steps beyond the stage) stays at the end value
    seen = []
    for step in steps:
        trainer.state.global_step = step
        seen.append(trainer.distill_weight())
    assert seen == pytest.approx([expected(min(s, 9) / 9) for s in steps])
    if schedule != "constant":
        assert seen[0] == LAMBDA and seen[2] == pytest.approx(LAMBDA / 2) and seen[3] == seen[4] == 0.0


def test_a_scheduled_lambda_is_0_on_the_stages_last_step_in_training(tmp_path):
    """In a real stage 2 (2 epochs of 3 batches, accumulated in pairs: 4 optimizer steps) the
    loss of the last step holds no distillation term (it used to be lambda / 4 there)."""
    weights = []
    trainer = _stage2_trainer(tmp_path, "linear", gradient_accumulation_steps=2, per_device_train_batch_size=4,
                              logging_steps=1)  # fmt: skip
    trainer._train_batches = None
    g = torch.Generator().manual_seed(0)
    trainer.train_dataset = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 3} for i in range(12)]
    compute = trainer.distill_weight

    def recorded() -> float:  # the lambda each compute_loss call gets, with the step it was asked at
        weights.append((trainer.state.global_step, compute()))
        return weights[-1][1]

    trainer.distill_weight = recorded
    trainer.train()
    # each epoch: batches 1-2 make a step, batch 3 the epoch's last (its accumulation cut short)
    assert [step for step, _ in weights] == [0, 0, 1, 2, 2, 3]
    assert [w for _, w in weights] == pytest.approx([LAMBDA, LAMBDA, LAMBDA * 2 / 3, LAMBDA / 3, LAMBDA / 3, 0.0])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["lambda"] for entry in logged] == pytest.approx([LAMBDA, LAMBDA * 2 / 3, LAMBDA / 3, 0.0])
    assert logged[-1]["distill"] == 0.0 and logged[-1]["loss"] == pytest.approx(logged[-1]["ce"], rel=1e-6)


def test_stage2_loss_uses_the_scheduled_lambda(tmp_path):
    trainer = _stage2_trainer(tmp_path, "linear")
    trainer.state.global_step = 6  # the 7th of 10 steps: lambda = 8 * (1 - 6 / 9)
    student = trainer.model
    student.eval()
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(6, 3, 32, 32, generator=g), "labels": torch.tensor([0, 1, 2, 0, 1, 1])}
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        logits = student(pixel_values=batch["pixel_values"])["logits"]
        teacher_emb = trainer.teacher(batch["pixel_values"])[0]
    labels = batch["labels"].tolist()
    expected = F.cross_entropy(logits, batch["labels"]) + local_classifier_reference(
        logits, teacher_emb, trainer.class_centers, labels, tau=2.0, weight=LAMBDA / 3
    )
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert trainer._components == {}  # eval mode: nothing logged


def test_unknown_schedule_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="distill_weight_schedule.*constant, linear, cosine"):
        RefilledConfig(teacher="x", output_dir=str(tmp_path), distill_weight_schedule="exp")


def test_distill_images_teacher_correct_distils_only_where_the_teacher_is_right(tmp_path):
    trainer = _stage2_trainer(tmp_path, "constant", distill_images="teacher_correct")
    student = trainer.model
    student.eval()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(12, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 2] * 4)
    with torch.no_grad():
        logits = student(pixel_values=images)["logits"]
        teacher_emb = trainer.teacher(images)[0]
    right = (teacher_emb @ trainer.class_centers.T).argmax(1) == labels
    assert 0 < int(right.sum()) < 12  # the test needs both kinds of image
    loss = trainer.compute_loss(student, {"pixel_values": images, "labels": labels})
    kept = local_classifier_reference(logits, teacher_emb, trainer.class_centers, labels.tolist(), tau=2.0,
                                      weight=LAMBDA, inst=right.double())  # fmt: skip
    everything = local_classifier_reference(logits, teacher_emb, trainer.class_centers, labels.tolist(), tau=2.0,
                                            weight=LAMBDA)  # fmt: skip
    ce = F.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(float(ce + kept), rel=1e-5)
    assert abs(float(everything - kept)) > 1e-3  # the option changed the loss
    student.train()  # in training, the teacher's running local top-1 is logged
    trainer.compute_loss(student, {"pixel_values": images, "labels": labels})
    assert float(trainer._components["teacher_local_top1"]) == pytest.approx(100 * float(right.double().mean()))


def test_unknown_distill_images_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="distill_images.*all, teacher_correct"):
        RefilledConfig(teacher="x", output_dir=str(tmp_path), distill_images="wrong")
