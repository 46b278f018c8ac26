"""`refilled-hf compare`: finished runs side by side, pooled over seeds, paired on the same images."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import tiny_recipe, write_random_teacher

from refilled_hf.cli import main
from refilled_hf.compare import compare_runs, format_comparison
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.model_card import check_comparable, same_images
from refilled_hf.pipeline import run_distillation


def _write_run(folder: Path, method: str, seed: int, top1: float, images: str, **identity) -> Path:
    """A finished run as refilled-hf leaves it: results.json and run.json's identity."""
    folder.mkdir(parents=True)
    base = {"method": method, "student": "cifar_wrn_16_1", "classes": "5-9", "stage2_epochs": 20.0, "seed": seed,
            "student_init": f"init{seed}", "data": images, "data_path": "device"}  # fmt: skip
    if method == "refilled":
        base.update(teacher="local-dir:t", teacher_weights="f" * 64, distill_weight=10.0, stage1_epochs=20.0)
    results = {"method": method, "final": {"test_top1": top1, "validation_top1": top1 - 1, "train_metrics": {}},
               "data_fingerprint": images, "train_seconds": 10.0 + seed}  # fmt: skip
    if method == "refilled":
        results.update(stage1={"test_ncm_top1": 50.0 + seed}, distill_weight=10.0)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "run.json").write_text(json.dumps({"identity": {**base, **identity}, "outputs": []}))
    return folder


def _reference_spread(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_runs_pool_over_seeds_and_pair_on_the_same_images(tmp_path):
    ce = [_write_run(tmp_path / f"ce{s}", "ce", s, top1, f"images{s}") for s, top1 in enumerate((60.0, 64.0, 59.0))]
    rf = [_write_run(tmp_path / f"rf{s}", "refilled", s, top1, f"images{s}") for s, top1 in enumerate((63.0, 63.5))]
    comparison = compare_runs([*ce, rf[0], rf[1] / "model"])  # an export's model/ folder stands for its run
    # the settings are named by what tells them apart; a ce run's missing teacher and lambda are implied
    assert [g["setting"] for g in comparison["settings"]] == ["method=ce", "method=refilled"]
    assert [r["run"] for r in comparison["runs"]][-1] == str(rf[1])
    ce_group, rf_group = comparison["settings"]
    assert ce_group["runs"] == 3 and rf_group["runs"] == 2
    for group, values in ((ce_group, [60.0, 64.0, 59.0]), (rf_group, [63.0, 63.5])):
        mean, std = _reference_spread(values)
        assert group["test_top1"]["mean"] == pytest.approx(mean) and group["test_top1"]["std"] == pytest.approx(std)
    assert ce_group["stage1_ncm_top1"] is None and rf_group["stage1_ncm_top1"]["mean"] == pytest.approx(50.5)
    # run by run on the same images: seed 2 of ce has no refilled twin
    (pair,) = comparison["paired"]
    assert [(d["run"], d["against"]) for d in pair["differences"]] == [
        (str(rf[0]), str(ce[0])),
        (str(rf[1]), str(ce[1])),
    ]
    assert [d["test_top1"] for d in pair["differences"]] == pytest.approx([3.0, -0.5])
    text = format_comparison(comparison)
    assert "  A: method=ce\n  B: method=refilled\n" in text
    assert "Test top-1 of B minus A, run by run on the same images: +3.00, -0.50 (mean 1.25 ± 2.47)." in text
    assert f"A        3     {_reference_spread([60.0, 64.0, 59.0])[0]:.2f} ± 2.65" in text


def test_a_trainer_option_a_run_records_only_where_set_tells_its_setting_apart(tmp_path):
    """A run records the TrainingArguments fields it left at their defaults by leaving them out;
    compare took such a field for a method's own option (named only where settings that have it
    differ), so runs with and without --warmup_steps 2 were one setting: pooled into one mean,
    or, on the same seed and images, refused as a run repeated."""
    plain = [_write_run(tmp_path / f"ce{s}", "ce", s, 60.0 + s, f"images{s}") for s in (0, 1)]
    warm = _write_run(tmp_path / "warm0", "ce", 0, 70.0, "images0", warmup_steps=2)
    comparison = compare_runs([*plain, warm])
    assert [(g["setting"], g["runs"]) for g in comparison["settings"]] == [("warmup_steps=0", 2),
                                                                           ("warmup_steps=2", 1)]  # fmt: skip
    assert comparison["settings"][0]["test_top1"]["mean"] == pytest.approx(60.5)
    assert [d["test_top1"] for d in comparison["paired"][0]["differences"]] == pytest.approx([10.0])


def test_one_run_is_shown_without_a_claim_about_other_runs(tmp_path):
    run = _write_run(tmp_path / "ce0", "ce", 0, 61.0, "images0")
    text = format_comparison(compare_runs([run]))
    assert text.startswith("run ") and "runs differ only" not in text and "61.00" in text


def test_a_run_of_an_earlier_release_pairs_by_the_fingerprint_it_recorded(tmp_path):
    """Earlier releases fingerprinted the data by its path and file dates; this one by the
    images' pixels, and records the earlier fingerprint beside it (data_fingerprint_legacy), by
    which an earlier run pairs and counts as a baseline on the same images."""
    old = _write_run(tmp_path / "ce-old", "ce", 0, 60.0, "by-path-0")
    new = _write_run(tmp_path / "rf-new", "refilled", 0, 63.0, "by-pixels-0")
    again = _write_run(tmp_path / "rf-again", "refilled", 1, 61.0, "by-pixels-0")  # the data copied again
    for folder, legacy in ((new, "by-path-0"), (again, "by-path-copied")):
        results = json.loads((folder / "results.json").read_text())
        (folder / "results.json").write_text(json.dumps({**results, "data_fingerprint_legacy": legacy}))
    (pair,) = compare_runs([old, new])["paired"]
    assert [(d["run"], d["test_top1"]) for d in pair["differences"]] == [(str(new), 3.0)]
    records = [json.loads((f / "results.json").read_text()) for f in (old, new, again)]
    assert same_images(records[0], records[1]) and same_images(records[1], records[0])
    assert same_images(records[1], records[2])  # the same pixels, whatever the files' dates
    assert not same_images(records[0], records[2])  # an earlier run is matched by path and dates only
    check_comparable(records[1], [records[0]])
    moved = {**records[2], "data_fingerprint": "by-pixels-other"}
    assert not same_images(moved, records[1]) and not same_images(moved, {**records[0], "data_fingerprint": None})
    with pytest.raises(ConfigError, match="used other images than this one"):
        check_comparable(moved, [records[1]])


def test_settings_name_what_differs_and_ambiguous_pairs_are_left_out(tmp_path):
    one = _write_run(tmp_path / "a", "refilled", 0, 60.0, "same")
    other_lambda = _write_run(tmp_path / "b", "refilled", 0, 61.0, "same", distill_weight=1.0)
    again = _write_run(tmp_path / "c", "refilled", 1, 62.0, "same", distill_weight=1.0)  # same images, other seed
    comparison = compare_runs([one, other_lambda, again])
    assert comparison["varying_fields"] == ["distill_weight"]
    assert [g["setting"] for g in comparison["settings"]] == ["distill_weight=10.0", "distill_weight=1.0"]
    # two runs of the second setting on the first's images (a fixed --data_seed): paired by seed, so the
    # seed-0 runs pair and the seed-1 run has no twin
    assert [(d["run"], d["against"], d["test_top1"]) for d in comparison["paired"][0]["differences"]] == [
        (str(other_lambda), str(one), 1.0)
    ]
    # no seed shared one to one: which pair is meant cannot be told, and the comparison says so
    third = _write_run(tmp_path / "d", "refilled", 2, 63.0, "same", distill_weight=1.0)
    unpaired = compare_runs([one, again, third])
    assert unpaired["paired"][0]["differences"] == [] and unpaired["paired"][0]["runs_without_one_pair"] == 2
    assert ("B - A: the runs of B and A on the same images cannot be paired one to one (several of one setting on "
            "those images, and no one seed shared by exactly one of each): run both with the same --seed values."
            ) in format_comparison(unpaired)  # fmt: skip
    # (it said: "no run of B has one of A on the same images to pair with")
    assert "B - A: no run of B has one of A on the same images to pair with." in format_comparison(
        compare_runs([one, _write_run(tmp_path / "e", "refilled", 0, 61.0, "other", distill_weight=1.0)])
    )
    # runs whose results record no data fingerprint are never taken for runs on the same images
    for folder in (one, other_lambda):
        results = json.loads((folder / "results.json").read_text())
        del results["data_fingerprint"]
        (folder / "results.json").write_text(json.dumps(results))
    assert compare_runs([one, other_lambda])["paired"][0]["differences"] == []
    alone = compare_runs([one])
    assert alone["settings"][0]["setting"] == "all" and alone["paired"] == []
    assert "runs differ only" not in format_comparison(alone)  # one run: nothing to say about what other runs differ by


def test_runs_whose_dropout_masks_inductor_drew_are_a_setting_of_their_own(tmp_path):
    """Compiled by inductor, a student with dropout trains with other masks than eager from
    the same seed (its identity's random_draws): another setting, named so. A run of an
    earlier release records none, and counts as eager."""
    earlier = _write_run(tmp_path / "a", "ce", 0, 60.0, "images0")
    eager = _write_run(tmp_path / "b", "ce", 1, 62.0, "images1", random_draws="eager")
    compiled = _write_run(tmp_path / "c", "ce", 0, 61.0, "images0", random_draws="inductor")
    comparison = compare_runs([earlier, eager, compiled])
    assert comparison["varying_fields"] == ["random_draws"]
    assert [(g["setting"], g["runs"]) for g in comparison["settings"]] == [
        ("random_draws=eager", 2), ("random_draws=inductor", 1)]  # fmt: skip
    differences = comparison["paired"][0]["differences"]
    assert [(d["run"], d["against"], d["test_top1"]) for d in differences] == [(str(compiled), str(earlier), 1.0)]


def test_a_run_repeated_with_the_same_seed_on_the_same_images_is_refused(tmp_path):
    """A train-teacher run and a distill --method ce run of the same model, classes and seed
    are one run twice: compare pooled them as a setting of 2 runs, 36.67 ± 0.00."""
    first = _write_run(tmp_path / "ce", "ce", 0, 60.0, "same")
    again = _write_run(tmp_path / "teacher", "ce", 0, 60.0, "same")
    with pytest.raises(ConfigError, match=r"teacher repeats .*ce: the same setting, seed and images .* count one run "
                                          r"twice\. Pass one of them"):  # fmt: skip
        compare_runs([first, again])
    other_seed = _write_run(tmp_path / "ce1", "ce", 1, 61.0, "same")  # a fixed --data_seed: the same images
    assert compare_runs([first, other_seed])["settings"][0]["runs"] == 2
    other_start = _write_run(tmp_path / "ce2", "ce", 0, 62.0, "same", student_init="retrained")  # (its file changed)
    assert compare_runs([first, other_start])["settings"][0]["runs"] == 2


def test_runs_on_the_same_images_without_a_test_split_say_so_instead_of_unpaired(tmp_path):
    ce = _write_run(tmp_path / "ce", "ce", 0, 60.0, "same")
    rf = _write_run(tmp_path / "rf", "refilled", 0, 61.0, "same")
    for folder in (ce, rf):  # run with --test_split none: a validation top-1 only
        results = json.loads((folder / "results.json").read_text())
        results["final"]["test_top1"] = None
        (folder / "results.json").write_text(json.dumps(results))
    comparison = compare_runs([ce, rf])
    (pair,) = comparison["paired"]
    assert pair["differences"] == [] and pair["pairs_without_test_top1"] == 1
    assert ("B - A: the runs of B and A on the same images have no test top-1 to subtract (a run without a test "
            "split: --test_split none).") in format_comparison(comparison)  # fmt: skip
    assert compare_runs([ce, _write_run(tmp_path / "x", "kd", 0, 61.0, "other")])["paired"][0][
        "pairs_without_test_top1"] == 0  # fmt: skip


def test_what_is_not_a_finished_run_is_refused(tmp_path):
    run = _write_run(tmp_path / "a", "ce", 0, 60.0, "x")
    with pytest.raises(ConfigError, match="holds no finished run"):
        compare_runs([run, tmp_path])
    with pytest.raises(ConfigError, match="given twice"):
        compare_runs([run, run / "model"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a run this refilled-hf can read"):
        compare_runs([tmp_path / "b"])


@pytest.mark.slow
def test_compare_command_on_real_runs(data_dir, tmp_path, capsys):
    """ce and refilled on the same images: one setting each, the method naming them, paired."""
    teacher = write_random_teacher(tmp_path / "t")
    folders = []
    for method in ("ce", "refilled"):
        recipe = tiny_recipe(data_dir, tmp_path / method, method=method, teacher=f"local-dir:{teacher}",
                             stage1_epochs=1, stage2_epochs=1)  # fmt: skip
        results = run_distillation(RefilledConfig(**recipe))
        folders.append((str(tmp_path / method), results))
    assert main(["compare", *(f for f, _ in folders)]) == 0
    out = capsys.readouterr().out
    assert "  A: method=ce\n  B: method=refilled\n" in out
    ce, refilled = (r["final"]["test_top1"] for _, r in folders)
    assert f"run by run on the same images: {refilled - ce:+.2f}." in out
    assert main(["compare", *(f for f, _ in folders), "--json", "true"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [r["test_top1"] for r in parsed["runs"]] == [ce, refilled]
    # another seed on a copy of the data elsewhere (a job's copy on its node's disk): the same ce setting
    copy = shutil.copytree(data_dir, tmp_path / "node-local", copy_function=shutil.copyfile)
    again = run_distillation(RefilledConfig(**tiny_recipe(copy, tmp_path / "ce-seed1", method="ce", seed=1,
                                                          stage2_epochs=1)))  # fmt: skip
    assert again["data_source_fingerprint"] == folders[0][1]["data_source_fingerprint"] is not None
    assert again["data_fingerprint"] != folders[0][1]["data_fingerprint"]  # another seed's validation carve
    comparison = compare_runs([folders[0][0], str(tmp_path / "ce-seed1"), folders[1][0]])
    assert [(g["setting"], g["runs"]) for g in comparison["settings"]] == [("method=ce", 2), ("method=refilled", 1)]


def test_usage_shows_the_runs_as_typed(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert capsys.readouterr().out.startswith("usage: refilled-hf compare RUN [RUN ...] [--json true]")
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    assert capsys.readouterr().out.startswith("usage: refilled-hf push FOLDER --repo_id REPO_ID")


def test_runs_with_the_same_teacher_read_from_other_folders_are_one_setting(tmp_path):
    """Jobs that each copy the teacher to their node's disk: the same weights and setup, as
    their records show, pool over seeds; another teacher (here copied to the first's path)
    stays another setting, and a run an earlier release recorded (no setup) keeps its folder
    in its setting."""
    setup = {"teacher_setup": "s" * 64}
    runs = [_write_run(tmp_path / f"rf{s}", "refilled", s, 60.0 + s, f"images{s}", teacher=f"local-dir:/tmp/job{s}/t",
                       **setup) for s in range(3)]  # fmt: skip
    other = _write_run(tmp_path / "other", "refilled", 0, 50.0, "images0", teacher="local-dir:/tmp/job0/t",
                       teacher_weights="e" * 64, **setup)  # fmt: skip
    comparison = compare_runs([*runs, other])
    assert [(g["setting"], g["runs"]) for g in comparison["settings"]] == [
        ("teacher_weights=ffffffffffff", 3), ("teacher_weights=eeeeeeeeeeee", 1)]  # fmt: skip
    earlier = [_write_run(tmp_path / f"old{s}", "refilled", s, 60.0, "i", teacher=f"local-dir:/tmp/job{s}/t")
               for s in range(2)]  # fmt: skip
    assert len(compare_runs(earlier)["settings"]) == 2


def test_runs_on_copies_of_one_data_set_are_one_setting_named_by_the_first_path(tmp_path):
    """The data source fingerprint (every image of the selected classes, whatever seed drew
    them) tells copies of one data set at other paths from another data set; a run that
    records none (a few-shot run, an earlier release) keeps its path in its setting."""

    def at(name: str, seed: int, path: str, source: str | None) -> Path:
        folder = _write_run(tmp_path / name, "ce", seed, 60.0 + seed, f"images{seed}{source}", dataset=path)
        results = json.loads((folder / "results.json").read_text())
        (folder / "results.json").write_text(json.dumps({**results, "data_source_fingerprint": source}))
        return folder

    runs = [at(f"copy{s}", s, f"/scratch/job{s}/cifar100", "cifar") for s in range(3)]
    runs += [at("noisy", 0, "/scratch/job9/cifar100", "noisy"), at("old", 0, "/scratch/job8/cifar100", None)]
    comparison = compare_runs(runs)
    assert [(g["setting"], g["runs"]) for g in comparison["settings"]] == [
        ('dataset=/scratch/job0/cifar100', 3), ('dataset=/scratch/job9/cifar100', 1),
        ('dataset=/scratch/job8/cifar100', 1)]  # fmt: skip
