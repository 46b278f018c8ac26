"""Every recipe parses into a valid configuration, and the quickstart's recipes on disk are
the ones the quickstart runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from refilled_hf.cli import parse_config
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.quickstart import QUICKSTART_RECIPES, run_quickstart

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses(path):
    assert path.read_text().startswith("#"), "each recipe says in a comment what it reproduces"
    (config,) = parse_config((RefilledConfig,), ["--config", str(path)], "test")
    trains_teacher = "method" not in yaml.safe_load(path.read_text()) and "teacher" in path.stem
    if config.method != "ce" and not trains_teacher:
        assert config.teacher
    assert config.milestones()
    # it sets nothing its run ignores (train-teacher would refuse it, distill warn about it)
    assert config.fields_unused_by("train-teacher" if trains_teacher else config.method) == {}


def test_authors_settings_are_kept_in_the_paper_recipes():
    for student in ("40_2", "16_2", "40_1", "16_1"):
        recipe = yaml.safe_load((RECIPES / "cifar100" / f"refilled_wrn_{student}.yaml").read_text())
        assert recipe["distill_weight"] == 100.0 and recipe["tau1"] == 4.0 and recipe["tau2"] == 2.0
        assert recipe["stage1_epochs"] == recipe["stage2_epochs"] == 200
    for path in (RECIPES / "cifar100").glob("*.yaml"):  # neither the REFILLED nor the CRD protocol clips
        assert yaml.safe_load(path.read_text())["max_grad_norm"] == 0.0, path.name


@pytest.mark.parametrize("name", sorted(QUICKSTART_RECIPES))
def test_quickstart_recipes_match_the_code(name):
    assert yaml.safe_load((RECIPES / "quickstart" / f"{name}.yaml").read_text()) == QUICKSTART_RECIPES[name]


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1


def test_the_quickstart_uses_a_gpu_when_there_is_one():
    """The README's main job must not pin the CPU: no quickstart recipe sets use_cpu."""
    for name, recipe in QUICKSTART_RECIPES.items():
        assert "use_cpu" not in recipe, name
        assert "use_cpu" not in yaml.safe_load((RECIPES / "quickstart" / f"{name}.yaml").read_text()), name


CIFAR100 = RECIPES.parents[1] / "shared" / "data" / "cifar100"
CIFAR100_RECIPES = sorted((RECIPES / "cifar100").glob("*.yaml"))


@pytest.fixture(scope="module")
def stand_in_teachers(tmp_path_factory) -> dict[str, str]:
    """Untrained teachers with the label names the recipes' real teachers would have."""
    import json

    from helpers import write_random_teacher

    names = json.loads((CIFAR100 / "meta.json").read_text())
    names = names["fine_label_names"]
    folder = tmp_path_factory.mktemp("teachers")
    return {
        "all": f"local-dir:{write_random_teacher(folder / 'all', label_names=list(names))}",
        "first-half": f"local-dir:{write_random_teacher(folder / 'half', label_names=list(names[:50]))}",
    }


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR100.is_dir(), reason="needs the local CIFAR-100 copy at ../shared/data/cifar100")
@pytest.mark.parametrize("path", CIFAR100_RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke_run(path, stand_in_teachers, tmp_path):
    """Each CIFAR-100 recipe runs one optimizer step per stage on the local copy (a few
    images per class, a stand-in teacher) and exports a model. Its batches hold 16 images:
    on these 200, any recipe's batch (64 to 512) is one step over (nearly) all of them, and
    the suite's slowest tests were these larger batches' forward passes on 2 CPU cores."""
    from refilled_hf.pipeline import run_distillation, run_teacher_training

    recipe = yaml.safe_load(path.read_text())
    trains_teacher = "method" not in recipe and "teacher" in path.stem
    argv = ["--config", str(path), "--dataset", str(CIFAR100), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--shots_per_class", "2", "--validation_fraction", "0.002", "--test_split", "none",
            "--use_cpu", "true", "--disable_tqdm", "true", "--per_device_train_batch_size", "16"]  # fmt: skip
    if not trains_teacher and recipe.get("method", "refilled") != "ce":
        which = "first-half" if recipe.get("teacher_classes") == "cifar100-first-half" else "all"
        argv += ["--teacher", stand_in_teachers[which]]
    (config,) = parse_config((RefilledConfig,), argv, "test")
    results = (run_teacher_training if trains_teacher else run_distillation)(config)
    import math

    assert math.isfinite(results["final"]["train_metrics"]["train_loss"])
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert results["final"]["validation_samples"] == results["data"]["validation_images"] > 0


@pytest.mark.parametrize(("shots", "message"), [(1000, "more than some classes have left"), (0, "must be >= 1")])
def test_the_quickstart_refuses_what_would_fail_after_the_teacher_trained(shots, message, tmp_path):
    """A --shots_per_class the digits cannot give (or out of range) is refused before
    anything is written or trained, not after the teacher's run."""
    with pytest.raises(ConfigError, match=message):
        run_quickstart(str(tmp_path / "qs"), shots_per_class=shots)
    assert not (tmp_path / "qs").exists()


def test_an_interrupted_quickstart_says_how_to_start_it_again(monkeypatch, tmp_path, capsys):
    """The quickstart takes no --resume_from_checkpoint: a stop inside one of its runs points
    to --overwrite true, and the command line exits as for the signal."""
    import signal

    from refilled_hf import cli, pipeline

    def stopped(config):
        resume = "The same command with --resume_from_checkpoint true continues"
        raise pipeline.RunInterrupted("interrupted (SIGINT): stage1 stopped at step 3 of 9", resume, signal.SIGINT)

    monkeypatch.setattr(pipeline, "run_teacher_training", lambda config: {"final": {"test_top1": 90.0}})
    monkeypatch.setattr(pipeline, "run_distillation", stopped)
    with pytest.raises(pipeline.RunInterrupted) as raised:
        run_quickstart(str(tmp_path / "qs"), seeds=(0,))
    assert str(raised.value) == (
        "interrupted (SIGINT): stage1 stopped at step 3 of 9, in the quickstart's ce run. Nothing was exported. "
        "`refilled-hf quickstart --overwrite true` (with the same options) starts the quickstart again."
    )
    assert cli.main(["quickstart", "--output_dir", str(tmp_path / "again"), "--seeds", "0"]) == 130
    assert "--resume_from_checkpoint" not in capsys.readouterr().err
