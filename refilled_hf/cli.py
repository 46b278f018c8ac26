"""The ``refilled-hf`` command line."""

from __future__ import annotations

import argparse
import sys

import torch

from .losses import kd_loss, local_classifier_loss, relationship_loss_with_stats, rkd_loss


def losses_demo(args: argparse.Namespace) -> int:
    """Run every loss once on random tensors and print what it returns."""
    torch.manual_seed(args.seed)
    batch, classes = args.batch_size, args.num_classes
    student_emb = torch.randn(batch, 64, requires_grad=True)
    teacher_emb = torch.randn(batch, 128)
    labels = torch.randint(0, classes, (batch,))
    rows = []
    for variant in ("tuple", "triplet"):
        loss, stats = relationship_loss_with_stats(student_emb, teacher_emb, labels, variant=variant)
        loss.backward()
        rows.append(
            (
                f"stage 1 relationship ({variant})",
                loss.item(),
                f"{stats['tuples']} tuples, {stats['triplets']} triplets",
            )
        )
    centers = torch.nn.functional.normalize(torch.randn(classes, 128), dim=1)
    logits = torch.randn(batch, classes, requires_grad=True)
    rows.append(
        (
            "stage 2 local classifier",
            local_classifier_loss(logits, teacher_emb, centers, labels).item(),
            f"{labels.unique().numel()} local classes",
        )
    )
    rows.append(("KD (same label space)", kd_loss(logits, torch.randn(batch, classes)).item(), ""))
    rows.append(("RKD", rkd_loss(student_emb, teacher_emb).item(), ""))
    for name, value, note in rows:
        print(f"{name:32s} {value:12.4f}  {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refilled-hf",
        description="REFILLED knowledge distillation for timm models with the Hugging Face Trainer.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("losses-demo", help="run every loss once on random tensors")
    demo.add_argument("--batch-size", type=int, default=128)
    demo.add_argument("--num-classes", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=losses_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
