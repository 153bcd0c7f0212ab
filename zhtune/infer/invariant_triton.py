"""The Triton kernels of :mod:`zhtune.infer.invariant` (imported only where Triton is installed) and their launchers.

Both kernels reduce in one fixed order that depends on the reduced length only, never on how many rows there are:

* ``linear``: ``x @ w.T (+ bias)``, one program per ``BLOCK_M x BLOCK_N`` output tile, the whole ``K`` walked in
  ``BLOCK_K`` steps accumulating in fp32 (no split-K, no autotuning: one configuration per weight shape). cuBLAS picks
  its kernel, tile and split-K from ``M`` as well, so a row's result there depends on the rows beside it.
* ``row_mean``: the mean over the last dimension, one program per row, ``BLOCK`` lanes accumulating in fp32 and then
  summed (torch may split a row across thread blocks when there are few rows).

``TRITON_INTERPRET=1`` runs them on a CPU (numpy), which the CPU tests use for correctness; there half-precision
operands are multiplied in fp32 (the interpreter's own bf16 products are wrong), on a GPU on the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x, w, bias, out, M, N, K, sxm, sxk, swn, swk, som, son,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(w + rn[None, :] * swn + kk[:, None] * swk, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        if IEEE:  # fp32 operands, or (Triton's interpreter multiplies bf16 wrongly) any operands upcast
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out + rm[:, None] * som + rn[None, :] * son, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _row_mean_kernel(x, out, N, sx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        acc += tl.load(x + row * sx + c0 + cols, mask=c0 + cols < N, other=0.0).to(tl.float32)
    tl.store(out + row, (tl.sum(acc, axis=0) / N).to(out.dtype.element_ty))


def _tiles(n: int, k: int) -> tuple[int, int, int, int]:
    """``BLOCK_M, BLOCK_N, BLOCK_K, num_warps`` for a weight ``[n, k]`` — a function of the weight alone."""
    return 64, (128 if n >= 8192 else 64), 64, 4


def linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d [M, K] @ weight[N, K].T + bias``, in ``x2d``'s dtype (fp32 inputs multiply exactly, no TF32)."""
    m, k = x2d.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return out
    bm, bn, bk, warps = _tiles(n, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _linear_kernel[grid](
        x2d, weight, bias if bias is not None else weight, out, m, n, k,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=x2d.dtype == torch.float32 or not x2d.is_cuda,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def row_mean(x2d: torch.Tensor) -> torch.Tensor:
    """The mean of each row of a contiguous ``[M, N]``, in its dtype (accumulated in fp32)."""
    m, n = x2d.shape
    out = torch.empty((m,), dtype=x2d.dtype, device=x2d.device)
    if m:
        _row_mean_kernel[(m,)](x2d, out, n, x2d.stride(0), BLOCK=min(1024, max(16, triton.next_power_of_2(n))))
    return out
