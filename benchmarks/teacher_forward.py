"""The frozen teacher's forward under ``torch.no_grad()`` (before) and
``torch.inference_mode()`` (``FrozenTeacher.forward`` now), alternated in one process, on
whatever device is present. At small batches the forward is host-bound (as a GPU step at
batch 128 is), so the difference is the autograd bookkeeping that inference mode skips.

    python benchmarks/teacher_forward.py [--teacher cifar_wrn_40_2] [--batches 2 16]  # ~1 min on 2 CPU cores

Writes ``benchmarks/results/teacher_forward_<device>.json`` and ``.md`` (device named inside).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from throughput import _device_name, _write_files

ROOT = Path(__file__).resolve().parent


def ms_per_forward(teacher, images, grad_mode, device: str, calls: int) -> float:
    """Mean ms of ``calls`` forwards under ``grad_mode``, after 3 warm-up calls."""
    import torch

    def run():
        with grad_mode():
            return teacher.model.forward(teacher.adapt(images))

    for _ in range(3):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--teacher", default="cifar_wrn_40_2")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two modes; the fastest is kept")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()

    import timm
    import torch

    import refilled_hf  # noqa: F401  (registers the CIFAR wide ResNets)
    from refilled_hf.backbone import FrozenTeacher

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = _device_name(device)
    teacher = FrozenTeacher(timm.create_model(args.teacher, num_classes=100)).to(device)
    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, 32, 32, device=device)
        times: dict[str, list[float]] = {"no_grad": [], "inference_mode": []}
        for _ in range(args.rounds):
            for mode, grad_mode in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
                times[mode].append(ms_per_forward(teacher, images, grad_mode, device, args.calls))
        row = {"batch": batch, "no_grad_ms": min(times["no_grad"]), "inference_mode_ms": min(times["inference_mode"]),
               "all_ms": times}  # fmt: skip
        row["speedup"] = row["no_grad_ms"] / row["inference_mode_ms"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "all_ms"}), flush=True)
    stem = f"teacher_forward_{device}"
    settings = {"teacher": args.teacher, "calls": args.calls, "rounds": args.rounds}
    result = {"device": name, "settings": settings, "rows": rows, "torch": torch.__version__}
    lines = [
        f"# Teacher forward: no_grad against inference_mode on {name}",
        "",
        f"`{args.teacher}`, fp32, 32 px; mean of {args.calls} forwards, the two modes alternated {args.rounds} "
        "times in one process, the fastest round of each kept.",
        "",
        "| batch | no_grad (ms) | inference_mode (ms) | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['no_grad_ms']:.2f} | {r['inference_mode_ms']:.2f} | {r['speedup']:.3f}x |")
    _write_files(Path(args.out), stem, result, lines)


if __name__ == "__main__":
    main()
