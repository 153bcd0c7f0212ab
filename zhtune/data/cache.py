"""The prepared-data cache: what ``zhtune prepare`` writes and ``zhtune train`` maps, keyed by content.

A prepared data set has two halves, each a folder written atomically (complete under its final name, or absent)::

    CACHE_DIR/samples-<key>/            tokens of every sample (flat arrays), per-record file:line and validity
        meta.json  *.bin
        layouts/<layout key>/           the validation split on records and the packed rows
            meta.json  *.bin

The tokenized half is keyed by the bytes of the data files (not their paths), the bytes of the tokenizer's files,
the template and system prompt, the tokenize options (cutoff, overflow, label masking), the reading options
(format, on_error, CGEC settings, max_samples, mix) and the zhtune data code itself; the layout also by
``train.val_size``, ``train.seed`` and ``tokenize.packing`` - so changing the seed re-packs in seconds without
re-tokenizing, and resuming a run never re-tokenizes. One process builds a missing half while holding a file lock
next to it; every other process (other ranks, other runs) waits and then maps the finished arrays read-only, so
the tokens are on disk once and in the page cache once, however many ranks read them.

The arrays are raw numpy files, memory-mapped. Measured on 200k samples (2-core CPU): writing 0.31 s against
0.90 s for Arrow IPC with list columns, reading 20k random samples 0.19 s against 0.14 s; and no dependency.
This module decides names, keys, locking and reuse; :mod:`zhtune.data.prepare` builds the arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from zhtune.atomic import atomic_dir
from zhtune.config import DataConfig, Recipe
from zhtune.data.formats import LoadReport
from zhtune.data.packing import row_from_arrays
from zhtune.data.prepare import build_layout, build_samples, open_arrays, record_origins
from zhtune.data.tokenize import IGNORE_INDEX, TokenizedSample, pad_id
from zhtune.errors import ConfigError
from zhtune.paths import cache_root

CACHE_FORMAT = 1
SAMPLES_PREFIX = "samples-"
_TOKENIZER_NAMES = ("merges.txt", "special_tokens_map.json", "added_tokens.json")
_TOKENIZER_SUFFIXES = (".tiktoken", ".model", ".jinja")
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def cache_dir(data: DataConfig) -> Path:
    """Where prepared data sets live: ``data.cache_dir``, else ``$ZHTUNE_CACHE/data``, else
    ``~/.cache/zhtune/data``."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else cache_root() / "data"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks.

    Raises:
        ConfigError: the file does not exist.
    """
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    except FileNotFoundError:
        raise ConfigError(f"data file {path} not found") from None
    return digest.hexdigest()


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of ``folder`` a tokenizer is loaded from (vocabularies, merges, configs, remote tokenizer code),
    not the weights."""
    out = []
    for f in sorted(Path(folder).iterdir()):
        name = f.name
        if not f.is_file() or name.endswith(_NOT_TOKENIZER):
            continue
        if (
            name.startswith(("tokenizer", "tokenization_", "chat_template"))
            or "vocab" in name
            or name in _TOKENIZER_NAMES
            or name.endswith(_TOKENIZER_SUFFIXES)
        ):
            out.append(f)
    return out


def tokenizer_fingerprint(folder: str | Path) -> str:
    """sha256 over the names and bytes of :func:`tokenizer_files`.

    Raises:
        ConfigError: the folder is missing or holds no tokenizer file.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {folder} not found")
    files = tokenizer_files(folder)
    if not files:
        raise ConfigError(f"{folder} holds no tokenizer files (tokenizer.json, vocab.json, tokenizer.model, ...)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return digest.hexdigest()


def code_fingerprint() -> str:
    """sha256 of zhtune's data-layer source: a change to how data is read, rendered or packed is a new cache."""
    digest = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def sample_key_inputs(recipe: Recipe) -> dict:
    """Everything the tokenized half depends on (what :func:`prepare_data` hashes into its key)."""
    data = recipe.data
    mix = dataclasses.asdict(data.mix)
    if data.mix.strategy == "concat":
        mix["seed"] = None  # concatenation draws nothing
    elif mix["seed"] is None:
        mix["seed"] = recipe.train.seed
    versions = {}
    for package in ("tokenizers", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "format": CACHE_FORMAT,
        "code": code_fingerprint(),
        "versions": versions,
        "files": [file_digest(Path(p)) for p in data.paths],
        "tokenizer": tokenizer_fingerprint(recipe.model.tokenizer or recipe.model.path),
        "template": dataclasses.asdict(recipe.template),
        "tokenize": {k: v for k, v in dataclasses.asdict(recipe.tokenize).items() if k != "packing"},
        "data": {
            "format": data.format,
            "on_error": data.on_error,
            "cgec_instruction": data.cgec_instruction,
            "cgec_refs": data.cgec_refs,
            "max_samples": list(data.file_limits()),
            "mix": mix,
        },
    }


def layout_key(sample_key: str, recipe: Recipe) -> str:
    """The key of the split and packing made from the tokenized half ``sample_key``."""
    train = recipe.train
    return _hash(
        {"samples": sample_key, "val_size": train.val_size, "seed": train.seed, "packing": recipe.tokenize.packing}
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (released when the process dies, so a crash never leaves it held)."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data: waiting for another process preparing {path.name[1:-5]} ...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def _remove_stale(final: Path) -> None:
    """Remove half-written temporaries of ``final`` left by a crashed build (call while holding its lock)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


class CachedUnits(Sequence):
    """Training units read from the memory-mapped cache on access: packed rows, or single samples."""

    def __init__(self, prepared: PreparedData, split: str):
        self.arrays, self.split = prepared.arrays, split
        self.samples = prepared.layout[f"{split}_samples"]
        self.packed = prepared.packed
        self.row_len, self.pad_id, self.origin = prepared.row_len, prepared.pad_id, prepared.origin
        if self.packed:
            self.offsets = prepared.layout[f"{split}_row_offsets"]
            self.members = prepared.layout[f"{split}_row_members"]

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.packed else len(self.samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a = self.arrays
        if self.packed:
            members = self.members[self.offsets[i] : self.offsets[i + 1]]
            return row_from_arrays(
                a["input_ids"],
                a["supervised"],
                a["sample_start"],
                a["sample_length"],
                members,
                self.row_len,
                self.pad_id,
            )
        s = int(self.samples[i])
        start, n = int(a["sample_start"][s]), int(a["sample_length"][s])
        ids = np.asarray(a["input_ids"][start : start + n], dtype=np.int64)
        labels = np.where(a["supervised"][start : start + n], ids, IGNORE_INDEX)
        return TokenizedSample(ids.tolist(), labels.tolist(), self.origin(int(a["sample_record"][s])))


@dataclass
class PreparedData:
    """A prepared data set, mapped: its arrays, its counts, and what this call had to build."""

    folder: Path
    layout_folder: Path
    meta: dict
    layout_meta: dict
    arrays: dict
    layout: dict
    packed: bool
    row_len: int
    pad_id: int
    origin: Callable[[int], str]
    built: tuple[str, ...] = ()
    seconds: float = 0.0

    def units(self, split: str) -> CachedUnits:
        """The ``train`` or ``val`` units (packed rows when packing is on)."""
        return CachedUnits(self, split)

    def describe(self) -> str:
        """One line: which cache, and whether this process built it or mapped it."""
        how = f"built {' and '.join(self.built)}" if self.built else "mapped"
        return f"data: {how} {self.layout_folder} ({self.seconds:.1f} s)"

    def reports(self) -> dict[str, str]:
        """Readable summaries (``load``, ``train``, ``val``), as ``data_report.txt`` and ``zhtune prepare`` show."""
        m = self.meta
        load = LoadReport(
            records=m["records"] - m["repeats"],
            conversations=m["conversations"],
            skipped=m["skipped"],
            trimmed_trailing_user=m["trimmed_trailing_user"],
            reasons=m["skip_reasons"],
        ).summary()
        if m["repeats"]:
            load += f"; {m['repeats']} records read again (interleave_over)"
        out = {"load": load}
        for split in ("train", "val"):
            c = self.layout_meta[split]
            text = c["summary"]
            if self.packed:
                text += f"\npacked rows: {c['packed_rows']} of {self.row_len} tokens, fill ratio {c['fill_ratio']}"
            out[split] = text
        return out

    @classmethod
    def open(cls, folder: Path, layout_folder: Path, recipe: Recipe, built=(), seconds=0.0) -> PreparedData:
        meta = json.loads((folder / "meta.json").read_text())
        layout_meta = json.loads((layout_folder / "meta.json").read_text())
        arrays = open_arrays(folder)
        layout = {}
        for f in layout_folder.glob("*.bin"):
            layout[f.stem] = np.memmap(f, dtype=np.int64, mode="r") if f.stat().st_size else np.zeros(0, np.int64)
        return cls(
            folder,
            layout_folder,
            meta,
            layout_meta,
            arrays,
            layout,
            recipe.tokenize.packing,
            recipe.tokenize.cutoff_len,
            meta["pad_id"],
            record_origins(arrays, recipe.data.paths),
            tuple(built),
            seconds,
        )


def prepare_data(recipe: Recipe, load_tokenizer: Callable[[], object]) -> PreparedData:
    """The recipe's prepared data: mapped from the cache when its key matches, built (under a lock) otherwise.

    Args:
        recipe: the resolved recipe (data, template, tokenize, model.tokenizer/path, train.val_size/seed).
        load_tokenizer: returns the tokenizer; called only when the tokenized half must be built.

    Returns:
        The mapped :class:`PreparedData`.

    Raises:
        DataError / ConfigError: bad data or settings found while building (nothing is left under a final name).
    """
    started = time.perf_counter()
    root = cache_dir(recipe.data)
    inputs = sample_key_inputs(recipe)
    key = _hash(inputs)
    folder = root / f"{SAMPLES_PREFIX}{key[:24]}"
    layout_folder = folder / "layouts" / layout_key(key, recipe)[:24]
    built = []
    if not _complete(layout_folder):
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{folder.name}.lock"):
            if not _complete(folder):
                _build_samples(recipe, load_tokenizer(), folder, key, inputs)
                built.append("samples")
            if not _complete(layout_folder):
                _build_layout(recipe, folder, layout_folder)
                built.append("layout")
    return PreparedData.open(folder, layout_folder, recipe, built, time.perf_counter() - started)


def _build_samples(recipe: Recipe, tokenizer, folder: Path, key: str, inputs: dict) -> None:
    _remove_stale(folder)
    started = time.perf_counter()
    with atomic_dir(folder) as tmp:
        meta = build_samples(recipe, tokenizer, tmp)
        meta.update(key=key, inputs=inputs, pad_id=pad_id(tokenizer), seconds=round(time.perf_counter() - started, 2))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))


def _build_layout(recipe: Recipe, folder: Path, layout_folder: Path) -> None:
    _remove_stale(layout_folder)
    arrays = open_arrays(folder)
    with atomic_dir(layout_folder) as tmp:
        out, meta = build_layout(arrays, recipe, record_origins(arrays, recipe.data.paths))
        for name, values in out.items():
            np.ascontiguousarray(values, dtype=np.int64).tofile(tmp / f"{name}.bin")
        meta.update(val_size=recipe.train.val_size, seed=recipe.train.seed, packing=recipe.tokenize.packing)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))


def clean_cache(data: DataConfig) -> tuple[int, int]:
    """Remove every prepared data set in the cache folder of ``data`` (stale ones, half-written ones, locks).

    Returns:
        ``(folders removed, bytes freed)``.
    """
    root = cache_dir(data)
    removed = freed = 0
    if not root.is_dir():
        return 0, 0
    for entry in root.iterdir():
        name = entry.name.lstrip(".")
        if not name.startswith(SAMPLES_PREFIX):
            continue
        if entry.is_dir():
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        else:
            entry.unlink(missing_ok=True)
    return removed, freed
