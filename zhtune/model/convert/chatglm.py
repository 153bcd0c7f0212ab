"""The weight layouts of the original ChatGLM checkpoints and of their native equivalents, both ways.

Two families:

* ChatGLM2-6B, ChatGLM3-6B (and their -32k / -base releases) and GLM-4-9B-chat (non ``-hf``) are transformers'
  native ``glm`` architecture (``GlmForCausalLM``): ``query_key_value`` rows are ``[Q | K | V]`` with multi-query
  groups, ``dense_h_to_4h`` is already ``[gate | up]`` (``gate_up_proj``), rotary on the first half of each head in
  interleaved pairs (``partial_rotary_factor`` 0.5), RMSNorm, q/k/v bias. What differs per release is the rotary base:
  ChatGLM3-32k and GLM-4 multiply it by ``rope_ratio``; ChatGLM2-32k divides positions by it (linear scaling).
  ChatGLM2's code builds its rotary table in the model dtype (in fp16, positions past 2048 round to even numbers);
  the converted model computes it in fp32 as transformers' ``glm`` does, the exact values of the same formula.
* ChatGLM-6B (v1) becomes zhtune's own ``zhtune_chatglm`` (:mod:`zhtune.model.chatglm`); its fused
  ``query_key_value`` interleaves q, k and v per head (``[h0: q k v | h1: q k v | ...]``).

A fused tensor is split by row indices (:func:`qkv_rows`), which serve weights, biases and LoRA ``B`` matrices
alike, and are put back with the same indices on the way back. Buffers the original stores but never reads from its
checkpoint (rotary ``inv_freq``) are dropped and kept, bit for bit, in the conversion record of ``config.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from zhtune.errors import ConfigError

RECORD = "zhtune_conversion"  # config.json key: what the conversion came from (original config, dropped buffers)

# original name suffix inside a layer -> native suffix (1:1 tensors); fused q/k/v are handled by qkv_rows
GLM_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
GLM_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
V1_LAYER = {
    **{f"input_layernorm.{p}": f"input_layernorm.{p}" for p in ("weight", "bias")},
    **{f"attention.dense.{p}": f"self_attn.o_proj.{p}" for p in ("weight", "bias")},
    **{f"post_attention_layernorm.{p}": f"post_attention_layernorm.{p}" for p in ("weight", "bias")},
    **{f"mlp.dense_h_to_4h.{p}": f"mlp.up_proj.{p}" for p in ("weight", "bias")},
    **{f"mlp.dense_4h_to_h.{p}": f"mlp.down_proj.{p}" for p in ("weight", "bias")},
}
V1_TOP = {
    "transformer.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.final_layernorm.weight": "model.norm.weight",
    "transformer.final_layernorm.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
}

# The original modules LoRA adapters of that era target, and what each becomes (q/k/v: split).
ADAPTER_MODULES = {
    "glm": {
        "self_attention.query_key_value": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attention.dense": ("self_attn.o_proj",),
        "mlp.dense_h_to_4h": ("mlp.gate_up_proj",),
        "mlp.dense_4h_to_h": ("mlp.down_proj",),
    },
    "v1": {
        "attention.query_key_value": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attention.dense": ("self_attn.o_proj",),
        "mlp.dense_h_to_4h": ("mlp.up_proj",),
        "mlp.dense_4h_to_h": ("mlp.down_proj",),
    },
}


@dataclass(frozen=True)
class Layout:
    """The tensor names of one family: ``layer_prefix`` (``{i}`` is the layer), fused q/k/v, 1:1 tables, buffers."""

    family: str  # "glm" or "v1"
    layer_prefix: str
    qkv: str  # the fused q/k/v module inside a layer
    layer: dict[str, str]
    top: dict[str, str]
    buffers: tuple[str, ...]  # patterns (``{i}``: layer) of tensors dropped and recorded

    def layer_of(self, name: str) -> tuple[int, str] | None:
        prefix = re.escape(self.layer_prefix).replace(r"\{i\}", r"(\d+)")
        m = re.fullmatch(prefix + r"(.+)", name)
        return (int(m.group(1)), m.group(2)) if m else None


LAYOUTS = {
    "glm": Layout(
        "glm",
        "transformer.encoder.layers.{i}.",
        "self_attention.query_key_value",
        GLM_LAYER,
        GLM_TOP,
        ("transformer.rotary_pos_emb.inv_freq",),
    ),
    "v1": Layout(
        "v1",
        "transformer.layers.{i}.",
        "attention.query_key_value",
        V1_LAYER,
        V1_TOP,
        ("transformer.layers.{i}.attention.rotary_emb.inv_freq",),
    ),
}


@dataclass(frozen=True)
class Dims:
    """The attention shape a fused q/k/v needs: heads, key/value groups, head size."""

    heads: int
    groups: int
    head_dim: int


def dims_of(family: str, config: dict) -> Dims:
    """Attention dims from an original ``config.json`` dict."""
    heads = int(config.get("num_attention_heads", 32))
    if family == "v1":
        return Dims(heads, heads, int(config.get("hidden_size", 4096)) // heads)
    groups = int(config.get("multi_query_group_num", 1)) if config.get("multi_query_attention") else heads
    return Dims(heads, groups, int(config.get("kv_channels") or int(config.get("hidden_size", 4096)) // heads))


def qkv_rows(family: str, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of q, k and v in the fused ``query_key_value`` output.

    ChatGLM2/3/GLM-4: contiguous ``[Q (heads) | K (groups) | V (groups)]``. ChatGLM-6B: per head ``[q | k | v]``, as its
    attention views the output as ``[heads, 3 * head_dim]`` before splitting the last dimension in three.
    """
    h, g, d = dims.heads, dims.groups, dims.head_dim
    if family == "v1":
        per_head = torch.arange(h * 3 * d).view(h, 3, d)
        return tuple(per_head[:, j].reshape(-1) for j in range(3))
    q, kv = h * d, g * d
    return torch.arange(q), torch.arange(q, q + kv), torch.arange(q + kv, q + 2 * kv)


@dataclass
class Piece:
    """One output tensor: its name, shape, the source tensor names it is made of, and how."""

    name: str
    shape: list[int]
    sources: tuple[str, ...]
    make: object  # callable(list[Tensor]) -> Tensor


def _take(rows):
    return lambda ts: ts[0].index_select(0, rows)


def _same(ts):
    return ts[0]


def forward_pieces(layout: Layout, dims: Dims, name: str, shape: list[int]) -> list[Piece] | None:
    """The native tensors made from the original tensor ``name``; None for a dropped buffer.

    Raises:
        ConfigError: a tensor this layout does not know (a p-tuning prefix, quantization scales, another model).
    """
    if any(re.fullmatch(re.escape(b).replace(r"\{i\}", r"\d+"), name) for b in layout.buffers):
        return None
    if name in layout.top:
        return [Piece(layout.top[name], shape, (name,), _same)]
    located = layout.layer_of(name)
    if located:
        i, rest = located
        native = f"model.layers.{i}."
        if rest in layout.layer:
            return [Piece(native + layout.layer[rest], shape, (name,), _same)]
        if rest in (f"{layout.qkv}.weight", f"{layout.qkv}.bias"):
            kind = rest.rsplit(".", 1)[1]
            rows = qkv_rows(layout.family, dims)
            if sum(len(r) for r in rows) != shape[0]:
                raise ConfigError(
                    f"tensor {name} has {shape[0]} rows but config.json implies {sum(len(r) for r in rows)} "
                    f"({dims.heads} heads, {dims.groups} key/value groups, head size {dims.head_dim})"
                )
            return [
                Piece(f"{native}self_attn.{x}_proj.{kind}", [len(r), *shape[1:]], (name,), _take(r))
                for x, r in zip("qkv", rows)
            ]
    hint = ""
    if "prefix_encoder" in name:
        hint = " (a p-tuning v2 prefix: merge or drop it first; zhtune converts plain checkpoints)"
    elif "weight_scale" in name:
        hint = " (a quantized -int4/-int8 checkpoint: convert the full-precision release instead)"
    raise ConfigError(f"tensor {name!r} is not part of the {layout.family} layout zhtune converts{hint}")


def _put(rows_list):
    def make(ts):
        width = sum(len(r) for r in rows_list)
        out = ts[0].new_empty((width, *ts[0].shape[1:]))
        for rows, t in zip(rows_list, ts):
            out.index_copy_(0, rows, t)
        return out

    return make


def backward_pieces(layout: Layout, dims: Dims, name: str, shapes: dict[str, list[int]]) -> list[Piece]:
    """The original tensors made from the native tensor ``name`` (empty when ``name`` is consumed by another one,
    as k/v are by q).

    Raises:
        ConfigError: a native tensor without an original counterpart.
    """
    inverse_top = {v: k for k, v in layout.top.items()}
    if name in inverse_top:
        return [Piece(inverse_top[name], shapes[name], (name,), _same)]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        prefix = layout.layer_prefix.format(i=i)
        inverse = {v: k for k, v in layout.layer.items()}
        if rest in inverse:
            return [Piece(prefix + inverse[rest], shapes[name], (name,), _same)]
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            if qkv.group(1) != "q":
                return []
            kind = qkv.group(2)
            sources = tuple(f"model.layers.{i}.self_attn.{x}_proj.{kind}" for x in "qkv")
            missing = [s for s in sources if s not in shapes]
            if missing:
                raise ConfigError(f"cannot rebuild {prefix}{layout.qkv}.{kind}: {missing} missing")
            rows = qkv_rows(layout.family, dims)
            shape = [sum(len(r) for r in rows), *shapes[name][1:]]
            return [Piece(f"{prefix}{layout.qkv}.{kind}", shape, sources, _put(rows))]
    raise ConfigError(f"native tensor {name!r} has no place in the original {layout.family} layout")


def rotary_inv_freq(family: str, config: dict, dtype: torch.dtype) -> torch.Tensor:
    """The ``inv_freq`` buffer the original code computes at construction, for checkpoints without a record.

    ChatGLM-6B: ``(1 / 10000 ** (arange(0, d, 2) / d)).half()`` with ``d = head_dim / 2``. ChatGLM2/3/GLM-4: the same
    formula in the model dtype with ``d = kv_channels / 2`` (the values are never read back by the original code).
    """
    dims = dims_of(family, config)
    dim = dims.head_dim // 2
    if family == "v1":
        return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half()
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim))


def tensor_record(tensor: torch.Tensor) -> dict:
    """A tensor as JSON, bit for bit (dtype, shape, raw bytes in hex)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "hex": flat.view(torch.uint8).numpy().tobytes().hex(),
    }


def tensor_from_record(record: dict) -> torch.Tensor:
    dtype = getattr(torch, record["dtype"])
    raw = torch.frombuffer(bytearray.fromhex(record["hex"]), dtype=torch.uint8)
    return raw.view(dtype).reshape(record["shape"]).clone()


def buffer_names(layout: Layout, layers: int) -> list[str]:
    out = []
    for pattern in layout.buffers:
        out += [pattern.format(i=i) for i in range(layers)] if "{i}" in pattern else [pattern]
    return out


# Defaults of the original configuration classes (keys a config.json may leave out).
V1_DEFAULTS = dict(
    vocab_size=150528,
    hidden_size=4096,
    num_layers=28,
    num_attention_heads=32,
    layernorm_epsilon=1e-5,
    bos_token_id=150004,
    eos_token_id=150005,
    mask_token_id=150000,
    gmask_token_id=150001,
    pad_token_id=0,
    max_sequence_length=2048,
    inner_hidden_size=16384,
    position_encoding_2d=True,
    pre_seq_len=None,
)
GLM_DEFAULTS = dict(
    num_layers=28,
    padded_vocab_size=65024,
    hidden_size=4096,
    ffn_hidden_size=13696,
    kv_channels=128,
    num_attention_heads=32,
    seq_length=2048,
    layernorm_epsilon=1e-5,
    rmsnorm=True,
    apply_residual_connection_post_layernorm=False,
    post_layer_norm=True,
    add_bias_linear=False,
    add_qkv_bias=False,
    multi_query_attention=False,
    multi_query_group_num=1,
    rope_ratio=1,
    fp32_residual_connection=False,
    pre_seq_len=None,
)
# (key, value the native architecture needs, what the key means): configs that differ are refused
GLM_REQUIRED = (
    ("rmsnorm", True, "RMSNorm"),
    ("post_layer_norm", True, "a final norm"),
    ("apply_residual_connection_post_layernorm", False, "pre-norm residuals"),
    ("add_bias_linear", False, "no bias on the dense/MLP layers"),
    ("fp32_residual_connection", False, "the residual stream in the model dtype"),
    ("pre_seq_len", None, "no p-tuning prefix"),
)
# end-of-turn ids of each release (ChatGLM3's chat() also stops at <|user|> 64795 and <|observation|> 64797)
END_OF_TURN = {"chatglm": (130005,), "chatglm2": (2,), "chatglm3": (2, 64795, 64797), "glm4": (151329, 151336, 151338)}
# the sampling defaults of each release's chat()
CHAT_SAMPLING = {
    "chatglm": {"do_sample": True, "top_p": 0.7, "temperature": 0.95},
    "chatglm2": {"do_sample": True, "top_p": 0.8, "temperature": 0.8},
    "chatglm3": {"do_sample": True, "top_p": 0.8, "temperature": 0.8},
    "glm4": {"do_sample": True, "top_p": 0.8, "temperature": 0.8},
}
AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}


def family_of(variant: str) -> str:
    return "v1" if variant == "chatglm" else "glm"


def _refuse(where: str, key: str, value, meaning: str) -> None:
    raise ConfigError(
        f"{where}: {key}={value!r}; the native architecture needs {meaning}, so this checkpoint cannot be converted"
    )


def native_config(variant: str, rope_semantics: str | None, config: dict, dtype: str, where: str, record: dict):
    """The transformers config of the converted model (``GlmConfig`` or ``ZhtuneChatGLMConfig``).

    ``rope_semantics`` says what ``rope_ratio`` means in this checkpoint's code: ``base`` (the rotary base is
    multiplied: ChatGLM3-32k, GLM-4) or ``positions`` (positions are divided: ChatGLM2-32k, linear scaling).

    Raises:
        ConfigError: a setting the native architecture does not have (named, with its meaning).
    """
    if variant == "chatglm":
        from zhtune.model.chatglm_config import ZhtuneChatGLMConfig

        c = {**V1_DEFAULTS, **config}
        if not c["position_encoding_2d"]:
            _refuse(where, "position_encoding_2d", False, "2D positions")
        if c["pre_seq_len"] is not None:
            _refuse(where, "pre_seq_len", c["pre_seq_len"], "no p-tuning prefix")
        out = ZhtuneChatGLMConfig(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_layers"],
            num_attention_heads=c["num_attention_heads"],
            intermediate_size=c["inner_hidden_size"],
            layer_norm_eps=c["layernorm_epsilon"],
            max_position_embeddings=c["max_sequence_length"],
            bos_token_id=c["bos_token_id"],
            eos_token_id=c["eos_token_id"],
            pad_token_id=c["pad_token_id"],
            mask_token_id=c["mask_token_id"],
            gmask_token_id=c["gmask_token_id"],
            dtype=dtype,
            architectures=["ZhtuneChatGLMForCausalLM"],
            **{RECORD: record},
        )
        return out
    from transformers import GlmConfig

    c = {**GLM_DEFAULTS, **config}
    for key, needed, meaning in GLM_REQUIRED:
        if c[key] != needed:
            _refuse(where, key, c[key], meaning)
    ratio = float(c["rope_ratio"] or 1)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if ratio != 1 and rope_semantics == "positions":
        rope.update(rope_type="linear", factor=ratio)
    elif ratio != 1:
        rope["rope_theta"] = 10000.0 * ratio
    dims = dims_of("glm", c)
    return GlmConfig(
        vocab_size=c["padded_vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["ffn_hidden_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.groups,
        head_dim=dims.head_dim,
        max_position_embeddings=c["seq_length"],
        rms_norm_eps=c["layernorm_epsilon"],
        attention_bias=bool(c["add_qkv_bias"]),
        rope_parameters=rope,
        partial_rotary_factor=0.5,
        tie_word_embeddings=False,
        pad_token_id=c.get("pad_token_id"),
        eos_token_id=c.get("eos_token_id"),
        bos_token_id=c.get("bos_token_id"),
        dtype=dtype,
        architectures=["GlmForCausalLM"],
        **{RECORD: record},
    )


def original_config(native: dict) -> tuple[str, dict]:
    """``(variant, config.json dict)`` of the original layout for a native config (``--to chatglm``).

    A converted checkpoint carries its original config in the conversion record; it is returned with the fields a
    merge can change (vocabulary size, dtype) updated. Otherwise the config is rebuilt from the native one.

    Raises:
        ConfigError: a model type that has no ChatGLM layout.
    """
    record = native.get(RECORD) or {}
    dtype = native.get("dtype") or native.get("torch_dtype")
    if record.get("config"):
        out = dict(record["config"])
        vocab_key = "vocab_size" if record.get("variant") == "chatglm" else "padded_vocab_size"
        out[vocab_key] = native["vocab_size"]
        if "vocab_size" in out:
            out["vocab_size"] = native["vocab_size"]
        if dtype:
            out["torch_dtype"] = dtype
        return record["variant"], out
    model_type = native.get("model_type")
    if model_type == "zhtune_chatglm":
        return "chatglm", {
            "architectures": ["ChatGLMModel"],
            "auto_map": dict(AUTO_MAP),
            "model_type": "chatglm",
            "vocab_size": native["vocab_size"],
            "hidden_size": native["hidden_size"],
            "num_layers": native["num_hidden_layers"],
            "num_attention_heads": native["num_attention_heads"],
            "inner_hidden_size": native["intermediate_size"],
            "layernorm_epsilon": native["layer_norm_eps"],
            "max_sequence_length": native["max_position_embeddings"],
            "position_encoding_2d": True,
            **{
                k: native[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id")
            },
            "torch_dtype": dtype,
            "use_cache": True,
        }
    if model_type != "glm":
        raise ConfigError(f"model_type {model_type!r} has no original ChatGLM layout (known: glm, zhtune_chatglm)")
    rope = native.get("rope_parameters") or {"rope_type": "default", "rope_theta": native.get("rope_theta", 10000)}
    linear = rope.get("rope_type") == "linear"
    ratio = float(rope.get("factor", 1)) if linear else float(rope.get("rope_theta", 10000)) / 10000.0
    variant = "glm4" if native["vocab_size"] == 151552 else ("chatglm2" if linear else "chatglm3")
    heads, groups = native["num_attention_heads"], native["num_key_value_heads"]
    out = {
        "architectures": ["ChatGLMModel"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": bool(native.get("attention_bias", True)),
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": native["intermediate_size"],
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": native["hidden_size"],
        "kv_channels": native.get("head_dim"),
        "layernorm_epsilon": native["rms_norm_eps"],
        "multi_query_attention": groups != heads,
        "multi_query_group_num": groups,
        "num_attention_heads": heads,
        "num_layers": native["num_hidden_layers"],
        "original_rope": True,
        "padded_vocab_size": native["vocab_size"],
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": native["max_position_embeddings"],
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "eos_token_id": native.get("eos_token_id"),
        "pad_token_id": native.get("pad_token_id"),
        "use_cache": True,
    }
    if ratio != 1:
        out["rope_ratio"] = ratio if not ratio.is_integer() else int(ratio)
    return variant, out


def generation_config(variant: str, config: dict, source: dict | None) -> dict:
    """``generation_config.json`` of the converted model: the checkpoint's own settings (or the release's chat()
    sampling defaults) with ``eos_token_id`` set to every end-of-turn id of the release."""
    out = dict(source) if source else {**CHAT_SAMPLING[variant], "max_length": config.get("seq_length", 2048)}
    eos = out.get("eos_token_id", config.get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    out["eos_token_id"] = list(dict.fromkeys(eos + list(END_OF_TURN[variant])))
    if config.get("pad_token_id") is not None:
        out.setdefault("pad_token_id", config["pad_token_id"])
    if variant == "chatglm":
        out.setdefault("bos_token_id", config.get("bos_token_id", V1_DEFAULTS["bos_token_id"]))
        out.setdefault("max_length", config.get("max_sequence_length", 2048))
    return out
