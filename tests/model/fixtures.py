"""A character-level fast tokenizer with the ChatGLM special tokens at their real ids, for training tests.

The converted SentencePiece / tiktoken tokenizers are tested in ``test_tokenizers.py`` (zhtune/model/convert/
tokenizers.py); the training and merge tests here only need a tokenizer that encodes the data and knows the
templates' special tokens at the ids the model's config expects, so they build this one.
"""

from __future__ import annotations

import json
from pathlib import Path

# (token, id) of the releases: ChatGLM-6B (ice_text.model) and ChatGLM2/3 (tokenizer.model + command tokens)
SPECIALS = {
    "chatglm": {"<unk>": 0, "<pad>": 3, "[MASK]": 130000, "[gMASK]": 130001, "<sop>": 130004, "<eop>": 130005},
    "chatglm3": {
        "<unk>": 0,
        "<s>": 1,
        "</s>": 2,
        "[MASK]": 64789,
        "[gMASK]": 64790,
        "[sMASK]": 64791,
        "sop": 64792,
        "eop": 64793,
        "<|system|>": 64794,
        "<|user|>": 64795,
        "<|assistant|>": 64796,
        "<|observation|>": 64797,
    },
}
ROLES = {"chatglm": ("<eop>", "<pad>"), "chatglm3": ("</s>", "<unk>")}  # (eos, pad) as the originals set them


def char_tokenizer(out: Path, variant: str, texts: list[str]) -> Path:
    """Write a fast tokenizer to ``out``: one id per character of ``texts`` (from 100 up), the specials above."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[variant]
    chars = sorted({c for t in texts for c in t})
    vocab = {**specials, **{c: 100 + i for i, c in enumerate(c for c in chars if c not in specials)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    eos, pad = ROLES[variant]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos, pad_token=pad)
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in ("<unk>", eos, pad)]})
    tok.save_pretrained(out)
    return out


def instruction_texts(data: Path) -> list[str]:
    rows = json.loads(data.read_text(encoding="utf-8"))
    return [r.get("instruction", "") + r.get("input", "") + r.get("output", "") for r in rows]
