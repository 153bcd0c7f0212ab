"""The chunked, supervised-positions-only loss equals the plain full-logits loss (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.helpers import load_fp32, tiny_model_dir
from zhtune.data.packing import collate_packed, pack_samples
from zhtune.data.tokenize import TokenizedSample
from zhtune.train.loop import summed_cross_entropy
from zhtune.train.loss import summed_ce_chunked


@pytest.mark.parametrize(
    "arch,head", [("qwen2", "frozen"), ("llama", "frozen"), ("glm", "frozen"), ("llama", "trained")]
)
def test_chunked_loss_and_grads_equal_plain(arch, head, tmp_path):
    """A frozen head takes the fused linear-cross-entropy; a trained head (modules_to_save) the checkpointed chunks."""
    import zhtune.train.loss as loss_mod

    torch.manual_seed(0)
    extra = {"modules_to_save": ["lm_head"]} if head == "trained" else {}
    model = get_peft_model(
        load_fp32(tiny_model_dir(tmp_path / "m", arch)),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **extra),
    )
    assert loss_mod._fusable_head(model.get_output_embeddings()) == (head == "frozen")
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (20, 33, 9, 41):
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        samples.append(TokenizedSample(ids, [-100] * (n // 2) + ids[n // 2 :]))
    batch = collate_packed(pack_samples(samples, 64, 0), torch.bool)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = summed_cross_entropy(model(**inputs).logits, batch["labels"])
    g_plain = grads(plain)
    fast = summed_ce_chunked(model, inputs, batch["labels"], chunk_tokens=16)
    g_fast = grads(fast)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_fast[name], g_plain[name], rtol=1e-4, atol=1e-6)
    if head == "trained":
        assert g_fast["base_model.model.lm_head.modules_to_save.default.weight"].abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(summed_ce_chunked(model, inputs, batch["labels"]), plain, rtol=1e-5, atol=1e-5)


def test_chunked_loss_sees_through_a_ddp_wrapper(tmp_path, monkeypatch):
    """Under DistributedDataParallel the model sits in ``.module``: the fast path must still apply."""
    from zhtune.train import fast

    model = get_peft_model(
        load_fp32(tiny_model_dir(tmp_path / "m", "qwen2")),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )

    class Wrapper(torch.nn.Module):  # the shape of DDP: forward delegates, the model is in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    monkeypatch.setattr(fast, "_said", set())
    ids = torch.randint(1, 256, (1, 24))
    labels = ids.clone()
    inputs = {"input_ids": ids}
    fast = summed_ce_chunked(Wrapper(model), inputs, labels)
    assert fast is not None
    torch.testing.assert_close(fast, summed_cross_entropy(model(**inputs).logits, labels), rtol=1e-5, atol=1e-5)


def test_validation_loss_uses_the_chunked_loss(llama_checkpoint, shared, tmp_path, monkeypatch):
    """Validation at step 0 must not build full logits (7.5 GB at 4x2048 with a 152k vocabulary)."""
    from tests.train.conftest import ALPACA, write_recipe
    from zhtune.cli import main
    from zhtune.train import loop

    calls = []
    full = loop.summed_cross_entropy
    monkeypatch.setattr(loop, "summed_cross_entropy", lambda *a: calls.append(1) or full(*a))
    train = {"max_steps": 2, "eval_every": 1}
    recipe = write_recipe(tmp_path / "r.yaml", llama_checkpoint, shared / ALPACA, tmp_path / "r", "llama2", train=train)
    assert main(["train", str(recipe)]) == 0
    assert calls == []
    # a second run in the same process, in another precision, with the plain loss
    plain = ["train.chunked_loss=false", f"output.dir={tmp_path / 'plain'}", "model.dtype=bf16"]
    assert main(["train", str(recipe), *plain]) == 0
    assert calls  # the check can fail: the plain path does build full logits
