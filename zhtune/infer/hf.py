"""transformers' own ``generate`` with zhtune's greedy settings: the fallback decoder and the benchmarks' baseline.

``generate`` fills every setting the caller leaves unset from the checkpoint's ``generation_config.json`` — for
Qwen2.5 that is ``repetition_penalty`` 1.1, ``top_k`` 20 ..., so a "greedy" call is not greedy (issue 11). Here the
checkpoint's generation config is swapped for transformers' plain defaults for the duration of the call, and the
call asks for argmax decoding with the template's stop tokens, so the only difference from a plain argmax loop is
the batching (left padding). Rows are cut by their own budgets afterwards (:func:`finish_row`), so a row's output does
not depend on the longest row of its batch. ``prompt_lookup`` turns on transformers' prompt-lookup decoding (batch
size 1 only, as transformers requires).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from zhtune.infer.completion import Completion, Request, finish_row
from zhtune.infer.kv import causal_lm


@contextlib.contextmanager
def plain_generation_config(model):
    """Within the block, ``model`` carries transformers' default generation config instead of the checkpoint's."""
    from transformers import GenerationConfig

    lm = causal_lm(model)
    saved = lm.generation_config
    lm.generation_config = GenerationConfig()
    try:
        yield
    finally:
        lm.generation_config = saved


def greedy_config(max_new_tokens: int, stop_ids: Sequence[int], pad_id: int, prompt_lookup: int = 0):
    """A ``GenerationConfig`` for argmax decoding that stops at ``stop_ids``, with no logits processor."""
    from transformers import GenerationConfig

    extra = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        use_cache=True,  # a model fresh from training may carry use_cache=False in its config
        **extra,
    )


@torch.no_grad()
def hf_generate(
    model,
    requests: Sequence[Request],
    stop_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 16,
    prompt_lookup: int = 0,
) -> list[Completion]:
    """Greedy completions of ``requests`` through ``model.generate``, ``batch_size`` left-padded rows at a time.

    Raises:
        ValueError: ``prompt_lookup`` with ``batch_size`` > 1 (transformers supports it for one row only).
    """
    if prompt_lookup and batch_size != 1:
        raise ValueError("prompt-lookup decoding runs one row at a time (batch_size=1)")
    device = next(model.parameters()).device
    stops = frozenset(int(s) for s in stop_ids)
    results: list[Completion] = []
    with plain_generation_config(model):
        for i in range(0, len(requests), batch_size):
            batch = requests[i : i + batch_size]
            width = max(len(r.prompt) for r in batch)
            ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + list(r.prompt) for r in batch], device=device)
            mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
            config = greedy_config(max(r.budget for r in batch), stop_ids, pad_id, prompt_lookup)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for r, row in zip(batch, out[:, width:].tolist()):
                results.append(finish_row(row, r.budget, stops))
    return results
