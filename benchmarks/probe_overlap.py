"""How much does a teacher probe flatter the teacher when the student's validation images
include images the teacher trained on?

The benchmarks' teachers share classes with some students: on CIFAR-100 (``cifar100.py``:
WRN-16-2 on classes 0-49, 200 training images per class) the partial-overlap students share
10-30 classes with it; on CIFAR-10 (``accuracy.py``, budget ``quick``: WRN-16-2 on 800
images per class) the ``overlap`` teacher shares 3 classes and the ``same`` teacher all 5.
A student's validation split is carved from the same training split with the student's
seed, so it holds images such a teacher trained on. ``probe-teacher`` leaves them out, by
drawing the teacher's training rows again from the record in its ``config.json``. This
script measures the probe both ways on the benchmarks' settings and seeds: with a copy of
the teacher holding its record (``clean``), and with a copy without one (``all``: what the
probe measured before exports carried a record).

    python benchmarks/probe_overlap.py [--cache-c100 DIR] [--cache-c10 DIR]

Writes ``benchmarks/results/probe_overlap.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

import accuracy
import cifar100

ROOT = Path(__file__).resolve().parent
#: (data set, setting, the student's classes, images per class, seeds): the benchmarks'
#: shared-class settings with the sizes and seeds they ran, and CIFAR-100's disjoint
#: cross-task split as the control (nothing to leave out)
RUNS = (
    ("cifar100", "overlap", cifar100.SETTINGS["overlap"], 50, (0, 1, 2)),
    ("cifar100", "overlap30", cifar100.SETTINGS["overlap30"], 50, (3, 4, 5)),
    ("cifar100", "overlap40", cifar100.SETTINGS["overlap40"], 50, (0, 1, 2)),
    ("cifar100", "cross", cifar100.SETTINGS["cross"], 50, (0, 1, 2)),
    ("cifar10", "same", accuracy.STUDENT_CLASSES, 50, (0, 1, 2)),
    ("cifar10", "overlap", accuracy.STUDENT_CLASSES, 50, (0, 1, 2)),
    ("cifar10", "same", accuracy.STUDENT_CLASSES, 500, (0,)),
    ("cifar10", "overlap", accuracy.STUDENT_CLASSES, 500, (0,)),
)


def copy_with_record(teacher: Path, folder: Path, record: dict | None) -> Path:
    """A copy of ``teacher`` whose config.json holds ``record`` as its training-data
    record (None: no record)."""
    from refilled_hf.hub import TRAINING_DATA_KEY

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(teacher, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop(TRAINING_DATA_KEY, None)
    if record is not None:
        config[TRAINING_DATA_KEY] = record
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def teachers(data: str, setting: str, caches: dict[str, Path]) -> tuple[Path, Path, dict]:
    """The benchmark's teacher for ``setting`` (trained if not cached), as two copies (with
    and without its record), and the common fields of the benchmark's student runs.

    The record is drawn again from the teacher's recipe, so that a teacher cached before
    exports carried a record is measured the same way (and one that carries one must agree).
    """
    from refilled_hf.data import load_classification_data

    if data == "cifar100":
        budget, common = cifar100.BUDGETS["cpu"], cifar100.COMMON
        trained, classes = cifar100.teacher(caches[data], budget), cifar100.TEACHER_CLASSES
    else:
        budget, common = accuracy.BUDGETS["quick"], accuracy.COMMON
        trained, classes = accuracy.teacher_dir(caches[data], setting, budget), accuracy.TEACHERS[setting]
    selection = load_classification_data(common["dataset"], classes=classes, shots_per_class=budget["teacher_shots"],
                                         validation_fraction=common["validation_fraction"], seed=0,
                                         splits=())  # fmt: skip
    record = selection.selection_record()
    recorded = json.loads((trained / "config.json").read_text()).get("refilled_hf_training_data")
    if recorded is not None and recorded["row_digests"] != record["row_digests"]:
        raise SystemExit(f"{trained}'s record does not match the benchmark teacher's recipe")
    base = caches[data] / f"probe-overlap-{setting if data == 'cifar10' else 'teacher'}"
    return (copy_with_record(trained, base / "with-record", record),
            copy_with_record(trained, base / "without-record", None), common)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-c100", type=Path,
                        default=Path(os.path.expanduser("~/.cache/refilled-hf-bench-c100")))  # fmt: skip
    parser.add_argument("--cache-c10", type=Path, default=Path(os.path.expanduser("~/.cache/refilled-hf-bench")))
    args = parser.parse_args()
    caches = {"cifar100": args.cache_c100, "cifar10": args.cache_c10}

    from refilled_hf.config import RefilledConfig
    from refilled_hf.probe import probe_teacher

    rows = []
    for data, setting, classes, shots, seeds in RUNS:
        with_record, without_record, common = teachers(data, setting, caches)
        for seed in seeds:
            row = {"data": data, "setting": setting, "classes": classes, "shots": shots, "seed": seed}
            for name, model in (("clean", with_record), ("all", without_record)):
                done = caches[data] / "probes-overlap" / f"{setting}-n{shots}-s{seed}-{name}.json"
                if not done.is_file():  # cached: a rerun measures only what is missing
                    config = RefilledConfig(**{**common, "teacher": f"local-dir:{model}",
                                               "student": "cifar_wrn_16_1", "classes": classes,
                                               "shots_per_class": shots, "seed": seed,
                                               "output_dir": str(done.parent)})  # fmt: skip
                    done.parent.mkdir(parents=True, exist_ok=True)
                    done.write_text(json.dumps(probe_teacher(config)))
                result = json.loads(done.read_text())
                row[f"{name}_probe"] = result["probe_ncm_top1"]
                row[f"{name}_images"] = result["validation_images"]
            row["left_out"] = row["all_images"] - row["clean_images"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    write(rows)


def write(rows: list[dict]) -> None:
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "probe_overlap.json").write_text(json.dumps({"rows": rows}, indent=2))
    c100, c10 = cifar100.BUDGETS["cpu"], accuracy.BUDGETS["quick"]
    lines = [
        "# Teacher probe with and without the validation images the teacher trained on",
        "",
        f"CIFAR-100: teacher WRN-16-2 on classes 0-49 ({c100['teacher_shots']} images/class, "
        f"{c100['teacher_epochs']} epochs; `cifar100.py`), students' classes as there, validation 50 images per "
        f"class. CIFAR-10: teachers WRN-16-2 on classes 3-7 (`overlap`) or 5-9 (`same`; {c10['teacher_shots']} "
        f"images/class, {c10['teacher_epochs']} epochs; `accuracy.py --budget quick`), student classes 5-9, "
        f"validation 100 images per class. Centres from the student's training images; the "
        "validation split is carved from the training split with the student's seed. `all`: NCM top-1 % on every "
        "validation image (the probe before it read the teacher's record); `clean`: without the images the "
        "teacher trained on (what `probe-teacher` reports now).",
        "",
        "| data | setting | classes | images/class | seed | validation images | teacher trained on | probe, all % | "
        "probe, clean % | difference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = r["all_probe"] - r["clean_probe"]
        lines.append(f"| {r['data']} | {r['setting']} | {r['classes']} | {r['shots']} | {r['seed']} | "
                     f"{r['all_images']} | {r['left_out']} | {r['all_probe']:.2f} | {r['clean_probe']:.2f} | "
                     f"{gap:+.2f} |")  # fmt: skip
    lines += ["", "| data | setting | images/class | probe, all % (mean ± std) | probe, clean % | difference |",
              "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for data, setting, _, shots, seeds in RUNS:
        if len(seeds) < 2:
            continue
        group = [r for r in rows if (r["data"], r["setting"], r["shots"]) == (data, setting, shots)]
        cells = []
        for values in ([r["all_probe"] for r in group], [r["clean_probe"] for r in group],
                       [r["all_probe"] - r["clean_probe"] for r in group]):  # fmt: skip
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        lines.append(f"| {data} | {setting} | {shots} | " + " | ".join(cells) + " |")
    (out / "probe_overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
