"""``zhtune convert`` against the original ChatGLM code: converted logits equal the original's, the way back is bit
for bit, and bad input is refused.

Checkpoints are tiny random models built with the original code of each release and saved as the releases ship
them (bf16 ``pytorch_model-*.bin`` shards with an index, the code beside them); see ``reference.py``. The ``glm4``
case is GLM-4-9B-chat: its code is the ChatGLM3-6B-32k code with ``rope_ratio`` 500 in its real ``config.json``, so
the reference is the chatglm3-6b-32k original run with GLM-4's real config shrunk to a tiny shape.

"Within bf16 rounding": the converted model in bf16 is no farther from the exact (fp32) logits than twice the
original code's own bf16 error on the same bf16 weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.model.reference import CASES, build_original, copy_real_tokenizer, read_state, reference, sample_ids
from zhtune.errors import ConfigError
from zhtune.model.convert import chatglm as layouts
from zhtune.model.convert import convert_checkpoint, convert_to_original, detect_original, resolve_checkpoint

FP32_TOLERANCE = 1e-5
LONG = 2100  # past 2048, where the 32k releases' rotary scaling matters


def _hidden_to_logits(model, ids, positions):
    """The original's logits at ``positions`` only (a 150k-vocabulary head over 2000 positions is 1 GiB)."""
    hidden = model.transformer(input_ids=ids, return_dict=True).last_hidden_state  # [length, batch, hidden]
    head = model.lm_head if hasattr(model, "lm_head") else model.transformer.output_layer
    return head(hidden[positions]).transpose(0, 1).float()


def native_logits(path, ids, dtype, positions=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        if positions is None:
            return model(input_ids=ids).logits.float()
        return model(input_ids=ids, logits_to_keep=torch.tensor(positions)).logits.float()


def original_logits(shared, case, config, src, ids, dtype, positions=None):
    model = reference(shared, case, config, src, dtype)
    with torch.no_grad():
        if positions is None:
            return model(input_ids=ids).logits.float()
        return _hidden_to_logits(model, ids, positions)


def parity(shared, case, config, src, native, ids, positions=None) -> dict[str, float]:
    """Max |logit error| against the original in fp32: converted fp32, converted bf16, original bf16."""
    exact = original_logits(shared, case, config, src, ids, torch.float32, positions)
    return {
        "fp32": (native_logits(native, ids, torch.float32, positions) - exact).abs().max().item(),
        "bf16": (native_logits(native, ids, torch.bfloat16, positions) - exact).abs().max().item(),
        "original_bf16": (original_logits(shared, case, config, src, ids, torch.bfloat16, positions) - exact)
        .abs()
        .max()
        .item(),
    }


def assert_parity(errors: dict[str, float]) -> None:
    assert errors["fp32"] <= FP32_TOLERANCE, errors
    assert errors["bf16"] <= 2 * errors["original_bf16"], errors


def _ids(case, config, length):
    return sample_ids(case, config, (length, length - 9) if case == "chatglm" else (length,))


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_equal_the_original(case, original, shared, tmp_path):
    src, config = original(case)
    summary = convert_checkpoint(src, tmp_path / "native")
    assert summary["variant"] == CASES[case][2] and summary["shards"] == 3
    assert summary["model_type"] == ("zhtune_chatglm" if case == "chatglm" else "glm")
    assert_parity(parity(shared, case, config, src, tmp_path / "native", _ids(case, config, 40)))


@pytest.mark.parametrize("case", ["chatglm2-32k", "chatglm3-32k", "glm4"])
def test_32k_releases_match_past_2048_positions(case, original, shared, tmp_path):
    src, config = original(case, shards=2)
    convert_checkpoint(src, tmp_path / "native")
    ids = _ids(case, config, LONG)
    positions = [0, 1000, 2047, 2048, 2049, 2080, ids.shape[1] - 1]
    assert_parity(parity(shared, case, config, src, tmp_path / "native", ids, positions))


def _swap_k_v(rows):
    def patched(family, dims):
        q, k, v = rows(family, dims)
        return q, v, k

    return patched


def _swap_gate_up(forward):
    def patched(layout, dims, name, shape):
        pieces = forward(layout, dims, name, shape)
        for p in pieces or []:
            if p.name.endswith("gate_up_proj.weight"):
                p.make = lambda ts: torch.cat(ts[0].chunk(2, dim=0)[::-1])
        return pieces

    return patched


def _contiguous_qkv(rows):
    return lambda family, dims: rows("glm", dims)


def _native_config_without_rope_ratio(native_config):
    def patched(variant, semantics, config, *args):
        return native_config(variant, semantics, {**config, "rope_ratio": 1}, *args)

    return patched


MUTATIONS = {
    # name: (case, object, attribute, wrapper, sequence length)
    "k_and_v_swapped": ("chatglm3", layouts, "qkv_rows", _swap_k_v, 40),
    "gate_and_up_swapped": ("chatglm3", layouts, "forward_pieces", _swap_gate_up, 40),
    "v1_qkv_read_as_contiguous": ("chatglm", layouts, "qkv_rows", _contiguous_qkv, 40),
    "glm4_rope_ratio_ignored": ("glm4", layouts, "native_config", _native_config_without_rope_ratio, 40),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_wrong_conversion_fails_the_logit_check(mutation, original, shared, tmp_path, monkeypatch):
    case, owner, attribute, wrap, length = MUTATIONS[mutation]
    src, config = original(case, shards=1)
    monkeypatch.setattr(owner, attribute, wrap(getattr(owner, attribute)))
    convert_checkpoint(src, tmp_path / "native")
    errors = parity(shared, case, config, src, tmp_path / "native", _ids(case, config, length))
    with pytest.raises(AssertionError):
        assert_parity(errors)
    assert errors["fp32"] > 1e-3, errors


def test_chatglm2_32k_read_as_a_base_scale_fails_past_2048(original, shared, tmp_path, monkeypatch):
    src, config = original("chatglm2-32k", shards=1)
    import zhtune.model.convert as convert_module

    monkeypatch.setattr(convert_module, "_rope_semantics", lambda *a: "base")
    convert_checkpoint(src, tmp_path / "native")
    ids = _ids("chatglm2-32k", config, LONG)
    errors = parity(shared, "chatglm2-32k", config, src, tmp_path / "native", ids, [2048, 2080, ids.shape[1] - 1])
    assert errors["fp32"] > 1e-3, errors


def _bitwise(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


@pytest.mark.parametrize("case", ["chatglm", "chatglm3", "glm4"])
def test_the_way_back_round_trips_bit_for_bit(case, original, tmp_path):
    src, config = original(case)
    convert_checkpoint(src, tmp_path / "native")
    summary = convert_to_original(tmp_path / "native", tmp_path / "back")
    before, after = read_state(src), read_state(tmp_path / "back")
    assert sorted(before) == sorted(after)  # rotary inv_freq buffers included
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and _bitwise(after[name]) == _bitwise(tensor), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert "modeling_chatglm.py" in summary["side_files"] and (tmp_path / "back" / "modeling_chatglm.py").exists()


def test_a_native_glm_without_record_goes_back_to_the_original_code(shared, tmp_path):
    """A glm checkpoint zhtune did not convert (e.g. GLM-4-9B-chat-hf): the original layout and config are rebuilt,
    and the original ChatGLM3 code computes the same logits."""
    from tests.helpers import tiny_model_dir

    native = tiny_model_dir(tmp_path / "glm", "glm", vocab_size=256)
    summary = convert_to_original(native, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert summary["variant"] == "chatglm3" and config["multi_query_group_num"] == 2
    model = build_original(shared, "chatglm3", config)
    model.load_state_dict({k: v.float() for k, v in read_state(tmp_path / "back").items()})
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.eval()(input_ids=ids).logits
    assert (got - native_logits(native, ids, torch.float32)).abs().max() <= FP32_TOLERANCE


def test_generation_config_stops_at_every_end_of_turn_id(original, shared, tmp_path):
    for case, eos in (("chatglm", [130005]), ("chatglm3", [2, 64795, 64797]), ("glm4", [151329, 151336, 151338])):
        src, _config = original(case, shards=1)
        if case == "glm4":  # GLM-4 ships its own generation_config.json: kept, with its sampling settings
            (src / "generation_config.json").write_text(
                (shared / "tokenizers/glm-4-9b-chat/generation_config.json").read_text()
            )
        convert_checkpoint(src, tmp_path / case)
        generation = json.loads((tmp_path / case / "generation_config.json").read_text())
        assert generation["eos_token_id"] == eos, case
        if case == "glm4":
            assert generation["max_length"] == 128000 and generation["top_p"] == 0.8


class NotATensor:
    """Any object a pickle may hold; unpickling it could run code."""


def test_pickle_with_anything_but_tensors_is_refused(original, tmp_path):
    src, _config = original("chatglm3", shards=1)
    shard = next(src.glob("*.bin"))
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "extra": NotATensor()}, shard)
    with pytest.raises(ConfigError, match=r"holds objects other than plain tensors.*weights_only"):
        convert_checkpoint(src, tmp_path / "native")
    torch.save({**state, "step": 3}, shard)  # unpicklable safely, but not a state dict
    with pytest.raises(ConfigError, match="not a flat name -> tensor dictionary"):
        convert_checkpoint(src, tmp_path / "native")
    assert not (tmp_path / "native").exists()  # nothing half-written under the final name


def test_unknown_or_unsupported_input_is_a_clear_error(original, tmp_path):
    src, _config = original("chatglm3", shards=1)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not an original ChatGLM checkpoint"):
        convert_checkpoint(src, tmp_path / "a")
    (src / "config.json").write_text(json.dumps({**config, "add_bias_linear": True}))
    with pytest.raises(ConfigError, match="add_bias_linear=True.*no bias on the dense/MLP layers"):
        convert_checkpoint(src, tmp_path / "b")
    (src / "config.json").write_text(json.dumps(config))
    shard = next(src.glob("*.bin"))
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "transformer.prefix_encoder.embedding.weight": torch.zeros(4, 4)}, shard)
    with pytest.raises(ConfigError, match="prefix_encoder.*p-tuning"):
        convert_checkpoint(src, tmp_path / "c")
    torch.save(state, shard)
    for f in src.glob("*.py"):  # without its code, ChatGLM3 cannot be told from ChatGLM2
        f.unlink()
    with pytest.raises(ConfigError, match="--variant chatglm2 or --variant chatglm3"):
        detect_original(src)
    assert convert_checkpoint(src, tmp_path / "d", variant="chatglm3")["variant"] == "chatglm3"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        convert_checkpoint(src, tmp_path / "e", variant="chatglm3")
    assert (tmp_path / "e" / "keep.txt").read_text() == "user data"


def test_an_original_folder_is_converted_once_into_the_cache(original, conversion_cache, caplog):
    from zhtune.config import ModelConfig
    from zhtune.model.load import load_base_model

    src, _config = original("chatglm3", shards=2)
    with caplog.at_level("WARNING"):
        first = resolve_checkpoint(src)
        second = resolve_checkpoint(src)
    assert first == second and first.parent == conversion_cache / "converted"
    said = [r.message for r in caplog.records if "converted once" in r.message]
    assert len(said) == 1 and "original chatglm3 checkpoint" in said[0]
    assert resolve_checkpoint(first) == first  # a native folder is left alone
    model = load_base_model(ModelConfig(path=str(src), dtype="fp32", attn_implementation="sdpa"))
    assert model.config.model_type == "glm"


def test_safetensors_originals_convert_too(original, shared, tmp_path):
    src, config = original("chatglm2", fmt="safetensors")
    assert convert_checkpoint(src, tmp_path / "native")["shards"] == 3
    assert_parity(parity(shared, "chatglm2", config, src, tmp_path / "native", _ids("chatglm2", config, 40)))


@pytest.mark.parametrize("case", ["chatglm", "chatglm3", "glm4"])
def test_the_tokenizer_is_converted_and_agrees_with_the_model_config(case, original, shared, tmp_path):
    """The tokenizer files beside the weights are converted (zhtune/model/convert/tokenizers.py, tested on its own in
    test_tokenizers.py); here: it loads without remote code and its special tokens are the ids the converted model's
    config and generation config use."""
    from transformers import AutoTokenizer

    src, _config = original(case, shards=1)
    copy_real_tokenizer(shared, case, src)
    summary = convert_checkpoint(src, tmp_path / "native")
    assert summary["tokenizer"].startswith("converted from ")
    tok = AutoTokenizer.from_pretrained(tmp_path / "native")  # no trust_remote_code
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    generation = json.loads((tmp_path / "native" / "generation_config.json").read_text())
    if case == "chatglm":
        ids = tok.convert_tokens_to_ids(["[gMASK]", "[MASK]", "<sop>", "<eop>"])
        assert ids == [
            native["gmask_token_id"],
            native["mask_token_id"],
            native["bos_token_id"],
            native["eos_token_id"],
        ]
    elif case == "chatglm3":
        assert tok.convert_tokens_to_ids(["</s>", "<|user|>", "<|observation|>"]) == generation["eos_token_id"]
    else:
        eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
        assert eos == generation["eos_token_id"] == native["eos_token_id"]
