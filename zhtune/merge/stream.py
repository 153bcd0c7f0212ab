"""A causal LM's forward pass one decoder layer at a time, weights read from safetensors as each layer runs.

Merge verification compares four versions of a model (base, merged, the reference merge and the live adapter); with
7B weights in fp32 that is 28 GB a copy. Here the model is built on the meta device and only one decoder layer holds
real (fp32) weights at any time: the layer's tensors are supplied by a :class:`WeightSource` (read from the shards,
or computed, for the reference and the live adapter), it runs on the hidden states of every probe row, and its weights
are dropped again. Only the embedding rows the probes use are read, and the output head is applied a slice of rows at
a time, so peak memory is about one decoder layer plus the activations of a few short probes.

What a decoder layer receives besides the hidden states (attention masks, rotary tables, position ids) is whatever the
model's own forward passes it: one forward of the decoder with every layer replaced by a recorder captures those
arguments, so the mask and position logic stay transformers'. Models whose decoder keeps its layers in
``get_decoder().layers`` and a final norm beside them (Llama, Qwen2/3, Mistral, GLM, Phi-3 and most transformers
decoders) are supported; others raise :class:`NotStreamable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

HEAD_CHUNK_ROWS = 16384
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f")


class NotStreamable(Exception):
    """The architecture does not keep its decoder layers where :class:`LayerStream` looks for them."""


class WeightSource(Protocol):
    """The tensors of one version of a model, in fp32, by checkpoint tensor name."""

    def tensor(self, name: str) -> torch.Tensor: ...

    def rows(self, name: str, ids: list[int]) -> torch.Tensor: ...

    def shape(self, name: str) -> list[int]: ...

    def live_lora(self, layer_name: str, layer: torch.nn.Module) -> contextlib.AbstractContextManager: ...

    def live_head(self, hidden: torch.Tensor, ids: list[int]) -> torch.Tensor | float: ...


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer: keeps the arguments it was called with and passes the hidden states on."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


class LayerStream:
    """The skeleton of a causal LM (no weights) that runs forward passes with weights supplied per tensor name.

    Args:
        model_dir: a checkpoint folder; only its ``config.json`` is read (the architecture).
        trust_remote_code: allow a model class shipped as code in the folder.

    Raises:
        NotStreamable: the decoder's layers or final norm cannot be found.
    """

    def __init__(self, model_dir: str | Path, trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code, attn_implementation="eager", dtype=torch.float32
            )
        self.model = model.eval()
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        norm_attr = next((n for n in FINAL_NORM_NAMES if hasattr(decoder, n)), None)
        if not isinstance(layers, torch.nn.ModuleList) or norm_attr is None:
            raise NotStreamable(f"{type(model).__name__} keeps no decoder layers and final norm in get_decoder()")
        self.decoder, self.layers, self.norm_attr = decoder, layers, norm_attr
        names = {id(m): n for n, m in model.named_modules()}
        self.layer_names = [names[id(layer)] for layer in layers]
        self.norm_name = names[id(getattr(decoder, norm_attr))]
        self.embed_name = names[id(model.get_input_embeddings())] + ".weight"
        self.head_name = names[id(model.get_output_embeddings())] + ".weight"

    def layer_tensor_names(self) -> list[str]:
        """Full names of the parameters of every decoder layer, in order."""
        return [f"{p}.{n}" for p, layer in zip(self.layer_names, self.layers) for n, _ in layer.named_parameters()]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, weights: WeightSource) -> torch.Tensor:
        """fp32 logits ``[batch, length, vocab]`` of ``ids`` with the tensors ``weights`` supplies."""
        unique = sorted(set(ids.flatten().tolist()))
        table = weights.rows(self.embed_name, unique)
        position = {t: k for k, t in enumerate(unique)}
        index = torch.tensor([position[t] for t in ids.flatten().tolist()]).view(ids.shape)
        hidden, calls = self._first_layer_inputs(table[index])
        for i, (layer, (_h, args, kwargs)) in enumerate(zip(self.layers, calls)):
            with _materialized(layer, self.layer_names[i], weights), weights.live_lora(self.layer_names[i], layer):
                out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        norm = getattr(self.decoder, self.norm_attr)
        with _materialized(norm, self.norm_name, weights):
            hidden = norm(hidden)
        vocab = weights.shape(self.head_name)[0]
        parts = []
        for start in range(0, vocab, HEAD_CHUNK_ROWS):
            chunk = list(range(start, min(vocab, start + HEAD_CHUNK_ROWS)))
            parts.append(hidden @ weights.rows(self.head_name, chunk).T + weights.live_head(hidden, chunk))
        return torch.cat(parts, -1)

    def _first_layer_inputs(self, embeds: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Run the decoder with recorders for layers and an identity norm; return what layer 0 receives (the
        embeddings after any scaling the model applies) and each layer's call."""
        calls: list = []
        saved_layers, saved_norm = list(self.layers), getattr(self.decoder, self.norm_attr)
        for i in range(len(self.layers)):
            self.layers[i] = _Recorder(calls)
        setattr(self.decoder, self.norm_attr, torch.nn.Identity())
        try:
            self.decoder(inputs_embeds=embeds, use_cache=False)
        finally:
            for i, layer in enumerate(saved_layers):
                self.layers[i] = layer
            setattr(self.decoder, self.norm_attr, saved_norm)
        if len(calls) != len(saved_layers):
            raise NotStreamable(f"the decoder called {len(calls)} of its {len(saved_layers)} layers")
        return calls[0][0], calls


@contextlib.contextmanager
def _materialized(module: torch.nn.Module, prefix: str, weights: WeightSource) -> Iterator[None]:
    """Give ``module`` real fp32 parameters (``weights.tensor(prefix + '.' + name)``) for the duration of the block."""
    slots = []
    try:
        for name, param in list(module.named_parameters()):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            value = weights.tensor(f"{prefix}.{name}")
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"tensor {prefix}.{name} has shape {tuple(value.shape)}; the model expects {tuple(param.shape)}"
                )
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
            slots.append((owner, leaf, param))
        yield
    finally:
        for owner, leaf, meta in slots:
            owner._parameters[leaf] = meta
