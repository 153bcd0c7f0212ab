"""Content fingerprints: the same tensors give the same fingerprint however they are stored; other bytes do not."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from tests.helpers import tiny_model_dir
from zhtune.model.checkpoint_files import base_fingerprint, tensor_digests, weight_shards


def test_same_shapes_different_bytes_differ(tmp_path):
    a = tiny_model_dir(tmp_path / "a", "qwen2", seed=0)
    b = tiny_model_dir(tmp_path / "b", "qwen2", seed=1)  # a "-Instruct sibling": same layout, other weights
    assert base_fingerprint(a) != base_fingerprint(b)
    assert base_fingerprint(a) == base_fingerprint(a)


def test_resharded_copy_and_cosmetic_config_keys_keep_the_fingerprint(tmp_path):
    from transformers import AutoModelForCausalLM

    a = tiny_model_dir(tmp_path / "a", "llama")
    model = AutoModelForCausalLM.from_pretrained(a)
    model.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    assert len(weight_shards(tmp_path / "b")) > 1 and len(weight_shards(a)) == 1
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(tmp_path / "b") == base_fingerprint(a)
    config["rope_theta"] = 1234.0  # changes what the model computes
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(tmp_path / "b") != base_fingerprint(a)


def test_weights_updated_in_place_change_the_fingerprint(tmp_path):
    a = tiny_model_dir(tmp_path / "a", "qwen2")
    shard = a / "model.safetensors"
    before = base_fingerprint(a)
    digests = tensor_digests(shard)
    state = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][0, 0] += 1.0
    save_file(state, shard, metadata={"format": "pt"})
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # even within one mtime tick
    after = tensor_digests(shard)
    assert after[name] != digests[name]
    assert {k for k in digests if digests[k] != after[k]} == {name}
    assert base_fingerprint(a) != before


def test_digest_cache_is_used_for_unchanged_files(tmp_path):
    from zhtune.paths import cache_root

    a = tiny_model_dir(tmp_path / "a", "qwen2")
    first = base_fingerprint(a)
    (entry,) = [p for p in (cache_root() / "fingerprints").glob("*.json") if str(a) in p.read_text()]
    cached = json.loads(entry.read_text())
    cached["tensors"]["model.norm.weight"] = "0" * 64  # the cache is trusted while path, size and mtime agree
    entry.write_text(json.dumps(cached))
    assert base_fingerprint(a) != first
    assert torch.equal(load_file(a / "model.safetensors")["model.norm.weight"], torch.ones(32))
