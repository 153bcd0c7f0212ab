"""Safetensors dtypes by their header names, and a writer that streams one tensor at a time.

Merge and ChatGLM conversion both write checkpoints far larger than memory should hold at once; both use
:func:`write_safetensors`, which hashes each tensor's content while writing it (the digest
:func:`zhtune.model.checkpoint_files.tensor_digests` would compute).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zhtune.errors import ConfigError
from zhtune.model.checkpoint_files import tensor_hasher

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def write_safetensors(path: Path, plan: list[tuple[str, torch.dtype, list[int]]], produce) -> dict[str, str]:
    """Write a safetensors file tensor by tensor: the header comes from ``plan``, the data from ``produce``.

    Only one tensor is in memory at a time, unlike ``safetensors.torch.save_file`` which needs the whole dict
    (and serialises a copy of it). Returns the tensors' content digests (as
    :func:`zhtune.model.checkpoint_files.tensor_digests` computes them), hashed while writing.
    """
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in plan:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digests = {}
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape in plan:
            tensor = produce(name, dtype).contiguous()
            if list(tensor.shape) != list(shape):
                raise ConfigError(f"tensor {name} has shape {tuple(tensor.shape)}, planned {tuple(shape)}")
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            h = tensor_hasher(names[dtype], shape)
            h.update(data)
            digests[name] = h.hexdigest()
            del tensor, data
    return digests
