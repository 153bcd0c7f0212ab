"""The Triton kernels of ``zhtune.train.glm_kernels`` (imported only where Triton is installed) and their launchers.

Each kernel computes the formula of its torch twin in ``glm_kernels`` (``silu_mul_math``, ``rope_math``) with the
same rounding: every product and sum is rounded to the output dtype (to nearest even on a GPU, as torch's kernels
round). ``TRITON_INTERPRET=1`` runs them on a CPU, exactly in fp32; its fp32->bf16 conversion truncates instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_mul_fwd(gu, out, n, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    ty = out.dtype.element_ty
    g = tl.load(gu + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu + row * stride_gu + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(out + row * stride_out + cols, (u * act).to(ty), mask=mask)


@triton.jit
def silu_mul_bwd(grad, gu, dgu, n, stride_grad, stride_gu, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    ty = dgu.dtype.element_ty
    dy = tl.load(grad + row * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gu + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu + row * stride_gu + n + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    d_act = (dy * u).to(ty).to(tl.float32)
    d_gate = d_act * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgu + row * stride_gu + cols, (d_gate).to(ty), mask=mask)
    tl.store(dgu + row * stride_gu + n + cols, (dy * act).to(ty), mask=mask)


@triton.jit
def rope(x, out, cos, sin, seq, heads, sxb, sxh, sxs, sob, soh, sos, scb, scs, ssb, sss, sign,
         HALF: tl.constexpr, DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
         BLOCK_R: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    b, s = tok // seq, tok % seq
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HALF
    ty = out.dtype.element_ty
    c = tl.load(cos + b * scb + s * scs + p, mask=pmask, other=0.0).to(tl.float32)[None, :]
    sn = (tl.load(sin + b * ssb + s * sss + p, mask=pmask, other=0.0).to(tl.float32) * sign)[None, :]
    xrow = x + b * sxb + s * sxs + h[:, None] * sxh
    orow = out + b * sob + s * sos + h[:, None] * soh
    m = (h < heads)[:, None] & pmask[None, :]
    x0 = tl.load(xrow + 2 * p[None, :], mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(xrow + 2 * p[None, :] + 1, mask=m, other=0.0).to(tl.float32)
    o0 = (x0 * c).to(ty).to(tl.float32) - (x1 * sn).to(ty).to(tl.float32)
    o1 = (x1 * c).to(ty).to(tl.float32) + (x0 * sn).to(ty).to(tl.float32)
    tl.store(orow + 2 * p[None, :], (o0).to(ty), mask=m)
    tl.store(orow + 2 * p[None, :] + 1, (o1).to(ty), mask=m)
    if 2 * HALF < DIM:
        r = 2 * HALF + tl.arange(0, BLOCK_R)
        rm = (h < heads)[:, None] & (r < DIM)[None, :]
        tl.store(orow + r[None, :], tl.load(xrow + r[None, :], mask=rm, other=0.0).to(ty), mask=rm)


_SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` of a contiguous ``[..., 2 * n]`` tensor, shape ``[..., n]``."""
    gu = gate_up.reshape(-1, gate_up.shape[-1])
    n = gu.shape[1] // 2
    out = torch.empty((gu.shape[0], n), dtype=gu.dtype, device=gu.device)
    if gu.shape[0]:
        grid = (gu.shape[0], triton.cdiv(n, _SILU_BLOCK))
        silu_mul_fwd[grid](gu, out, n, gu.stride(0), out.stride(0), BLOCK=_SILU_BLOCK)
    return out.view(*gate_up.shape[:-1], n)


def silu_mul_grad(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to the fused ``gate_up`` (its shape) of :func:`silu_mul`, given ``grad``."""
    gu = gate_up.reshape(-1, gate_up.shape[-1])
    g = grad.reshape(-1, grad.shape[-1]).contiguous()
    n = gu.shape[1] // 2
    dgu = torch.empty_like(gu)
    if gu.shape[0]:
        grid = (gu.shape[0], triton.cdiv(n, _SILU_BLOCK))
        silu_mul_bwd[grid](g, gu, dgu, n, g.stride(0), gu.stride(0), BLOCK=_SILU_BLOCK)
    return dgu.view(gate_up.shape)


def rotary(x, cos, sin, sign: float, out: torch.Tensor) -> torch.Tensor:
    """Write GLM's rotary embedding of ``x`` ``[b, h, s, d]`` (any strides, last one 1) into ``out``; ``sign`` -1
    rotates backwards (the gradient). ``cos``/``sin`` are ``[b, s, rotary_dim]`` as ``GlmRotaryEmbedding`` returns."""
    batch, heads, seq, dim = x.shape
    half = cos.shape[-1] // 2
    pow2 = triton.next_power_of_2
    bstride = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731 - one cos row for every batch row
    block_h = min(pow2(heads), 16)
    if x.numel():
        grid = (batch * seq, triton.cdiv(heads, block_h))
        rope[grid](
            x, out, cos, sin, seq, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
            out.stride(2), bstride(cos), cos.stride(1), bstride(sin), sin.stride(1), sign,
            HALF=half, DIM=dim, BLOCK_H=block_h, BLOCK_P=pow2(half), BLOCK_R=pow2(max(dim - 2 * half, 1)),
        )  # fmt: skip
    return out
