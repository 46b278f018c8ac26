"""What inductor's own dropout draws save: a student's training step eager, compiled by
inductor (dropout masks from inductor's generator, what ``--torch_compile`` does), and
compiled with ``fallback_random`` (eager's random kernels: the masks of the eager run, at
a cost), alternated in one process on whatever device is present. Also whether each
compiled step draws the eager step's masks (its first loss against eager's).

    python benchmarks/compile_random.py [--student cifar_wrn_16_2] [--batch 128]  # ~3 min on 2 CPU cores

Writes ``benchmarks/results/compile_random_<device>.json`` and ``.md`` (device named inside).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from throughput import _device_name, _write_files

ROOT = Path(__file__).resolve().parent

#: the variants timed: name -> torch.compile options (None: eager)
VARIANTS = {"eager": None, "inductor": {}, "inductor_fallback_random": {"fallback_random": True}}


def build(student: str, options: dict | None, mode: str, device: str):
    """The student (dropout as its default), an SGD optimizer and a step function, compiled as ``options`` say."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(student, num_classes=100).to(device).train()
    if options is not None:
        import torch._inductor

        model.compile(options={**torch._inductor.list_mode_options(mode), **options})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    graphs = options is not None and mode in ("reduce-overhead", "max-autotune")

    def step(images, labels):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def timed(step, images, labels, steps: int, device: str) -> float:
    """Images per second over ``steps`` training steps."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    if device == "cuda":
        torch.cuda.synchronize()
    return images.shape[0] * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--student", default="cifar_wrn_16_2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", default="default", help="inductor mode of both compiled variants")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the variants; the fastest is kept")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()

    import torch

    import refilled_hf  # noqa: F401  (registers the CIFAR wide ResNets)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = _device_name(device)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 100, (args.batch,), device=device)
    steps, first_loss, compile_s = {}, {}, {}
    for variant, options in VARIANTS.items():
        steps[variant] = build(args.student, options, args.mode, device)
        torch.manual_seed(1)  # the same generator state for every variant's first step
        start = time.perf_counter()
        first_loss[variant] = float(steps[variant](images, labels))
        for _ in range(2):  # warm-up (CUDA graphs record on the second and third calls)
            steps[variant](images, labels)
        compile_s[variant] = time.perf_counter() - start
        print(json.dumps({"variant": variant, "first_loss": first_loss[variant], "first_steps_s": compile_s[variant]}),
              flush=True)  # fmt: skip
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            rates[variant].append(timed(steps[variant], images, labels, args.steps, device))
    rows = []
    for variant in VARIANTS:
        same_loss = abs(first_loss[variant] - first_loss["eager"]) <= 1e-4 * abs(first_loss["eager"])
        row = {"variant": variant, "images_per_s": max(rates[variant]), "all_images_per_s": rates[variant],
               "first_loss": first_loss[variant], "first_steps_s": compile_s[variant],
               "eager_masks": same_loss}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "all_images_per_s"}), flush=True)
    own = rows[1]["images_per_s"]
    settings = {"student": args.student, "batch": args.batch, "mode": args.mode, "steps": args.steps,
                "rounds": args.rounds}  # fmt: skip
    result = {"device": name, "settings": settings, "rows": rows, "torch": torch.__version__}
    lines = [
        f"# Dropout under torch.compile: inductor's own draws against eager's kernels, on {name}",
        "",
        f"`{args.student}` (its default dropout), one training step (forward, cross-entropy, backward, SGD) at batch "
        f"{args.batch}, 32 px, fp32, inductor mode `{args.mode}`; {args.steps} steps per round, the variants "
        f"alternated {args.rounds} times in one process, the fastest round of each kept. *Eager masks*: the first "
        "step's loss equals the eager step's from the same generator state. The first 3 steps include the compile "
        "unless inductor's on-disk cache already held the graphs.",
        "",
        "| variant | img/s | vs inductor | eager masks | first 3 steps (s) |",
        "|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['images_per_s']:.0f} | {r['images_per_s'] / own:.2f}x | "
            f"{'yes' if r['eager_masks'] else 'no'} | {r['first_steps_s']:.1f} |"
        )
    _write_files(Path(args.out), f"compile_random_{device}", result, lines)


if __name__ == "__main__":
    main()
