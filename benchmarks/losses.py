"""Micro-benchmark of the stage-1 relationship loss (forward + backward).

Times ``relationship_loss`` (tuple and triplet) at batch 64..1024 with 128-d embeddings
and 100 classes (then 10 classes: more positives per anchor, many more triplets), against
two slow references: the explicit per-tuple loops of the tests (small batches only) and a
dense ``B x B x B`` mask (vectorized, cubic memory). The tuple loss is timed on both of its
paths: the mined pairs listed (the CPU's, which reads their number back to the host) and
fixed shapes (the accelerators', masked over every slot, no read-back). On a GPU
(``--device cuda``) calls are queued back to back and the device synchronized once per 20
calls, as a training loop runs them; the references are CPU-only. Prints a table and writes
``benchmarks/results/losses.json`` and ``losses.md`` (``losses_cuda.*`` on a GPU).

    python benchmarks/losses.py [--threads 2] [--batches 64 128 256 512 1024] [--classes 100 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from refilled_hf import losses
from refilled_hf.losses import DEFAULT_RELATIONSHIP_WEIGHTS, relationship_loss_with_stats

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
from reference_losses import relationship_reference  # noqa: E402


def median_ms(fn, *, min_runs: int = 5, budget_s: float = 2.0, warmup: int = 2, queued: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds (at least ``min_runs`` runs, then more
    until ``budget_s`` is spent). ``queued > 1`` (a GPU): each run is that many calls back
    to back, the device synchronized at its ends, divided by the calls."""
    sync = torch.cuda.synchronize if queued > 1 else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        for _ in range(queued):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / queued)
    return statistics.median(times) * 1000


def fixed_shapes(fixed: bool):
    """Force the tuple loss's path (fixed shapes or listed pairs) on any device."""
    losses._fixed_shapes = lambda device: fixed


def dense_reference(s, t, labels, variant, tau=4.0, margin=0.2):
    """The obvious vectorized version: a [B, B, B] semi-hard mask (cubic memory)."""
    zs, zt = F.normalize(s, dim=1), F.normalize(t, dim=1)
    ds, dt = torch.cdist(zs, zs), torch.cdist(zt, zt)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool)
    dsd = ds.detach()
    mask = (
        pos[:, :, None]
        & ~same[:, None, :]
        & (dsd[:, None, :] > dsd[:, :, None])
        & (dsd[:, None, :] < dsd[:, :, None] + margin)
    )
    weight = DEFAULT_RELATIONSHIP_WEIGHTS[variant]
    if variant == "triplet":
        xs = (ds[:, None, :] - ds[:, :, None]) / tau
        xt = (dt[:, None, :] - dt[:, :, None]) / tau
        kl = F.logsigmoid(xt) - F.logsigmoid(xs) + torch.sigmoid(-xt) * (xs - xt)
        return weight * kl[mask].mean()
    tuples = mask.any(2)
    big = -1e9
    ls = torch.cat([-ds[:, :, None], (-ds[:, None, :]).expand_as(mask).masked_fill(~mask, big)], 2) / tau
    lt = torch.cat([-dt[:, :, None], (-dt[:, None, :]).expand_as(mask).masked_fill(~mask, big)], 2) / tau
    lps, lpt = F.log_softmax(ls, 2), F.log_softmax(lt, 2)
    kl = (lpt.exp() * (lpt - lps)).sum(2)
    return weight * kl[tuples].mean()


def measure(s, t, y, variant: str, args, reference: bool = True) -> dict:
    """Time one (batch, variant) cell: ours, and the references where affordable."""
    batch = s.shape[0]

    def ours():
        loss, _ = relationship_loss_with_stats(s, t, y, variant=variant)
        loss.backward()

    # Both variants mine the same tuples; the tuple loss counts them at O(B^2) cost.
    _, stats = relationship_loss_with_stats(s.detach(), t, y, variant="tuple")
    row = {"batch": batch, "variant": variant, **{k: int(v) for k, v in stats.items()}}
    if variant == "triplet" and row["triplets"] > args.max_triplets:
        return row  # too many triplets to time in reasonable memory and time
    queued = 20 if s.device.type == "cuda" else 1
    if variant == "tuple":
        fixed_shapes(True)
        row["fixed_ms"] = median_ms(ours, queued=queued)
    fixed_shapes(False)
    row["ms"] = median_ms(ours, queued=queued)
    if not reference or s.device.type != "cpu":
        return row
    if batch <= args.dense_max_batch:
        row["dense_ms"] = median_ms(lambda: dense_reference(s, t, y, variant).backward(), budget_s=1)
    if batch <= args.loop_max_batch:
        weight, labels = DEFAULT_RELATIONSHIP_WEIGHTS[variant], y.tolist()
        row["loop_ms"] = median_ms(
            lambda: relationship_reference(s, t, labels, variant, 4.0, 0.2, weight).backward(),
            min_runs=1,
            warmup=0,
            budget_s=0,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 10])
    parser.add_argument("--max-triplets", type=int, default=20_000_000, help="skip the triplet variant above this")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--loop-max-batch", type=int, default=128, help="largest batch for the loop reference")
    parser.add_argument("--dense-max-batch", type=int, default=256, help="largest batch for the dense mask")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for classes, batch in [(c, b) for c in args.classes for b in args.batches]:
        s = torch.randn(batch, args.dim).to(args.device).requires_grad_(True)
        t = torch.randn(batch, args.dim).to(args.device)
        y = torch.randint(0, classes, (batch,)).to(args.device)
        for variant in ("tuple", "triplet"):
            row = measure(s, t, y, variant, args, reference=classes == args.classes[0])
            row["classes"] = classes
            rows.append(row)
            print(
                f"C={classes:4d} B={batch:5d} {variant:8s} {row.get('ms', float('nan')):9.2f} ms  "
                f"fixed={row.get('fixed_ms', float('nan')):9.2f} ms  tuples={row['tuples']:7d} "
                f"triplets={row['triplets']:9d}  dense={row.get('dense_ms', float('nan')):9.2f} ms  "
                f"loop={row.get('loop_ms', float('nan')):10.1f} ms",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({args.threads} threads)"
    meta = {
        "device": device,
        "max_triplets": args.max_triplets,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "classes": args.classes,
        "dim": args.dim,
        "timing": "median wall time of forward+backward"
        + (", 20 calls queued per synchronization" if args.device == "cuda" else ""),
    }
    stem = "losses" if args.device == "cpu" else f"losses_{args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# relationship_loss: forward + backward on {device}",
        "",
        f"{args.dim}-d random embeddings (random embeddings put about half of each "
        f"anchor's negatives in the semi-hard window: a worst case), torch {torch.__version__}; median wall time "
        f"of {meta['timing'].removeprefix('median wall time of ')}. `listed`: the mined pairs listed (the CPU's "
        "path; the triplet variant always); `fixed shapes`: the tuple loss over every slot, masked, nothing read "
        "back (the accelerators' path); `dense`: a [B, B, B] mask; `loop`: the tests' explicit per-tuple reference "
        f"(float64). Triplet cells above {args.max_triplets:,} triplets are not timed.",
        "",
        "| classes | batch | variant | tuples | triplets | listed (ms) | fixed shapes (ms) | dense mask (ms) "
        "| loops (ms) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("ms", "fixed_ms", "dense_ms")]
        loop = f"{r['loop_ms']:.0f}" if "loop_ms" in r else "-"
        lines.append(
            f"| {r['classes']} | {r['batch']} | {r['variant']} | {r['tuples']} | {r['triplets']} | "
            + " | ".join(cells)
            + f" | {loop} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
