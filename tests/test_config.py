"""The strict config loader: unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

import pytest

from zhtune.config import DataConfig, TemplateConfig, TokenizeConfig, from_mapping
from zhtune.errors import ConfigError


def test_loads_values_and_defaults():
    cfg = from_mapping(DataConfig, {"paths": "a.json", "on_error": "skip"}, "data")
    assert cfg.paths == ("a.json",) and cfg.on_error == "skip" and cfg.format == "auto"
    assert from_mapping(TemplateConfig, {"name": "qwen3", "system": None}).system is None
    assert from_mapping(TokenizeConfig, None) == TokenizeConfig()


@pytest.mark.parametrize(
    ("cls", "mapping", "message"),
    [
        (DataConfig, {"pathz": ["a"]}, "data: unknown key(s) ['pathz']; known keys:"),
        (DataConfig, {"on_error": "ignore"}, "data.on_error: 'ignore' is not one of ['raise', 'skip']"),
        (TokenizeConfig, {"cutoff_len": "2048"}, "data.cutoff_len: expected int"),
        (TokenizeConfig, {"packing": 1}, "data.packing: expected bool"),
        (TokenizeConfig, {"cutoff_len": True}, "data.cutoff_len: expected int, got a boolean"),
    ],
)
def test_bad_values_name_the_key(cls, mapping, message):
    with pytest.raises(ConfigError) as err:
        from_mapping(cls, mapping, "data")
    assert message in str(err.value)
