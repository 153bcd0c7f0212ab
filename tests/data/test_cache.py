"""The prepared-data cache: same units as tokenizing in memory, reused when nothing changed, rebuilt when anything
that changes the result does, bounded by a chunk, atomic, and errors that still name file:line."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

import zhtune.data.prepare as prepare_module
import zhtune.data.readers as readers_module
from zhtune.config import recipe_from_dict
from zhtune.data.cache import cache_dir, clean_cache, prepare_data
from zhtune.data.formats import load_conversations
from zhtune.data.packing import pack_samples
from zhtune.data.templates import RenderOptions, get_template
from zhtune.data.tokenize import tokenize_dataset
from zhtune.errors import DataError

QWEN = "tokenizers/qwen2.5-0.5b-instruct"
BELLE = "data/instruct/belle/dev1K.json"
ALPACA = "data/instruct/alpaca_zh/alpaca_zh_demo.json"


def make_recipe(tokenizer_dir, paths, cache, **sections):
    tree = {
        "model": {"path": str(tokenizer_dir)},
        "data": {"paths": [str(p) for p in paths], "cache_dir": str(cache)},
        "template": {"name": "qwen"},
        "tokenize": {"cutoff_len": 256},
        "train": {"val_size": 0.05, "seed": 3},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return recipe_from_dict(tree)


@pytest.fixture(scope="module")
def qwen(real_tokenizer):
    return real_tokenizer("qwen2.5-0.5b-instruct")


@pytest.fixture
def small_belle(shared, tmp_path):
    path = tmp_path / "belle300.jsonl"
    path.write_bytes(b"".join((shared / BELLE).read_bytes().splitlines(keepends=True)[:300]))
    return path


def in_memory_units(recipe, tokenizer):
    """What zhtune trained on before the cache: load, split the conversations, tokenize, pack, all in memory."""
    convs, _ = load_conversations(recipe.data.paths, recipe.data)
    n_val = round(len(convs) * recipe.train.val_size)
    order = list(range(len(convs)))
    random.Random(recipe.train.seed).shuffle(order)
    held = set(order[:n_val])
    template = get_template(recipe.template.name)
    out = {}
    for split, keep in (("train", lambda i: i not in held), ("val", lambda i: i in held)):
        part = [c for i, c in enumerate(convs) if keep(i)]
        samples, _ = tokenize_dataset(part, tokenizer, template, recipe.tokenize, RenderOptions())
        out[split] = pack_samples(samples, recipe.tokenize.cutoff_len, tokenizer.pad_token_id)
        if not recipe.tokenize.packing:
            out[split] = samples
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_cached_units_equal_in_memory_units_and_second_call_maps(packing, shared, qwen, tmp_path):
    recipe = make_recipe(
        shared / QWEN, [shared / BELLE, shared / ALPACA], tmp_path / "c", tokenize={"packing": packing}
    )
    first = prepare_data(recipe, lambda: qwen)
    assert first.built == ("samples", "layout")
    expected = in_memory_units(recipe, qwen)
    for split in ("train", "val"):
        got = first.units(split)
        assert len(got) == len(expected[split]) > 0
        assert list(got) == expected[split]
    second = prepare_data(recipe, lambda: pytest.fail("a cache hit must not need the tokenizer"))
    assert second.built == () and second.layout_folder == first.layout_folder
    assert list(second.units("train")[:5]) == expected["train"][:5]
    counts = second.layout_meta["train"]
    if packing:
        assert counts["packed_rows"] == len(expected["train"]) and 0.9 < counts["fill_ratio"] <= 1
    else:
        assert counts["kept"] == len(expected["train"]) and counts["packed_rows"] == 0


# change -> which half is rebuilt ("samples" means both, "layout" only the split/packing, None a cache hit)
CHANGES = {
    "data bytes": (lambda r, f, t: _append_record(f), "samples"),
    "tokenizer bytes": (lambda r, f, t: _touch_tokenizer(t), "samples"),
    "cutoff_len": (lambda r, f, t: {"tokenize": {"cutoff_len": 200}}, "samples"),
    "system prompt": (lambda r, f, t: {"template": {"system": "你是助手。"}}, "samples"),
    "train_on_prompt": (lambda r, f, t: {"tokenize": {"train_on_prompt": True}}, "samples"),
    "max_samples": (lambda r, f, t: {"data": {"max_samples": 250}}, "samples"),
    "split seed": (lambda r, f, t: {"train": {"val_size": 0.05, "seed": 4}}, "layout"),
    "val_size": (lambda r, f, t: {"train": {"val_size": 10, "seed": 3}}, "layout"),
    "packing": (lambda r, f, t: {"tokenize": {"packing": False}}, "layout"),
    "learning rate": (lambda r, f, t: {"train": {"val_size": 0.05, "seed": 3, "lr": 1e-3}}, None),
    "moved data file": (lambda r, f, t: _move(f), None),
}


def _append_record(path):
    path.write_bytes(path.read_bytes() + b'{"instruction": "1+1=?", "input": "", "output": "2"}\n')


def _touch_tokenizer(folder):
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "zhtune_test": 1}))


def _move(path):
    moved = path.with_name("moved.jsonl")
    shutil.copy(path, moved)
    return {"data": {"paths": [str(moved)]}}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_cache_is_rebuilt_exactly_when_the_result_would_change(change, shared, qwen, small_belle, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(shared / QWEN, tok)
    base = {"model": {"path": str(tok)}, "data": {"paths": [str(small_belle)], "cache_dir": str(tmp_path / "c")}}
    before = prepare_data(make_recipe(tok, [small_belle], tmp_path / "c"), lambda: qwen)
    edit, rebuilt = CHANGES[change]
    extra = edit(None, small_belle, tok) or {}
    tree = {
        **base,
        "template": {"name": "qwen"},
        "tokenize": {"cutoff_len": 256},
        "train": {"val_size": 0.05, "seed": 3},
    }
    for section, values in extra.items():
        tree[section] = {**tree.get(section, {}), **values}
    after = prepare_data(recipe_from_dict(tree), lambda: qwen)
    expected_built = {"samples": ("samples", "layout"), "layout": ("layout",), None: ()}[rebuilt]
    assert after.built == expected_built
    assert (after.folder == before.folder) == (rebuilt != "samples")
    if rebuilt is None:
        assert list(after.units("train")) == list(before.units("train"))


def test_chunks_bound_what_is_in_memory_and_do_not_change_the_result(shared, qwen, tmp_path, monkeypatch):
    """The encoder never holds more than one chunk of records, and the cache does not depend on chunk or block size."""
    recipe = make_recipe(shared / QWEN, [shared / BELLE, shared / ALPACA], tmp_path / "a")
    reference = prepare_data(recipe, lambda: qwen)
    seen = []
    real_front = prepare_module.ChunkEncoder.front

    def spy(self, items):
        seen.append(len(items))
        return real_front(self, items)

    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 37)
    monkeypatch.setattr(readers_module, "BLOCK_BYTES", 4093)  # records and UTF-8 characters split across blocks
    monkeypatch.setattr(prepare_module.ChunkEncoder, "front", spy)
    small = prepare_data(make_recipe(shared / QWEN, [shared / BELLE, shared / ALPACA], tmp_path / "b"), lambda: qwen)
    assert max(seen) == 37 and sum(seen) == 2000
    for name in ("input_ids", "supervised", "sample_length", "record_line", "record_valid"):
        np.testing.assert_array_equal(small.arrays[name], reference.arrays[name])
    assert list(small.units("train")) == list(reference.units("train"))


def test_two_workers_give_the_same_cache(shared, qwen, small_belle, tmp_path):
    one = prepare_data(make_recipe(shared / QWEN, [small_belle], tmp_path / "a"), lambda: qwen)
    two = prepare_data(make_recipe(shared / QWEN, [small_belle], tmp_path / "b", data={"num_workers": 2}), lambda: qwen)
    for name in ("input_ids", "supervised", "sample_length", "sample_record"):
        np.testing.assert_array_equal(two.arrays[name], one.arrays[name])


def test_errors_name_file_and_line_deep_in_a_streamed_file(shared, qwen, tmp_path, monkeypatch):
    lines = (shared / BELLE).read_bytes().splitlines() * 3
    lines[2345] = b'{"instruction": "x", "input": "", "output": 7}'
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as err:
        prepare_data(make_recipe(shared / QWEN, [path], tmp_path / "c"), lambda: qwen)
    assert str(err.value).startswith(f"{path}:2346: field 'output': expected a string")
    assert not list((tmp_path / "c").glob("samples-*")), "a failed build leaves nothing under a final name"
    skipping = prepare_data(make_recipe(shared / QWEN, [path], tmp_path / "c", data={"on_error": "skip"}), lambda: qwen)
    assert skipping.meta["skipped"] == 1 and f"{path}:2346:" in skipping.meta["skip_reasons"][0]
    assert skipping.meta["records"] == 3000 and skipping.meta["samples"] == 2999
    # a JSON array read in blocks much smaller than it still names the line of its broken element
    monkeypatch.setattr(readers_module, "BLOCK_BYTES", 1000)
    items = [x.decode() for x in lines[:50]]
    items[40] = items[40].replace('"input": ""', '"input" ""')
    array = tmp_path / "array.json"
    array.write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare_data(make_recipe(shared / QWEN, [array], tmp_path / "d"), lambda: qwen)
    assert err.value.line == 42 and "invalid JSON: Expecting ':' delimiter" in str(err.value)


def test_crashed_build_leaves_no_cache_and_the_next_one_cleans_up(shared, qwen, small_belle, tmp_path, monkeypatch):
    recipe = make_recipe(shared / QWEN, [small_belle], tmp_path / "c")
    real = prepare_module.build_samples

    def crash(recipe, tokenizer, folder):
        real(recipe, tokenizer, folder)
        raise KeyboardInterrupt  # after the arrays were written, before the meta

    monkeypatch.setattr("zhtune.data.cache.build_samples", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(recipe, lambda: qwen)
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith("samples-")]
    monkeypatch.undo()
    # a SIGKILL would leave the temporary folder behind: the next build of that cache removes it, nothing else
    prepared = prepare_data(recipe, lambda: qwen)
    leftover = prepared.folder.with_name(f".{prepared.folder.name}.tmp-999999")
    other = prepared.folder.with_name(".samples-other.tmp-999999")
    leftover.mkdir(), other.mkdir()
    shutil.rmtree(prepared.folder)
    assert prepare_data(recipe, lambda: qwen).built == ("samples", "layout")
    assert not leftover.exists() and other.exists()


def test_clean_removes_prepared_data_only(shared, qwen, small_belle, tmp_path):
    recipe = make_recipe(shared / QWEN, [small_belle], tmp_path / "c")
    prepare_data(recipe, lambda: qwen)
    (tmp_path / "c" / "keep.txt").write_text("not ours")
    removed, freed = clean_cache(recipe.data)
    assert removed == 1 and freed > 0
    assert [p.name for p in cache_dir(recipe.data).iterdir()] == ["keep.txt"]


def test_prepare_command_prints_counts_cleans_and_reports_bad_data(shared, small_belle, tmp_path, capsys):
    import yaml

    from zhtune.cli import main

    tree = {
        "model": {"path": str(shared / QWEN)},
        "data": {"paths": [str(small_belle)], "cache_dir": str(tmp_path / "c")},
        "template": {"name": "qwen"},
        "train": {"val_size": 10},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree, allow_unicode=True))
    assert main(["prepare", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "data: built samples and layout" in out and "300 records → 300 conversations; 0 skipped" in out
    assert "train: 290 samples → 290 kept" in out and "val: 10 samples → 10 kept" in out and "fill ratio" in out
    assert main(["prepare", str(recipe), "tokenize.cutoff_len=128", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (
        counts["built"] == ["samples", "layout"]
        and counts["train"]["kept"] + counts["train"]["dropped_no_target"] == 290
    )
    assert counts["train"]["truncated"] > 0 and counts["load"]["records"] == 300
    assert main(["prepare", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["built"] == []
    assert main(["prepare", str(recipe), "--clean"]) == 0
    assert "removed 2 prepared data set(s)" in capsys.readouterr().out
    small_belle.write_text(small_belle.read_text() + '{"instruction": "x"}\n', encoding="utf-8")
    assert main(["prepare", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{small_belle}:301: field 'output': missing" in err and "Traceback" not in err
