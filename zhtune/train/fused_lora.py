"""A fused forward/backward for peft's LoRA linear layers (plain LoRA, one active adapter).

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as five separate operations, and autograd keeps
them separate in the backward pass too: the ``[tokens, out]`` LoRA product is written, scaled, and added in three
passes over memory, and its gradient is read three times. Here one autograd function does

    forward:  y = x W^T (+ b);  y += scaling * (x_d A^T) B^T        (addmm into y: the add rides the GEMM epilogue)
    backward: g_B = scaling * g B;  dx = g W + g_B A;  dA = g_B^T x_d;  dB = scaling * g^T (x_d A^T)

with the same matrix products as peft (so the same numbers in fp32 and within rounding in bf16) and the same saved
tensors (x, the dropout output when there is dropout, and the rank-r product). The base weight stays frozen.

Layers this does not cover (DoRA and other variants, a bias on ``lora_B``, several active adapters, mixed-adapter
batches, merged or disabled adapters, quantized base layers, mixed dtypes outside autocast) keep peft's own forward;
the eligibility test runs at every call, so switching adapters or merging later stays correct.
"""

from __future__ import annotations

import types

import torch


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x2 if x_drop is None else x_drop.reshape(-1, shape[-1])
        xa = xd2 @ lora_a.t()
        out = torch.nn.functional.linear(x2, weight, bias)
        out.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(xd2, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.separate_drop, ctx.x_shape = scaling, x_drop is not None, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xd2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).to(xa.dtype)
        g_b = (g2 @ lora_b).mul_(ctx.scaling)  # [tokens, r]
        grad_x = grad_drop = None
        if ctx.needs_input_grad[0]:
            grad_x = g2 @ weight.to(g2.dtype)
            if not ctx.separate_drop:
                grad_x.addmm_(g_b, lora_a)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.separate_drop and ctx.needs_input_grad[1]:
            grad_drop = (g_b @ lora_a).view(ctx.x_shape)
        grad_a = g_b.t() @ xd2 if ctx.needs_input_grad[4] else None
        grad_b = (g2.t() @ xa).mul_(ctx.scaling) if ctx.needs_input_grad[5] else None
        return grad_x, grad_drop, None, None, grad_a, grad_b, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's when it is on for ``x``'s device, else ``x``'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _fusable(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The adapter name when ``layer`` can take the fused path for this call, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "fan_in_fan_out", False):
        return None
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if layer.lora_B[name].bias is not None or (base.bias is not None and base.bias.requires_grad):
        return None
    if type(layer.lora_dropout[name]) not in (torch.nn.Identity, torch.nn.Dropout):
        return None
    if not torch.is_autocast_enabled(x.device.type):
        dtypes = {x.dtype, base.weight.dtype, layer.lora_A[name].weight.dtype, layer.lora_B[name].weight.dtype}
        if len(dtypes) != 1:
            return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return self._zhtune_peft_forward(x, *args, **kwargs)
    base = self.base_layer
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    dropout = self.lora_dropout[name]
    dt = compute_dtype(x)
    x = x.to(dt)
    x_drop = dropout(x) if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training else None
    bias = None if base.bias is None else base.bias.to(dt)
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x, x_drop, base.weight.to(dt), bias, a.to(dt), b.to(dt), float(self.scaling[name]))


def fuse_lora_layers(model) -> int:
    """Give every peft ``lora.Linear`` in ``model`` the fused forward; return how many layers got it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and "_zhtune_peft_forward" not in module.__dict__:
            module._zhtune_peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def unfuse_lora_layers(model) -> None:
    """Restore peft's own forward on every layer ``fuse_lora_layers`` changed."""
    for module in model.modules():
        if "_zhtune_peft_forward" in module.__dict__:
            module.forward = module.__dict__.pop("_zhtune_peft_forward")
