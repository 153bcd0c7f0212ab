"""Pipeline recipes: a base model and an ordered list of stages, each with its own folder and manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zhtune.config import from_mapping
from zhtune.errors import ConfigError

STAGE_KINDS = ("sft", "merge", "eval_cgec")


@dataclass(frozen=True)
class EvalSetConfig:
    """One CGEC benchmark: sentences to correct (``id<TAB>src`` or para) and references (M2 or para)."""

    name: str = ""
    input: str = ""
    ref: str = ""
    limit: int = 0  # 0: all sentences


@dataclass(frozen=True)
class StageConfig:
    """One stage. ``sft``: ``recipe`` holds recipe sections (model.path is filled in from the previous stage);
    ``merge``: folds the previous ``sft`` adapter into the current model; ``eval_cgec``: corrects and scores ``sets``
    with the current model and, for comparison, the models named in ``compare`` (``base`` or a merge stage)."""

    name: str = ""
    kind: str = ""
    recipe: dict | None = None
    dtype: str | None = None
    verify: bool = True
    sets: tuple[EvalSetConfig, ...] = ()
    compare: tuple[str, ...] = ()
    batch_size: int = 16


@dataclass(frozen=True)
class PipelineConfig:
    base: str = ""
    work_dir: str = "runs/pipeline"
    template: str = "qwen"
    system: str | None = None  # system prompt for every stage (training and evaluation); None: the template's
    trust_remote_code: bool = False
    stages: tuple[StageConfig, ...] = ()


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline recipe.

    Raises:
        ConfigError: unknown keys or stage kinds, duplicate names, a merge with no sft before it, bad compare names.
    """
    import yaml

    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"pipeline recipe {path} not found") from None
    config = from_mapping(PipelineConfig, tree, str(path))
    if not config.base:
        raise ConfigError(f"{path}: base is required (the base model folder)")
    names, seen_sft, merges = set(), False, {"base"}
    for i, stage in enumerate(config.stages):
        where = f"{path}: stages[{i}]"
        if stage.kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: unknown kind {stage.kind!r}; known kinds: {', '.join(STAGE_KINDS)}")
        if not stage.name or stage.name in names:
            raise ConfigError(f"{where}: every stage needs a unique name")
        names.add(stage.name)
        if stage.kind == "sft":
            seen_sft = True
        if stage.kind == "merge":
            if not seen_sft:
                raise ConfigError(f"{where}: a merge stage needs an sft stage before it")
            merges.add(stage.name)
        if stage.kind == "eval_cgec":
            if not stage.sets:
                raise ConfigError(f"{where}: eval_cgec needs sets")
            for other in stage.compare:
                if other not in merges:
                    raise ConfigError(f"{where}: compare name {other!r} is not 'base' or an earlier merge stage")
    return config
