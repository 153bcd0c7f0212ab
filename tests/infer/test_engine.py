"""The static-cache engine decodes exactly what a plain argmax loop decodes: with and without input-copy drafts, at
batch 1 and with ragged rows, on every architecture it serves, across batches that reuse its cache; and each of
these checks fails on an engine broken on purpose (a wrong acceptance rule, an off-by-one slot)."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from tests.helpers import tiny_model_dir
from tests.infer.reference import argmax_loop, sharpen, stub_model
from zhtune.infer import kv, speculative
from zhtune.infer.completion import Request
from zhtune.infer.engine import Engine

STOPS = {3, 5}


def _random_requests(vocab: int, lengths, seed: int = 0, budget_extra: int = 6) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        prompt = [rng.randrange(6, vocab) for _ in range(n)]
        out.append(Request(prompt, budget_extra + n // 2, source=prompt[-8:]))
    return out


def _reference(model, requests, stops=STOPS):
    return [argmax_loop(model, list(r.prompt), r.budget, stops) for r in requests]


def _decoded(engine, requests, batch_size):
    return [(c.tokens, c.stopped) for c in engine.generate(requests, batch_size)]


def _tiny(arch: str, tmp_path):
    if arch in ("qwen3", "mistral", "glm4"):
        common = dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        torch.manual_seed(0)
        config = {
            "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=8),
            "mistral": lambda: transformers.MistralConfig(**common),
            "glm4": lambda: transformers.Glm4Config(**common, head_dim=8, pad_token_id=0),
        }[arch]()
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        path = tiny_model_dir(tmp_path / arch, arch)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return sharpen(model.eval())


@pytest.mark.parametrize("arch", ["qwen2", "llama", "glm", "glm4", "phi3", "qwen3", "mistral"])
def test_engine_equals_argmax_loop_on_every_architecture(arch, tmp_path):
    model = _tiny(arch, tmp_path)
    requests = _random_requests(256, [7, 19, 3, 12])
    reference = _reference(model, requests)
    for speculate in (False, True):
        engine = Engine(model, STOPS, 0, speculative=speculate)
        assert engine.fallback is None
        assert _decoded(engine, requests, 1) == reference  # batch 1
        assert _decoded(engine, requests, 3) == reference  # ragged rows, refilled as rows finish
        engine.close()
    assert model.config._attn_implementation != kv.ATTENTION  # closing gives the model its attention back


def _chain_case(kind: str):
    """Stub requests whose drafts always / never / sometimes agree with the model (which writes t+1 after t)."""
    stop = 60
    model = stub_model({59: stop})  # ... 57, 58, 59 -> stop
    requests = []
    for start in (20, 33, 45):
        prompt = [7, 8, start]
        chain = list(range(start + 1, stop))  # what greedy writes (the stop token follows)
        if kind == "always":
            source = chain
        elif kind == "never":
            source = chain[::-1]  # descending: a draft continues downwards, the model upwards
        else:
            source = [t if i % 4 else 2 for i, t in enumerate(chain)]  # every fourth token edited
        requests.append(Request(prompt, len(chain) + 4, source=source))
    return model, requests, {stop}


@pytest.mark.parametrize("kind", ["always", "never", "sometimes"])
def test_speculative_equals_greedy_on_a_stub_with_known_agreement(kind):
    model, requests, stops = _chain_case(kind)
    expected = [(list(range(r.prompt[-1] + 1, 60)), True) for r in requests]
    assert _reference(model, requests, stops) == expected
    for batch_size in (1, 3):
        engine = Engine(model, stops, 0, speculative=True, end_token=60)
        assert _decoded(engine, requests, batch_size) == expected
        s = engine.stats
        if kind == "always":
            assert s.accepted == s.drafted > 0 and s.tokens_per_step > 4
        elif kind == "never":
            assert s.accepted == 0 and s.tokens_per_step == 1.0
        else:
            assert 0 < s.accepted < s.drafted and 1.0 < s.tokens_per_step


def test_a_wrong_acceptance_rule_breaks_equality(monkeypatch):
    model, requests, stops = _chain_case("sometimes")
    expected = _decoded(Engine(model, stops, 0, speculative=False), requests, 3)
    assert _decoded(Engine(model, stops, 0, speculative=True, end_token=60), requests, 3) == expected
    # one draft token more than agrees with the model: the rejected (edited) draft token leaks into the output
    monkeypatch.setattr(speculative, "accepted_length", lambda d, p: min(len(d), _count_agreeing(d, p) + 1))
    assert _decoded(Engine(model, stops, 0, speculative=True, end_token=60), requests, 3) != expected


def _count_agreeing(draft, predicted):
    n = 0
    while n < min(len(draft), len(predicted)) and draft[n] == predicted[n]:
        n += 1
    return n


def test_an_off_by_one_cache_slot_breaks_equality(monkeypatch, tmp_path):
    model = _tiny("qwen2", tmp_path)
    requests = _random_requests(256, [9, 14])
    reference = _reference(model, requests)
    assert _decoded(Engine(model, STOPS, 0, speculative=False), requests, 2) == reference
    original = kv.step_slots
    monkeypatch.setattr(kv, "step_slots", lambda ends, k, n: original(ends + 1, k, n))
    assert _decoded(Engine(model, STOPS, 0, speculative=False), requests, 2) != reference


def test_cache_reused_across_batches_and_budgets_per_row(tmp_path):
    model = _tiny("llama", tmp_path)
    first = _random_requests(256, [15, 4, 22], seed=1)
    second = _random_requests(256, [6, 30, 11, 2, 9], seed=2)
    engine = Engine(model, STOPS, 0)
    _decoded(engine, first, 3)
    runner = engine._runner
    assert _decoded(engine, second, 3) == _reference(model, second)  # stale slots of the first batch stay unseen
    assert engine._runner is runner  # the same buffers served both batches
    # a row's output and budget are its own: alone, or beside much longer rows with larger budgets
    short = Request(second[3].prompt, 3, second[3].source)
    long_rows = [Request(r.prompt, 40, r.source) for r in second[:3]]
    alone = engine.generate([short], 1)[0]
    together = engine.generate([*long_rows, short], 4)[3]
    assert (together.tokens, together.stopped) == (alone.tokens, alone.stopped)
    assert len(alone.tokens) == 3 and alone.truncated


def test_stop_tokens_end_rows_and_budgets_truncate():
    model, requests, stops = _chain_case("always")
    engine = Engine(model, stops, 0, end_token=60)
    done = engine.generate(requests, 2)
    assert all(c.stopped and 60 not in c.tokens for c in done)
    cut = engine.generate([Request(r.prompt, 5, r.source) for r in requests], 2)
    assert all(c.truncated and len(c.tokens) == 5 for c in cut)
    assert [c.tokens for c in cut] == [c.tokens[:5] for c in done]


def test_models_the_cache_cannot_serve_fall_back_to_plain_greedy(tmp_path):
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    windowed = transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=16)
    gpt2 = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4)
    for config in (windowed, gpt2):
        model = sharpen(transformers.AutoModelForCausalLM.from_config(config).eval())
        requests = _random_requests(256, [5, 11])
        engine = Engine(model, STOPS, 0)
        assert _decoded(engine, requests, 2) == _reference(model, requests)
        assert engine.fallback  # said why, and decoded with transformers' generate instead


def test_two_engines_on_one_model_each_decode_exactly(tmp_path):
    model = _tiny("qwen2", tmp_path)
    requests = _random_requests(256, [8, 13])
    reference = _reference(model, requests)
    first, second = Engine(model, STOPS, 0), Engine(model, STOPS, 0, speculative=False)
    assert _decoded(first, requests, 2) == reference
    assert _decoded(second, requests, 1) == reference
    first.close()  # gives the model SDPA back while the second engine is alive
    assert _decoded(second, requests, 1) == reference
    second.close()
    assert model.config._attn_implementation == "sdpa"
