"""The offline quickstart: the real workflow in miniature on real images that ship with
scikit-learn (the 1,797 handwritten digits, 8x8, upscaled to 16x16).

1. write the digits as a parquet data set (the Hub layout `datasets` reads);
2. ``train-teacher``: a WRN-16-2 on digits 0-4;
3. ``distill``, for each seed: a WRN-16-1 student on digits 5-9 with a few images per
   class, once with ``ce`` (student alone) and once with ``refilled`` (cross-task: the
   teacher never saw 5-9);
4. print every run with the mean and spread over seeds, and leave the first seed's
   exported REFILLED student in ``<output_dir>/refilled/model``.

The recipes it runs are written next to the outputs, so every step can be re-run with
``refilled-hf <command> --config <recipe>``.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import ConfigError, RefilledConfig

__all__ = ["QUICKSTART_RECIPES", "run_quickstart", "write_digits_dataset"]

_COMMON: dict[str, Any] = {
    "image_size": 16,
    "horizontal_flip": False,  # digits are not mirror-symmetric
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "logging_steps": 5,
    "save_total_limit": 1,
    "disable_tqdm": True,
}

#: The quickstart's recipes, with the paths of the default output folder (the
#: quickstart rewrites them for another ``output_dir``).
QUICKSTART_RECIPES: dict[str, dict[str, Any]] = {
    "teacher": {
        **_COMMON,
        "dataset": "quickstart_outputs/digits",
        "output_dir": "quickstart_outputs/teacher",
        "teacher": "cifar_wrn_16_2",
        "classes": "0-4",
        "validation_fraction": 0.1,
        "stage2_epochs": 15,
        "stage2_learning_rate": 0.05,
        "stage2_milestones": "10",
    },
    "ce": {
        **_COMMON,
        "dataset": "quickstart_outputs/digits",
        "output_dir": "quickstart_outputs/ce",
        "shots_per_class": 10,
        "method": "ce",
        "student": "cifar_wrn_16_1",
        "classes": "5-9",
        "validation_fraction": 0.2,
        "stage2_epochs": 100,
        "stage2_learning_rate": 0.05,
        "stage2_milestones": "70",
    },
    "refilled": {
        **_COMMON,
        "dataset": "quickstart_outputs/digits",
        "output_dir": "quickstart_outputs/refilled",
        "shots_per_class": 10,
        "teacher": "local-dir:quickstart_outputs/teacher/model",
        "compare_runs": "quickstart_outputs/ce",
        "method": "refilled",
        "student": "cifar_wrn_16_1",
        "classes": "5-9",
        "teacher_classes": "0-4",
        "validation_fraction": 0.2,
        "stage1_epochs": 30,
        "stage1_learning_rate": 0.05,
        "stage2_epochs": 100,
        "stage2_learning_rate": 0.05,
        "stage2_milestones": "70",
        # 10 images per class: the README's case for lambda 10 over the library's default 1
        "distill_weight": 10.0,
    },
}


def write_digits_dataset(folder: Path, seed: int = 0, digits=None) -> Path:
    """scikit-learn's digits as ``train.parquet`` / ``test.parquet`` (80/20, stratified),
    with an ``image`` column (PNG) and a ``label`` ClassLabel column (``digits``: those of
    :func:`digits_dataset` already built with ``seed``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (digits if digits is not None else digits_dataset(seed)).items():
        rows.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def digits_dataset(seed: int = 0):
    """scikit-learn's digits as a ``datasets.DatasetDict`` (train/test, 80/20, stratified)."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: len(idx) // 5]] = True
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )

    def png(array: np.ndarray) -> dict[str, Any]:
        buffer = io.BytesIO()
        Image.fromarray(array, mode="L").save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"image": [png(a) for a in images[mask]], "label": labels[mask].tolist()}, features=features
        )
        for split, mask in (("train", ~test), ("test", test))
    })  # fmt: skip


def _config(recipe: dict[str, Any], **overrides: Any) -> RefilledConfig:
    return RefilledConfig(**{**recipe, **overrides})


def _check_before_training(recipes: dict[str, dict[str, Any]], digits) -> None:
    """Refuse, before anything is written or trained, a recipe that cannot run: a value out
    of range, or a selection the digits cannot give (``--shots_per_class`` beyond what a
    class has left after its validation split), which would otherwise fail after the
    teacher trained."""
    from .data import DataError, load_classification_data

    for run, recipe in recipes.items():
        config = _config(recipe)  # checks every value's range
        try:
            load_classification_data("digits", raw=digits, classes=config.classes, splits=(),
                                     shots_per_class=config.shots_per_class,
                                     validation_fraction=config.validation_fraction, seed=config.seed)  # fmt: skip
        except DataError as err:
            raise ConfigError(f"quickstart run {run}: {err}") from None


def _run_name(name: str, seed: int, first: int) -> str:
    return name if name == "teacher" or seed == first else f"{name}-seed{seed}"


def run_quickstart(output_dir: str = "quickstart_outputs", *, shots_per_class: int = 10,
                   seeds: tuple[int, ...] = (0, 1, 2), overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run the miniature workflow: one teacher, then a ``ce`` and a ``refilled`` student
    per seed (the seed draws the students' few training images and their training);
    returns ``{run: results}`` and prints every run and the mean and spread over seeds."""
    import statistics

    from .pipeline import RunInterrupted, run_distillation, run_teacher_training

    seeds = tuple(dict.fromkeys(seeds))
    if not seeds:
        raise ConfigError("quickstart needs at least one seed (--seeds 0 1 2).")
    out = Path(output_dir)
    names = ["teacher"] + [_run_name(n, s, seeds[0]) for s in seeds for n in ("ce", "refilled")]
    earlier = [out / name for name in ("digits", "recipes", *names) if (out / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            f"{out} holds an earlier quickstart ({', '.join(p.name for p in earlier)}): pass --overwrite true to "
            "replace its outputs, or --output_dir <another folder>."
        )
    data_dir, recipes_dir, teacher_dir = out / "digits", out / "recipes", out / "teacher"
    plan = [("teacher", seeds[0])] + [(n, s) for s in seeds for n in ("ce", "refilled")]
    recipes: dict[str, dict[str, Any]] = {}
    for name, seed in plan:
        run = _run_name(name, seed, seeds[0])
        recipe = {**QUICKSTART_RECIPES[name], "dataset": str(data_dir), "output_dir": str(out / run), "seed": seed}
        if name != "teacher":
            recipe["shots_per_class"] = shots_per_class
        if name == "refilled":
            recipe["teacher"] = f"local-dir:{teacher_dir / 'model'}"
            recipe["compare_runs"] = str(out / _run_name("ce", seed, seeds[0]))
        if overwrite:
            recipe["overwrite_output"] = True  # each run replaces only what its earlier run wrote
        recipes[run] = recipe
    digits = digits_dataset(seed=seeds[0])
    _check_before_training(recipes, digits)
    write_digits_dataset(data_dir, digits=digits)
    recipes_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for (name, _), (run, recipe) in zip(plan, recipes.items()):
        (recipes_dir / f"{run}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        print(f"\n=== quickstart: {run} (recipe {recipes_dir / f'{run}.yaml'}) ===", flush=True)
        start = time.perf_counter()
        runner = run_teacher_training if name == "teacher" else run_distillation
        try:
            runs[run] = runner(_config(recipe))
        except RunInterrupted as err:  # the quickstart takes no --resume_from_checkpoint: it starts again
            raise RunInterrupted(
                f"{err.stopped}, in the quickstart's {run} run",
                "`refilled-hf quickstart --overwrite true` (with the same options) starts the quickstart again",
                err.signal_number,
            ) from None
        timings[run] = time.perf_counter() - start

    print("\nDigits, teacher WRN-16-2 trained on 0-4; students WRN-16-1 on 5-9 "
          f"({shots_per_class} training images per class, seeds {list(seeds)}):")  # fmt: skip
    print(f"{'run':18s} {'test top-1 %':>13s} {'stage-1 NCM %':>14s} {'seconds':>8s}")
    for run, results in runs.items():
        ncm = results.get("stage1", {}).get("test_ncm_top1")
        ncm_text = f"{ncm:14.1f}" if ncm is not None else f"{'-':>14s}"
        print(f"{run:18s} {results['final']['test_top1']:13.1f} {ncm_text} {timings[run]:8.0f}")
    summary = {}
    for name in ("ce", "refilled"):
        accs = [runs[_run_name(name, s, seeds[0])]["final"]["test_top1"] for s in seeds]
        summary[name] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0)
    gains = [runs[_run_name("refilled", s, seeds[0])]["final"]["test_top1"]
             - runs[_run_name("ce", s, seeds[0])]["final"]["test_top1"] for s in seeds]  # fmt: skip
    (ce_mean, ce_std), (rf_mean, rf_std) = summary["ce"], summary["refilled"]
    print(f"\nOver {len(seeds)} seeds (mean ± std of test top-1 %): ce {ce_mean:.1f} ± {ce_std:.1f}, "
          f"refilled {rf_mean:.1f} ± {rf_std:.1f}; refilled - ce per seed: "
          f"{', '.join(f'{g:+.1f}' for g in gains)}.")  # fmt: skip
    print(f"Exported REFILLED student (seed {seeds[0]}), with its model card: {out / 'refilled' / 'model'}")
    folders = " ".join(str(out / _run_name(name, s, seeds[0])) for name in ("ce", "refilled") for s in seeds)
    print(f"Every run side by side: refilled-hf compare {folders}")
    return {run: {**r, "seconds": timings[run]} for run, r in runs.items()}
