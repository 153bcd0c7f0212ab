"""Load a local tokenizer safely: never from a hub, remote code only when the user asks for it."""

from __future__ import annotations

import json
from pathlib import Path

from zhtune.errors import ConfigError

# The files a tokenizer may be saved as (any of them may be absent); merge and conversion copy these.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "ice_text.model",
)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer saved in the directory ``path``.

    Args:
        path: a local checkpoint or tokenizer directory; an original ChatGLM checkpoint (with its weights) is
            converted once (see :func:`zhtune.model.convert.resolve_checkpoint`) and its converted tokenizer loaded.
        trust_remote_code: allow the checkpoint's own Python tokenizer class (ChatGLM, GLM-4 non-hf).

    Raises:
        ConfigError: missing directory, or remote code needed but not allowed (the message says how to allow it).
    """
    from transformers import AutoTokenizer

    from zhtune.model.convert import has_weights, is_original_chatglm, resolve_checkpoint

    path = Path(path)
    if is_original_chatglm(path) and has_weights(path):  # a tokenizer-only folder keeps the remote-code rule below
        path = resolve_checkpoint(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if "auto_map" in config and not trust_remote_code:
        raise ConfigError(
            f"{path} uses a tokenizer class shipped as Python code inside the checkpoint "
            f"({config.get('tokenizer_class')}); run it only if you trust it: pass --trust-remote-code "
            "(model.trust_remote_code: true in a recipe)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path}: {exc}") from None
