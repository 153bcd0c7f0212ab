"""Batched greedy generation that renders prompts exactly as training rendered them.

Prompts are built by the chat template with ``add_generation_prompt`` and encoded by the same
:func:`~zhtune.data.tokenize.encode_segments` as training, so a model sees at inference the very token ids it was
trained on. Generation stops at the tokenizer's EOS or any of the template's stop tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zhtune.data.conversation import Conversation
from zhtune.data.templates import RenderOptions, SpecialTokens, Template
from zhtune.data.tokenize import encode_segments


@dataclass
class Generator:
    """Greedy generation for a loaded causal LM; ``generate`` takes conversations ending with a user turn."""

    model: object
    tokenizer: object
    template: Template
    options: RenderOptions = RenderOptions()

    def prompt_ids(self, conv: Conversation) -> list[int]:
        opts = RenderOptions(self.options.system, self.options.enable_thinking, add_generation_prompt=True)
        segments = self.template.render(conv, SpecialTokens.of(self.tokenizer), opts)
        ids, _owner = encode_segments(self.tokenizer, segments, self.template.tokenization)
        return ids

    def stop_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        for name in self.template.stop:
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                ids.add(tid)
        return sorted(ids)

    @torch.no_grad()
    def generate(self, convs: list[Conversation], max_new_tokens: int = 128) -> list[str]:
        """Left-padded batch, greedy decoding; returns the decoded new text of each prompt."""
        if not convs:
            return []
        prompts = [self.prompt_ids(c) for c in convs]
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = next(self.model.parameters()).device
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids(),
            pad_token_id=pad,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        texts = []
        stops = set(self.stop_ids())
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return texts
