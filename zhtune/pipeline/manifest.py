"""A stage's ``manifest.json``: written atomically, read back, and asked whether it still describes its stage.

A done stage is still valid when its settings and data are unchanged (its chain fingerprint, see
:func:`zhtune.pipeline.runner.plan_pipeline`) and the models it touched hold the bytes they held when it ran: the
model it read (its input) and, for a merge, the model it wrote. Fingerprints are by content
(:func:`zhtune.model.checkpoint_files.base_fingerprint`), so weights changed in place make the stage stale.
"""

from __future__ import annotations

import json
from pathlib import Path

from zhtune.atomic import write_text_atomic
from zhtune.errors import ConfigError
from zhtune.model.checkpoint_files import base_fingerprint

MANIFEST = "manifest.json"


def read_manifest(stage_dir: Path) -> dict | None:
    """The manifest of ``stage_dir``, or None when the stage never started."""
    path = Path(stage_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    write_text_atomic(Path(stage_dir) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))


def model_fingerprint_or_none(path: str | None) -> str | None:
    """The content fingerprint of a model folder, or None when it is gone or unreadable."""
    if not path or not (Path(path) / "config.json").exists():
        return None
    try:
        return base_fingerprint(path)
    except (ConfigError, OSError, ValueError):
        return None


def stale_reason(manifest: dict) -> str | None:
    """Why a done stage no longer describes its models (None when it still does)."""
    inputs, outputs = manifest.get("inputs") or {}, manifest.get("outputs") or {}
    recorded = inputs.get("model_fingerprint")
    if recorded and model_fingerprint_or_none(inputs.get("model")) != recorded:
        return f"its input model {inputs.get('model')} changed since it ran"
    recorded = outputs.get("model_fingerprint")
    if recorded and model_fingerprint_or_none(outputs.get("model")) != recorded:
        return f"the model it wrote, {outputs.get('model')}, changed since"
    return None
