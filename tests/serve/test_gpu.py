"""The serving backend on a CUDA GPU in bf16: memorized answers and corrections come back through the batcher,
greedy batched rows equal the same rows decoded alone, a seeded request repeats itself (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tests.serve.conftest import CORRECTIONS, GREETING, TEMPLATE
from zhtune.data.conversation import Conversation, Message
from zhtune.serve.generation import Row, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_backend(corrector):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from zhtune.serve.backend import load_backend

    backend = load_backend(corrector, template=TEMPLATE, dtype="bf16")
    assert next(backend.model.parameters()).device.type == "cuda"
    return backend


def test_backend_on_cuda(cuda_backend):
    from zhtune.serve.batcher import Batcher

    prompts = [cuda_backend.prompt_ids(Conversation((Message("user", q),))) for q in (GREETING[0], "今天天气怎么样？")]
    greedy = [Row(p, SamplingParams(max_tokens=16)) for p in prompts]
    batched = cuda_backend.generate(greedy)
    alone = [cuda_backend.generate([Row(p, SamplingParams(max_tokens=16))])[0] for p in prompts]
    assert batched[0].text == GREETING[1] and batched[0].finish_reason == "stop"
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=7)
    first, second = (cuda_backend.generate([Row(prompts[1], seeded)])[0] for _ in range(2))
    assert first.token_ids == second.token_ids
    batcher = Batcher(cuda_backend).start()
    try:
        results = batcher.run("correct", list(CORRECTIONS))
        assert [r.corrected for r in results] == list(CORRECTIONS.values())
        assert [[e.type for e in r.edits] for r in results] == [["S"], ["R"], ["M"]]
    finally:
        batcher.close()
