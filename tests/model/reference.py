"""The original ChatGLM code as the reference, and tiny original checkpoints saved the way the real ones are.

The code is imported with importlib from ``../shared/chatglm_code/<release>/`` (never copied). Under transformers 5 it
needs the fixes that folder's README lists, applied here in the test only: ``config.max_length`` and
``config.use_cache`` set before construction, ``model.post_init()`` after it, and an empty ``.lora`` module for the
modified ``chatglm3-6b-32k`` copy (whose config class also defaults to ``quantization_bit`` 4: set to 0). Importing
the code flips torch's JIT fuser flags; they are put back afterwards.

GLM-4-9B-chat's code is the ChatGLM3-6B-32k code with the rotary base scaled by its ``rope_ratio`` (500), so the
``glm4`` case runs the chatglm3-6b-32k original with GLM-4's real ``config.json`` (from
``../shared/tokenizers/glm-4-9b-chat/``) shrunk to a tiny shape, ``rope_ratio``, epsilon and vocabulary kept.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import types
from pathlib import Path

import torch

# case -> (code folder in ../shared/chatglm_code, folder of the real config.json, variant zhtune detects)
CASES = {
    "chatglm": ("chatglm-6b", "chatglm_code/chatglm-6b", "chatglm"),
    "chatglm2": ("chatglm2-6b", "chatglm_code/chatglm2-6b", "chatglm2"),
    "chatglm2-32k": ("chatglm2-6b-32k", "chatglm_code/chatglm2-6b-32k", "chatglm2"),
    "chatglm3": ("chatglm3-6b", "chatglm_code/chatglm3-6b", "chatglm3"),
    "chatglm3-32k": ("chatglm3-6b-32k", "chatglm_code/chatglm3-6b-32k", "chatglm3"),
    "glm4": ("chatglm3-6b-32k", "tokenizers/glm-4-9b-chat", "glm4"),
}
TINY_V1 = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "inner_hidden_size": 128}
TINY_GLM = {
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "kv_channels": 16,
    "num_attention_heads": 4,
    "multi_query_group_num": 2,
}
# metadata, not constructor arguments; GLM-4's "attn_implementation": "sdpa" would make transformers 5 refuse the
# original class (it does not declare SDPA support), while the code itself always uses SDPA on torch 2
NOT_KWARGS = ("model_type", "auto_map", "_name_or_path", "architectures", "transformers_version", "attn_implementation")
_modules: dict[str, types.ModuleType] = {}


def _jit_flags() -> tuple:
    c = torch._C
    profiling = c._jit_set_profiling_mode(True)
    c._jit_set_profiling_mode(profiling)
    executor = c._jit_set_profiling_executor(True)
    c._jit_set_profiling_executor(executor)
    return profiling, executor, c._jit_can_fuse_on_cpu(), c._jit_can_fuse_on_gpu()


def _restore_jit_flags(flags: tuple) -> None:
    c = torch._C
    c._jit_set_profiling_mode(flags[0])
    c._jit_set_profiling_executor(flags[1])
    c._jit_override_can_fuse_on_cpu(flags[2])
    c._jit_override_can_fuse_on_gpu(flags[3])


def original_code(shared: Path, case: str) -> types.ModuleType:
    """The original ``modeling_chatglm`` module of ``case``, imported from ../shared as a package."""
    folder = shared / "chatglm_code" / CASES[case][0]
    pkg = "chatglm_reference_" + CASES[case][0].replace("-", "_")
    if pkg not in _modules:
        package = types.ModuleType(pkg)
        package.__path__ = [str(folder)]
        sys.modules[pkg] = package
        lora = types.ModuleType(pkg + ".lora")  # the modified chatglm3-6b-32k copy imports these names
        for name in ("attach_lora", "detach_lora", "merge_lora", "lora_state_dict", "base_state_dict"):
            setattr(lora, name, None)
        sys.modules[pkg + ".lora"] = lora
        flags = _jit_flags()
        try:
            importlib.import_module(pkg + ".configuration_chatglm")
            _modules[pkg] = importlib.import_module(pkg + ".modeling_chatglm")
        finally:
            _restore_jit_flags(flags)
    return _modules[pkg]


def tiny_config(shared: Path, case: str, **changes) -> dict:
    """The real ``config.json`` of ``case`` shrunk to a tiny shape (everything else kept), as a dict."""
    config = json.loads((shared / CASES[case][1] / "config.json").read_text())
    config.update(TINY_V1 if case == "chatglm" else TINY_GLM)
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = config["num_layers"]
    if "quantization_bit" in config:
        config["quantization_bit"] = 0
    config.update(changes)
    return config


def build_original(shared: Path, case: str, config: dict, dtype: torch.dtype = torch.float32):
    """The original model for ``config`` (uninitialised weights: load or initialise them), in ``dtype``."""
    code = original_code(shared, case)
    kwargs = {k: v for k, v in config.items() if k not in NOT_KWARGS}
    kwargs.update(torch_dtype=dtype, quantization_bit=0)
    cfg = code.ChatGLMConfig(**kwargs)
    cfg.max_length = config.get("seq_length", config.get("max_sequence_length", 2048))  # transformers 5 fix
    cfg.use_cache = True  # transformers 5 fix
    model = code.ChatGLMForConditionalGeneration(cfg)
    model.post_init()  # transformers 5 fix
    return model.to(dtype).eval()


def randomize(model, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights (norm weights near 1, non-zero biases); returns the state dict in fp32."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        if "inv_freq" in name:
            state[name] = param.float()
        elif name.endswith("layernorm.weight"):
            state[name] = 1 + 0.1 * torch.randn(param.shape, generator=gen)
        elif name.endswith("bias"):
            state[name] = 0.1 * torch.randn(param.shape, generator=gen)
        elif "word_embeddings" in name:
            state[name] = 0.5 * torch.randn(param.shape, generator=gen)
        else:
            state[name] = 0.08 * torch.randn(param.shape, generator=gen)
    return state


def save_original(
    path: Path,
    shared: Path,
    case: str,
    config: dict,
    state: dict,
    dtype=torch.bfloat16,
    shards: int = 3,
    fmt: str = "bin",
    code: bool = True,
) -> Path:
    """Save like the released checkpoints: ``config.json``, the model code beside it, weights in ``dtype`` as
    ``pytorch_model-0000i-of-0000n.bin`` pickles (or safetensors) with an index."""
    path.mkdir(parents=True)
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if code:
        for f in (shared / "chatglm_code" / CASES[case][0]).glob("*.py"):
            shutil.copy(f, path / f.name)
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        part = {n: state[n].to(dtype) if state[n].is_floating_point() else state[n] for n in sorted(group)}
        if fmt == "bin":
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, path / file)
        else:
            from safetensors.torch import save_file

            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in part.items()}, path / file)
        weight_map.update({n: file for n in group})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return path


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint (pickle or safetensors shards)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference(shared: Path, case: str, config: dict, path: Path, dtype: torch.dtype):
    """The original model with the weights saved in ``path``, run in ``dtype``."""
    model = build_original(shared, case, config, dtype)
    state = {k: v.to(dtype) for k, v in read_state(path).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def sample_ids(case: str, config: dict, lengths: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Rows of random ids shaped like prompts: ``[gMASK] <sop>`` + text (ChatGLM2/3, GLM-4), or text + ``[gMASK]
    <sop>`` + answer with ``lengths`` giving the prompt length of each row (ChatGLM-6B)."""
    gen = torch.Generator().manual_seed(seed)
    if case == "chatglm":
        total = max(lengths) + 24
        rows = []
        for n in lengths:
            prompt = torch.randint(20, 130000, (n,), generator=gen).tolist()
            answer = torch.randint(20, 130000, (total - n - 2,), generator=gen).tolist()
            rows.append(prompt + [config["gmask_token_id"], config["bos_token_id"]] + answer)
        return torch.tensor(rows)
    vocab = config["padded_vocab_size"]
    gmask, sop = (151331, 151333) if vocab == 151552 else (64790, 64792)
    body = torch.randint(20, min(vocab, 64000), (len(lengths), max(lengths)), generator=gen)
    return torch.cat([torch.tensor([[gmask, sop]] * len(lengths)), body], dim=1)


# the real tokenizer files of each case in ../shared/tokenizers (what the released checkpoints ship beside the weights)
TOKENIZER_FILES = {
    "chatglm": ("chatglm-6b", "ice_text.model"),
    "chatglm2": ("chatglm2-6b", "tokenizer.model"),
    "chatglm3": ("chatglm3-6b", "tokenizer.model"),
    "glm4": ("glm-4-9b-chat", "tokenizer.model"),
}


def copy_real_tokenizer(shared: Path, case: str, folder: Path) -> None:
    """Put the release's real tokenizer model and ``tokenizer_config.json`` (with its ``auto_map``) into ``folder``."""
    name, model_file = TOKENIZER_FILES[case.removesuffix("-32k")]
    for f in (model_file, "tokenizer_config.json"):
        shutil.copy(shared / "tokenizers" / name / f, folder / f)
