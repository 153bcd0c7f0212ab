"""ChatGLM-6B/2/3 templates against their official prompt-building code, written out here.

Their tokenizer classes are remote code inside the checkpoints, so the tests use the real SentencePiece models
from ../shared through a stand-in with the special-token layout of that remote code, and check the ids of those
special tokens against the documented values.
"""

from __future__ import annotations

import pytest

from zhtune.data.conversation import Conversation, Message
from zhtune.data.templates import RenderOptions, SpecialTokens, get_template, rendered_text
from zhtune.data.tokenize import IGNORE_INDEX, tokenize_conversation

SYSTEM = "你是一个乐于助人的助手。"
Q1, A1, Q2, A2 = "你好", "你好！有什么可以帮你？", "介绍一下北京。", "北京是中国的首都，\n历史悠久。"


class SentencePieceStandIn:
    """The tokenizer interface zhtune uses, over a real SentencePiece model.

    ``specials`` are appended after the SentencePiece vocabulary in the given order, as ChatGLM2/3's
    ``SPTokenizer`` does; ChatGLM-6B's special tokens are pieces of its model.
    """

    is_fast = False
    unk_token_id = 0
    unk_token = "<unk>"

    def __init__(self, model_file, specials=(), eos="</s>", bos=None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.specials = {name: self.sp.get_piece_size() + i for i, name in enumerate(specials)}
        self.eos_token, self.bos_token = eos, bos

    def convert_tokens_to_ids(self, name):
        return self.specials[name] if name in self.specials else self.sp.piece_to_id(name)

    def encode(self, text, add_special_tokens=False):
        return self.sp.encode(text)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}


def two_rounds(system=None) -> Conversation:
    return Conversation(
        (Message("user", Q1), Message("assistant", A1), Message("user", Q2), Message("assistant", A2)), system=system
    )


@pytest.fixture(scope="module")
def glm2_tok(shared):
    return SentencePieceStandIn(
        shared / "tokenizers/chatglm3-6b/tokenizer.model",
        ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
    )


def test_chatglm3_special_ids_match_the_real_model(glm2_tok):
    assert glm2_tok.sp.get_piece_size() == 64789
    ids = {n: glm2_tok.convert_tokens_to_ids(n) for n in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>")}
    assert ids == {"[gMASK]": 64790, "sop": 64792, "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796}
    assert glm2_tok.convert_tokens_to_ids("</s>") == 2


def test_chatglm3_text_and_ids_follow_build_single_message(glm2_tok):
    conv = two_rounds(SYSTEM)
    tmpl = get_template("chatglm3")
    text = rendered_text(tmpl.render(conv, SpecialTokens(eos="</s>")))
    assert (
        text == f"[gMASK]sop<|system|>\n{SYSTEM}<|user|>\n{Q1}<|assistant|>\n{A1}<|user|>\n{Q2}<|assistant|>\n{A2}</s>"
    )

    enc = glm2_tok.sp.encode
    # ChatGLM3's finetune code: [gMASK] sop, then per message build_single_message(role, "", content) =
    # [<|role|>] + encode("\n") + encode(content), then eos; the loss starts after each <|assistant|> token and
    # runs through the next role token.
    expected, labels = [64790, 64792], [IGNORE_INDEX] * 2
    for role, content in (
        ("<|system|>", SYSTEM),
        ("<|user|>", Q1),
        ("<|assistant|>", A1),
        ("<|user|>", Q2),
        ("<|assistant|>", A2),
    ):
        piece = [glm2_tok.convert_tokens_to_ids(role)] + enc("\n") + enc(content)
        sup = role == "<|assistant|>"
        if labels and labels[-1] != IGNORE_INDEX:  # the role token after an answer ends that answer
            labels += [piece[0]] + ([IGNORE_INDEX] * (len(piece) - 1) if not sup else piece[1:])
        else:
            labels += [IGNORE_INDEX] + (piece[1:] if sup else [IGNORE_INDEX] * (len(piece) - 1))
        expected += piece
    expected.append(2)
    labels.append(2)
    sample = tokenize_conversation(conv, glm2_tok, tmpl)
    assert sample.input_ids == expected
    assert sample.labels == labels

    gen = rendered_text(
        tmpl.render(
            Conversation((Message("user", Q1),)), SpecialTokens(eos="</s>"), RenderOptions(add_generation_prompt=True)
        )
    )
    assert gen == f"[gMASK]sop<|user|>\n{Q1}<|assistant|>"


def build_prompt_chatglm2(query, history):
    # ChatGLM2-6B tokenization_chatglm.py, ChatGLMTokenizer.build_prompt
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    return prompt


def test_chatglm2_follows_build_prompt(glm2_tok):
    tmpl = get_template("chatglm2")
    segments = tmpl.render(two_rounds(), SpecialTokens(eos="</s>"))
    last_target = max(i for i, s in enumerate(segments) if s.target and not s.special)
    prompt = rendered_text(segments[:last_target])
    assert prompt == "[gMASK]sop" + build_prompt_chatglm2(Q2, [(Q1, A1)])
    assert rendered_text(segments) == "[gMASK]sop" + build_prompt_chatglm2(Q2, [(Q1, A1)]) + A2 + "</s>"
    sample = tokenize_conversation(two_rounds(), glm2_tok, tmpl)
    assert sample.input_ids[:2] == [64790, 64792] and sample.input_ids[-1] == 2
    supervised = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert supervised == glm2_tok.sp.encode(A1) + glm2_tok.sp.encode(A2) + [2]


def chat_prompt_chatglm6b(query, history):
    # ChatGLM-6B modeling_chatglm.py, ChatGLMForConditionalGeneration.chat
    if not history:
        return query
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i}]\n问：{old_query}\n答：{response}\n"
    prompt += f"[Round {len(history)}]\n问：{query}\n答："
    return prompt


def test_chatglm6b_prompt_and_special_ids(shared):
    tok = SentencePieceStandIn(shared / "tokenizers/chatglm-6b/ice_text.model", eos="<eop>", bos="<sop>")
    assert {n: tok.convert_tokens_to_ids(n) for n in ("[gMASK]", "<sop>", "<eop>")} == {
        "[gMASK]": 130001,
        "<sop>": 130004,
        "<eop>": 130005,
    }
    tmpl = get_template("chatglm")
    text = rendered_text(tmpl.render(two_rounds(), SpecialTokens(eos="<eop>", bos="<sop>")))
    assert text == chat_prompt_chatglm6b(Q2, [(Q1, A1)]) + "[gMASK]<sop>" + A2 + "<eop>"
    single = Conversation((Message("user", Q1), Message("assistant", A1)))
    assert rendered_text(tmpl.render(single)) == Q1 + "[gMASK]<sop>" + A1 + "<eop>"
    # ptuning/main.py: a_ids + [gMASK, <sop>] + b_ids + [<eop>], loss on b_ids and <eop>
    sample = tokenize_conversation(single, tok, tmpl)
    assert sample.input_ids == tok.sp.encode(Q1) + [130001, 130004] + tok.sp.encode(A1) + [130005]
    n_prompt = len(tok.sp.encode(Q1)) + 2
    assert sample.labels == [IGNORE_INDEX] * n_prompt + sample.input_ids[n_prompt:]
