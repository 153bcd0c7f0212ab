"""Where zhtune's own Triton kernels run: CUDA tensors, and any tensor under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` (read when Triton is imported) runs Triton kernels on CPU tensors with numpy; the tests use it to
check the kernels of :mod:`zhtune.train.glm_kernels` and :mod:`zhtune.infer.invariant` on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch


def runs_triton(device: torch.device | str) -> bool:
    """Whether a Triton kernel can take tensors on ``device``: CUDA, or any device under the interpreter."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
