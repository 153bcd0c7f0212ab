"""Every recipe under recipes/ loads and validates (walked recursively and counted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zhtune.config import load_recipe
from zhtune.data.templates import get_template

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING = sorted(p for p in RECIPES.rglob("*.yaml") if not {"accelerate", "pipeline"} & set(p.parts))
PIPELINES = sorted((RECIPES / "pipeline").rglob("*.yaml"))
ACCELERATE = sorted((RECIPES / "accelerate").rglob("*.yaml"))


def test_recipe_count():
    assert len(TRAINING) == 5, TRAINING  # Qwen2.5-7B, GLM-4-9B, Chinese-Alpaca-2-7B, ChatGLM3-6B, Llama-3-8B
    assert {p.parent.name for p in TRAINING} == {"qwen2.5", "glm4", "chinese-alpaca-2", "chatglm3", "llama3"}
    assert {p.name for p in ACCELERATE} == {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}
    assert len(PIPELINES) == 1
    assert len(TRAINING) + len(ACCELERATE) + len(PIPELINES) == len(list(RECIPES.rglob("*.yaml")))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_recipe_validates(path):
    from zhtune.config import recipe_from_dict
    from zhtune.pipeline.config import load_pipeline

    config = load_pipeline(path)
    assert [s.kind for s in config.stages] == ["sft", "merge", "sft", "merge", "eval_cgec"]
    for stage in config.stages:
        if stage.kind == "sft":  # the stage recipe is a valid training recipe once the pipeline fills model.path
            recipe_from_dict({**stage.recipe, "model": {**stage.recipe["model"], "path": config.base}})


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path):
    recipe = load_recipe(path)
    get_template(recipe.template.name)
    assert not recipe.model.trust_remote_code  # original ChatGLM checkpoints are converted, never run as code


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid_yaml(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
