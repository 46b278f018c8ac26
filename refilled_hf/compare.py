"""Finished runs side by side (``refilled-hf compare``): each run's numbers, the runs that
differ only by their seed pooled (mean and standard deviation over seeds), and, between
settings, the differences of runs on the same images.

What a run is comes from its ``run.json`` (the identity a resume is checked against), its
numbers from its ``results.json``: a folder without both holds no finished run and is
refused, as is a folder given twice."""

from __future__ import annotations

import functools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FIELD_USERS, ConfigError, RefilledConfig
from .model_card import epochs_text, exported_student_alone, same_images
from .pipeline import EXPORT_DIR, RESULTS_FILE
from .rundir import MANIFEST, MODEL_LOCATION_FIELDS, NON_IDENTITY_FIELDS, RETIRED_IDENTITY_FIELDS, names_a_place

__all__ = ["FinishedRun", "compare_runs", "format_comparison", "load_finished_run"]

#: identity fields a seed changes (``student_init``: the initial weights; ``data``: the images
#: drawn) or that change how a run computes, not what: runs that differ only in these are the
#: same setting, repeated
SEED_AND_PLACEMENT_FIELDS = (
    "seed", "data_seed", "student_init", "data", "data_path", "dataloader_num_workers", "device_data_budget_gb",
    "teacher_cache",
)  # fmt: skip
#: identity fields that record the teacher, left out (with the teacher options) for a run without one
TEACHER_RECORD_FIELDS = ("teacher_weights", "teacher_setup")


@dataclass
class FinishedRun:
    """A finished run's folder, its results.json and the identity its run.json records."""

    folder: Path
    results: dict[str, Any]
    identity: dict[str, Any]


def load_finished_run(folder: str | Path) -> FinishedRun:
    """The finished run in ``folder`` (its ``output_dir``); refused, naming the fix, where it
    holds none (an export's ``model/`` folder is taken as its run's)."""
    folder = Path(folder)
    if folder.name == EXPORT_DIR and (folder.parent / RESULTS_FILE).is_file():
        folder = folder.parent
    if not (folder / RESULTS_FILE).is_file():
        raise ConfigError(f"{folder} holds no finished run (no {RESULTS_FILE}): pass the output_dir of finished runs.")
    try:
        results = json.loads((folder / RESULTS_FILE).read_text())
        identity = json.loads((folder / MANIFEST).read_text())["identity"]
        if not isinstance(results.get("final"), dict) or not isinstance(identity, dict):
            raise ValueError("not a refilled-hf run")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{folder} is not a run this refilled-hf can read ({type(err).__name__}: {err}): its {RESULTS_FILE} and "
            f"{MANIFEST} must be a finished run's, written by refilled-hf 0.1 or newer."
        ) from None
    return FinishedRun(folder, results, identity)


def _method_text(results: dict[str, Any]) -> str:
    """``refilled (lambda 10)``, ``refilled (student alone exported)``, ``ce``: what the exported model is."""
    method = results["method"]
    if exported_student_alone(results):
        return f"{method} (student alone exported)"
    if method == "refilled" and results.get("distill_weight") is not None:
        return f"{method} (lambda {results['distill_weight']:g})"
    return method


def _value_text(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12]  # a digest (the teacher's weights): its start tells them apart
    return text if len(text) <= 48 else text[:45] + "..."


@functools.lru_cache(maxsize=1)
def _recorded_defaults() -> dict[str, Any]:
    """The default of each identity field a run records only where it is set otherwise."""
    left_out = NON_IDENTITY_FIELDS | RETIRED_IDENTITY_FIELDS
    return {k: v for k, v in RefilledConfig.recipe_defaults().items() if k not in left_out}


def _setting(run: FinishedRun, places: dict[str, Any]) -> dict[str, Any]:
    """What a run computes: its identity without the seed and data placement, and without
    the options its method does not use (a ce run's teacher, a kd run's tau1...); ``places``
    (:func:`_places`) replace the paths it read its data and teacher from."""
    unused = {name for name, users in FIELD_USERS.items() if run.results["method"] not in users}
    if "teacher" in unused:
        unused.update(TEACHER_RECORD_FIELDS)
    # A run records the TrainingArguments fields it left at their defaults by leaving them out:
    # they are its defaults here, so that a run with --warmup_steps 2 is another setting than one
    # without (both were named by the fields they share, pooled as one setting, or refused as a
    # repeat). Runs of earlier releases recorded no random_draws: as eager, what a run drew
    # unless compiled.
    identity = {"random_draws": "eager", **_recorded_defaults(), **run.identity}
    return {k: places.get(k, v) for k, v in identity.items() if k not in SEED_AND_PLACEMENT_FIELDS and k not in unused}


def _places(runs: list[FinishedRun]) -> list[dict[str, Any]]:
    """For each run, the fields that say where its data and teacher were read from, each given
    the value of the first run that read the same thing: the same data set (its recorded
    source fingerprint: every image of the selected classes, whatever seed drew them) or the
    same teacher (its recorded weights and setup, read from a folder or checkpoint file). Jobs
    that each copy the data and teacher to their node's disk are then one setting, named by
    the first's paths. (A student's place stays: its recorded initial weights change with the
    seed.)"""
    first: dict[tuple[Any, ...], Any] = {}
    places = []
    for run in runs:
        identity, own = run.identity, {}
        source = run.results.get("data_source_fingerprint")
        if source and "dataset" in identity:
            own["dataset"] = first.setdefault(("dataset", source), identity["dataset"])
        teacher = tuple(identity.get(f) for f in MODEL_LOCATION_FIELDS["teacher"])
        if None not in teacher:
            for key in ("teacher", "teacher_checkpoint"):
                if names_a_place(key, identity.get(key)):
                    own[key] = first.setdefault((key, *teacher), identity.get(key))
        places.append(own)
    return places


def _setting_names(settings: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Each setting's name (the fields whose values tell the settings apart) and those fields.
    A field that only some settings have (a method's own option, such as REFILLED's lambda) is
    implied by the method, and named only where settings that have it differ in it."""
    keys = sorted({k for s in settings for k in s}, key=lambda k: (k != "method", k))
    varying = [k for k in keys if len({_value_text(s[k]) for s in settings if k in s}) > 1]
    names = [", ".join(f"{k}={_value_text(s[k])}" for k in varying if k in s) or "all" for s in settings]
    return names, varying


def _spread(values: list[float | None]) -> dict[str, Any] | None:
    """Mean and standard deviation (n - 1; 0 for one value) of ``values``; None where one is missing."""
    if not values or any(v is None for v in values):
        return None
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": len(values),
    }


def compare_runs(folders: list[str | Path]) -> dict[str, Any]:
    """Each run of ``folders`` (its method, epochs, test and validation top-1, stage-1 NCM
    top-1, training seconds), the settings they form (runs whose identity differs only in
    :data:`SEED_AND_PLACEMENT_FIELDS` are one setting, named by the fields that tell the
    settings apart) with the mean and standard deviation of each number over a setting's
    runs, and, for every setting after the first, its test top-1 minus the first's on the
    same images (the same data fingerprint: classes, shots, validation carve, data seed and
    the images' pixels), where each of the two settings has exactly one run on them."""
    runs = [load_finished_run(f) for f in folders]
    seen: dict[Path, Path] = {}
    for run in runs:
        resolved = run.folder.resolve()
        if resolved in seen:
            raise ConfigError(f"{run.folder} is given twice (as {seen[resolved]}): pass each run once.")
        seen[resolved] = run.folder
    names, varying = _setting_names([_setting(run, places) for run, places in zip(runs, _places(runs))])
    _refuse_repeats(runs, names)
    rows = []
    for run, name in zip(runs, names):
        final, stage1 = run.results["final"], run.results.get("stage1") or {}
        rows.append({
            "run": str(run.folder),
            "setting": name,
            "method": _method_text(run.results),
            "epochs": epochs_text(run.results),
            "test_top1": final.get("test_top1"),
            "validation_top1": final.get("validation_top1"),
            # the exported student alone had no stage 1 (the run's belongs to REFILLED's candidates)
            "stage1_ncm_top1": None if exported_student_alone(run.results) else stage1.get("test_ncm_top1"),
            "train_seconds": run.results.get("train_seconds"),
            "data_fingerprint": run.results.get("data_fingerprint"),
            "seed": run.identity.get("seed"),
        })  # fmt: skip
    order = list(dict.fromkeys(names))
    groups = []
    for name in order:
        members = [row for row in rows if row["setting"] == name]
        groups.append({
            "setting": name,
            "runs": len(members),
            **{key: _spread([row[key] for row in members])
               for key in ("test_top1", "validation_top1", "stage1_ncm_top1", "train_seconds")},
        })  # fmt: skip
    paired = []
    recorded = {str(run.folder): run.results for run in runs}
    first = [row for row in rows if row["setting"] == order[0]]
    for name in order[1:]:
        members = [row for row in rows if row["setting"] == name]
        differences, untested, ambiguous = [], 0, 0
        for row in members:
            if row["data_fingerprint"] is None:  # (a results.json that records none cannot be paired)
                continue
            same = [r for r in first if same_images(recorded[r["run"]], recorded[row["run"]])]
            twins = [r for r in members if same_images(recorded[r["run"]], recorded[row["run"]])]
            several = len(same) > 1 or len(twins) > 1
            if several:  # several seeds on these images (a fixed --data_seed): paired by seed
                same = [r for r in same if r["seed"] == row["seed"]]
                twins = [r for r in twins if r["seed"] == row["seed"]]
            if len(same) != 1 or len(twins) != 1:
                ambiguous += several
                continue
            if None in (row["test_top1"], same[0]["test_top1"]):
                untested += 1  # the same images, but one of the two ran without a test split
                continue
            differences.append({"run": row["run"], "against": same[0]["run"],
                                "test_top1": row["test_top1"] - same[0]["test_top1"]})  # fmt: skip
        paired.append({
            "setting": name,
            "against": order[0],
            "differences": differences,
            "test_top1": _spread([d["test_top1"] for d in differences]),
            "pairs_without_test_top1": untested,
            "runs_without_one_pair": ambiguous,
        })  # fmt: skip
    return {"runs": rows, "settings": groups, "paired": paired, "varying_fields": varying}


def _refuse_repeats(runs: list[FinishedRun], names: list[str]) -> None:
    """Refuse two runs of one setting with the same seed (and initial weights) on the same
    images: a seeded run trains the same again, so pooling both would count one run twice (a
    mean of 2 runs, ± 0.00)."""

    def start(run: FinishedRun) -> list[Any]:
        return [run.identity.get(k) for k in ("seed", "student_init")]

    for i, (run, name) in enumerate(zip(runs, names)):
        for earlier, earlier_name in zip(runs[:i], names[:i]):
            # (the same images as compare pairs them: also a run of an earlier release's fingerprint)
            if earlier_name == name and start(earlier) == start(run) and same_images(earlier.results, run.results):
                raise ConfigError(
                    f"{run.folder} repeats {earlier.folder}: the same setting, seed and images (a seeded run trains "
                    "the same again), and pooling both would count one run twice. Pass one of them; repeat a setting "
                    "with other --seed values."
                )


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread_text(spread: dict[str, Any] | None, digits: int = 2) -> str:
    if spread is None:
        return "-"
    if spread["runs"] == 1:
        return _num(spread["mean"], digits)
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *lines]]


def format_comparison(comparison: dict[str, Any]) -> str:
    """The comparison as text: the settings (lettered), the runs, the settings' mean ± std
    over their runs, and the paired differences."""
    letter = {g["setting"]: chr(ord("A") + i) if i < 26 else str(i) for i, g in enumerate(comparison["settings"])}
    out = []
    if comparison["varying_fields"]:
        out += ["Settings (what tells the runs apart, beside their seeds):"]
        out += [f"  {letter[g['setting']]}: {g['setting']}" for g in comparison["settings"]]
        out.append("")
    elif len(comparison["runs"]) > 1:
        out += ["The runs differ only by their seed (initial weights, images drawn) and data placement.", ""]
    out += _table(
        ["run", "setting", "method", "epochs", "test top-1 %", "validation top-1 %", "stage-1 NCM %", "seconds"],
        [[r["run"], letter[r["setting"]], r["method"], r["epochs"], _num(r["test_top1"]), _num(r["validation_top1"]),
          _num(r["stage1_ncm_top1"]), _num(r["train_seconds"], 0)] for r in comparison["runs"]],
    )  # fmt: skip
    if any(group["runs"] > 1 for group in comparison["settings"]):
        out += ["", "Per setting (mean ± standard deviation over its runs):"]
        out += _table(
            ["setting", "runs", "test top-1 %", "validation top-1 %", "stage-1 NCM %", "seconds"],
            [[letter[g["setting"]], str(g["runs"]), _spread_text(g["test_top1"]), _spread_text(g["validation_top1"]),
              _spread_text(g["stage1_ncm_top1"]), _spread_text(g["train_seconds"], 0)]
             for g in comparison["settings"]],
        )  # fmt: skip
    for pair in comparison["paired"]:
        this, that = letter[pair["setting"]], letter[pair["against"]]
        if not pair["differences"]:
            if pair["pairs_without_test_top1"]:
                why = (f"the runs of {this} and {that} on the same images have no test top-1 to subtract (a run "
                       "without a test split: --test_split none)")  # fmt: skip
            elif pair.get("runs_without_one_pair"):
                why = (f"the runs of {this} and {that} on the same images cannot be paired one to one (several of one "
                       "setting on those images, and no one seed shared by exactly one of each): run both with the "
                       "same --seed values")  # fmt: skip
            else:
                why = f"no run of {this} has one of {that} on the same images to pair with"
            out += ["", f"{this} - {that}: {why}."]
            continue
        each = ", ".join(f"{d['test_top1']:+.2f}" for d in pair["differences"])
        mean = f" (mean {_spread_text(pair['test_top1'])})" if len(pair["differences"]) > 1 else ""
        out += ["", f"Test top-1 of {this} minus {that}, run by run on the same images: {each}{mean}."]
    return "\n".join(out)
