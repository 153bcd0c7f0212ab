"""Fast tokenizers for the ChatGLM family, built from the checkpoint's own tokenizer files, without its Python code.

ChatGLM-6B (``ice_text.model``), ChatGLM2-6B / ChatGLM3-6B (``tokenizer.model``, SentencePiece) and GLM-4-9B-chat
(``tokenizer.model``, tiktoken ranks) ship their tokenizer as remote code that no longer runs under transformers 5.
:func:`convert_tokenizer` writes ``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer`` loads with no
remote code and that encode as the original classes do:

* plain text gives the ids of the original: SentencePiece's own normalizer, merges ranked by piece score, byte
  fallback (ChatGLM-6B: a unigram model, NFKC, extra-whitespace removal, and the class's own rewriting of newlines,
  tabs and runs of spaces into ``<n>`` / ``<|tab|>`` / ``<|blank_N|>``); GLM-4: byte-level BPE with its split regex;
* the special tokens sit at their real ids (ChatGLM2/3 append ``[MASK] [gMASK] [sMASK] sop eop`` (+ the four role
  tokens) after the 64789 SentencePiece pieces; ChatGLM-6B's are pieces of its model; GLM-4's follow its 151329
  ranks), eos/pad/unk as the originals set them, left padding, and ``build_inputs_with_special_tokens`` as the
  post-processor (``[gMASK] sop`` before the text; ChatGLM-6B: ``[gMASK] <sop>`` after it);
* every span between special tokens is normalized on its own, so it gets SentencePiece's dummy prefix as the
  original code's per-piece ``encode`` calls give it; decoding drops that prefix again after a special token;
* ``chat_template``: :data:`zhtune.data.chat_templates_chatglm.CHATGLM_JINJA` for ChatGLM-6B/2/3, the checkpoint's
  own template for GLM-4.

What it deliberately does not reproduce: a literal special-token string inside user text (``<|user|>``, ``</s>``,
``[gMASK]``) becomes that special token, as in every transformers tokenizer; in ChatGLM2/3 text the words ``sop`` and
``eop`` standing alone are the special tokens too (inside words, as in ``people``, they are not); ChatGLM-6B's
unigram model has segmentations of equal score (``███████``), and in texts thousands of tokens long also ones
within float32 rounding of SentencePiece's path scores, where the tokenizers Unigram (float64, its own tie order)
can pick the other one: the ids differ, the text does not (5 of 2000 long ShareGPT conversations, none of 7000
shorter texts). Converting a 130k-piece model takes a second or three; nothing is cached here.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.atomic import write_text_atomic
from zhtune.data.chat_templates_chatglm import BARE_WORD_SPECIALS, CHATGLM_JINJA
from zhtune.errors import ConfigError

# GLM-4's split pattern (tokenization_chatglm.py, ChatGLM4Tokenizer.pat_str); the same regex as Llama-3's.
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
_GLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
_ROLE_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_MAX_BLANK = 80  # ChatGLM-6B's SPTokenizer: runs of 2..80 spaces become <|blank_N|>
_PROTO_NORMAL, _PROTO_UNKNOWN, _PROTO_CONTROL, _PROTO_USER = 1, 2, 3, 4  # SentencePiece piece types


@dataclass(frozen=True)
class _Variant:
    """What one ChatGLM generation's tokenizer class does, as data."""

    model_file: str
    appended: tuple[str, ...]  # special tokens after the model's own pieces, in id order
    roles: dict[str, str]  # transformers' special-token attributes -> token
    single: str  # build_inputs_with_special_tokens for one sequence (tokenizers TemplateProcessing syntax)
    pair: str
    extra: dict = field(default_factory=dict)  # more tokenizer_config.json keys


VARIANTS: dict[str, _Variant] = {
    "chatglm": _Variant(
        "ice_text.model",
        (),
        {
            "bos_token": "<sop>",
            "eos_token": "<eop>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "[MASK]",
        },
        "$A [gMASK] <sop>",
        "$A [gMASK] <sop> $B <eop>",
    ),
    "chatglm2": _Variant(
        "tokenizer.model",
        _GLM2_SPECIALS,
        {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
        "[gMASK] sop $A",
        "[gMASK] sop $A $B </s>",
    ),
    "chatglm3": _Variant(
        "tokenizer.model",
        _GLM2_SPECIALS + _ROLE_SPECIALS,
        {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
        "[gMASK] sop $A",
        "[gMASK] sop $A $B </s>",
    ),
    "glm4": _Variant(
        "tokenizer.model",
        GLM4_SPECIALS,
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "[gMASK] <sop> $A",
        "[gMASK] <sop> $A $B <|endoftext|>",
        {"model_max_length": 128000},
    ),
}


def convert_tokenizer(src: Path, dst: Path, variant: str, *, overwrite: bool = False) -> None:
    """Write a fast tokenizer for the ChatGLM checkpoint ``src`` into ``dst``.

    Args:
        src: the original checkpoint (or tokenizer) folder with ``ice_text.model`` (``chatglm``) or
            ``tokenizer.model``; its ``tokenizer_config.json`` is read when present.
        dst: the folder to write ``tokenizer.json`` and ``tokenizer_config.json`` into (created if missing); each
            file appears complete or not at all.
        variant: ``chatglm`` (ChatGLM-6B), ``chatglm2``, ``chatglm3`` (incl. -32k, -base) or ``glm4``.
        overwrite: replace tokenizer files already in ``dst``.

    Raises:
        ConfigError: unknown variant, a missing or unreadable model file, a ChatGLM-6B release whose ids are shifted
            by image tokens, or tokenizer files in ``dst`` without ``overwrite``.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown ChatGLM tokenizer variant {variant!r}; known: {', '.join(VARIANTS)}")
    src, dst = Path(src), Path(dst)
    spec = VARIANTS[variant]
    model_file = src / spec.model_file
    if not model_file.is_file():
        raise ConfigError(f"{model_file} does not exist: a {variant} tokenizer is converted from its {spec.model_file}")
    src_config = _read_json(src / "tokenizer_config.json")
    existing = [p for p in (dst / "tokenizer.json", dst / "tokenizer_config.json") if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; refusing to overwrite it (pass overwrite=True)")
    if variant == "glm4":
        backend = _tiktoken_backend(model_file, _glm4_specials(src_config, src / "tokenizer_config.json"))
        chat_template = src_config.get("chat_template")
    else:
        if variant == "chatglm" and src_config.get("num_image_tokens", 0):
            raise ConfigError(
                f"{src / 'tokenizer_config.json'}: field 'num_image_tokens' is {src_config['num_image_tokens']}: this "
                "is the early ChatGLM-6B release whose ids are shifted by 20000 image tokens; only the current "
                "release (num_image_tokens 0, 130528 embedding rows) is supported"
            )
        backend = _sentencepiece_backend(model_file, spec, chatglm6b=variant == "chatglm")
        chat_template = CHATGLM_JINJA[variant]
    backend.post_processor = _post_processor(backend, spec)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **spec.roles,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        **spec.extra,
    }
    if variant == "glm4" and "model_max_length" in src_config:
        config["model_max_length"] = src_config["model_max_length"]
    if chat_template:
        config["chat_template"] = chat_template
    dst.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dst / "tokenizer.json", backend.to_str(pretty=False))
    write_text_atomic(dst / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def _load_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError type
        raise ConfigError(f"{model_file}: not a SentencePiece model ({type(exc).__name__}: {exc})") from None
    if not proto.pieces:
        raise ConfigError(f"{model_file}: a SentencePiece model without pieces")
    return proto


def _spm_model(proto):
    """The BPE or unigram model of a SentencePiece proto, ids and byte fallback as in the file."""
    from tokenizers import models

    trainer = proto.trainer_spec
    if trainer.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in proto.pieces]
        return models.Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    if trainer.model_type != 2:
        raise ConfigError(f"SentencePiece model type {trainer.model_type} is neither unigram (1) nor BPE (2)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = _bpe_merges(proto)
    return models.BPE(
        vocab=vocab, merges=merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback
    )


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose union is the best-scored normal piece; ranking every split of
    every normal piece by that piece's score gives the tokenizers BPE the same choice."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _PROTO_NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _chatglm6b_rewrites():
    """ChatGLM-6B's SPTokenizer._preprocess: newline, tab and space runs become user-defined pieces, longest first."""
    from tokenizers import normalizers

    rules = [normalizers.Replace("\n", "<n>"), normalizers.Replace("\t", "<|tab|>")]
    return rules + [normalizers.Replace(" " * n, f"<|blank_{n}|>") for n in range(_MAX_BLANK, 1, -1)]


def _sentencepiece_backend(model_file: Path, spec: _Variant, chatglm6b: bool):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    proto = _load_proto(model_file)
    backend = Tokenizer(_spm_model(proto))
    spec_n = proto.normalizer_spec
    steps = _chatglm6b_rewrites() if chatglm6b else []
    if spec_n.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec_n.precompiled_charsmap))
    if spec_n.remove_extra_whitespaces:  # SentencePiece counts only spaces here, not newlines
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec_n.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec_n.add_dummy_prefix:
        # Prepend runs on each span between added tokens: the per-piece dummy prefix of the original code.
        steps.append(normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    user_defined = [p.piece for p in proto.pieces if p.type == _PROTO_USER]
    if user_defined:  # SentencePiece emits user-defined pieces whole, never merged with their neighbours
        alternatives = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(alternatives), behavior="isolated")
    own = [p.piece for p in proto.pieces if p.type in (_PROTO_UNKNOWN, _PROTO_CONTROL)]
    missing = [t for t in spec.roles.values() if t not in own and t not in spec.appended]
    if missing:
        raise ConfigError(f"{model_file}: no piece {missing[0]!r}; is this the {spec.model_file} of that ChatGLM?")
    specials = own + list(spec.appended)
    n_pieces = len(proto.pieces)
    bare = BARE_WORD_SPECIALS
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=t in bare, rstrip=t in bare) for t in specials]
    )
    _check_ids(backend, spec.appended, n_pieces, model_file)
    steps = [decoders.Replace("▁", " ")]
    if chatglm6b:  # SPTokenizer.postprocess
        steps += [decoders.Replace("<n>", "\n"), decoders.Replace("<|tab|>", "\t")]
        steps += [decoders.Replace(f"<|blank_{n}|>", " " * n) for n in range(2, _MAX_BLANK + 1)]
    steps += [decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    # The dummy prefix after a special token is not text: drop it, as SentencePiece drops a leading one. (After the
    # bare words ``sop``/``eop`` it stays: they may end a word of the text, and their rstrip ate a space there.)
    bracketed = [t for t in specials if t not in bare]
    after_special = "|".join(re.escape(t) for t in sorted(bracketed, key=len, reverse=True))
    steps.append(decoders.Replace(Regex(f"(?<={after_special}) "), ""))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _tiktoken_backend(rank_file: Path, specials: list[str]):
    """Byte-level BPE equal to ``tiktoken.Encoding(pat_str=GLM4_PATTERN, mergeable_ranks=...)``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(rank_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ConfigError(f"{rank_file}:{lineno}: not a tiktoken 'base64-token rank' line ({exc})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{rank_file}: ranks are not 0..{len(ranks) - 1} without gaps")
    chars = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    # tiktoken merges the adjacent pair whose union has the lowest rank: every split of a token into two tokens,
    # ranked by the token's own rank, gives the tokenizers BPE the same order.
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort()
    backend = Tokenizer(
        models.BPE(
            vocab={text(t): r for t, r in ranks.items()},
            merges=[(text(a), text(b)) for *_, a, b in merges],
            fuse_unk=False,
            ignore_merges=True,  # tiktoken takes a whole pre-token that is in the ranks as it is
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    _check_ids(backend, specials, len(ranks), rank_file)
    return backend


def _check_ids(backend, appended, first: int, model_file: Path) -> None:
    """Appended special tokens must land right after the model's own tokens, in order (not on a piece they equal)."""
    for k, name in enumerate(appended):
        if backend.token_to_id(name) != first + k:
            raise ConfigError(
                f"{model_file}: special token {name!r} would get id {backend.token_to_id(name)}, not {first + k} as "
                "the original tokenizer gives it; is this the model file of the right ChatGLM version?"
            )


def _glm4_specials(config: dict, path: Path) -> list[str]:
    """GLM-4's special tokens in id order: the checkpoint's ``added_tokens_decoder`` when it has one."""
    added = config.get("added_tokens_decoder")
    if not added:
        return list(GLM4_SPECIALS)
    ordered = sorted(added.items(), key=lambda kv: int(kv[0]))
    ids = [int(k) for k, _ in ordered]
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ConfigError(f"{path}: field 'added_tokens_decoder': ids {ids} are not consecutive")
    return [entry["content"] for _, entry in ordered]


def _post_processor(backend, spec: _Variant):
    """``build_inputs_with_special_tokens`` of the original class (what ``tokenizer(text)`` adds by default)."""
    from tokenizers import processors

    names = {t for t in (spec.single + " " + spec.pair).split() if not t.startswith("$")}
    return processors.TemplateProcessing(
        single=spec.single, pair=spec.pair, special_tokens=[(t, backend.token_to_id(t)) for t in sorted(names)]
    )
