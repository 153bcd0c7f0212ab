"""Streaming: merging a model saved in >= 4 shards grows peak RSS by less than 2.5x the largest shard."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import transformers
from peft import LoraConfig, get_peft_model

from zhtune.model.checkpoint_files import weight_shards


def test_peak_rss_growth_is_about_one_shard(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="30MB")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ad")
    del model, peft_model
    shards = weight_shards(tmp_path / "base")
    assert len(shards) >= 4
    largest_mb = max((tmp_path / "base" / s).stat().st_size for s in shards) / 2**20
    code = (
        "import json, sys; from zhtune.merge.merge import merge_adapters; "
        f"r = merge_adapters({str(tmp_path / 'base')!r}, [{str(tmp_path / 'ad')!r}], {str(tmp_path / 'out')!r}); "
        "print(json.dumps({'growth': r.peak_rss_growth_mb, 'changed': r.tensors_changed}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["changed"] == 8 * 7  # every linear layer (all-linear leaves lm_head out)
    print(f"peak RSS growth {result['growth']:.1f} MB, largest shard {largest_mb:.1f} MB")
    assert result["growth"] < 2.5 * largest_mb, (result, largest_mb)
