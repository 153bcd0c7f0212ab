"""On a CUDA GPU a row's result on the batch-invariant kernels does not depend on its batch, bit for bit — for one
GEMM, for a whole engine step (the same token's logits prefilled at once, token by token, or as one row of 16 in a
runner with another cache length) and for whole decodes (speculative at batch 16 and 64 = plain greedy one sentence
at a time, bf16). Each check is also run on torch's own kernels, where it finds differences: that is what the
kernels are for, and it shows the checks can fail. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zhtune.infer.completion import Request
from zhtune.infer.engine import Engine
from zhtune.infer.kv import StepRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)"),
]
ROWS = (1, 2, 7, 16, 64, 333, 1024)


def _shape_dependent_rows(fn, x: torch.Tensor) -> list[int]:
    """The batch sizes ``m`` for which ``fn(x[:m])`` is not bit for bit ``fn(x)[:m]``."""
    full = fn(x)
    return [m for m in ROWS if not torch.equal(fn(x[:m]), full[:m])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_rows_do_not_depend_on_the_batch(dtype):
    from zhtune.infer import invariant_triton as kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    vendor_dependent = 0
    for k, n in ((896, 4864), (4864, 896), (896, 151936), (3584, 512)):
        x = torch.randn(2048, k, device="cuda").to(dtype)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
        b = torch.randn(n, device="cuda").to(dtype)
        ours = kernels.linear(x, w, b)
        assert _shape_dependent_rows(lambda t, w=w, b=b: kernels.linear(t, w, b), x) == []
        assert torch.equal(kernels.linear(x[500:501], w, b), ours[500:501])  # a row alone = the same row in a batch
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-2)
        torch.testing.assert_close(ours.float(), F.linear(x, w, b).float(), **tol)
        vendor_dependent += len(_shape_dependent_rows(lambda t, w=w, b=b: F.linear(t, w, b), x))
    if dtype == torch.bfloat16:  # the check finds cuBLAS's shape dependence (why the kernels exist)
        assert vendor_dependent > 0


def test_row_mean_does_not_depend_on_the_batch():
    from zhtune.infer import invariant_triton as kernels

    x = torch.randn(2048, 896, device="cuda")
    assert _shape_dependent_rows(kernels.row_mean, x) == []
    torch.testing.assert_close(kernels.row_mean(x), x.mean(-1), rtol=1e-6, atol=1e-7)


def _model(layers=4, vocab=4096):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).eval().to("cuda", torch.bfloat16)


def _last_logits(model, prompt, invariant: bool) -> list[torch.Tensor]:
    """The logits after ``prompt``: prefilled in one step, token by token, and as row 5 of a 16-row step."""
    cuda = dict(device="cuda", dtype=torch.long)
    n = len(prompt)
    one = StepRunner(model, 1, 256, invariant=invariant)
    whole = one.step_logits(torch.tensor([prompt], **cuda), torch.zeros(1, **cuda))[0, -1].clone()
    for i, t in enumerate(prompt):  # the same slots again, one token per step
        single = one.step_logits(torch.tensor([[t]], **cuda), torch.full((1,), i, **cuda))[0, -1].clone()
    one.close()
    many = StepRunner(model, 16, 512, invariant=invariant)
    ids = torch.randint(10, 4000, (16, 64), generator=torch.Generator().manual_seed(3)).to("cuda")
    ids[5, :n] = torch.tensor(prompt)
    in_batch = many.step_logits(ids, torch.zeros(16, **cuda))[5, n - 1].clone()
    many.close()
    return [whole, single, in_batch]


@torch.no_grad()
def test_step_logits_do_not_depend_on_k_rows_or_cache_length():
    model = _model()
    prompt = torch.randint(10, 4000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    whole, single, in_batch = _last_logits(model, prompt, invariant=True)
    assert torch.equal(whole, single) and torch.equal(whole, in_batch)
    whole, single, in_batch = _last_logits(model, prompt, invariant=False)
    assert not (torch.equal(whole, single) and torch.equal(whole, in_batch))  # torch's kernels: they differ


def _decode(model, requests, batch_size, speculative, invariant):
    engine = Engine(model, [1, 2], 0, speculative=speculative, invariant=invariant)
    assert engine.invariant is invariant and engine.fallback is None
    done = [(c.tokens, c.stopped) for c in engine.generate(requests, batch_size)]
    assert engine._runner.graphs_on
    engine.close()
    return done


def test_speculative_batches_equal_greedy_one_at_a_time_bf16(monkeypatch):
    """A random bf16 model (logits close together: near-ties everywhere) whose drafts are its own greedy output
    with an edit or two, so that steps verify long blocks and rows accept different lengths."""
    from zhtune.infer import invariant_triton as kernels

    calls = []
    monkeypatch.setattr(kernels, "linear", lambda *a, _f=kernels.linear: calls.append(1) or _f(*a))
    model = _model(layers=6)
    g = torch.Generator().manual_seed(4)
    prompts = [
        torch.randint(10, 4000, (int(n),), generator=g).tolist() for n in torch.randint(8, 90, (48,), generator=g)
    ]
    plain = [Request(p, 24) for p in prompts]
    greedy = _decode(model, plain, 1, speculative=False, invariant=True)
    sources = []
    for i, (tokens, _stopped) in enumerate(greedy):
        draft = list(tokens)
        if draft and i % 3:
            draft[len(draft) // 2] = 7  # an edit: the rest re-aligns
        sources.append(draft)
    requests = [Request(p, 24, s) for p, s in zip(prompts, sources)]
    for batch_size in (16, 64):
        assert _decode(model, requests, batch_size, speculative=True, invariant=True) == greedy
    assert calls  # the steps (their captures) really ran the kernels
    calls.clear()
    vendor = _decode(model, requests, 16, speculative=True, invariant=False)
    assert not calls
    print(f"torch's kernels: {sum(a != b for a, b in zip(vendor, greedy))} of {len(greedy)} rows differ")
