"""Batch-invariant engine steps: a token's logits do not depend on how many rows and tokens share its forward.

Input-copy speculative decoding is lossless when verifying a token inside a block of ``k`` gives the argmax that
decoding it alone gives. In bf16 on a GPU that is not so by default: cuBLAS chooses its GEMM kernel (tile, split-K)
from the number of rows ``M`` too, so the same row of activations comes out with a different last bit in a step of
64 rows x 32 tokens than in a step of one token, the difference grows through the layers, and an argmax close to a
tie flips (seen on the H200 with a trained 0.5B corrector: 4 of 160 sentences at batch 16 differed from greedy).

Inside :func:`batch_invariant` the two reductions of a transformers decoder step that cuBLAS / torch would order
by shape run through fixed-order Triton kernels (:mod:`zhtune.infer.invariant_triton`): every ``F.linear`` (the
projections, the MLP, the head, LoRA's A and B under autocast) and the last-dimension ``mean`` of RMSNorm. The rest
of a step is elementwise or gathers (no reduction order), RoPE's frequencies are an outer product (``K = 1``), and
attention is SDPA's memory-efficient kernel over the engine's fixed-size cache, whose per-query reduction runs over
the same key blocks whatever the number of queries. The engine's output is then the same at every batch size and
draft length, bit for bit, as its own token-by-token greedy decoding of one sentence at a time (tested on the GPU:
``tests/infer/test_invariant_gpu.py``).

The mode is a :class:`torch.overrides.TorchFunctionMode`, active only around the engine's own forwards (and so recorded
into its CUDA graphs): nothing else in the process changes. A call the kernels do not cover (other dtypes, autograd, CPU
tensors, tensor subclasses such as FSDP2's DTensors) runs torch's own function. Triton is needed (installed with CUDA
builds of torch); on a CPU the engine runs torch's kernels, or these kernels under ``TRITON_INTERPRET=1`` (for tests).
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from zhtune.triton_support import runs_triton

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


@functools.cache
def _kernels():
    return importlib.import_module("zhtune.infer.invariant_triton")


def available(device: torch.device | str) -> bool:
    """Whether the invariant kernels can run on ``device`` (CUDA with Triton, or Triton's interpreter on a CPU)."""
    if not runs_triton(device):
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


def _covers(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    if any(type(t) not in _PLAIN for t in present):  # DTensors (FSDP2), quantized weights: torch's own function
        return False
    if any(t.requires_grad for t in present) and torch.is_grad_enabled():
        return False
    device, dtype = present[0].device, present[0].dtype
    return runs_triton(device) and dtype in _FLOATS and all(t.device == device and t.dtype == dtype for t in present)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    device = input.device.type
    if torch.is_autocast_enabled(device):  # what autocast does to F.linear: every operand in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if input.ndim < 1 or weight.ndim != 2 or not _covers(input, weight, bias):
        return None
    out = _kernels().linear(input.reshape(-1, input.shape[-1]), weight, bias)
    return out.reshape(*input.shape[:-1], weight.shape[0])


def _mean(input: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None, out=None) -> torch.Tensor | None:
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else []
    if dtype is not None or out is not None or len(dims) != 1 or input.ndim < 1 or not _covers(input):
        return None
    if dims[0] % input.ndim != input.ndim - 1:
        return None
    means = _kernels().row_mean(input.reshape(-1, input.shape[-1]).contiguous()).reshape(input.shape[:-1])
    return means.unsqueeze(-1) if keepdim else means


_HANDLERS = {F.linear: _linear, torch.mean: _mean, torch.Tensor.mean: _mean}


class _BatchInvariant(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)


def batch_invariant(enabled: bool = True):
    """Context manager: ``F.linear`` and last-dimension means on the invariant kernels (see the module docstring)."""
    return _BatchInvariant() if enabled else contextlib.nullcontext()
