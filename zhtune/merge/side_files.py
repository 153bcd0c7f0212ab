"""Everything a merged checkpoint carries besides its weights: tokenizer, chat template, stops, generation settings
and the model code of remote-code checkpoints.

A merged model must render prompts and stop as training did, in any engine. So the tokenizer is copied (from the last
adapter that ships one, else the base); its ``chat_template`` is kept only when it renders the probe conversations
exactly as the training template does, otherwise the training template's Jinja form
(:func:`zhtune.data.chat_templates.chat_template_for`, with the training system prompt as its default) replaces it;
and ``generation_config.json`` gets the template's end-of-turn tokens in ``eos_token_id``. Checkpoints whose classes
ship as Python code (``auto_map``) get those files copied too, or the merge is refused before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zhtune.errors import ConfigError
from zhtune.model.tokenizer import TOKENIZER_FILES


def tokenizer_source(base: Path, adapter_paths: list[Path]) -> Path:
    """Where the merged model's tokenizer comes from: the last adapter that ships one (an extended vocabulary
    does), else the base."""
    return next((p for p in reversed(adapter_paths) if any((p / f).exists() for f in TOKENIZER_FILES)), base)


def code_files(folders: list[Path]) -> list[Path]:
    """The Python files a remote-code checkpoint needs: every ``*.py`` beside its config, once each.

    Raises:
        ConfigError: a module named in an ``auto_map`` of ``config.json`` / ``tokenizer_config.json`` is missing (the
            merged model could not be loaded), said before anything is written.
    """
    found: dict[str, Path] = {}
    for folder in folders:
        for name in ("config.json", "tokenizer_config.json"):
            cfg = folder / name
            auto_map = json.loads(cfg.read_text()).get("auto_map") if cfg.exists() else None
            for ref in _auto_map_refs(auto_map):
                module = ref.split("--")[-1].rsplit(".", 1)[0] + ".py"
                if not (folder / module).exists():
                    raise ConfigError(
                        f"{cfg} names {ref!r} in auto_map but {folder / module} is missing; the merged model could not "
                        "be loaded. Put the checkpoint's code files back (or convert it: zhtune convert)"
                    )
        for py in sorted(folder.glob("*.py")):
            found.setdefault(py.name, py)
    return list(found.values())


def _auto_map_refs(auto_map) -> list[str]:
    refs = []
    for value in (auto_map or {}).values():
        refs += [v for v in (value if isinstance(value, list) else [value]) if v]
    return refs


def copy_side_files(base: Path, out: Path, adapter_paths: list[Path], code: list[Path]) -> Path:
    """Copy the tokenizer files, the generation config and the code files into ``out``; return the tokenizer
    source folder."""
    if (base / "generation_config.json").exists():
        shutil.copy(base / "generation_config.json", out / "generation_config.json")
    source = tokenizer_source(base, adapter_paths)
    for f in TOKENIZER_FILES:
        if (source / f).exists():
            shutil.copy(source / f, out / f)
    for py in code:
        shutil.copy(py, out / py.name)
    return source


def install_training_template(
    out: Path, template_name: str | None, system: str | None, trust_remote_code: bool = False
) -> dict:
    """Make the merged tokenizer render ``template_name`` and the generation config stop at its end of turn.

    Returns:
        ``{"template", "chat_template_source", "eos_token_id"}`` for the merge report; ``chat_template_source`` is
        ``base`` (kept, it renders like the training template), ``zhtune`` (the training template's Jinja form was
        written), or a sentence saying why nothing was done.
    """
    if not template_name:
        return {"template": None, "chat_template_source": "no training template recorded (plain peft adapter)"}
    from zhtune.data.chat_templates import chat_template_for, chat_template_problems
    from zhtune.data.templates import get_template
    from zhtune.model.tokenizer import load_tokenizer

    template = get_template(template_name)
    try:
        tokenizer = load_tokenizer(out, trust_remote_code)
    except ConfigError as exc:
        return {"template": template_name, "chat_template_source": f"tokenizer not loadable here: {exc}"}
    source = "base"
    if chat_template_problems(tokenizer, template, system):
        try:
            jinja = chat_template_for(template_name, system)
        except ConfigError as exc:
            return {"template": template_name, "chat_template_source": str(exc)}
        _write_chat_template(out, jinja)
        source = "zhtune"
    eos = stop_ids(tokenizer, template)
    _write_eos(out, eos, tokenizer)
    return {"template": template_name, "chat_template_source": source, "eos_token_id": eos}


def stop_ids(tokenizer, template) -> list[int]:
    """The template's end-of-turn token ids, then the tokenizer's EOS, without repeats."""
    ids = []
    for name in template.stop:
        tid = tokenizer.convert_tokens_to_ids(name)
        # a token the vocabulary lacks comes back as the unknown token's id (Qwen's unk *is* <|endoftext|>, a stop)
        if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == name:
            ids.append(tid)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))


def _write_chat_template(out: Path, jinja: str) -> None:
    """``chat_template.jinja`` (what transformers 5 reads first) and the same string in ``tokenizer_config.json``."""
    (out / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    (out / "chat_template.json").unlink(missing_ok=True)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    cfg["chat_template"] = jinja
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def _write_eos(out: Path, eos: list[int], tokenizer) -> None:
    gen_file = out / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    old = gen.get("eos_token_id")
    old = [] if old is None else old if isinstance(old, list) else [old]
    gen["eos_token_id"] = list(dict.fromkeys(eos + old))
    if gen.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = int(tokenizer.pad_token_id)
    gen_file.write_text(json.dumps(gen, indent=2))
