"""Fused kernels for transformers' native ``glm`` architecture (ChatGLM2/3 and GLM-4 once converted).

liger-kernel covers ``glm`` with none of its patches: its SwiGLU wants separate gate/up projections, its RoPE
rotates halves of the whole head. GLM has a fused ``gate_up_proj`` and rotates only the first ``partial_rotary_factor``
of each head, in interleaved pairs ``(x[2i], x[2i+1])``. Here, on one model instance:

* SwiGLU over the fused projection: one Triton pass reads ``gate_up`` and writes ``up * silu(gate)``; the backward
  writes the gradient of the fused tensor directly (transformers' version chunks, multiplies, and concatenates the
  two gradients again, several passes over ``[tokens, 2 * intermediate]``);
* the partial interleaved rotary embedding: one Triton pass per tensor (transformers' version materialises the
  interleaved cos/sin, the rotated copy, the products and a concatenation, forward and backward);
* RMSNorm: liger's ``LigerRMSNorm`` (it fits: llama casting, no offset), through liger's own module patch.

Both kernels are exact: they compute transformers' formulas with the same rounding after every operation (in bf16
each product and sum is rounded to bf16 as torch's separate kernels round it), so they give transformers' numbers in
fp32 and, up to the last bit of an exp, in bf16. :func:`silu_mul_math` and :func:`rope_math` write those formulas
out in torch (used off CUDA, and by the tests as the reference of the Triton code, which also runs under
``TRITON_INTERPRET=1`` on a CPU).

Scope: MLP and norm forwards are bound to the instance; the rotary function is looked up by name in
``transformers.models.glm.modeling_glm``, so that name is replaced once by a dispatcher that uses the fused kernel
only for the cos/sin tensors this instance's rotary embedding produced (they carry a flag); every other model of the
process, built before or after, runs transformers' code unchanged.
"""

from __future__ import annotations

import functools
import importlib
import types

import torch

from zhtune.triton_support import runs_triton

_FLAG = "_zhtune_fused_rope"  # set on the cos/sin tensors of patched models


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round an fp32 intermediate to ``dtype`` as a torch kernel writing ``dtype`` would, and go on in fp32."""
    return x.to(dtype).float()


# --- the formulas, in torch ---------------------------------------------------------------------------------------


def silu_mul_math(gate_up: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` for ``gate, up = gate_up.chunk(2, -1)``, rounded as transformers' ``GlmMLP`` rounds."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = _round(gate / (1 + torch.exp(-gate)), gate_up.dtype)
    return (up * act).to(gate_up.dtype)


def silu_mul_grad_math(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`silu_mul_math` with respect to ``gate_up`` (autograd's rounding of the chunked form)."""
    dtype = gate_up.dtype
    gate, up = gate_up.float().chunk(2, dim=-1)
    g = grad.float()
    sig = 1 / (1 + torch.exp(-gate))
    act = _round(gate / (1 + torch.exp(-gate)), dtype)
    d_up = _round(g * act, dtype)
    d_act = _round(g * up, dtype)
    d_gate = d_act * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, d_up], dim=-1).to(dtype)


def rope_math(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """GLM's rotary embedding of ``x`` ``[batch, heads, seq, head_dim]``: pairs ``(x[2i], x[2i+1])`` of the first
    ``cos.shape[-1]`` channels rotate by the angle of ``cos[..., i]`` (``cos`` ``[batch, seq, rotary_dim]`` holds each
    frequency twice, as ``GlmRotaryEmbedding`` returns it); the rest passes. Products and sums are rounded to
    ``out_dtype``. With ``-sin`` and the input's dtype this is the backward pass."""
    half = cos.shape[-1] // 2
    c = cos[..., :half].unsqueeze(1).float()
    s = sin[..., :half].unsqueeze(1).float()
    x0, x1 = x[..., 0 : 2 * half : 2].float(), x[..., 1 : 2 * half : 2].float()
    o0 = _round(x0 * c, out_dtype) - _round(x1 * s, out_dtype)
    o1 = _round(x1 * c, out_dtype) + _round(x0 * s, out_dtype)
    rotated = torch.stack([o0, o1], dim=-1).flatten(-2).to(out_dtype)
    return torch.cat([rotated, x[..., 2 * half :].to(out_dtype)], dim=-1)


# --- the Triton kernels -------------------------------------------------------------------------------------------


def _use_triton(t: torch.Tensor) -> bool:
    return runs_triton(t.device)


@functools.cache
def _kernels():
    """The Triton module, imported on first use (Triton is not installed everywhere)."""
    return importlib.import_module("zhtune.train.glm_triton")


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        return _kernels().silu_mul(gate_up) if _use_triton(gate_up) else silu_mul_math(gate_up)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        return _kernels().silu_mul_grad(grad, gate_up) if _use_triton(gate_up) else silu_mul_grad_math(grad, gate_up)


def _grad_like(x_shape, x_layout_contiguous_bshd: bool, dtype, device) -> torch.Tensor:
    """A gradient buffer in the layout attention's q/k views have (``[b, s, h, d]`` memory, ``[b, h, s, d]`` view),
    so the view/transpose backward of the projections copies nothing."""
    b, h, s, d = x_shape
    if x_layout_contiguous_bshd:
        return torch.empty((b, s, h, d), dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(x_shape, dtype=dtype, device=device)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.meta = [(t.shape, t.transpose(1, 2).is_contiguous(), t.dtype) for t in (q, k)]
        outs = []
        for t in (q, k):
            dtype = torch.promote_types(torch.promote_types(t.dtype, cos.dtype), sin.dtype)
            if _use_triton(t):
                outs.append(_kernels().rotary(t, cos, sin, 1.0, torch.empty(t.shape, dtype=dtype, device=t.device)))
            else:
                outs.append(rope_math(t, cos, sin, dtype))
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = []
        for g, (shape, bshd, dtype) in zip((grad_q, grad_k), ctx.meta):
            if g is None:
                grads.append(None)
                continue
            g = g if g.stride(-1) == 1 else g.contiguous()
            if _use_triton(g):
                grads.append(_kernels().rotary(g, cos, sin, -1.0, _grad_like(shape, bshd, dtype, g.device)))
            else:
                grads.append(rope_math(g, cos, -sin, dtype))
        return grads[0], grads[1], None, None


def fused_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` of GLM's fused ``gate_up_proj`` output, one kernel each way (torch math off CUDA)."""
    return _SiluMul.apply(gate_up)


def can_fuse_rope(q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:
    """Whether :func:`fused_rope` takes these arguments (the layout ``GlmAttention`` passes); else use transformers'."""
    ok = q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and unsqueeze_dim == 1
    ok = ok and cos.shape == sin.shape and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= q.shape[-1] == k.shape[-1]
    ok = ok and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[2] and q.shape[0] == k.shape[0]
    ok = ok and not (cos.requires_grad or sin.requires_grad)
    return ok and all(t.stride(-1) == 1 for t in (q, k, cos, sin))


def fused_rope(q, k, cos, sin):
    """GLM's partial interleaved rotary embedding of ``q`` and ``k`` (see :func:`rope_math`)."""
    return _Rope.apply(q, k, cos, sin)


# --- applying them to a model -------------------------------------------------------------------------------------


def _dispatching_rope(plain):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if getattr(cos, _FLAG, False) and can_fuse_rope(q, k, cos, sin, *args, **kwargs):
            return fused_rope(q, k, cos, sin)
        return plain(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = plain
    apply_rotary_pos_emb._zhtune_dispatcher = True
    return apply_rotary_pos_emb


def install_rope_dispatcher() -> None:
    """Replace ``modeling_glm.apply_rotary_pos_emb`` by the dispatcher (once); unflagged calls reach the original."""
    from transformers.models.glm import modeling_glm

    if not getattr(modeling_glm.apply_rotary_pos_emb, "_zhtune_dispatcher", False):
        modeling_glm.apply_rotary_pos_emb = _dispatching_rope(modeling_glm.apply_rotary_pos_emb)


def _flagging(forward):
    def rotary_forward(*args, **kwargs):
        cos, sin = forward(*args, **kwargs)
        setattr(cos, _FLAG, True)
        setattr(sin, _FLAG, True)
        return cos, sin

    return rotary_forward


def _fused_mlp_forward(self, hidden_states):
    return self.down_proj(fused_silu_mul(self.gate_up_proj(hidden_states)))


def apply_glm_kernels(base) -> tuple[list[str], dict[str, str]]:
    """Fuse SwiGLU and the rotary embedding of the ``glm`` model ``base`` (a ``GlmForCausalLM``, peft's base model),
    and RMSNorm with liger when it is installed.

    Returns:
        ``(applied, skipped)``: names of the pieces applied; piece -> reason for those that were not.
    """
    from transformers.models.glm.modeling_glm import GlmMLP, GlmRMSNorm

    applied, skipped = [], {}
    try:
        _kernels()
    except Exception as exc:  # ImportError, or a Triton that cannot build here
        return [], {"glm_kernels": f"Triton is not usable here ({type(exc).__name__}: {exc})"}
    inner = getattr(base, "model", base)
    if getattr(base.config, "hidden_act", "silu") != "silu":
        skipped["swiglu"] = f"hidden_act {base.config.hidden_act!r} is not silu"
    else:
        mlps = [m for m in base.modules() if isinstance(m, GlmMLP)]
        for mlp in mlps:
            mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
        applied.append(f"fused SwiGLU over gate_up_proj ({len(mlps)} layers)")
    install_rope_dispatcher()
    inner.rotary_emb.forward = _flagging(inner.rotary_emb.forward)
    applied.append("fused partial rotary embedding")
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module
    except Exception as exc:  # noqa: BLE001 - not installed, or an incompatible version
        skipped["rms_norm"] = f"liger-kernel's RMSNorm is not usable here ({type(exc).__name__}: {exc})"
    else:
        norms = [m for m in base.modules() if isinstance(m, GlmRMSNorm)]
        for norm in norms:
            _patch_rms_norm_module(norm, eps=norm.variance_epsilon)
        applied.append(f"liger RMSNorm ({len(norms)})")
    return applied, skipped
