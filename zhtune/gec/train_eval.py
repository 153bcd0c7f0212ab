"""The CGEC evaluation the training loop runs every N steps: correct a dev subset, score it, report P/R/F0.5.

It is built here (the GEC layer) and handed to :func:`zhtune.train.loop.train` as an evaluator, so the training
loop stays free of GEC code. The prompt is the one training renders: the recipe's template and system prompt, and
``eval.cgec.instruction`` or else the recipe's ``data.cgec_instruction``. Decoding is the engine's greedy
speculative decoding, run eagerly (no CUDA graphs: the weights change between evaluations and the training process
needs its memory); the engine is closed after every evaluation, which gives the model its attention back.
"""

from __future__ import annotations

from pathlib import Path

from zhtune.config import CgecEvalConfig
from zhtune.data.templates import RenderOptions, Template
from zhtune.gec.align import CharAligner
from zhtune.gec.corpora import CGEC_INSTRUCTION, read_cgec
from zhtune.gec.correct import correct_and_score
from zhtune.gec.scorer import reference_edits
from zhtune.gec.tables import tables_or_empty
from zhtune.infer.engine import Generator


class CgecEvaluator:
    """``evaluator(model, tokenizer, step) -> {"cgec_precision", "cgec_recall", "cgec_f0.5"}``."""

    best_key = "cgec_f0.5"

    def __init__(
        self,
        config: CgecEvalConfig,
        template: Template,
        out_dir: Path,
        options: RenderOptions,
        default_instruction: str = CGEC_INSTRUCTION,
    ):
        self.config, self.template, self.options = config, template, options
        self.instruction = config.instruction if config.instruction is not None else default_instruction
        self.every = config.every
        self.out_dir = Path(out_dir) / "cgec_eval"
        semantic, confusion, self.tables = tables_or_empty()
        self.aligner = CharAligner(semantic, confusion)
        rows = read_cgec(config.data)[: config.limit]
        self.rows = [(r.id, r.source) for r in rows]
        self.refs = reference_edits(config.data, self.aligner, config.limit)
        if not config.keep_best:
            self.best_key = None

    def __call__(self, model, tokenizer, step: int) -> dict:
        generator = Generator(model, tokenizer, self.template, self.options, speculative=True, graphs=False)
        try:
            result = correct_and_score(
                generator,
                self.rows,
                self.refs,
                self.aligner,
                self.out_dir / f"step-{step:07d}.para",
                self.config.batch_size,
                self.instruction,
            )
        finally:
            generator.close()
        fallbacks = sum(result["fallbacks"].values())
        return {
            "cgec_precision": result["precision"],
            "cgec_recall": result["recall"],
            "cgec_f0.5": result["f0.5"],
            "cgec_fallbacks": fallbacks,
        }


def build_evaluators(recipe) -> list:
    """The in-loop evaluators a recipe asks for (today: ``eval.cgec``)."""
    if recipe.eval.cgec is None:
        return []
    from zhtune.data.templates import get_template

    options = RenderOptions(system=recipe.template.system, enable_thinking=recipe.template.enable_thinking)
    template = get_template(recipe.template.name)
    out = Path(recipe.output.dir)
    return [CgecEvaluator(recipe.eval.cgec, template, out, options, default_instruction=recipe.data.cgec_instruction)]
