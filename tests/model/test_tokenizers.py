"""Converted ChatGLM-family tokenizers against the original tokenizer code and zhtune's templates.

The references are the original classes in ../shared/chatglm_code (ChatGLM-6B's and ChatGLM2's ``SPTokenizer``,
ChatGLM3's ``ChatGLMTokenizer``, which still constructs under transformers 5; their encode paths are used as they
are) over the real model files in ../shared/tokenizers, and for GLM-4 a ``tiktoken.Encoding`` built exactly as
``ChatGLM4Tokenizer.__init__`` builds it (that file is not in ../shared). Every check has a mutation beside it that
makes it fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from zhtune.config import DataConfig
from zhtune.data.chat_templates_chatglm import CHATGLM_JINJA, chat_template_text
from zhtune.data.conversation import Conversation, Message
from zhtune.data.formats import load_conversations
from zhtune.data.templates import RenderOptions, SpecialTokens, get_template
from zhtune.data.tokenize import tokenize_conversation
from zhtune.errors import ConfigError
from zhtune.model.convert import tokenizers as conv_tok
from zhtune.model.convert.tokenizers import GLM4_PATTERN, GLM4_SPECIALS, convert_tokenizer

SOURCES = {"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b", "glm4": "glm-4-9b-chat"}
SYSTEM = "你是一个乐于助人的助手。"
EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n", " \n ", "\t", "a\tb\t\tc", "x" + " " * 100 + "y", " leading", "trailing ", "  both  ",
    "line1\r\nline2\r\n", "\u3000全角空格\u3000", "ＡＢＣ１２３ｶﾀｶﾅ", "ﬁ ligature ①②③ ㈱", "e\u0301 combining",
    "zero\u200bwidth", "emoji 😀👍🏽👨‍👩‍👧‍👦🇨🇳", "𠀀𠀁 supplementary", "한국어 日本語 العربية",
    "def f(x):\n    return x ** 2  # 注释\n", '{"name": "get_weather", "arguments": {"city": "北京"}}',
    "literal <n> and ▁ marks", "1234567890 3.14159 1e-5", "\x07bell\x1b[0m", "Mixed中English混合text，标点！？。、",
    "\\n escaped", "   \n\t  \n", "a" * 500, "people leopard Aesop isopropyl",
]  # fmt: skip


def _load_original(folder: str, shared: Path):
    path = shared / "chatglm_code" / folder / "tokenization_chatglm.py"
    spec = importlib.util.spec_from_file_location(f"original_tokenization_{folder.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Original:
    """The original code's ids for text and special tokens (what its ``ChatGLMTokenizer`` computes), also usable as
    the tokenizer of ``tokenize_conversation`` (zhtune's ``pieces`` path)."""

    is_fast = False
    unk_token = "<unk>"

    def __init__(self, variant: str, shared: Path):
        self.variant = variant
        files = shared / "tokenizers" / SOURCES[variant]
        if variant == "glm4":
            import base64

            import tiktoken

            ranks = {}
            for line in (files / "tokenizer.model").read_text().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            self.specials = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIALS)}
            self.enc = tiktoken.Encoding(
                "glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=self.specials
            )
            self.eos_token, self.bos_token, self.unk_token_id = "<|endoftext|>", None, None
        elif variant == "chatglm":
            code = _load_original("chatglm-6b", shared)
            self.sp = code.SPTokenizer(str(files / "ice_text.model"), num_image_tokens=0)
            self.eos_token, self.bos_token, self.unk_token_id = "<eop>", "<sop>", 0
        else:
            code = _load_original(SOURCES[variant], shared)
            if variant == "chatglm3":  # the whole class still constructs under transformers 5
                self.full = code.ChatGLMTokenizer(vocab_file=str(files / "tokenizer.model"))
                self.sp = self.full.tokenizer
            else:
                self.sp = code.SPTokenizer(str(files / "tokenizer.model"))
            self.eos_token, self.bos_token, self.unk_token_id = "</s>", None, 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.variant == "glm4":  # ChatGLM4Tokenizer._tokenize
            return self.enc.encode(text, disallowed_special=())
        if self.variant == "chatglm":  # ChatGLMTokenizer._tokenize + _convert_token_to_id
            return [self.sp[piece] for piece in self.sp.tokenize(text)]
        return [self.sp.convert_token_to_id(piece) for piece in self.sp.tokenize(text)]

    def decode(self, ids: list[int]) -> str:
        if self.variant == "glm4":
            return self.enc.decode(ids)
        return self.sp.decode(ids)

    def convert_tokens_to_ids(self, name: str) -> int:
        if self.variant == "glm4":
            return self.specials[name]
        if self.variant == "chatglm":
            return self.sp[name]
        if self.variant == "chatglm3":
            return self.full.get_command(name) if name in self.sp.special_tokens else self.sp.convert_token_to_id(name)
        return self.sp.convert_token_to_id(name)


@pytest.fixture(scope="session")
def converted(shared, tmp_path_factory):
    """``converted(variant)``: the variant's real tokenizer files converted once per session and loaded."""
    from transformers import AutoTokenizer

    root, loaded = tmp_path_factory.mktemp("converted"), {}

    def get(variant: str):
        if variant not in loaded:
            convert_tokenizer(shared / "tokenizers" / SOURCES[variant], root / variant, variant)
            loaded[variant] = AutoTokenizer.from_pretrained(root / variant)
        return loaded[variant]

    get.root = root
    return get


@pytest.fixture(scope="session")
def original(shared):
    cache = {}

    def get(variant: str) -> Original:
        if variant not in cache:
            cache[variant] = Original(variant, shared)
        return cache[variant]

    return get


def _strings(path: Path, limit: int) -> list[str]:
    text = path.read_text(encoding="utf-8")
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    out: list[str] = []

    def walk(value):
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for record in records[:limit]:
        walk(record)
    return out


@pytest.fixture(scope="session")
def corpus(shared) -> list[str]:
    """Real instruction data (Chinese, English, code, JSON tool calls, markdown, CGEC) plus whitespace, newline,
    emoji, NFKC and script edge cases."""
    data = shared / "data" / "instruct"
    texts = list(EDGE_CASES)
    for rel, limit in [
        ("alpaca_zh/alpaca_zh_demo.json", 1000),
        ("alpaca_zh/identity.json", 100),
        ("belle/dev1K.json", 300),
        ("sharegpt_zh/sharegpt_zh_1K_format.jsonl", 300),
        ("sharegpt_toolcall_zh/glaive_toolcall_zh_demo.json", 100),
        ("cgec/text_correct.json", 300),
        ("firefly/dummy_data.jsonl", 33),
    ]:
        texts += _strings(data / rel, limit)
    return list(dict.fromkeys(texts))


def _without_specials(texts: list[str], tok) -> list[str]:
    """Texts without a literal special-token string (those become the special token, as documented)."""
    words = [t for t in tok.all_special_tokens + list(tok.get_added_vocab()) if t]
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(w)}(?!\w)" if w.isalpha() else re.escape(w) for w in words))
    kept = [t for t in texts if not pattern.search(t)]
    assert len(kept) > 0.99 * len(texts), len(texts) - len(kept)
    return kept


def _mismatches(tok, ref, texts) -> list[str]:
    return [t for t in texts if tok(t, add_special_tokens=False)["input_ids"] != ref.encode(t)]


@pytest.mark.parametrize("variant", sorted(SOURCES))
def test_plain_text_ids_equal_the_original(variant, converted, original, corpus):
    tok, ref = converted(variant), original(variant)
    texts = _without_specials(corpus, tok)
    assert len(texts) > 5000
    bad = _mismatches(tok, ref, texts)
    assert not bad, f"{len(bad)} texts differ, first {bad[0]!r}"
    # the original tokenizer(text) adds build_inputs_with_special_tokens' tokens
    ids = ref.encode("你好，世界")
    gmask = ref.convert_tokens_to_ids("[gMASK]")
    sop = ref.convert_tokens_to_ids({"chatglm2": "sop", "chatglm3": "sop"}.get(variant, "<sop>"))
    expected = ids + [gmask, sop] if variant == "chatglm" else [gmask, sop] + ids
    assert tok("你好，世界")["input_ids"] == expected


@pytest.mark.parametrize("variant", sorted(SOURCES))
def test_decode_round_trips(variant, converted, original, corpus):
    tok, ref = converted(variant), original(variant)
    texts = _without_specials(corpus, tok)
    for text in texts:
        ids = ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids), text
    exact = [t for t in texts if ref.decode(ref.encode(t)) == t]
    # ChatGLM-6B's NFKC turns fullwidth punctuation into ASCII ("，" decodes as ","): most of its texts are lossy
    assert len(exact) > (0.15 if variant == "chatglm" else 0.95) * len(texts)
    assert all(tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t for t in exact)
    # the dummy prefix after a special token is dropped again, so text with special tokens round-trips too (after
    # the bare word "sop" the chat templates' space stays: the token's rstrip took the one in the text)
    text = {
        "chatglm": "你好[gMASK]<sop>\n你好 world<eop>",
        "chatglm2": "[gMASK]sop [Round 1]\n\n问：你好</s>",
        "chatglm3": "[gMASK]sop<|user|>\n你好 world<|assistant|>",
        "glm4": "[gMASK]<sop><|user|>\n你好 world<|assistant|>",
    }[variant]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


OFFICIAL_IDS = {
    "chatglm": {"[MASK]": 130000, "[gMASK]": 130001, "<sop>": 130004, "<eop>": 130005, "<pad>": 3, "<unk>": 0},
    "chatglm2": {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793, "</s>": 2},
    "chatglm3": {"[gMASK]": 64790, "sop": 64792, "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796,
                 "<|observation|>": 64797, "</s>": 2, "<unk>": 0},
    "glm4": {"<|endoftext|>": 151329, "[gMASK]": 151331, "<sop>": 151333, "<|system|>": 151335, "<|user|>": 151336,
             "<|assistant|>": 151337, "<|observation|>": 151338, "<|end_of_video|>": 151342},
}  # fmt: skip
# eos, pad, vocabulary size (the original classes' vocab_size / n_words)
OFFICIAL_ROLES = {
    "chatglm": ("<eop>", "<pad>", 130344),
    "chatglm2": ("</s>", "<unk>", 64794),
    "chatglm3": ("</s>", "<unk>", 64798),
    "glm4": ("<|endoftext|>", "<|endoftext|>", 151343),
}


@pytest.mark.parametrize("variant", sorted(SOURCES))
def test_special_ids_are_the_official_ones(variant, converted, original):
    tok, ref = converted(variant), original(variant)
    for name, tid in OFFICIAL_IDS[variant].items():
        assert tok.convert_tokens_to_ids(name) == tid == ref.convert_tokens_to_ids(name), name
        assert tok(name, add_special_tokens=False)["input_ids"] == [tid], name
    eos, pad, size = OFFICIAL_ROLES[variant]
    assert (tok.eos_token, tok.pad_token, len(tok), tok.padding_side) == (eos, pad, size, "left")
    if variant == "chatglm3":  # the original class's own properties
        assert (tok.eos_token_id, tok.pad_token_id) == (ref.full.eos_token_id, ref.full.pad_token_id) == (2, 0)
        assert len(tok) == ref.full.vocab_size
    if variant == "chatglm":
        assert (tok.bos_token, tok.bos_token_id) == ("<sop>", 130004)


def test_loads_without_remote_code(converted):
    from zhtune.model.tokenizer import load_tokenizer

    for variant in SOURCES:
        converted(variant)
        folder = converted.root / variant
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert "auto_map" not in config and sorted(p.name for p in folder.iterdir()) == [
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        assert load_tokenizer(folder).is_fast  # zhtune's loader refuses remote code unless asked


def hf_messages(conv: Conversation) -> list[dict]:
    system = [{"role": "system", "content": conv.system}] if conv.system else []
    return system + [{"role": m.role, "content": m.content} for m in conv.messages]


def chat_ids(tok, messages, **kwargs) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="session")
def conversations(shared) -> list[Conversation]:
    """Multi-turn ShareGPT and single-turn alpaca samples, each also with a system prompt."""
    data = shared / "data" / "instruct"
    multi, _ = load_conversations([data / "sharegpt_zh/sharegpt_zh_1K_format.jsonl"], DataConfig(on_error="skip"))
    single, _ = load_conversations([data / "alpaca_zh/alpaca_zh_demo.json"])
    picked = [c for c in multi if len(c.messages) >= 4][:25] + single[:15]
    assert sum(len(c.messages) >= 4 for c in picked) >= 20
    return picked + [dataclasses.replace(c, system=SYSTEM) for c in picked]


def _known_mismatch(name: str, conv: Conversation) -> bool:
    """The two chatglm2 cases no text can encode as the pieces (see chat_templates_chatglm): an earlier answer ending
    in a space, and a system prompt starting with whitespace."""
    if name != "chatglm2":
        return False
    spaced = any(m.role == "assistant" and m.content.endswith(" ") for m in conv.messages[:-1])
    return spaced or (conv.system or "x")[0].isspace()


def _unigram_tie(name: str, conv: Conversation, tok, ref) -> bool:
    """ChatGLM-6B: a text piece SentencePiece's unigram segments differently (tied scores; see the test below)."""
    segments = get_template(name).render(conv, SpecialTokens.of(tok))
    return name == "chatglm" and bool(_mismatches(tok, ref, [s.text for s in segments if not s.special]))


@pytest.mark.parametrize("name", ["chatglm", "chatglm2", "chatglm3"])
def test_chat_template_gives_the_ids_of_zhtune_render(name, converted, original, conversations):
    variant = "chatglm3" if name == "chatglm3" else name
    tok, ref, template = converted(variant), original(variant), get_template(name)
    assert tok.chat_template == CHATGLM_JINJA[name]
    checked = ties = 0
    for conv in conversations:
        if _known_mismatch(name, conv):
            continue
        if _unigram_tie(name, conv, tok, ref):
            ties += 1
            continue
        segments = template.render(conv, SpecialTokens.of(tok))
        expected = tokenize_conversation(conv, ref, template).input_ids  # zhtune render, the original's own encode
        assert tokenize_conversation(conv, tok, template).input_ids == expected  # zhtune render, converted
        assert tok.apply_chat_template(hf_messages(conv), tokenize=False) == chat_template_text(segments)
        assert chat_ids(tok, hf_messages(conv)) == expected, conv.origin
        checked += 1
        # the generation prompt of the last turn
        opts = RenderOptions(add_generation_prompt=True)
        prompt_conv = dataclasses.replace(conv, messages=conv.messages[:-1])
        prompt = tokenize_conversation(prompt_conv, ref, template, options=opts).input_ids
        assert chat_ids(tok, hf_messages(prompt_conv), add_generation_prompt=True) == prompt
    assert checked >= 70 and ties <= 4, (checked, ties)


def test_chatglm3_chat_ids_follow_build_single_message(converted, original):
    """The converted template against the original class's own ``build_single_message`` / ``build_chat_input``."""
    tok, ref = converted("chatglm3"), original("chatglm3").full
    history = [
        ("system", SYSTEM),
        ("user", "你好"),
        ("assistant", " 你好！\n有什么可以帮你？"),
        ("user", "  介绍一下北京。"),
    ]
    expected = ref.get_prefix_tokens()
    for role, content in history:
        expected += ref.build_single_message(role, "", content)
    expected.append(ref.get_command("<|assistant|>"))
    messages = [{"role": r, "content": c} for r, c in history]
    assert chat_ids(tok, messages, add_generation_prompt=True) == expected


def test_chatglm2_answer_ending_in_a_space_is_the_documented_mismatch(converted, original):
    tok, ref, template = converted("chatglm2"), original("chatglm2"), get_template("chatglm2")
    msgs = (
        Message("user", "问一"),
        Message("assistant", "答一 "),
        Message("user", "问二"),
        Message("assistant", "答二"),
    )
    conv = Conversation(msgs)
    assert _known_mismatch("chatglm2", conv)
    pieces = tokenize_conversation(conv, ref, template).input_ids
    assert tok.apply_chat_template(hf_messages(conv), tokenize=False) == chat_template_text(template.render(conv))
    assert chat_ids(tok, hf_messages(conv)) != pieces  # "▁" + "▁" merged into "▁▁": no text gives the pieces' ids
    fixed = Conversation((msgs[0], Message("assistant", "答一"), *msgs[2:]))
    assert chat_ids(tok, hf_messages(fixed)) == tokenize_conversation(fixed, ref, template).input_ids


def test_chatglm2_system_starting_with_whitespace_is_the_other_documented_mismatch(converted, original):
    tok, ref, template = converted("chatglm2"), original("chatglm2"), get_template("chatglm2")
    conv = Conversation((Message("user", "问一"), Message("assistant", "答一")), system="\n系统")
    assert _known_mismatch("chatglm2", conv)
    # the rstrip of "sop" (which lets it match as a whole word) also takes the system prompt's leading newline
    assert chat_ids(tok, hf_messages(conv)) != tokenize_conversation(conv, ref, template).input_ids
    fixed = dataclasses.replace(conv, system="系统")
    assert chat_ids(tok, hf_messages(fixed)) == tokenize_conversation(fixed, ref, template).input_ids


def test_chatglm6b_unigram_ties_are_the_documented_plain_text_mismatch(converted, original):
    """Where two segmentations of ChatGLM-6B's unigram model score the same (or within float32 rounding of the
    path scores SentencePiece keeps, in texts thousands of tokens long), SentencePiece and the tokenizers Unigram
    (float64, its own tie order) can pick different ones; the ids then differ, the text does not."""
    tok, ref = converted("chatglm"), original("chatglm")
    text = "██╔════╝\n███████║██"
    ours, theirs = tok(text, add_special_tokens=False)["input_ids"], ref.encode(text)
    assert ours != theirs and tok.decode(ours) == tok.decode(theirs) == text
    assert sorted(ours) == sorted(theirs)  # the same pieces, in another order: a tie


def test_glm4_chat_template_is_the_real_one_and_matches_zhtune_render(converted, conversations, real_tokenizer, shared):
    tok = converted("glm4")
    real = json.loads((shared / "tokenizers/glm-4-9b-chat/tokenizer_config.json").read_text())["chat_template"]
    assert tok.chat_template == real
    reference = real_tokenizer("glm-4-9b-chat")  # tests/tokenizers.py: transformers' TikTokenConverter + real template
    template = get_template("glm4")
    for conv in conversations:
        sample = tokenize_conversation(conv, tok, template)
        full = chat_ids(tok, hf_messages(conv))
        assert full == chat_ids(reference, hf_messages(conv))
        # GLM-4's finetune code appends <|user|> as the end of the last answer; the chat template stops before it
        assert sample.input_ids == full + [tok.convert_tokens_to_ids("<|user|>")]
        assert sample.input_ids == tokenize_conversation(conv, reference, template).input_ids


# --- mutations: each check above fails when the piece it checks is broken ---------------------------------------


def _backend_copy(tok):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        chat_template=tok.chat_template,
    )


def test_without_the_dummy_prefix_per_span_the_chat_ids_differ(converted, original, conversations):
    """A tokenizer that prefixes only the start of the text (transformers' non-legacy SentencePiece setting) still
    encodes plain text like SentencePiece, but its chat-template ids are not the pieces' ids."""
    from tokenizers import normalizers, pre_tokenizers

    tok, ref, template = converted("chatglm3"), original("chatglm3"), get_template("chatglm3")
    mutant = _backend_copy(tok)
    backend = mutant.backend_tokenizer
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    assert not _mismatches(mutant, ref, ["你好", "hello world", "\n你好"])
    conv = conversations[0]
    assert chat_ids(mutant, hf_messages(conv)) != tokenize_conversation(conv, ref, template).input_ids


def test_without_the_visible_dummy_prefix_the_chat_ids_differ(converted, original, conversations):
    tok, ref, template = converted("chatglm3"), original("chatglm3"), get_template("chatglm3")
    mutant = _backend_copy(tok)
    mutant.chat_template = CHATGLM_JINJA["chatglm3"].replace(
        "{{ ' ' + message['content'] }}", "{{ message['content'] }}"
    )
    conv = conversations[0]
    assert chat_ids(mutant, hf_messages(conv)) != tokenize_conversation(conv, ref, template).input_ids


@pytest.mark.parametrize(
    ("variant", "mutation"),
    [
        ("chatglm", "no_rewrites"),  # ChatGLM-6B's newline/tab/blank rewriting left out
        ("chatglm3", "reversed_merges"),  # BPE merges in the wrong order
        ("glm4", "no_split"),  # GLM-4 without its split regex
    ],
)
def test_mutated_conversions_fail_the_id_check(variant, mutation, shared, tmp_path, monkeypatch, original, corpus):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    if mutation == "no_rewrites":
        monkeypatch.setattr(conv_tok, "_chatglm6b_rewrites", lambda: [])
    elif mutation == "reversed_merges":
        real = conv_tok._bpe_merges
        monkeypatch.setattr(conv_tok, "_bpe_merges", lambda proto: real(proto)[::-1])
    else:
        real_backend = conv_tok._tiktoken_backend

        def unsplit(*args):
            backend = real_backend(*args)
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
            return backend

        monkeypatch.setattr(conv_tok, "_tiktoken_backend", unsplit)
    convert_tokenizer(shared / "tokenizers" / SOURCES[variant], tmp_path, variant)
    mutant = AutoTokenizer.from_pretrained(tmp_path)
    assert _mismatches(mutant, original(variant), corpus[:400])


def test_bad_inputs_are_refused_with_the_reason(shared, tmp_path):
    with pytest.raises(ConfigError, match="unknown ChatGLM tokenizer variant 'chatglm4'.*glm4"):
        convert_tokenizer(shared / "tokenizers/glm-4-9b-chat", tmp_path / "a", "chatglm4")
    with pytest.raises(ConfigError, match="ice_text.model does not exist"):
        convert_tokenizer(shared / "tokenizers/chatglm3-6b", tmp_path / "b", "chatglm")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "ice_text.model").write_bytes((shared / "tokenizers/chatglm3-6b/tokenizer.model").read_bytes())
    with pytest.raises(ConfigError, match="no piece '<sop>'"):
        convert_tokenizer(wrong, tmp_path / "c", "chatglm")
    (wrong / "tokenizer_config.json").write_text('{"num_image_tokens": 20000}')
    with pytest.raises(ConfigError, match="num_image_tokens.*20000"):
        convert_tokenizer(wrong, tmp_path / "c", "chatglm")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.model").write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(ConfigError, match=r"tokenizer.model:2: not a tiktoken"):
        convert_tokenizer(broken, tmp_path / "d", "glm4")
    (broken / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        convert_tokenizer(broken, tmp_path / "e", "chatglm3")


def test_existing_tokenizer_files_are_not_overwritten(shared, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "tokenizer_config.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        convert_tokenizer(shared / "tokenizers/chatglm2-6b", dst, "chatglm2")
    assert (dst / "tokenizer_config.json").read_text() == '{"mine": true}'
    convert_tokenizer(shared / "tokenizers/chatglm2-6b", dst, "chatglm2", overwrite=True)
    assert json.loads((dst / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no temporary files left behind


@pytest.mark.parametrize("name", ["chatglm", "chatglm2", "chatglm3"])
def test_exported_chatglm_template_renders_the_training_system_prompt(name, converted):
    """What `zhtune merge` writes for a ChatGLM adapter: the template with the training system prompt as default."""
    import copy

    from zhtune.data.chat_templates import chat_template_for, chat_template_problems

    tok = copy.deepcopy(converted("chatglm3" if name == "chatglm3" else name))  # the session's one stays as it is
    template, system = get_template(name), "你是一个中文语法纠错助手。"
    tok.chat_template = chat_template_for(name, system)
    assert chat_template_problems(tok, template, system) == []
    assert chat_template_problems(tok, template, "另一个系统提示。")  # the default is really there
