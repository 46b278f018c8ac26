"""What DDP's search for unused parameters costs a training step, and what refilled-hf's
one-off check that replaces it costs.

transformers has DDP look for unused parameters at every step (``find_unused_parameters=True``)
for any model that is not its own: after each forward pass DDP walks the autograd graph from
the outputs. refilled-hf finds out once per stage, with a pass on the meta device
(``StudentModel.parameters_without_gradient``), and turns the search off where every
parameter is used. This script times, in 2 gloo processes on the CPU, a training step
(forward, cross-entropy, backward: where DDP does its work) of the same model wrapped both
ways, alternating between the two in rounds so that a change in the machine's load hits
both; and the meta-device check of each model.

``host_probe`` (a model with almost no compute, ``benchmarks/host_probe.py``) shows the
host's own work, which a launch-bound GPU step pays in full; the wide ResNets show what it
weighs against a CPU's compute.

    python benchmarks/ddp_unused.py [--rounds 6] [--steps 12]

Writes ``benchmarks/results/ddp_unused_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import host_probe  # noqa: F401  (registers host_probe with timm)
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from throughput import _processor_name

import refilled_hf  # noqa: F401  (registers cifar_wrn_*)
from refilled_hf.backbone import StudentModel

ROOT = Path(__file__).resolve().parent
PROCESSES = 2
#: (model, images per process)
CASES = (("host_probe", 16), ("cifar_wrn_16_1", 8), ("cifar_wrn_16_1", 64), ("cifar_wrn_16_2", 64))


def step_ms(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) * 1e3


def measure(name: str, batch: int, rounds: int, steps: int) -> dict:
    """Median step time with and without the search (same weights, same batch), and the
    meta-device check's time and answer."""
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=10)
    wrapped = {}
    for search in (True, False):
        model = timm.create_model(name, num_classes=10)
        model.load_state_dict(base.state_dict())
        wrapped[search] = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=search)
    size = base.pretrained_cfg["input_size"]
    generator = torch.Generator().manual_seed(dist.get_rank())
    images = torch.randn(batch, *size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for search, model in wrapped.items():
            for step in range(steps):
                ms = step_ms(model, images, labels)
                if step >= 2:  # the first steps of each round warm the caches up
                    times[search].append(ms)
    student = StudentModel(base, input_size=size)
    start = time.perf_counter()
    unused = []
    for stage1 in (True, False):  # the stages' passes: embeddings only, then with the classifier
        student.set_embeddings_only(stage1)
        unused += student.parameters_without_gradient() or []
    check_s = time.perf_counter() - start
    with_search, without = statistics.median(times[True]), statistics.median(times[False])
    return {
        "model": name,
        "batch_per_process": batch,
        "step_ms_searching": round(with_search, 3),
        "step_ms_not_searching": round(without, 3),
        "added_ms": round(with_search - without, 3),
        "ratio": round(with_search / without, 3),
        "steps_timed_each": len(times[True]),
        "check_s": round(check_s, 3),
        "unused_found": sorted(set(unused)),
    }


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = [measure(name, batch, args.rounds, args.steps) for name, batch in CASES]
    if dist.get_rank() == 0:
        write(rows, args)
    dist.barrier()
    dist.destroy_process_group()


def write(rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = f"CPU ({_processor_name()}, {PROCESSES} gloo processes, 1 thread each)"
    record = {"device": device, "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps, "rows": rows}
    (out / "ddp_unused_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# DDP's per-step search for unused parameters, on {device}",
        "",
        f"Forward, cross-entropy and backward of one model wrapped with `find_unused_parameters=True` "
        f"(transformers' default for a model not its own) and `False` (refilled-hf's where every "
        f"parameter is used), same weights and batch, alternating over {args.rounds} rounds of "
        f"{args.steps} steps (median of the timed steps); torch {torch.__version__}. The check is refilled-hf's "
        "meta-device pass (both stages' forward and backward), once per stage.",
        "",
        "| model | images / process | searching (ms/step) | not searching (ms/step) | added (ms/step) | ratio "
        "| check (s) | unused found |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_per_process']} | {r['step_ms_searching']:.2f} | "
            f"{r['step_ms_not_searching']:.2f} | {r['added_ms']:+.2f} | {r['ratio']:.3f} | {r['check_s']:.2f} | "
            f"{', '.join(r['unused_found']) if r['unused_found'] else 'none'} |"
        )
    (out / "ddp_unused_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12, help="steps per round and setting (the first 2 untimed)")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        worker(args)
        return
    # started by hand: start the processes (the CPU's, whatever GPUs there are)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={PROCESSES}", f"--master_port={port}"]
    sys.exit(subprocess.run([*launcher, __file__, *sys.argv[1:]], env=env).returncode)


if __name__ == "__main__":
    main()
