"""REFILLED on real CIFAR-100, reduced to what a 2-core CPU can run: when does it help?

The paper's class splits with one teacher (WRN-16-2 trained here on classes 0-49):

* ``cross``: student on classes 50-99 (disjoint, the paper's cross-task split);
* ``overlap``: student on classes 20-69 (preset ``cifar100-shift-20``: 30 shared classes);
* ``cross10``: student on classes 50-59 with all their training images (450 per class):
  the full-data cross-task regime, at a size this CPU can run.

KD cannot run in either (the label spaces differ). Students: WRN-16-1, middle-shot
(50 or 100 training images per class), validation = 50 images per class carved from the
rest of the training split, test = the 5,000 official test images of the student's classes.

Methods, each with the same optimizer and stage-2 schedule: ``ce`` (student alone, as long
as stage 2: the paper's convention), ``ce-equal`` (student alone on as many images as
REFILLED's two stages), ``rkd``, ``refilled`` (lambda 10, the library's default until
``refilled-lambda1-noclip`` below made lambda 1 the default; every run pins its lambda) and
``refilled-linear`` (``--distill_weight_schedule linear``: lambda decays to 0 over stage 2);
``refilled-short1-noclip`` splits the same two-stage budget 1:3 (5 + 15 epochs) instead of 1:1,
``refilled-nostage1-noclip`` spends all of it on stage 2 (0 + 20: cross-entropy plus the
distillation term, against ``ce-equal``'s cross-entropy alone), ``refilled-lambda1-noclip``
uses lambda 1 instead of 10, ``refilled-correct-noclip`` distils only the images whose
teacher local classifier picks the true label (``--distill_images teacher_correct``).
``refilled-hf probe-teacher`` (the teacher's nearest-class-mean accuracy on the student's
validation split) for every setting.

    python benchmarks/cifar100.py [--budget cpu|smoke|cross100|cross10|unseen|reverse|timm_student|gpu|gpu_batch]
        [--cache ~/.cache/refilled-hf-bench-c100]
    python benchmarks/cifar100.py --report-only

The ``-noclip`` variants run without gradient clipping (``--max_grad_norm 0``, the authors'
protocol and the library's default since this benchmark); the others clip at 1
(transformers' default, the library's before).
Also REFILLED at batch 128 and 512 (``refilled-b128``, ``refilled-b512``: learning rate
scaled linearly, 5 % warm-up at 512; ``refilled-b512-sqrt``: square-root scaling, 10 % warm-up)
on the cross split: does a large batch keep accuracy?

Runs are cached (never repeated) and go in priority order (``BUDGETS["cpu"]["runs"]``),
so an interrupted run still answers the main questions. Writes
``benchmarks/results/cifar100.{json,md}`` and ``cifar100_gain.png`` (other budgets than ``cpu``:
``cifar100_<budget>.*``). ``--budget gpu`` is the converging 60 + 60-epoch run of the cross split for
a lent GPU (see ``BUDGETS``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from accuracy import COMMON as ACCURACY_COMMON
from accuracy import _mean_std, _read_jsonl, _run

ROOT = Path(__file__).resolve().parent
CIFAR100 = ROOT.parent.parent / "shared" / "data" / "cifar100"
TEACHER_CLASSES = "cifar100-first-half"
#: ``cross10``: the cross-task split's first 10 classes with all their training images (450
#: per class after the validation carve): the data-rich regime, where the student alone
#: may beat what the teacher knows about its classes
#: ``overlap40``: a split no default was tuned on (classes 40-89, 10 shared with the teacher)
#: ``overlap30``: another (classes 30-79, 20 shared), run only by the ``unseen`` budget, with seeds no
#: other run used
#: ``reverse``: the cross-task split the other way round (teacher on 50-99, student on 0-49), run only by the
#: ``reverse`` budget, with its own teacher and seeds no other run used
SETTINGS = {
    "cross": "cifar100-second-half",
    "overlap": "cifar100-shift-20",
    "cross10": "50-59",
    "overlap40": "cifar100-shift-40",
    "overlap30": "cifar100-shift-30",
    "reverse": "cifar100-first-half",
}
#: what the report says of each setting's classes, beside their ids
SETTING_NOTES = {
    "cross": "disjoint from the teacher's",
    "overlap": "30 shared",
    "cross10": "all their images, 450/class",
    "overlap40": "10 shared",
    "overlap30": "20 shared",
    "reverse": "disjoint from the teacher's 50-99",
}
#: the students of every budget but ``timm_student``
DEFAULT_STUDENT = "cifar_wrn_16_1"
METHODS = ("ce", "ce-equal", "rkd", "refilled", "refilled-linear")
#: the same without gradient clipping (--max_grad_norm 0: the authors' protocol, the library's default)
NO_CLIP = ("ce-noclip", "ce-equal-noclip", "refilled-noclip", "refilled-linear-noclip", "rkd-noclip")
#: REFILLED at batch 128 and 512 (learning rate scaled linearly from 0.05 at 64, 5 % warm-up at
#: 512), without clipping, as the large-batch recipes
LARGE_BATCH = ("refilled-b128", "refilled-b512", "refilled-b512-sqrt")
#: REFILLED with the same two-stage budget split 1:3 instead of 1:1 (stage 1 a quarter of
#: it): does a shorter relationship stage help where the student has many images?
SHORT_STAGE1 = ("refilled-short1-noclip",)
#: REFILLED's stage 2 alone for the whole budget (CE + lambda x KL, no stage 1): what the
#: distillation term alone does against ce-equal
NO_STAGE1 = ("refilled-nostage1-noclip",)
#: REFILLED with lambda 1 instead of the default 10 (a weaker pull towards the teacher's
#: local classifier in stage 2)
LAMBDA1 = ("refilled-lambda1-noclip",)
#: REFILLED distilling only the images whose teacher local classifier picks the true label
#: (``--distill_images teacher_correct``): the others train on cross-entropy alone
CORRECT_ONLY = ("refilled-correct-noclip",)
#: the library's default REFILLED: lambda chosen on validation between 1 and 10 (ties: 1, the first listed),
#: derived in the report from the lambda-1 and lambda-10 runs of the same seed, the search's two candidates
#: (tests/test_distill_weight_search.py checks that a candidate's weights equal the run with that lambda
#: alone; most cached runs predate a reordering of stage 2's float sums, so a fresh run differs by rounding)
SEARCH = "refilled-search-noclip"
DEFAULT_REFILLED = SEARCH
#: the library's lambda and clipping defaults run for real (neither pinned: lambda chosen on validation by the
#: run itself, no clipping), under this benchmark's protocol (batch 64, lr 0.05, its epochs)
LIBRARY_DEFAULT = ("refilled-default",)
#: the library's defaults in full since the student-alone candidate (``--student_alone_candidate``): the lambda
#: search of ``refilled-default`` plus the student trained alone for both stages' epochs, exported when better on
#: validation (``refilled-default`` runs pin it off: they ran before it existed, and their cache keeps its meaning)
STUDENT_ALONE = ("refilled-alone",)
#: CE trained as long as stage 1 plus two stage 2s: the compute of the default's lambda search
CE_SEARCH_EQUAL = ("ce-searchequal-noclip",)
#: method -> (batch, learning rate of both stages, warm-up fraction per stage); ``-sqrt`` scales the
#: learning rate with the square root of the batch (0.1 at 128 -> 0.2 at 512) and warms up longer
BATCHES = {"refilled-b128": (128, 0.1, 0.0), "refilled-b512": (512, 0.4, 0.05), "refilled-b512-sqrt": (512, 0.2, 0.1)}
#: the same batch-128 / batch-512 pair with both stages 4x as long (40 + 40 epochs: 200 optimizer steps per
#: stage at batch 512 instead of 50): is the large-batch loss a matter of too few steps? And CE on that
#: batch-128 protocol, as long as its stage 2 (40 epochs) and as its two stages (80): does REFILLED's lead
#: over the student alone hold when both train longer? Each maps to the BATCHES entry it trains with.
LONG = {"refilled-b128-x4": "refilled-b128", "refilled-b512-x4": "refilled-b512", "ce-b128-x4": "refilled-b128",
        "ce-equal-b128-x4": "refilled-b128", "refilled-default-b128-x4": "refilled-b128"}  # fmt: skip
LARGE_BATCH_LONG = ("refilled-b128-x4", "refilled-b512-x4")
CE_LONG = ("ce-b128-x4", "ce-equal-b128-x4")
#: the library's lambda default (chosen on validation between 1 and 10) on that 40 + 40 protocol, where lambda
#: 10 pinned fell within noise of CE on as many images: does the search choose 1 there, and keep up with CE?
LIBRARY_DEFAULT_LONG = ("refilled-default-b128-x4",)
ALL_METHODS = (
    METHODS
    + NO_CLIP
    + LARGE_BATCH
    + LARGE_BATCH_LONG
    + CE_LONG
    + SHORT_STAGE1
    + NO_STAGE1
    + LAMBDA1
    + CORRECT_ONLY
    + (SEARCH,)
    + LIBRARY_DEFAULT
    + STUDENT_ALONE
    + LIBRARY_DEFAULT_LONG
    + CE_SEARCH_EQUAL
)
#: the runs that decide the clipping default, first for the later seeds
CLIP_QUESTION = ("ce", "ce-noclip", "refilled", "refilled-noclip", "ce-equal-noclip")
#: both CE baselines and REFILLED at lambda 10 (the library's defaults after the clipping question was
#: settled, until this benchmark made lambda 1 the default)
LAMBDA10_AND_CE = ("ce-noclip", "ce-equal-noclip", "refilled-noclip")

#: the CPU protocol most budgets share: the teacher (200 images per class of its classes, 15 epochs) and
#: 10 + 10-epoch stages
CPU_PROTOCOL = {"teacher_shots": 200, "teacher_epochs": 15, "stage1": 10, "stage2": 10}

BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "teacher_shots": 20,
        "teacher_epochs": 1,
        "stage1": 1,
        "stage2": 1,
        "runs": [("cross", 10, 0, METHODS + LARGE_BATCH)],
    },  # fmt: skip
    # (setting, images per class, seed) in priority order, so that an interrupted run still
    # answers the main question: about 15 minutes per 50-image run of all methods on 2 cores
    "cpu": {
        **CPU_PROTOCOL,
        "runs": [("cross", 50, 0, METHODS + NO_CLIP), ("cross", 50, 1, CLIP_QUESTION)]
        + [("cross", 50, 2, CLIP_QUESTION), ("cross", 50, 0, LARGE_BATCH)]
        + [("overlap", 50, 0, CLIP_QUESTION), ("cross", 50, 1, LARGE_BATCH)]
        # from here on without clipping: the data-rich cross10 setting and what moves its gap
        # (lambda schedule, stage split, no stage 1, lambda 1), 100 images per class, more seeds
        + [("cross10", 450, 0, LAMBDA10_AND_CE + ("refilled-linear-noclip",))]
        + [("cross", 100, 0, LAMBDA10_AND_CE), ("cross10", 450, 0, SHORT_STAGE1 + NO_STAGE1)]
        + [("cross10", 450, 0, LAMBDA1), ("cross", 50, 0, LAMBDA1), ("cross", 100, 0, LAMBDA1)]
        + [("cross", 50, s, LAMBDA1) for s in (1, 2)]
        + [("cross10", 450, 1, ("ce-equal-noclip",) + LAMBDA1 + ("refilled-noclip", "ce-noclip"))]
        + [("cross", 50, 0, SHORT_STAGE1)]
        + [("cross10", 450, 1, LAMBDA10_AND_CE + ("refilled-linear-noclip",)), ("cross", 100, 1, LAMBDA10_AND_CE)]
        # does distilling only where the teacher's local classifier is right close the data-rich gap?
        + [("cross10", 450, 0, CORRECT_ONLY), ("cross", 50, 0, CORRECT_ONLY)]
        # lambda 1 against 10 with a third seed wherever they differ by less than 2 points
        + [("cross", 100, 1, LAMBDA1), ("overlap", 50, 0, LAMBDA1)]
        + [
            (setting, n, 2, ("ce-equal-noclip",) + LAMBDA1 + ("refilled-noclip", "ce-noclip"))
            for setting, n in (("cross10", 450), ("cross", 100))
        ]  # fmt: skip
        + [("overlap", 50, s, LAMBDA10_AND_CE + LAMBDA1) for s in (1, 2)]
        # the default run for real where its candidates already ran (the same test top-1 as the run of the
        # lambda it picks), then on a split no default was tuned on
        + [("cross", 50, 0, LIBRARY_DEFAULT)]
        # RKD, within 2 points of CE on as many images, with 3 seeds on both 50-image splits, then 100 per class
        + [("cross", 50, s, ("rkd-noclip",)) for s in (1, 2)]
        + [("overlap", 50, s, ("rkd-noclip",)) for s in (0, 1, 2)]
        + [("overlap40", 50, s, ("ce-noclip", "ce-equal-noclip") + LIBRARY_DEFAULT) for s in (0, 1, 2)]
        # batch 512 against 128 with 4x the epochs, and CE on that protocol, before the remaining baselines
        + [("cross", 50, 0, LARGE_BATCH_LONG + CE_LONG[::-1]), ("cross", 50, 1, LARGE_BATCH_LONG[:1] + CE_LONG[::-1])]
        + [("cross", 50, 1, LARGE_BATCH_LONG[1:]), ("cross", 50, 2, LARGE_BATCH_LONG + CE_LONG[::-1])]
        + [("cross", 50, s, LIBRARY_DEFAULT_LONG) for s in (1, 0, 2)]
        + [("cross", 50, s, CE_SEARCH_EQUAL) for s in (0, 1, 2)]
        + [("cross", 100, s, ("rkd-noclip",)) for s in (0, 1, 2)]
        + [("cross10", 450, 1, CORRECT_ONLY), ("cross", 50, 1, CORRECT_ONLY), ("cross", 50, 2, CORRECT_ONLY)]
        + [("cross", 100, 0, CORRECT_ONLY), ("cross", 100, 1, CORRECT_ONLY), ("overlap", 50, 0, CORRECT_ONLY)]
        + [("cross10", 450, 2, ("refilled-linear-noclip",))]
        + [("cross", 50, s, ("rkd-noclip",)) for s in (0, 1, 2)]
        + [("cross", 100, s, ("refilled-linear-noclip",)) for s in (0, 1, 2)]
        + [("cross", 100, 0, CLIP_QUESTION), ("overlap", 50, 1, CLIP_QUESTION)]
        + [("cross", 50, s, ("ce-equal",)) for s in (1, 2)]
        + [("overlap", 50, 2, CLIP_QUESTION), ("cross", 50, 2, LARGE_BATCH)]
        + [("cross", 100, s, CLIP_QUESTION) for s in (1, 2)]
        + [(setting, 50, s, METHODS + NO_CLIP) for setting in SETTINGS for s in (0, 1, 2)]
        + [("cross", 100, s, METHODS + NO_CLIP) for s in (0, 1, 2)],
    },
    # the cell where the lambda search alone fell furthest below CE on as many images with WRN-16-1 (cross, 100 per
    # class, seeds 0-2 of "cpu": -0.6 ± 0.8), again with the library's full defaults, the student-alone candidate
    # included (~50 min here with the teacher)
    "cross100": {
        **CPU_PROTOCOL,
        "runs": [("cross", 100, s, ("ce-noclip", "ce-equal-noclip") + STUDENT_ALONE) for s in (0, 1, 2)],
    },
    # the data-rich cell where the lambda search alone was within noise below CE on as many images (cross10, all
    # 450 images of 10 classes, seeds 0-2 of "cpu": -0.2 ± 1.6), again with the full defaults (~50 min here)
    "cross10": {
        **CPU_PROTOCOL,
        "runs": [("cross10", 450, s, ("ce-noclip", "ce-equal-noclip") + STUDENT_ALONE) for s in (0, 1, 2)],
    },
    # issue 10's acceptance check, rehearsed: the CLI's defaults on a split and seeds no earlier run used
    # (classes 30-79, seeds 3-5), against both CE baselines, under the "cpu" protocol
    "unseen": {
        **CPU_PROTOCOL,
        "runs": [("overlap30", 50, s, ("ce-noclip", "ce-equal-noclip") + LIBRARY_DEFAULT) for s in (3, 4, 5)],
    },
    # the same check with the teacher's and the student's classes swapped (teacher 50-99, student 0-49): another
    # teacher, other student classes, seeds 6-8
    "reverse": {
        **CPU_PROTOCOL,
        "teacher_classes": "cifar100-second-half",
        "runs": [
            ("reverse", 50, s, ("ce-noclip", "ce-equal-noclip") + LIBRARY_DEFAULT + STUDENT_ALONE) for s in (6, 7, 8)
        ],
    },
    # the same split and teacher as "reverse" with another student family: timm's resnet10t at 32 px (ImageNet
    # normalization, no CIFAR-specific stem) instead of refilled-hf's WRN-16-1, 50 and 100 images per class,
    # seeds 10-12 (~50 min here)
    "timm_student": {
        **CPU_PROTOCOL,
        "teacher_classes": "cifar100-second-half",
        "student": "resnet10t",
        "common": {"image_size": 32},
        "runs": [
            ("reverse", n, s, ("ce-noclip", "ce-equal-noclip") + LIBRARY_DEFAULT + STUDENT_ALONE)
            for n in (50, 100)
            for s in (10, 11, 12)
        ],
    },
    # for a lent GPU (issue 10's open question): the cross split at a schedule that converges, 60 + 60
    # epochs, the library's default against CE as long as stage 2, on as many images, and as long as the
    # default's whole run (stage 1 plus both stage 2s); the same teacher protocol as "cpu", batch 128 with the
    # learning rate scaled linearly (0.1), bf16. About 1.4 M images per seed: a few minutes on an H100.
    #   python benchmarks/cifar100.py --budget gpu --dataset .device/data/cifar100 --cache /tmp/c100 --out $OUT
    "gpu": {
        "teacher_shots": 200,
        "teacher_epochs": 15,
        "stage1": 60,
        "stage2": 60,
        "learning_rate": 0.1,
        "common": {"use_cpu": False, "bf16": True, "per_device_train_batch_size": 128, "logging_steps": 200},
        "runs": [
            ("cross", 50, s, ("ce-noclip",) + STUDENT_ALONE + ("ce-equal-noclip",) + CE_SEARCH_EQUAL) for s in (0, 1, 2)
        ],
    },
    # for a lent GPU (issue 11): batch 512 against 128 where large batches are meant to run, all 450 training
    # images of the cross split's 50 classes (44 steps per epoch at 512), 30 + 30 epochs, lambda 10 pinned;
    # about 2.7 M images per seed pair: some 8 minutes on an H100
    #   python benchmarks/cifar100.py --budget gpu_batch --dataset .device/data/cifar100 --cache /tmp/c100 --out $OUT
    "gpu_batch": {
        "teacher_shots": 200,
        "teacher_epochs": 15,
        "stage1": 30,
        "stage2": 30,
        "common": {"use_cpu": False, "bf16": True, "logging_steps": 200},
        "runs": [("cross", 450, s, ("refilled-b512", "refilled-b128")) for s in (0, 1)],
    },
}

# the CIFAR-10 benchmark's run settings, on CIFAR-100
COMMON = {**ACCURACY_COMMON, "dataset": str(CIFAR100), "validation_fraction": 0.1}  # 50 of 500 per class


def teacher(cache: Path, budget: dict) -> Path:
    from refilled_hf.pipeline import run_teacher_training

    epochs = budget["teacher_epochs"]
    classes = budget.get("teacher_classes", TEACHER_CLASSES)
    named = "" if classes == TEACHER_CLASSES else f"-{classes}"  # the default teacher keeps its cached folder
    out = cache / f"teacher-s{budget['teacher_shots']}-e{epochs}{named}"
    fields = {"teacher": "cifar_wrn_16_2", "classes": classes, "shots_per_class": budget["teacher_shots"],
              "stage2_epochs": epochs, "stage2_learning_rate": 0.1,
              "stage2_milestones": f"{int(epochs * 0.5)},{int(epochs * 0.75)}", "per_device_train_batch_size": 128,
              "output_dir": str(out), "seed": 0}  # fmt: skip
    results = _run({**COMMON, **fields}, run_teacher_training)
    print(f"teacher: test top-1 {results['final']['test_top1']:.1f}% on classes {results['classes']}", flush=True)
    return out / "model"


def _student_tag(budget: dict) -> str:
    """A run folder's suffix naming a student other than the default (cached runs keep their names)."""
    name = budget.get("student", DEFAULT_STUDENT)
    return "" if name == DEFAULT_STUDENT else f"-{name}"


def student(cache: Path, setting: str, method: str, shots: int, seed: int, budget: dict, teacher_model: Path) -> dict:
    from refilled_hf.pipeline import run_distillation, training_seconds

    s1, s2 = budget["stage1"], budget["stage2"]
    if method in SHORT_STAGE1:
        s1, s2 = (s1 + s2) // 4, s1 + s2 - (s1 + s2) // 4
    if method in NO_STAGE1:
        s1, s2 = 0, s1 + s2
    if method in LONG:
        s1, s2 = 4 * s1, 4 * s2
    base = method.removesuffix("-noclip").removesuffix("-b128-x4")
    epochs = s1 + s2 if base == "ce-equal" else s1 + 2 * s2 if base == "ce-searchequal" else s2
    fields: dict[str, Any] = {
        "method": method.split("-")[0],
        "student": budget.get("student", DEFAULT_STUDENT),
        "teacher": f"local-dir:{teacher_model}",
        "classes": SETTINGS[setting],
        "teacher_classes": budget.get("teacher_classes", TEACHER_CLASSES),
        "shots_per_class": shots,
        "stage1_epochs": s1,
        "stage2_epochs": epochs,
        "stage1_learning_rate": budget.get("learning_rate", 0.05),
        "stage2_learning_rate": budget.get("learning_rate", 0.05),
        "stage2_milestones": f"{int(epochs * 0.5)},{int(epochs * 0.75)}",
        "output_dir": str(cache / "runs" / f"{setting}-{method}-n{shots}-s{seed}-e{s1}x{s2}{_student_tag(budget)}"),
        "seed": seed,
    }
    if base in ("ce-equal", "ce-searchequal"):
        fields["method"] = "ce"
    library_default = method in LIBRARY_DEFAULT + LIBRARY_DEFAULT_LONG + STUDENT_ALONE
    if not library_default:
        fields["distill_weight"] = 1.0 if method in LAMBDA1 else 10.0  # pinned: cached runs keep their meaning
    if method in CORRECT_ONLY:
        fields["distill_images"] = "teacher_correct"
    if base == "refilled-linear":
        fields["distill_weight_schedule"] = "linear"
    if method.endswith("-noclip"):
        fields["max_grad_norm"] = 0.0
    if (batch_method := LONG.get(method, method)) in BATCHES:
        batch, lr, warmup = BATCHES[batch_method]
        fields.update(per_device_train_batch_size=batch, stage1_learning_rate=lr, stage2_learning_rate=lr,
                      warmup_steps=warmup, max_grad_norm=0.0)  # fmt: skip
    if library_default:  # the library's own lambda and clipping defaults, not COMMON's pins
        from refilled_hf.config import RefilledConfig

        library = RefilledConfig(output_dir="unused")
        fields.update(distill_weight=library.distill_weight, max_grad_norm=library.max_grad_norm,
                      student_alone_candidate=method in STUDENT_ALONE and library.student_alone_candidate)  # fmt: skip
    results = _run({**COMMON, **fields}, run_distillation)
    seen = s1 + s2 if method.startswith("refilled") or base == "ce-equal" else epochs
    search = results.get("distill_weight_search")
    if search:  # every candidate's stage 2 trained
        seen += s2 * (len(search["candidates"]) - 1)
    alone = results.get("student_alone")
    if alone:  # and the student alone, for both stages' epochs
        seen += s1 + s2
    record = {
        "setting": setting,
        "method": method,
        "shots": shots,
        "seed": seed,
        "test_top1": results["final"]["test_top1"],
        "validation_top1": results["final"].get("validation_top1"),
        "stage1_test_ncm": results.get("stage1", {}).get("test_ncm_top1"),
        "images_seen": results["data"]["train_images"] * seen,
        "train_seconds": training_seconds(results),  # stage 1 and every stage 2 (runs cached before the key too)
        "picked_lambda": search["selected"] if search else None,
        "exported_student_alone": bool(alone and alone.get("exported")),
    }
    print(json.dumps(record), flush=True)
    return record


def probe(cache: Path, setting: str, shots: int, seed: int, teacher_model: Path) -> float:
    from refilled_hf.config import RefilledConfig
    from refilled_hf.probe import probe_teacher

    path = cache / "probes" / f"{setting}-n{shots}-s{seed}.json"
    if not path.is_file():
        config = RefilledConfig(**{**COMMON, "teacher": f"local-dir:{teacher_model}", "student": "cifar_wrn_16_1",
                                   "classes": SETTINGS[setting], "shots_per_class": shots, "seed": seed,
                                   "output_dir": str(cache / "probes")})  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(probe_teacher(config)))
    return json.loads(path.read_text())["probe_ncm_top1"]


def run_all(cache: Path, budget_name: str) -> None:
    budget = BUDGETS[budget_name]
    cache.mkdir(parents=True, exist_ok=True)
    records_path = cache / f"records-{budget_name}.jsonl"
    keys = ("setting", "method", "shots", "seed")
    done = {tuple(r[k] for k in keys) for r in _read_jsonl(records_path)}
    start = time.perf_counter()
    teacher_model = teacher(cache, budget)

    def record(r: dict) -> None:
        if tuple(r[k] for k in keys) not in done:
            done.add(tuple(r[k] for k in keys))
            with records_path.open("a") as f:
                f.write(json.dumps(r) + "\n")

    def cell(setting: str, shots: int, seed: int, methods: tuple[str, ...]) -> None:
        if (setting, "probe", shots, seed) not in done:
            record({"setting": setting, "method": "probe", "shots": shots, "seed": seed,
                    "probe_ncm": probe(cache, setting, shots, seed, teacher_model)})  # fmt: skip
        for method in methods:
            if (setting, method, shots, seed) not in done:
                record(student(cache, setting, method, shots, seed, budget, teacher_model))
        print(f"{setting} n{shots} seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)

    for setting, shots, seed, methods in budget["runs"]:
        cell(setting, shots, seed, methods)


def search_records(records: list[dict], budget: dict) -> list[dict]:
    """The default (``--distill_weight`` unset) per seed: the lambda-1 run, or the lambda-10 run
    where its validation top-1 is higher. Its cost is stage 1 plus both stage 2s: images seen
    count them; train seconds add the lambda-10 run's stage-2 share of its epochs (an estimate)."""
    from refilled_hf.candidates import pick_candidate

    by_key = {(r["setting"], r["shots"], r["seed"], r["method"]): r for r in records}
    s1, s2 = budget["stage1"], budget["stage2"]
    derived = []
    for (setting, shots, seed, method), low in by_key.items():
        high = by_key.get((setting, shots, seed, "refilled-noclip"))
        if method != LAMBDA1[0] or high is None or None in (low["validation_top1"], high["validation_top1"]):
            continue
        pick = (low, high)[pick_candidate([low, high])]  # the library's own rule
        derived.append({
            **pick, "method": SEARCH, "picked_lambda": 10.0 if pick is high else 1.0,
            "images_seen": low["images_seen"] * (s1 + 2 * s2) // (s1 + s2),
            "train_seconds": low["train_seconds"] + high["train_seconds"] * s2 / (s1 + s2),
        })  # fmt: skip
    return derived


def _student_name(budget: dict) -> str:
    name = budget.get("student", DEFAULT_STUDENT)
    if name == DEFAULT_STUDENT:
        return "WRN-16-1"
    return f"`{name}` (timm) at {budget.get('common', {}).get('image_size', 'its own')} px"


def report(cache: Path, budget_name: str, out: Path) -> None:
    records = _read_jsonl(cache / f"records-{budget_name}.jsonl")
    derived = search_records(records, BUDGETS[budget_name])
    runs = [r for r in records if r["method"] != "probe"] + derived
    rows, gains = [], []
    for setting, shots in sorted({(r["setting"], r["shots"]) for r in runs}):
        by_method = {m: [r for r in runs if (r["setting"], r["shots"], r["method"]) == (setting, shots, m)]
                     for m in ALL_METHODS}  # fmt: skip
        probes = [r["probe_ncm"] for r in records
                  if r["method"] == "probe" and (r["setting"], r["shots"]) == (setting, shots)]  # fmt: skip
        for method, rs in by_method.items():
            if rs:
                mean, std = _mean_std([r["test_top1"] for r in rs])
                rows.append({"setting": setting, "shots": shots, "method": method, "test_mean": mean, "test_std": std,
                             "seeds": len(rs), "images_seen": rs[0]["images_seen"],
                             "seconds_mean": statistics.mean(r["train_seconds"] for r in rs)})  # fmt: skip
        for method, bases in (("refilled", ("ce", "ce-equal")), ("refilled-linear", ("ce", "ce-equal")),
                              ("refilled-noclip", ("ce-noclip", "ce-equal-noclip")),
                              ("refilled-linear-noclip", ("ce-noclip", "ce-equal-noclip")),
                              ("refilled-short1-noclip", ("ce-noclip", "ce-equal-noclip")),
                              ("refilled-nostage1-noclip", ("ce-noclip", "ce-equal-noclip")),
                              ("refilled-lambda1-noclip", ("ce-noclip", "ce-equal-noclip")),
                              ("refilled-correct-noclip", ("ce-noclip", "ce-equal-noclip")),
                              (SEARCH, ("ce-noclip", "ce-equal-noclip", "ce-searchequal-noclip")),
                              ("refilled-default", ("ce-noclip", "ce-equal-noclip",
                                                    "ce-searchequal-noclip")),
                              # the last baseline is not a student alone: what the candidate changed, paired
                              ("refilled-alone", ("ce-noclip", "ce-equal-noclip", "ce-searchequal-noclip",
                                                  "refilled-default")),
                              ("refilled-b128-x4", CE_LONG),
                              ("refilled-default-b128-x4", CE_LONG + ("refilled-b128-x4",)),
                              # not a student-alone baseline: batch 512 minus batch 128, paired
                              ("refilled-b512", ("refilled-b128",)),
                              ("refilled-b512-x4", ("refilled-b128-x4",))):  # fmt: skip
            for base in bases:
                base_runs = {r["seed"]: r["test_top1"] for r in by_method[base]}
                diffs = [r["test_top1"] - base_runs[r["seed"]] for r in by_method[method] if r["seed"] in base_runs]
                if diffs:
                    mean, std = _mean_std(diffs)
                    gains.append({"setting": setting, "shots": shots, "method": method, "baseline": base,
                                  "gain_mean": mean, "gain_std": std, "seeds": len(diffs),
                                  "probe_mean": statistics.mean(probes) if probes else None})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    data = {"budget": budget_name, "budget_spec": BUDGETS[budget_name], "summary": rows, "gains": gains,
            "records": records, "derived": derived}  # fmt: skip
    stem = "cifar100" if budget_name == "cpu" else f"cifar100_{budget_name}"  # the CPU results keep their names
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    b = BUDGETS[budget_name]
    settings = sorted({r["setting"] for r in runs}, key=list(SETTINGS).index)
    searched = any(r["method"] == SEARCH for r in runs)
    classes = "; ".join(
        f"{_ranges(SETTINGS[name])} (`{name}`" + (f", {SETTING_NOTES[name]})" if name in SETTING_NOTES else ")")
        for name in settings
    )
    lines = [f"# REFILLED on CIFAR-100 (budget `{budget_name}`)", "",
             f"Teacher WRN-16-2 on classes {_ranges(b.get('teacher_classes', TEACHER_CLASSES))} "
             f"({b['teacher_shots']} images/class, {b['teacher_epochs']} epochs). "
             f"Student {_student_name(b)} on classes {classes}; "
             f"stage 1 {b['stage1']} + stage 2 {b['stage2']} epochs, baselines {b['stage2']} epochs (`ce-equal`: "
             f"{b['stage1'] + b['stage2']}). `refilled-default`: the library's lambda and clipping defaults, neither "
             "pinned" + (", without the student-alone candidate; `refilled-alone`: the library's defaults in full, "
                         "that candidate included (the student trained alone for both stages' epochs, exported "
                         "where better on validation; its images seen count it)"
                         if any(r["method"] in STUDENT_ALONE for r in runs) else "")
             + ". Test top-1 % on the official test images of the student's classes (100 per class), "
             "mean ± std over seeds.", "",
             *([f"`{SEARCH}` is the library's default (`--distill_weight` unset): per seed, the lambda-1 run, or the "
                "lambda-10 run where its validation top-1 is higher (derived from those two runs, the search's "
                "candidates, most of them run before a reordering of stage 2's float sums); it trains stage 2 twice "
                "(images seen count both; its train seconds add an estimate of the second stage 2).", ""]
               if searched else []),
             "| setting | images/class | method | test top-1 % | seeds | images seen | train s |",
             "|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['setting']} | {r['shots']} | {r['method']} | {r['test_mean']:.1f} ± {r['test_std']:.1f} | "
                     f"{r['seeds']} | {r['images_seen']} | {r['seconds_mean']:.0f} |")  # fmt: skip
    lines += ["", "## REFILLED minus the student alone (paired by seed)", "",
              "| setting | images/class | probe NCM % | method | baseline | difference (points) | seeds |",
              "|---|---:|---:|---|---|---:|---:|"]  # fmt: skip
    for g in gains:
        probe_text = f"{g['probe_mean']:.1f}" if g["probe_mean"] is not None else "-"
        lines.append(f"| {g['setting']} | {g['shots']} | {probe_text} | {g['method']} | {g['baseline']} | "
                     f"{g['gain_mean']:+.1f} ± {g['gain_std']:.1f} | {g['seeds']} |")  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        _plot(out / f"{stem}_gain.png", rows)
        _plot_margin(out / f"{stem}_gain_vs_margin.png", records + derived)
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")


def _ranges(preset: str) -> str:
    """A class selection as ranges of CIFAR-100 ids ('cifar100-first-half' -> '0-49')."""
    from refilled_hf.data import class_ranges, parse_class_selection

    return class_ranges(parse_class_selection(preset, [str(i) for i in range(100)]))


def _plot(path: Path, rows: list[dict]) -> None:
    """``cifar100_gain.png`` (``path``): test top-1 per method (mean, seed std as error bar), one panel
    per setting; the seed count under each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["setting"], r["shots"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (setting, shots) in zip(axes[0], panels):
        cell = [r for r in rows if (r["setting"], r["shots"]) == (setting, shots)]
        colors = ["tab:orange" if r["method"].startswith("refilled") else "tab:blue" for r in cell]
        ax.bar([f"{r['method']} ({r['seeds']})" for r in cell], [r["test_mean"] for r in cell],
               yerr=[r["test_std"] for r in cell], capsize=3, color=colors)  # fmt: skip
        ax.set_title(f"{setting}, {shots} images/class", fontsize=9)
        ax.tick_params(axis="x", rotation=70, labelsize=7)
    axes[0][0].set_ylabel("test top-1 % (seeds in brackets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_margin(path: Path, records: list[dict]) -> None:
    """``cifar100_gain_vs_margin.png`` (``path``): REFILLED (library defaults) minus CE on as many images, against
    the teacher probe minus that CE's accuracy, one point per setting; both paired by seed
    (the seeds that have both runs), the seed std as error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["setting"], r["shots"], r["seed"], r["method"]): r for r in records}
    points = []
    for setting, shots in sorted({(r["setting"], r["shots"]) for r in records}):
        for method in (*STUDENT_ALONE, DEFAULT_REFILLED, *LIBRARY_DEFAULT):
            seeds = [s for (st, sh, s, m) in by_key if (st, sh, m) == (setting, shots, method)]
            seeds = [s for s in seeds if all((setting, shots, s, m) in by_key for m in ("ce-equal-noclip", "probe"))]
            if seeds:
                break
        if seeds:
            ce = [by_key[(setting, shots, s, "ce-equal-noclip")]["test_top1"] for s in seeds]
            gains = [by_key[(setting, shots, s, method)]["test_top1"] - c for s, c in zip(seeds, ce)]
            margins = [by_key[(setting, shots, s, "probe")]["probe_ncm"] - c for s, c in zip(seeds, ce)]
            points.append((statistics.mean(margins), *_mean_std(gains), f"{setting} {shots}/class ({len(seeds)})"))
    if not points:
        return
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for margin, gain, std, label in points:
        ax.errorbar(margin, gain, yerr=std, fmt="o", capsize=3, color="tab:orange")
        ax.annotate(label, (margin, gain), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("teacher probe - CE on as many images (points)")
    ax.set_ylabel("REFILLED - CE on as many images (points)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--cache", type=Path, default=Path(os.path.expanduser("~/.cache/refilled-hf-bench-c100")))
    parser.add_argument("--report-only", action="store_true", help="only build the tables from the cache")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--dataset", type=Path, default=CIFAR100, help="the CIFAR-100 copy (Hub parquet layout)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    COMMON.update(BUDGETS[args.budget].get("common", {}), dataset=str(args.dataset))
    if not args.report_only:
        if not (args.dataset / "train.parquet").is_file():
            raise SystemExit(f"needs the CIFAR-100 copy at {args.dataset} (--dataset)")
        import torch

        torch.set_num_threads(args.threads)
        run_all(args.cache, args.budget)
    report(args.cache, args.budget, args.out)


if __name__ == "__main__":
    main()
