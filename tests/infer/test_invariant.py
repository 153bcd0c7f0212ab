"""The batch-invariant kernels compute what torch computes, the mode hands every call they do not cover back to torch,
and the engine on them still decodes exactly what a plain argmax loop decodes (and not with a kernel whose rows
depend on their neighbours) — run on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``, in a child process:
the variable is read when Triton is imported). That a row's result does not depend on its batch is a property of the
GPU kernels and is checked there (``tests/infer/test_invariant_gpu.py``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.infer.reference import stub_model
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Engine

_INTERPRETED = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from tests.infer.reference import argmax_loop, sharpen
    from zhtune.infer import invariant, invariant_triton
    from zhtune.infer.completion import Request
    from zhtune.infer.engine import Engine

    calls = {"linear": 0, "row_mean": 0}
    for name in calls:
        def counted(*a, _f=getattr(invariant_triton, name), _n=name):
            calls[_n] += 1
            return _f(*a)
        setattr(invariant_triton, name, counted)

    torch.manual_seed(0)
    x = torch.randn(3, 70, 96)
    w = torch.randn(200, 130)[:, 17:113]  # a strided weight
    b = torch.randn(200)
    with invariant.batch_invariant():
        got = [F.linear(x, w, b), F.linear(x[0], w), x.pow(2).mean(-1, keepdim=True), torch.mean(x, dim=(2,))]
        half = F.linear(x.bfloat16(), w.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = F.linear(x, w.bfloat16())  # fp32 input, bf16 weight: both taken in bf16, as autocast does
        before = dict(calls)
        g = x.clone().requires_grad_()
        untouched = [F.linear(g, w).sum(), x.mean(0), x.mean(), x.mean(-1, dtype=torch.float64)]
        untouched.append(F.linear(x.double(), w.double()))
        class Sub(torch.Tensor):
            pass
        untouched.append(F.linear(x.as_subclass(Sub), w))
        assert calls == before, calls  # autograd, other dims, dtype=, fp64 and subclasses stay with torch
    want = [F.linear(x, w, b), F.linear(x[0], w), x.pow(2).mean(-1, keepdim=True), x.mean(2)]
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
    exact = F.linear(x.bfloat16().float(), w.bfloat16().float())  # the interpreter truncates to bf16
    assert half.dtype == mixed.dtype == torch.bfloat16
    for h in (half, mixed):
        assert ((h.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()
    assert calls == {"linear": 4, "row_mean": 2}, calls
    g.grad = None
    untouched[0].backward()
    assert g.grad is not None

    # the engine on the kernels: exactly the argmax loop, with and without drafts, batch 1 and ragged rows
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = sharpen(AutoModelForCausalLM.from_config(config).eval())
    g = torch.Generator().manual_seed(1)
    requests = []
    for n in (5, 11, 3):
        prompt = torch.randint(6, 128, (n,), generator=g).tolist()
        requests.append(Request(prompt, 7, source=prompt[-6:]))
    reference = [argmax_loop(model, list(r.prompt), r.budget, {3, 5}) for r in requests]
    for speculative, batch in ((True, 1), (True, 3), (False, 2)):
        calls["linear"] = 0
        engine = Engine(model, {3, 5}, 0, speculative=speculative, invariant=True)
        assert engine.invariant
        done = [(c.tokens, c.stopped) for c in engine.generate(requests, batch)]
        assert done == reference, (speculative, batch, done, reference)
        assert calls["linear"] > 0  # the forwards really ran on the kernels
        engine.close()
    # negative: a kernel whose rows depend on the rows beside them (every row after the first rotated) is caught
    exact_linear = invariant_triton.linear
    invariant_triton.linear = lambda *a: (lambda o: torch.cat([o[:1], o[1:].roll(1, -1)]))(exact_linear(*a))
    engine = Engine(model, {3, 5}, 0, speculative=True, invariant=True)
    assert [(c.tokens, c.stopped) for c in engine.generate(requests, 3)] != reference
    engine.close()
    print("interpreted invariant kernels ok")
    """
)


def test_kernels_and_engine_under_the_interpreter():
    pytest.importorskip("triton")
    from tests.helpers import subprocess_env

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED],
        cwd=root,
        env=subprocess_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "invariant kernels ok" in done.stdout, done.stdout + done.stderr[-3000:]


def test_engine_asks_for_the_kernels_where_they_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = stub_model({})  # on the CPU: the choice is made before anything runs
    assert Engine(model, [1], 0).invariant is False  # auto: CUDA only
    assert Engine(model, [1], 0, invariant=False).invariant is False
    with pytest.raises(ZhtuneError, match="batch-invariant kernels need Triton and a CUDA device"):
        Engine(model, [1], 0, invariant=True)
