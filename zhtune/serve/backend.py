"""The one place the serving layer calls a model: chat generation and corrections for one loaded checkpoint.

:class:`Backend` renders chat messages with the training template (:class:`zhtune.infer.engine.Generator`'s prompt
and stop tokens), decodes batches of chat rows through :func:`zhtune.serve.generation.generate_rows` and corrects
texts through :func:`zhtune.gec.correct.correct_rows` (documents split into sentences, edits as character offsets).
It counts the model batches it runs (``forward_batches``) so that batching can be checked by counting, not timing.

It is not thread-safe: the server's batcher and the terminal chat each call it from one thread.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zhtune.data.conversation import Conversation
from zhtune.data.templates import RenderOptions, Template, get_template
from zhtune.errors import ConfigError
from zhtune.gec.align import CharAligner
from zhtune.gec.correct import correct_rows
from zhtune.infer.engine import Generator
from zhtune.serve.edits import TextEdit, document_pieces, text_edits
from zhtune.serve.generation import Completion, Row, SamplingParams, generate_rows


@dataclass
class Correction:
    """One corrected input: the text, its correction, the edits (offsets into ``input``), the pieces corrected."""

    input: str
    corrected: str
    edits: list[TextEdit]
    pieces: int = 0


class _CountingEngine:
    """The generator, with its batch calls (``complete``, ``generate``) counted."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def complete(self, *args, **kwargs):
        self.calls += 1
        return self.engine.complete(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.engine.generate(*args, **kwargs)


class Backend:
    """A loaded model with its tokenizer and template.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        template: the chat template it was trained with.
        name: the model id clients use.
        options: render options (system prompt override, thinking).
        aligner: the aligner for correction edits (default: with the ChERRANT tables when found).
        max_chars: corrections group a line's sentences into pieces of up to this many characters; 1 (the default)
            corrects each sentence on its own, as CGEC models are trained.
        correction_batch: pieces corrected per model batch.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: Template,
        name: str,
        options: RenderOptions = RenderOptions(),
        aligner: CharAligner | None = None,
        max_chars: int = 1,
        correction_batch: int = 32,
    ):
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.generator = Generator(model, tokenizer, template, options)
        if aligner is None:
            from zhtune.gec.tables import tables_or_empty

            semantic, confusion, _folder = tables_or_empty()
            aligner = CharAligner(semantic, confusion)
        self.aligner = aligner
        self.max_chars, self.correction_batch = max_chars, correction_batch
        self.forward_batches = 0
        self.default_sampling = sampling_defaults(getattr(model, "generation_config", None))

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """The token ids of ``conv`` (ending with a user turn) followed by the assistant header.

        Raises:
            DataError: the template cannot render the conversation.
        """
        return self.generator.prompt_ids(conv)

    def pieces(self, text: str) -> list[tuple[int, str]]:
        """``(offset, piece)``: the pieces a text is corrected in."""
        return document_pieces(text, self.max_chars)

    def generate(self, rows: list[Row]) -> list[Completion]:
        """Decode ``rows`` in one model batch (each row's callback gets its text as it comes)."""
        self.forward_batches += 1
        return generate_rows(self.model, self.tokenizer, rows, self.generator.stop_ids())

    def chat(
        self, conv: Conversation, params: SamplingParams, on_delta: Callable[[str], None] | None = None
    ) -> Completion:
        """Answer one conversation (streamed to ``on_delta`` when given)."""
        return self.generate([Row(self.prompt_ids(conv), params, on_delta)])[0]

    def correct(self, texts: list[str]) -> tuple[list[Correction], Counter]:
        """Correct each text (a sentence or a document) in as few model batches as ``correction_batch`` allows.

        Returns:
            one :class:`Correction` per text, and the outputs replaced by their source, by reason (see
            :func:`zhtune.gec.correct.bad_output`).
        """
        pieces = [(k, offset, piece) for k, text in enumerate(texts) for offset, piece in self.pieces(text)]
        engine = _CountingEngine(self.generator)
        rows = [(str(i), piece) for i, (_k, _offset, piece) in enumerate(pieces)]
        fixed, stats = correct_rows(engine, rows, self.correction_batch, max_chars=self.max_chars)
        self.forward_batches += engine.calls
        results = [Correction(text, "", []) for text in texts]
        parts: list[list[str]] = [[] for _ in texts]
        cursor = [0] * len(texts)
        for (k, offset, piece), (_id, _src, hyp) in zip(pieces, fixed):
            parts[k] += [texts[k][cursor[k] : offset], hyp]
            cursor[k] = offset + len(piece)
            results[k].edits += text_edits(self.aligner, piece, hyp, offset)
            results[k].pieces += 1
        for k, text in enumerate(texts):
            results[k].corrected = "".join(parts[k]) + text[cursor[k] :]
        return results, Counter({r: n for r, n in stats.items() if r not in ("sentences", "pieces")})


def sampling_defaults(generation_config) -> SamplingParams:
    """Temperature and top-p a request gets when it names none: the checkpoint's own (greedy when its
    ``generation_config.json`` says ``do_sample: false`` or has none)."""
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return SamplingParams(temperature=0.0)
    return SamplingParams(
        temperature=float(generation_config.temperature or 1.0), top_p=float(generation_config.top_p or 1.0)
    )


def resolve_template(name: str | None, model_dir: str | Path, adapter: str | Path | None) -> Template:
    """The template to chat with: ``name`` if given, else the one recorded with the adapter or merged model.

    Raises:
        ConfigError: none given and none recorded.
    """
    from zhtune.model.load import recorded_template

    name = name or recorded_template(model_dir, adapter)
    if not name:
        raise ConfigError(f"no chat template recorded with {adapter or model_dir}; pass --template NAME")
    return get_template(name)


def load_backend(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    template: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    name: str | None = None,
    system: str | None = None,
) -> Backend:
    """Load a checkpoint (plus adapter) for serving.

    Args:
        model_dir: a merged model, or the base of ``adapter``.
        adapter: a LoRA adapter folder.
        template: chat template name (default: the recorded one).
        dtype: ``auto`` (bf16 on a GPU, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
        trust_remote_code: allow model code shipped in the checkpoint.
        name: the model id clients use (default: the adapter's or model's folder name).
        system: a system prompt replacing the template's default.

    Raises:
        ConfigError: missing folders, no template, an unknown dtype.
    """
    import torch

    from zhtune.model.load import load_for_inference
    from zhtune.model.tokenizer import load_tokenizer

    tmpl = resolve_template(template, model_dir, adapter)
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"--dtype {dtype!r}: expected auto, bf16, fp16 or fp32")
    tok_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model_dir
    tokenizer = load_tokenizer(tok_dir, trust_remote_code)
    model = load_for_inference(model_dir, adapter, dtype, trust_remote_code)
    return Backend(model, tokenizer, tmpl, name or Path(adapter or model_dir).resolve().name, RenderOptions(system))
