"""Every recipe under recipes/ loads and validates (walked recursively and counted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zhtune.config import load_recipe
from zhtune.data.templates import get_template

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((RECIPES / "accelerate").rglob("*.yaml"))


def test_recipe_count():
    assert len(TRAINING) == 5, TRAINING  # Qwen2.5-7B, GLM-4-9B, Chinese-Alpaca-2-7B, ChatGLM3-6B, Llama-3-8B
    assert {p.parent.name for p in TRAINING} == {"qwen2.5", "glm4", "chinese-alpaca-2", "chatglm3", "llama3"}
    assert len(ACCELERATE) == 3


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path):
    recipe = load_recipe(path)
    get_template(recipe.template.name)
    assert recipe.model.trust_remote_code == (recipe.template.name.startswith("chatglm"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid_yaml(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
