"""Build real tokenizers from the files in ``../shared/tokenizers`` for tests.

Qwen2.5 and LLaMA-2 load as they are. Qwen3 ships only its ``tokenizer_config.json``; it shares Qwen2.5's BPE files.
GLM-4 and Llama-3 ship tiktoken rank files; they are converted with transformers' ``TikTokenConverter`` and their
special tokens are added at the ids the real tokenizers give them, so ids are the real ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

# The split pattern of Llama-3's and GLM-4's tiktoken tokenizers (the same regex in both).
TIKTOKEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _tiktoken(rank_file: Path, config: dict, out: Path) -> Path:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    added = config.pop("added_tokens_decoder")
    specials = [added[k]["content"] for k in sorted(added, key=int)]
    backend = TikTokenConverter(
        vocab_file=str(rank_file), pattern=TIKTOKEN_PATTERN, extra_special_tokens=specials
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: v for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token", "chat_template")},
    )
    tok.save_pretrained(out)
    return out


def build_tokenizer_dir(name: str, shared: Path, cache: Path) -> Path:
    """Return a directory that ``AutoTokenizer.from_pretrained`` loads for the shared tokenizer ``name``."""
    src = shared / "tokenizers"
    out = cache / name
    if (out / "tokenizer_config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if name in ("qwen2.5-0.5b-instruct", "llama-2-7b", "chinese-llama-2"):
        for f in (src / name).iterdir():
            shutil.copy(f, out / f.name)
    elif name == "qwen3":
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(src / "qwen2.5-0.5b-instruct" / f, out / f)
        shutil.copy(src / "qwen3" / "tokenizer_config.json", out / "tokenizer_config.json")
    elif name == "glm-4-9b-chat":
        config = json.loads((src / name / "tokenizer_config.json").read_text())
        config.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        _tiktoken(src / name / "tokenizer.model", config, out)
    elif name in ("llama-3-70b-instruct", "llama3-8b-chinese-chat"):
        config = json.loads((src / name / "tokenizer_config.json").read_text())
        _tiktoken(src / "llama-3-8b-instruct" / "tokenizer.model", config, out)
    else:
        raise KeyError(name)
    return out


def load_tokenizer(name: str, shared: Path, cache: Path):
    return AutoTokenizer.from_pretrained(build_tokenizer_dir(name, shared, cache))
