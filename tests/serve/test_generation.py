"""Batched chat decoding: greedy is the plain argmax, seeded sampling does not depend on the batch, each row ends on
its own (end-of-turn id, stop string, budget, cancellation), streamed text never shows a stop string or half a
character."""

from __future__ import annotations

import torch

from tests.serve.conftest import GREETING
from zhtune.data.conversation import Conversation, Message
from zhtune.serve.generation import Row, SamplingParams, TextStream, generate_rows, sample_token

QUESTIONS = ["你好", "今天天气怎么样？", "请写一首关于春天的诗。"]


def _prompt(backend, question: str, system: str | None = None) -> list[int]:
    return backend.prompt_ids(Conversation((Message("user", question),), system=system))


def _reference(backend, prompt: list[int], steps: int, repetition_penalty: float = 1.0) -> list[int]:
    """Plain greedy: full forward of the whole sequence each step, argmax over the tokenizer's vocabulary."""
    stops = set(backend.generator.stop_ids())
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = backend.model(torch.tensor([seq])).logits[0, -1].float()
            logits[len(backend.tokenizer) :] = -float("inf")
            if repetition_penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor
                seen = torch.tensor(sorted(set(seq)))
                picked = logits[seen]
                logits[seen] = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
            token = int(logits.argmax())
            out.append(token)
            seq.append(token)
            if token in stops:
                break
    return out


def test_greedy_batch_is_plain_argmax_whatever_the_checkpoint_says(backend):
    """Left-padded batch of prompts of different lengths == one-by-one full-forward argmax, although the real
    generation_config.json asks for sampling, top_k 20 and repetition_penalty 1.1 — and still when a checkpoint asks
    for an extreme repetition penalty, which plain ``generate(do_sample=False)`` applies."""
    gen = backend.model.generation_config
    assert gen.do_sample and gen.repetition_penalty == 1.1 and gen.top_k == 20  # the real file is in place
    prompts = [_prompt(backend, q) for q in QUESTIONS]
    references = [_reference(backend, p, 12) for p in prompts]
    stops = backend.generator.stop_ids()
    rows = [Row(p, SamplingParams(temperature=0.0, max_tokens=12)) for p in prompts]
    assert [c.token_ids for c in generate_rows(backend.model, backend.tokenizer, rows, stops)] == references
    assert backend.tokenizer.decode(references[0][:-1]) == GREETING[1] and references[0][-1] in stops  # memorized
    old = gen.repetition_penalty
    gen.repetition_penalty = 100.0
    try:
        rows = [Row(p, SamplingParams(temperature=0.0, max_tokens=12)) for p in prompts[:1]]
        assert generate_rows(backend.model, backend.tokenizer, rows, stops)[0].token_ids == references[0]
        plain = backend.model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=12)
        assert plain[0, len(prompts[0]) :].tolist() != references[0]  # the check can fail: the penalty leaks there
    finally:
        gen.repetition_penalty = old


def test_seeded_sampling_does_not_depend_on_the_batch(backend):
    prompt = _prompt(backend, QUESTIONS[1])
    sampled = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, seed=5)
    alone = generate_rows(backend.model, backend.tokenizer, [Row(prompt, sampled)], backend.generator.stop_ids())
    rows = [
        Row(_prompt(backend, QUESTIONS[2]), SamplingParams(temperature=0.7, max_tokens=4, seed=1)),
        Row(prompt, sampled),
        Row(_prompt(backend, QUESTIONS[0]), SamplingParams(max_tokens=6)),
    ]
    batched = generate_rows(backend.model, backend.tokenizer, rows, backend.generator.stop_ids())
    assert batched[1].token_ids == alone[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, seed=6)
    differs = generate_rows(backend.model, backend.tokenizer, [Row(prompt, other_seed)], backend.generator.stop_ids())
    assert differs[0].token_ids != alone[0].token_ids
    greedy = generate_rows(backend.model, backend.tokenizer, [Row(prompt, SamplingParams(max_tokens=10))], [])
    assert greedy[0].token_ids != alone[0].token_ids  # sampling really sampled


def test_each_row_ends_on_its_own(backend):
    stops = backend.generator.stop_ids()
    greeting = _prompt(backend, GREETING[0])
    deltas: list[str] = []
    rows = [
        Row(greeting, SamplingParams(max_tokens=3)),
        Row(greeting, SamplingParams(max_tokens=50, stop=("小助",)), deltas.append),
        Row(greeting, SamplingParams(max_tokens=50)),
        Row(greeting, SamplingParams(max_tokens=50), cancelled=lambda: True),
    ]
    budget, stopped, full, cancelled = generate_rows(backend.model, backend.tokenizer, rows, stops)
    assert (budget.finish_reason, budget.completion_tokens) == ("length", 3)
    assert budget.text == backend.tokenizer.decode(full.token_ids[:3])
    assert (stopped.text, stopped.finish_reason) == ("你好！我是", "stop")
    assert "".join(deltas) == "你好！我是" and not any("小" in d for d in deltas)
    assert full.text == GREETING[1] and full.token_ids[-1] in stops and full.completion_tokens == len(full.token_ids)
    assert full.prompt_tokens == len(greeting)
    assert (cancelled.finish_reason, cancelled.completion_tokens) == ("cancelled", 1)


def test_text_stream_holds_back_half_characters_and_stop_prefixes(backend):
    tok = backend.tokenizer
    text = "好𠀾的诗：春眠不觉晓。"  # 𠀾 is four UTF-8 bytes, split over byte-level tokens
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))  # the case really occurs
    stream = TextStream(tok, stop=("不觉晓",))
    deltas = [stream.push(i) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == "好𠀾的诗：春眠" and stream.stopped
    held = TextStream(tok, stop=("春眠X",))
    shown = "".join(held.push(i) for i in ids[: len(tok.encode("好𠀾的诗：春眠", add_special_tokens=False))])
    assert shown == "好𠀾的诗：" and held.flush() == "春眠"  # "春眠" might start the stop string: held until the end


def test_sample_token_follows_temperature_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rng = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(logits, 1.0, 1.0, rng) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert {sample_token(logits, 1.0, 0.5, rng) for _ in range(200)} == {0}  # top 0.5 mass: the top token only
    assert {sample_token(logits, 1.0, 0.75, rng) for _ in range(400)} == {0, 1}
    cold = torch.tensor([sample_token(logits, 0.25, 1.0, rng) for _ in range(400)])
    assert (cold == 0).float().mean() > 0.85  # p ~ 0.5^4 / (0.5^4 + 0.3^4 + ...) = 0.87
