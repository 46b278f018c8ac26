"""Plot the step-time ratios of ``benchmarks/results/step_time.json`` (written by
``step_time.py``) to ``step_time_ratios.png``.

    python benchmarks/plot_step_time.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads((RESULTS / "step_time.json").read_text())["rows"]
    students = sorted({r["student"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(students)
    for i, student in enumerate(students):
        values = [next(r["ratio_to_kd"] for r in rows if r["student"] == student and r["method"] == m) for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], values, width=width, label=student)
    ax.axhline(1.05, color="red", lw=0.8, ls="--", label="target 1.05x")
    ax.set_xticks([j + width * (len(students) - 1) / 2 for j in range(len(methods))], methods, rotation=20)
    ax.set_ylabel("step time / KD step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "step_time_ratios.png", dpi=110)
    print(f"wrote {RESULTS / 'step_time_ratios.png'}")


if __name__ == "__main__":
    main()
