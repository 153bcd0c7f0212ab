"""On a CUDA GPU the engine's steps are captured CUDA graphs: their output equals the eager engine's and a plain
argmax loop's (fp32), and the eager engine's bit for bit in bf16 (the same kernels replayed). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.infer.reference import argmax_loop, sharpen, stub_model
from zhtune.infer.completion import Request
from zhtune.infer.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)"),
]
STOPS = {3, 5}


def _model(dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    return sharpen(model, 4.0).to("cuda", dtype)


def _requests(n=6):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(6, 2048, (5 + 7 * i,), generator=g).tolist()
        out.append(Request(prompt, 8 + 3 * i, source=prompt[-10:]))
    return out


def _run(model, requests, batch_size, graphs, speculative=True, stops=STOPS, end_token=None):
    engine = Engine(model, stops, 0, graphs=graphs, speculative=speculative, end_token=end_token)
    done = [(c.tokens, c.stopped) for c in engine.generate(requests, batch_size)]
    runner = engine._runner
    captured = len(runner._graphs) if runner is not None else 0
    assert engine.fallback is None
    if graphs:
        assert runner.graphs_on and captured > 0  # really replayed graphs (a failed capture would run eagerly)
    engine.close()
    return done


def test_graphs_equal_eager_equal_argmax_loop_fp32():
    model = _model(torch.float32)
    requests = _requests()
    reference = [argmax_loop(model, list(r.prompt), r.budget, STOPS) for r in requests]
    for batch_size in (1, 4):
        for speculative in (False, True):
            assert _run(model, requests, batch_size, graphs=True, speculative=speculative) == reference
            assert _run(model, requests, batch_size, graphs=False, speculative=speculative) == reference


def test_graphs_equal_eager_bit_for_bit_bf16():
    model = _model(torch.bfloat16)
    requests = _requests()
    for batch_size in (1, 4):
        assert _run(model, requests, batch_size, graphs=True) == _run(model, requests, batch_size, graphs=False)


def test_graph_steps_verify_long_drafts_on_a_stub():
    model = stub_model({59: 60}).to("cuda")
    requests = [Request([7, 8, s], 60 - s + 4, source=list(range(s + 1, 60))) for s in (20, 33, 45)]
    expected = [(list(range(r.prompt[-1] + 1, 60)), True) for r in requests]
    assert _run(model, requests, 2, graphs=True, stops={60}, end_token=60) == expected
