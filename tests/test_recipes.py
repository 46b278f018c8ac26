"""Every recipe parses into a valid configuration, and the quickstart's recipes on disk are
the ones the quickstart runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from refilled_hf.cli import parse_config
from refilled_hf.config import RefilledConfig
from refilled_hf.quickstart import QUICKSTART_RECIPES

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses(path):
    assert path.read_text().startswith("#"), "each recipe says in a comment what it reproduces"
    (config,) = parse_config((RefilledConfig,), ["--config", str(path)], "test")
    if config.method != "ce":
        assert config.teacher
    assert config.milestones()


def test_authors_settings_are_kept_in_the_paper_recipes():
    for student in ("40_2", "16_2", "40_1", "16_1"):
        recipe = yaml.safe_load((RECIPES / "cifar100" / f"refilled_wrn_{student}.yaml").read_text())
        assert recipe["distill_weight"] == 100.0 and recipe["tau1"] == 4.0 and recipe["tau2"] == 2.0
        assert recipe["stage1_epochs"] == recipe["stage2_epochs"] == 200


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
