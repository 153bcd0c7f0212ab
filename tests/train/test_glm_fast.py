"""The glm fast path (``zhtune.train.glm_kernels``) against transformers' own glm modules.

On CPU: the kernels' formulas (the torch twins the Triton code computes) equal ``modeling_glm.apply_rotary_pos_emb``
and ``GlmMLP`` forward and backward (fp32 to 1e-6; bf16 bit for bit), a patched tiny model gives the plain logits and
LoRA gradients, the patch stays on its instance, and the Triton kernels themselves run under ``TRITON_INTERPRET=1``.
On a GPU (marked ``gpu``): the compiled kernels, and the whole fast path on a glm model, against the plain path.
Each comparison has a mutation beside it that makes it fail.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.helpers import subprocess_env
from zhtune.train import fast
from zhtune.train import glm_kernels as gk

CUDA = torch.cuda.is_available()
NEEDS_CUDA = "needs a CUDA GPU (the glm Triton kernels)"


def _config(**kwargs):
    from transformers import GlmConfig

    shape = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        eos_token_id=1,
    )
    return GlmConfig(**{**shape, **kwargs})


def _plain_rope():
    from transformers.models.glm import modeling_glm

    return getattr(modeling_glm.apply_rotary_pos_emb, "__wrapped__", modeling_glm.apply_rotary_pos_emb)


def _rope_inputs(dtype, factor=0.5, device="cpu", batch=2, cos_batch=None):
    """q/k in the layout GlmAttention passes them ([b, s, h, d] memory, [b, h, s, d] view), cos/sin of a real
    GlmRotaryEmbedding at packed positions (restarting per document)."""
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    g = torch.Generator().manual_seed(0)
    seq = 37
    config = _config() if factor == 0.5 else _config(partial_rotary_factor=factor)
    rotary = GlmRotaryEmbedding(config).to(device)
    positions = torch.cat([torch.arange(20), torch.arange(17)]).repeat(cos_batch or batch, 1).to(device)
    cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), positions)
    q = (torch.randn(batch, seq, 4, 16, generator=g) * 3).to(device, dtype).transpose(1, 2)
    k = (torch.randn(batch, seq, 2, 16, generator=g) * 3).to(device, dtype).transpose(1, 2)
    grads = [torch.randn(t.shape, generator=g).to(device, dtype) for t in (q, k)]
    return q, k, cos, sin, grads


def _run_rope(fn, q, k, cos, sin, grads):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    outs = fn(q, k, cos, sin)
    torch.autograd.backward(outs, grads)
    return [*outs, q.grad, k.grad]


def _assert_same(got, want, dtype):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:  # every product and sum rounded as torch rounds it: the same bits
            assert torch.equal(a, b), (a.float() - b.float()).abs().max()


@pytest.mark.parametrize("factor", [0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_math_equals_transformers(dtype, factor):
    inputs = _rope_inputs(dtype, factor)
    _assert_same(_run_rope(gk.fused_rope, *inputs), _run_rope(_plain_rope(), *inputs), dtype)


def test_rope_with_one_cos_row_for_the_batch_and_an_fp32_cos():
    """position_ids [1, s] (transformers' default) broadcast over the batch; fp32 cos/sin promote bf16 q/k."""
    q, k, cos, sin, grads = _rope_inputs(torch.bfloat16, cos_batch=1)
    assert gk.can_fuse_rope(q, k, cos, sin)
    _assert_same(
        _run_rope(gk.fused_rope, q, k, cos, sin, grads), _run_rope(_plain_rope(), q, k, cos, sin, grads), q.dtype
    )
    cos32, sin32 = cos.float(), sin.float()
    got = _run_rope(gk.fused_rope, q, k, cos32, sin32, [g.float() for g in grads])
    want = _run_rope(_plain_rope(), q, k, cos32, sin32, [g.float() for g in grads])
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    _assert_same(got, want, torch.bfloat16)


def _mlp_case(dtype, forward=None):
    from transformers.models.glm.modeling_glm import GlmMLP

    torch.manual_seed(0)
    mlp = GlmMLP(_config()).to(dtype)
    if forward is not None:
        mlp.forward = forward.__get__(mlp)
    x = (torch.randn(3, 11, 64) * 2).to(dtype).requires_grad_()
    y = mlp(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    return [y, x.grad, mlp.gate_up_proj.weight.grad, mlp.down_proj.weight.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_math_equals_glm_mlp(dtype):
    _assert_same(_mlp_case(dtype, gk._fused_mlp_forward), _mlp_case(dtype), dtype)


def _liger_style_rope(q, k, cos, sin):
    """Rotate-half over the rotary channels (what liger's RoPE and Llama do): wrong for GLM's interleaved pairs."""
    rot = cos.shape[-1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def one(x):
        xr = x[..., :rot]
        half = torch.cat([-xr[..., rot // 2 :], xr[..., : rot // 2]], dim=-1)
        return torch.cat([xr * c + half * s, x[..., rot:]], dim=-1)

    return one(q), one(k)


def test_mutations_fail_the_comparisons(monkeypatch):
    inputs = _rope_inputs(torch.float32)
    want = _run_rope(_plain_rope(), *inputs)
    with pytest.raises(AssertionError):
        _assert_same(_run_rope(_liger_style_rope, *inputs), want, torch.float32)
    real = gk.rope_math
    monkeypatch.setattr(gk, "rope_math", lambda x, c, s, dt: real(x, c, s.flip(-1), dt))  # pairs get wrong angles
    with pytest.raises(AssertionError):
        _assert_same(_run_rope(gk.fused_rope, *inputs), want, torch.float32)
    monkeypatch.setattr(gk, "rope_math", real)
    real_grad = gk.silu_mul_grad_math
    monkeypatch.setattr(gk, "silu_mul_grad_math", lambda g, gu: real_grad(g, gu.flip(-1)))  # gate and up swapped
    with pytest.raises(AssertionError):
        _assert_same(_mlp_case(torch.float32, gk._fused_mlp_forward), _mlp_case(torch.float32), torch.float32)


def _tiny_peft(seed=0, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_config(), dtype=dtype, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def _packed_batch(device="cpu", vocab=256):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, vocab, (2, 48), generator=g).to(device)
    positions = torch.cat([torch.arange(30), torch.arange(18)]).repeat(2, 1).to(device)
    return ids, positions


def _loss_and_grads(model, ids, positions):
    model.zero_grad()
    loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _Counter:
    def __init__(self, monkeypatch):
        self.rope = self.silu = 0
        real_rope, real_silu = gk.fused_rope, gk.fused_silu_mul

        def rope(*a):
            self.rope += 1
            return real_rope(*a)

        def silu(*a):
            self.silu += 1
            return real_silu(*a)

        monkeypatch.setattr(gk, "fused_rope", rope)
        monkeypatch.setattr(gk, "fused_silu_mul", silu)


def test_patched_model_gives_plain_logits_and_lora_gradients_and_stays_scoped(monkeypatch):
    pytest.importorskip("triton")  # apply_glm_kernels wants the Triton module importable; CPU tensors use torch math
    from transformers.models.glm import modeling_glm

    calls = _Counter(monkeypatch)
    ids, positions = _packed_batch()
    plain_loss, plain_grads = _loss_and_grads(_tiny_peft(), ids, positions)
    assert (calls.rope, calls.silu) == (0, 0)

    patched = _tiny_peft()
    applied, skipped = gk.apply_glm_kernels(patched.get_base_model())
    assert applied[:2] == ["fused SwiGLU over gate_up_proj (2 layers)", "fused partial rotary embedding"]
    if importlib.util.find_spec("liger_kernel") is None:
        assert "rms_norm" in skipped
    loss, grads = _loss_and_grads(patched, ids, positions)
    assert calls.rope == 2 and calls.silu == 2  # one per decoder layer: the patched functions really ran
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    # models built before or after the patch run transformers' code: unflagged cos/sin, their class's forward
    calls.rope = calls.silu = 0
    later = _tiny_peft()
    _loss_and_grads(later, ids, positions)
    assert (calls.rope, calls.silu) == (0, 0)
    assert all("forward" not in vars(m) for m in later.modules() if isinstance(m, modeling_glm.GlmMLP))
    assert modeling_glm.apply_rotary_pos_emb.__wrapped__ is _plain_rope()


def test_fast_path_on_cpu_skips_the_glm_kernels_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(fast, "_said", set())
    caplog.set_level(logging.WARNING, logger="zhtune.train.fast")
    reports = [fast.apply_fast_path(_tiny_peft()) for _ in range(2)]
    for report in reports:
        assert report.applied == ["fused LoRA linear (12 layers)"]
        assert "CUDA" in report.skipped["glm_kernels"] and "liger" not in report.skipped
    assert sum("glm kernels" in r.getMessage() for r in caplog.records) == 1
    off = fast.apply_fast_path(_tiny_peft(), layer_kernels=False)
    assert off.applied == ["fused LoRA linear (12 layers)"] and not off.skipped


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from tests.train import test_glm_fast as t
    from zhtune.train import glm_kernels as gk

    assert gk._use_triton(torch.zeros(1))  # TRITON_INTERPRET=1: the Triton kernels run on these CPU tensors
    for factor in (0.5, 1.0):
        inputs = t._rope_inputs(torch.float32, factor)
        t._assert_same(t._run_rope(gk.fused_rope, *inputs), t._run_rope(t._plain_rope(), *inputs), torch.float32)
    inputs = t._rope_inputs(torch.float32, cos_batch=1)
    t._assert_same(t._run_rope(gk.fused_rope, *inputs), t._run_rope(t._plain_rope(), *inputs), torch.float32)
    fused = t._mlp_case(torch.float32, gk._fused_mlp_forward)
    t._assert_same(fused, t._mlp_case(torch.float32), torch.float32)
    # bf16: the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: within one bf16 step here
    for got, want in zip(t._run_rope(gk.fused_rope, *t._rope_inputs(torch.bfloat16)),
                         t._run_rope(t._plain_rope(), *t._rope_inputs(torch.bfloat16))):
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2 ** -6)
    print("interpreted kernels ok")
    """
)


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = subprocess_env(TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "interpreted kernels ok" in done.stdout, done.stdout + done.stderr[-3000:]


# --- on a GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NEEDS_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_compiled_kernels_equal_transformers_on_gpu(dtype, factor):
    """On the GPU Triton contracts a product and a sum into one fused multiply-add (one rounding where torch rounds
    twice), so the kernels agree with transformers to a few units in the last place, not bit for bit (seen on the
    H200: 2.6e-5 in fp32, one bf16 step); the mutations the CPU tests reject differ by O(1)."""
    inputs = _rope_inputs(dtype, factor, device="cuda")
    assert gk._use_triton(inputs[0])
    for a, b in zip(_run_rope(gk.fused_rope, *inputs), _run_rope(_plain_rope(), *inputs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        fp32 = dtype == torch.float32
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5 if fp32 else 2**-6, atol=1e-4 if fp32 else 2**-7)
    got = _mlp_case_cuda(dtype, gk._fused_mlp_forward)
    want = _mlp_case_cuda(dtype)
    for a, b in zip(got, want):  # silu's exp may differ in its last bit from torch's: one bf16 step at most
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-4)


def _mlp_case_cuda(dtype, forward=None):
    from transformers.models.glm.modeling_glm import GlmMLP

    torch.manual_seed(0)
    mlp = GlmMLP(_config(hidden_size=256, intermediate_size=1376)).to("cuda", dtype)
    if forward is not None:
        mlp.forward = forward.__get__(mlp)
    x = (torch.randn(4, 333, 256, device="cuda") * 2).to(dtype).requires_grad_()
    y = mlp(x)
    y.backward(torch.randn(y.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype))
    return [y, x.grad, mlp.gate_up_proj.weight.grad, mlp.down_proj.weight.grad]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NEEDS_CUDA)
def test_glm_fast_path_gives_the_plain_loss_and_lora_gradients_on_gpu():
    """bf16 glm model (GLM-4 layout, scaled down), LoRA on all linear layers, packed rows: the whole fast path
    (fused LoRA + glm kernels + liger RMSNorm when installed) against transformers + peft."""
    from transformers import AutoModelForCausalLM

    from zhtune.model.load import upcast_trainable
    from zhtune.train.loop import disable_lora_input_casting

    config = _config(
        vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64,
    )  # fmt: skip
    ids, positions = _packed_batch("cuda", vocab=4096)
    results = {}
    for on in (False, True):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        upcast_trainable(model)
        if on:
            disable_lora_input_casting(model)
            applied = fast.apply_fast_path(model).applied
            assert any("glm fused SwiGLU" in a for a in applied) and any("glm fused partial" in a for a in applied)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[on] = _loss_and_grads(model.train(), ids, positions)
    (plain_loss, plain_grads), (fast_loss, fast_grads) = results[False], results[True]
    assert abs(fast_loss.item() - plain_loss.item()) / plain_loss.item() < 2e-3, (fast_loss, plain_loss)
    for name, g in plain_grads.items():
        rel = float((fast_grads[name].float() - g.float()).norm() / g.float().norm())
        assert rel < 3e-2, (name, rel)
