"""zhtune's native ChatGLM-6B: generation with a KV cache, padded and packed batches, LoRA, registration.

Greedy references come from the original code run without a cache (its own ``generate`` does not work under
transformers 5): the prompt plus the tokens so far, one full forward per new token.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import subprocess_env
from tests.model.reference import reference
from zhtune.model.convert import convert_checkpoint

NEW = 8


@pytest.fixture
def v1(original, shared, tmp_path):
    """``(native model, original model, config)`` of one tiny ChatGLM-6B, both fp32."""
    from transformers import AutoModelForCausalLM

    src, config = original("chatglm", dtype=torch.float32, shards=2)
    convert_checkpoint(src, tmp_path / "native")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32).eval()
    return native, reference(shared, "chatglm", config, src, torch.float32), config


def _prompt(n: int, seed: int, config: dict) -> list[int]:
    ids = torch.randint(20, 130000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids + [config["gmask_token_id"], config["bos_token_id"]]


@torch.no_grad()
def _greedy_without_cache(model, prompt: list[int], new: int) -> list[int]:
    seq = list(prompt)
    for _ in range(new):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@torch.no_grad()
def test_generate_with_a_cache_equals_the_original_greedy(v1):
    native, orig, config = v1
    prompts = [_prompt(9, 1, config), _prompt(4, 2, config)]
    expected = [_greedy_without_cache(orig, p, NEW) for p in prompts]
    for p, want in zip(prompts, expected):
        out = native.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None)
        assert out[0, len(p) :].tolist() == want
    width = max(map(len, prompts))  # a left-padded batch gives each row its own result
    ids = torch.tensor([[config["pad_token_id"]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = native.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert out[:, width:].tolist() == expected


@torch.no_grad()
def test_decoding_from_a_cache_without_positions_uses_the_prompt_context(v1):
    """An engine that passes only the new token (no 2D positions) gets the positions from the cache."""
    from transformers.cache_utils import DynamicCache

    native, orig, config = v1
    prompt = _prompt(7, 3, config)
    cache = DynamicCache()
    first = native(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
    seq = prompt + [int(first.logits[0, -1].argmax())]
    for _ in range(3):
        step = native(input_ids=torch.tensor([seq[-1:]]), cache=cache, use_cache=True)
        full = orig(input_ids=torch.tensor([seq])).logits[0, -1]
        assert (step.logits[0, -1] - full).abs().max() <= 1e-5
        seq.append(int(step.logits[0, -1].argmax()))


@torch.no_grad()
def test_packed_documents_see_only_themselves(v1):
    """Two documents in one row (1D positions restarting at 0, as zhtune packs them) give each document's own
    logits, with and without the block-causal mask zhtune's collator builds."""
    from zhtune.data.packing import block_causal_mask

    native, orig, config = v1
    a, b = _prompt(6, 4, config) + [11, 12, 13], _prompt(3, 5, config) + [14, 15]
    ids = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    alone = [orig(input_ids=torch.tensor([d])).logits[0] for d in (a, b)]
    seq_ids = torch.tensor([[0] * len(a) + [1] * len(b)])
    for mask in (None, block_causal_mask(seq_ids, torch.bool), block_causal_mask(seq_ids, torch.float32)):
        packed = native(input_ids=ids, position_ids=positions, attention_mask=mask).logits[0]
        assert (packed[: len(a)] - alone[0]).abs().max() <= 1e-5
        assert (packed[len(a) :] - alone[1]).abs().max() <= 1e-5
    # a causal mask given for one document still gets the prefix-LM context added
    causal = native(input_ids=torch.tensor([a]), attention_mask=block_causal_mask(torch.zeros(1, len(a)), torch.bool))
    assert (causal.logits[0] - alone[0]).abs().max() <= 1e-5
    # the check can fail: read as one document (no restarting positions), the second one sees the first
    merged = native(input_ids=ids).logits[0]
    assert (merged[len(a) :] - alone[1]).abs().max() > 1e-3


def test_lora_trains_and_generates_with_gradient_checkpointing(v1):
    from zhtune.config import LoraConfig
    from zhtune.model.load import attach_lora

    native, _orig, config = v1
    native.train()
    ids = torch.tensor([_prompt(8, 6, config) + [21, 22, 23, 24]])
    plain_loss = native(input_ids=ids, labels=ids).loss
    model = attach_lora(native, LoraConfig(r=4, alpha=8, dropout=0.0), resized=False)
    names = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    losses = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
        losses[checkpointing] = (loss.item(), grads)
    assert losses[False][0] == pytest.approx(plain_loss.item(), abs=1e-5)  # lora_B starts at zero
    assert losses[False][0] == pytest.approx(losses[True][0], abs=1e-6)
    for g0, g1 in zip(losses[False][1], losses[True][1]):
        torch.testing.assert_close(g0, g1)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids[:, :10], max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 13)


def test_import_zhtune_is_cheap_and_registers_the_auto_classes():
    script = (
        "import sys, zhtune\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import zhtune must stay cheap'\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "from zhtune.model.chatglm_config import ZhtuneChatGLMConfig\n"
        "config = AutoConfig.for_model('zhtune_chatglm', hidden_size=32, num_attention_heads=4, num_hidden_layers=1,"
        " intermediate_size=64, vocab_size=130528)\n"
        "model = AutoModelForCausalLM.from_config(config)\n"
        "print(type(config).__name__, type(model).__name__)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = subprocess_env()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ZhtuneChatGLMConfig", "ZhtuneChatGLMForCausalLM"]
