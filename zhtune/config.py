"""Typed configuration sections and the strict loader that builds them from YAML mappings.

Each concern (data, template, tokenization, model, LoRA, training, output, in-loop evaluation) has one small frozen
dataclass; :func:`from_mapping` turns a plain mapping (from YAML or CLI ``key=value`` overrides) into one, refusing
unknown keys and wrong types with the dotted path of the key. These are plain settings: nothing here imports a model
or reads data, so every layer can depend on this module; other recipes (the pipeline's) build their own dataclasses
with the same loader.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from zhtune.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class MixConfig:
    """How the files of ``data.paths`` become one record stream (before the validation split).

    ``concat`` reads the files one after the other. ``interleave_under`` draws each next record from file ``i``
    with probability ``probabilities[i]`` (round-robin when empty) and stops when the first file runs out;
    ``interleave_over`` goes on until every file has run out once, reading exhausted files again (oversampling
    the smaller ones), as LLaMA-Factory's ``mix_strategy`` does. Draws are seeded with ``seed`` (default
    ``train.seed``).
    """

    strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"
    probabilities: tuple[float, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how to read it.

    ``format`` is ``auto`` (detected from the first record) or a name from ``zhtune.data.formats.FORMATS``.
    ``on_error`` is ``raise`` (first bad record stops with file:line and field) or ``skip`` (bad records are
    counted and the first few reasons reported). ``max_samples`` keeps the first N records of each file (one
    number for every file, or a list with one entry per path; null or -1: all). ``cache_dir`` holds what
    ``zhtune prepare`` writes (default ``$ZHTUNE_CACHE/data``, else ``~/.cache/zhtune/data``); ``num_workers``
    processes tokenize in parallel (1: in this process, the tokenizer's own threads still use every core).
    """

    paths: tuple[str, ...] = ()
    format: str = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    cgec_instruction: str = "请改正下面句子中的语法错误，只输出改正后的句子。"
    cgec_refs: Literal["first", "each"] = "first"
    max_samples: int | tuple[int | None, ...] | None = None
    mix: MixConfig = MixConfig()
    cache_dir: str | None = None
    num_workers: int = 1

    def file_limits(self) -> tuple[int | None, ...]:
        """``max_samples`` as one limit per path (None: no limit)."""
        limits = self.max_samples if isinstance(self.max_samples, tuple) else (self.max_samples,) * len(self.paths)
        return tuple(None if n is None or n < 0 else n for n in limits)


def check_data_config(data: DataConfig, where: str = "data") -> None:
    """Cross-field checks of a :class:`DataConfig` (the loader checks each key's type).

    Raises:
        ConfigError: a per-file list whose length differs from ``paths``, probabilities that are negative or do
            not sum to 1, ``num_workers`` below 1.
    """
    n = len(data.paths)
    if isinstance(data.max_samples, tuple) and len(data.max_samples) != n:
        raise ConfigError(f"{where}.max_samples: {len(data.max_samples)} values for {n} paths; give one per path")
    probs = data.mix.probabilities
    if probs:
        if data.mix.strategy == "concat":
            raise ConfigError(f"{where}.mix.probabilities: only used with strategy interleave_under/interleave_over")
        if len(probs) != n:
            raise ConfigError(f"{where}.mix.probabilities: {len(probs)} values for {n} paths; give one per path")
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ConfigError(f"{where}.mix.probabilities: must be >= 0 and sum to 1, got {list(probs)}")
    if data.num_workers < 1:
        raise ConfigError(f"{where}.num_workers: must be at least 1, got {data.num_workers}")


@dataclass(frozen=True)
class TemplateConfig:
    """Which chat template renders conversations; ``system`` overrides the template's default system prompt."""

    name: str = "default"
    system: str | None = None
    enable_thinking: bool = False


@dataclass(frozen=True)
class TokenizeConfig:
    """How rendered conversations become ``(input_ids, labels)``.

    ``overflow`` decides what happens to samples longer than ``cutoff_len``: ``truncate`` keeps the first
    ``cutoff_len`` tokens, ``drop`` removes the sample; both are counted in the report.
    """

    cutoff_len: int = 2048
    overflow: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """The base checkpoint: a local folder; ``trust_remote_code`` only when the user asks (ChatGLM-6B/2/3)."""

    path: str = ""
    tokenizer: str | None = None  # defaults to ``path``
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    # auto: flex attention for packed training on CUDA, SDPA elsewhere; or any transformers name (sdpa, eager, ...)
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = True
    # with gradient_checkpointing: the share of decoder layers (the first ones) that recompute their activations;
    # lower is faster and takes more memory (benchmarks/results/train_throughput-7b.json)
    checkpoint_fraction: float = 1.0
    # "4bit": QLoRA, the frozen base in NF4 (double quantization) through bitsandbytes, computing in ``dtype``
    quantization: Literal["none", "4bit"] = "none"


@dataclass(frozen=True)
class InitAdapterConfig:
    """Start from an existing adapter: keep training it (``resume_weights``) or fold it into the base and train a
    new one on top (``merge_then_new``)."""

    path: str = ""
    mode: Literal["resume_weights", "merge_then_new"] = "merge_then_new"


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters; ``target_modules`` is ``auto`` (the architecture table), ``all-linear`` or a list."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "auto"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    init_adapter: InitAdapterConfig | None = None


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop. ``micro_batch_size`` counts packed rows (or samples when packing is off) per
    device; one optimizer step sees ``micro_batch_size * grad_accum * world_size`` of them."""

    lr: float = 2e-4
    epochs: float = 3.0
    max_steps: int = -1
    micro_batch_size: int = 2
    grad_accum: int = 4
    warmup_ratio: float = 0.03
    warmup_steps: int = -1
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 200
    eval_every: int = 100
    val_size: float = 0.02
    log_every: int = 1
    resume_from: str | None = None
    progress_bar: bool = True
    chunked_loss: bool = True  # loss without full logits (zhtune.train.loss); False: the plain full-logits loss
    # the fast path (zhtune.train.fast): fused LoRA layers, liger RMSNorm/SwiGLU/RoPE on CUDA, flex attention for
    # packed rows on CUDA (model.attn_implementation: auto), the chunked loss; false: peft + transformers as they are
    fast_path: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes: checkpoints, the final adapter, metrics, plots."""

    dir: str = "runs/zhtune"


@dataclass(frozen=True)
class CgecEvalConfig:
    """Generate corrections on (the first ``limit`` sentences of) a dev set every ``every`` steps and score them;
    ``keep_best`` keeps the adapter with the best F0.5 in ``OUT/best_adapter``."""

    data: str = ""
    every: int = 100
    limit: int = 200
    batch_size: int = 16
    instruction: str | None = None
    keep_best: bool = True


@dataclass(frozen=True)
class EvalConfig:
    """Evaluations run inside the training loop besides the validation loss."""

    cgec: CgecEvalConfig | None = None


@dataclass(frozen=True)
class Recipe:
    """A whole training recipe, one section per concern."""

    model: ModelConfig
    data: DataConfig
    template: TemplateConfig
    tokenize: TokenizeConfig
    lora: LoraConfig
    train: TrainConfig
    output: OutputConfig
    eval: EvalConfig = EvalConfig()


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: must not be null")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (arm, *_rest) = get_args(tp)
        return tuple(_check_type(v, arm, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "2e-4" as a string
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got a boolean")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_mapping(cls: type[T], mapping: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``mapping``, checking every key and type.

    Args:
        cls: a dataclass type whose fields have simple annotations (str, int, float, bool, Literal, unions
            with None, tuple[X, ...], nested dataclasses).
        mapping: a dict (None means "all defaults").
        where: dotted prefix used in error messages (``train.lr``).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: on an unknown key (listing the known ones) or a value of the wrong type.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _check_type(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _set_override(tree: dict, override: str) -> None:
    import yaml

    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def recipe_from_dict(tree: dict, where: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from a nested mapping (unknown sections or keys are errors)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections")
    recipe = from_mapping(
        Recipe,
        {k: v if v is not None else {} for k, v in tree.items()}
        | {k: {} for k in ("model", "data", "template", "tokenize", "lora", "train", "output") if k not in tree},
    )
    if not recipe.model.path:
        raise ConfigError(f"{where}: model.path is required (a local checkpoint folder)")
    if not recipe.data.paths:
        raise ConfigError(f"{where}: data.paths is required (one or more data files)")
    check_data_config(recipe.data, f"{where}: data")
    if not 0.0 <= recipe.model.checkpoint_fraction <= 1.0:
        raise ConfigError(f"{where}: model.checkpoint_fraction must be between 0 and 1")
    if recipe.eval.cgec is not None and not recipe.eval.cgec.data:
        raise ConfigError(f"{where}: eval.cgec.data is required (a dev para or M2 file)")
    if recipe.lora.init_adapter is not None and not recipe.lora.init_adapter.path:
        raise ConfigError(f"{where}: lora.init_adapter.path is required when init_adapter is set")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe and apply ``section.key=value`` overrides (values parsed as YAML).

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types, missing required values.
    """
    import yaml

    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    for override in overrides:
        _set_override(tree, override)
    return recipe_from_dict(tree, str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe as plain data (tuples as lists), for writing next to outputs."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(recipe))


__all__ = [
    "DataConfig",
    "MixConfig",
    "check_data_config",
    "TemplateConfig",
    "TokenizeConfig",
    "ModelConfig",
    "LoraConfig",
    "InitAdapterConfig",
    "TrainConfig",
    "OutputConfig",
    "Recipe",
    "from_mapping",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
]
