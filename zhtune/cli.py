"""The ``zhtune`` command: one subcommand per plain function, errors printed without tracebacks."""

from __future__ import annotations

import argparse
import sys

from zhtune import __version__
from zhtune.errors import ZhtuneError


def _refuse_overwrite(path: str | None, force: bool) -> None:
    """Stop before any work when an output file exists and --force was not given (user data is never overwritten)."""
    from pathlib import Path

    if path and Path(path).exists() and not force:
        raise ZhtuneError(f"{path} exists; pass --force to overwrite it")


def render(args: argparse.Namespace) -> int:
    """``zhtune render``: print rendered samples with supervised spans highlighted, or write ids/labels."""
    from zhtune.config import DataConfig, TokenizeConfig
    from zhtune.data.formats import load_conversations
    from zhtune.data.inspect import highlight, write_jsonl
    from zhtune.data.templates import RenderOptions, get_template
    from zhtune.data.tokenize import tokenize_dataset
    from zhtune.model.tokenizer import load_tokenizer

    _refuse_overwrite(args.out, args.force)
    template = get_template(args.template)
    tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
    data_cfg = DataConfig(paths=tuple(args.data), format=args.format, on_error=args.on_error)
    convs, load_report = load_conversations(data_cfg.paths, data_cfg)
    if args.limit is not None:
        convs = convs[: args.limit]
    tok_cfg = TokenizeConfig(
        cutoff_len=args.cutoff_len,
        overflow=args.overflow,
        train_on_prompt=args.train_on_prompt,
        mask_history=args.mask_history,
    )
    options = RenderOptions(system=args.system, enable_thinking=args.enable_thinking)
    samples, report = tokenize_dataset(convs, tokenizer, template, tok_cfg, options)
    if args.out:
        write_jsonl(samples, args.out, overwrite=True)  # refused above, before any work, unless --force
        print(f"wrote {len(samples)} samples to {args.out}", file=sys.stderr)
    else:
        color = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
        for s in samples[: args.show]:
            print(f"=== {s.origin} ({len(s.input_ids)} tokens)")
            print(highlight(s, tokenizer, color) + "\n")
    print(f"data: {load_report.summary()}", file=sys.stderr)
    print(f"tokens: {report.summary()}", file=sys.stderr)
    return 0


def templates(args: argparse.Namespace) -> int:
    """``zhtune templates``: list the registered chat templates."""
    from zhtune.data.templates import TEMPLATES

    for name, t in sorted(TEMPLATES.items()):
        print(f"{name:18s} {t.tokenization:7s} {t.description}")
    return 0


def merge(args: argparse.Namespace) -> int:
    """``zhtune merge``: fold adapters into the base, verify numerically, write merge_report.json."""
    import time
    from pathlib import Path

    from zhtune.merge.merge import merge_adapters, write_report
    from zhtune.merge.verify import verify_merge

    result = merge_adapters(
        args.base, args.adapter, args.out, args.dtype, args.allow_base_mismatch, args.trust_remote_code
    )
    checks, t0 = None, time.perf_counter()
    if not args.no_verify:
        checks = verify_merge(
            Path(args.base),
            [Path(a) for a in args.adapter],
            result.out,
            trust_remote_code=args.trust_remote_code,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    report = write_report(result, checks, args.dtype, time.perf_counter() - t0)
    print(
        f"merged {len(args.adapter)} adapter(s) into {result.out}: {result.tensors_changed} tensors changed, "
        f"{result.shards} shard(s), {result.seconds:.1f}s, peak RSS +{result.peak_rss_growth_mb:.0f} MB"
    )
    for c in report["checks"]:
        status = "ok  " if c["passed"] else "WAIVED" if c.get("waived") else "FAIL"
        print(f"  {status} {c['check']}" + "".join(f"\n       {p}" for p in c.get("problems") or []))
    if report["passed"] is False:
        failed = [c["check"] for c in report["checks"] if not c["passed"]]
        raise ZhtuneError(f"merge verification failed: {', '.join(failed)} (see {result.out}/merge_report.json)")
    return 0


def convert(args: argparse.Namespace) -> int:
    """``zhtune convert``: an original ChatGLM checkpoint (or adapter) to the native layout; ``--to chatglm`` back."""
    from zhtune.model.convert import convert_checkpoint, convert_to_original

    if args.adapter:
        from zhtune.model.convert.adapters import convert_adapter

        if not args.base or args.src:
            raise ZhtuneError(
                "convert --adapter ADAPTER needs --base ORIGINAL (the checkpoint it was trained on), no SRC"
            )
        s = convert_adapter(args.adapter, args.base, args.out)
        print(
            f"converted {args.variant or s['variant']} adapter {args.adapter} -> {args.out}: {s['tensors_in']} -> "
            f"{s['tensors_out']} tensors, target_modules {', '.join(s['target_modules'])}"
        )
        return 0
    if not args.src:
        raise ZhtuneError("give SRC (a checkpoint folder), or --adapter ADAPTER --base ORIGINAL")
    if args.to == "chatglm":
        s = convert_to_original(args.src, args.out, args.original)
        copied = ", ".join(s["side_files"]) or "none: copy the original code and tokenizer files beside it"
        print(f"wrote the original {s['variant']} layout to {args.out} ({s['shards']} shard(s)); side files: {copied}")
        return 0
    s = convert_checkpoint(args.src, args.out, args.variant)
    print(
        f"converted {s['variant']} -> {args.out}: model_type {s['model_type']} ({s['rope']}), {s['shards']} "
        f"shard(s), tokenizer {s['tokenizer']}"
    )
    return 0


def train(args: argparse.Namespace) -> int:
    """``zhtune train RECIPE.yaml [key=value ...]``: LoRA tuning as the recipe says."""
    from zhtune.config import load_recipe
    from zhtune.gec.train_eval import build_evaluators
    from zhtune.train.loop import train as run_training

    recipe = load_recipe(args.recipe, args.overrides)
    summary = run_training(recipe, build_evaluators(recipe))
    if "adapter" in summary:
        print(f"adapter: {summary['adapter']}  (steps {summary['steps']}, last loss {summary['last'].get('loss')})")
    return 0


def prepare(args: argparse.Namespace) -> int:
    """``zhtune prepare RECIPE.yaml``: tokenize and pack the recipe's data into the cache (or find it there)."""
    import json

    from zhtune.config import load_recipe
    from zhtune.data.cache import cache_dir, clean_cache, prepare_data
    from zhtune.model.tokenizer import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    if args.clean:
        removed, freed = clean_cache(recipe.data)
        print(f"removed {removed} prepared data set(s) from {cache_dir(recipe.data)}, {freed / 2**20:.1f} MB freed")
        return 0
    prepared = prepare_data(
        recipe, lambda: load_tokenizer(recipe.model.tokenizer or recipe.model.path, recipe.model.trust_remote_code)
    )
    if args.json:
        counts = {k: v for k, v in prepared.layout_meta.items() if k not in ("train", "val")}
        for split in ("train", "val"):
            counts[split] = {k: v for k, v in prepared.layout_meta[split].items() if k != "summary"}
        meta = {k: v for k, v in prepared.meta.items() if k not in ("inputs", "key")}
        head = {"cache": str(prepared.layout_folder), "built": list(prepared.built), "seconds": prepared.seconds}
        print(json.dumps({**head, "load": meta, **counts}, ensure_ascii=False))
        return 0
    print(prepared.describe())
    for name, text in prepared.reports().items():
        print(f"{name}: {text}")
    return 0


def score(args: argparse.Namespace) -> int:
    """``zhtune score``: ChERRANT char-level P/R/F0.5 of a hypothesis para file against M2 or para references."""
    import json

    from zhtune.gec.scorer import score_files

    result = score_files(args.hyp, args.ref, args.tables, args.beta)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    f_key = f"f{args.beta}"
    print("TP\tFP\tFN\tPrec\tRec\tF" + str(args.beta))
    print(f"{result['tp']}\t{result['fp']}\t{result['fn']}\t{result['precision']}\t{result['recall']}\t{result[f_key]}")
    print("\ntype  TP     FP     FN     P       R       F" + str(args.beta))
    for cat, c in result["per_type"].items():
        print(f"{cat:5s} {c['tp']:<6d} {c['fp']:<6d} {c['fn']:<6d} {c['precision']:<7} {c['recall']:<7} {c[f_key]}")
    rate = result["overcorrection_rate"]
    print(f"\nover-correction on {result['no_edit_gold_sentences']} edit-free gold sentences: {rate}")
    print(
        f"{result['sentences']} sentences ({result['skipped_unannotatable']} skipped as 无法标注), "
        f"{result['seconds']} s"
    )
    if result["truncated_alignments"]:
        print(f"note: {result['truncated_alignments']} pair(s) had too many cheapest alignments and used the first")
    return 0


def correct(args: argparse.Namespace) -> int:
    """``zhtune correct``: batched greedy correction of a file, written as id<TAB>source<TAB>hypothesis."""
    from pathlib import Path

    from zhtune.gec.correct import correct_rows, correction_settings, corrector, read_inputs, write_para
    from zhtune.model.load import load_for_inference, recorded_settings
    from zhtune.model.tokenizer import load_tokenizer

    _refuse_overwrite(args.output, args.force)
    settings = correction_settings(
        recorded_settings(args.model, args.adapter), args.template, args.system, args.instruction
    )
    rows = read_inputs(args.input)
    tokenizer = load_tokenizer(
        args.adapter if args.adapter and (Path(args.adapter) / "tokenizer_config.json").exists() else args.model,
        args.trust_remote_code,
    )
    model = load_for_inference(args.model, args.adapter, args.dtype, args.trust_remote_code)
    invariant = False if args.no_batch_invariant else "auto"
    generator = corrector(model, tokenizer, settings, speculative=not args.no_speculative, invariant=invariant)
    fixed, stats = correct_rows(
        generator,
        rows,
        args.batch_size,
        settings.instruction,
        max_chars=args.max_chars,
        fallback=not args.no_fallback,
    )
    write_para(fixed, args.output)
    fallbacks = {k: v for k, v in stats.items() if k not in ("sentences", "pieces")}
    verb = "counted (kept as written, --no-fallback)" if args.no_fallback else "fell back to the source"
    print(
        f"corrected {stats['sentences']} sentences ({stats['pieces']} pieces) -> {args.output}; "
        f"{verb}: {dict(fallbacks) or 'none'}"
    )
    speed = generator.stats.as_dict()
    mode = "plain greedy" if args.no_speculative else "speculative"
    mode += ", batch-invariant kernels" if generator.engine.invariant else ""
    print(
        f"{stats['sentences'] / max(speed['seconds'], 1e-9):.2f} sentences/s, {speed['tokens_per_s']} tokens/s, "
        f"mean accepted length {speed['mean_accepted_length']} ({mode}; template {settings.template})"
    )
    generator.close()
    return 0


def tables(args: argparse.Namespace) -> int:
    """``zhtune tables download``: fetch ChERRANT's lookup tables (checked by sha256) into the cache."""
    from zhtune.gec.tables import download_tables

    dest = download_tables(args.url, args.dest)
    print(f"ChERRANT tables in {dest}: zhtune score finds them there")
    return 0


def noise(args: argparse.Namespace) -> int:
    """``zhtune noise``: corrupt correct sentences into (noisy, clean) pairs; print the edit distribution."""
    import json
    from pathlib import Path

    from zhtune.gec.correct import read_inputs
    from zhtune.gec.noise import NoiseGenerator, noise_stats

    _refuse_overwrite(args.output, args.force)
    gen = NoiseGenerator(args.seed)
    rows = read_inputs(args.input)
    results = [(rid, *gen.corrupt(src), src) for rid, src in rows]
    if args.output:
        Path(args.output).write_text(
            "".join(f"{rid}\t{noisy}\t{clean}\n" for rid, noisy, _k, clean in results), encoding="utf-8"
        )
    print(json.dumps(noise_stats([k for _r, _n, k, _c in results]), ensure_ascii=False, indent=2))
    return 0


def pipeline(args: argparse.Namespace) -> int:
    """``zhtune pipeline RECIPE.yaml``: run (or with --status, show) the stages of a pipeline."""
    from zhtune.pipeline.config import load_pipeline
    from zhtune.pipeline.runner import PipelineRunner, stage_states

    config = load_pipeline(args.recipe)
    if args.status:
        for name, kind, state in stage_states(config):
            print(f"{name:24s} {kind:10s} {state}")
        return 0
    summary = PipelineRunner(config).run()
    print("report: " + ", ".join(summary["report"]))
    return 0


def demo(args: argparse.Namespace) -> int:
    """``zhtune demo``: build a tiny model and data from packaged text and run the whole pipeline on CPU."""
    import time
    from pathlib import Path

    from zhtune.pipeline.config import load_pipeline
    from zhtune.pipeline.demo import prepare_demo
    from zhtune.pipeline.runner import PipelineRunner

    start = time.perf_counter()
    recipe = prepare_demo(Path(args.out))
    summary = PipelineRunner(load_pipeline(recipe)).run()
    final = load_pipeline(recipe).work_dir
    print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {', '.join(summary['report'])}")
    print(f"final merged model (loads with transformers): {final}/04-merge_cgec/model")
    return 0


def cgec_data(args: argparse.Namespace) -> int:
    """``zhtune cgec-data``: CGEC corpora -> training JSON Lines, with evaluation-overlap removal reported."""
    import json
    from pathlib import Path

    from zhtune.gec.corpora import CGEC_INSTRUCTION, evaluation_sentences, read_cgec, remove_overlap

    _refuse_overwrite(args.out, args.force)
    out = Path(args.out)
    rows = [r for path in args.train for r in read_cgec(path)]
    without_ref = sum(1 for r in rows if not r.refs)
    rows = [r for r in rows if r.refs]
    report = {"read": len(rows) + without_ref, "without_reference": without_ref}
    if args.exclude:
        rows, removed = remove_overlap(rows, evaluation_sentences(args.exclude))
        report.update(removed)
    instruction = args.instruction if args.instruction is not None else CGEC_INSTRUCTION
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            for ref in row.refs[:1] if args.refs == "first" else row.refs:
                f.write(
                    json.dumps({"instruction": instruction, "input": row.source, "output": ref}, ensure_ascii=False)
                    + "\n"
                )
                n += 1
    report["samples_written"] = n
    print(json.dumps(report, ensure_ascii=False))
    return 0


def _serving_backend(args: argparse.Namespace, model: str | None = None, adapter: str | None = None):
    """The backend ``chat``, ``serve`` and ``webui`` load from their common flags."""
    from zhtune.serve.backend import load_backend

    return load_backend(
        model or args.model,
        adapter,
        args.template,
        args.dtype,
        args.trust_remote_code,
        name=getattr(args, "model_name", None),
    )


def chat(args: argparse.Namespace) -> int:
    """``zhtune chat``: a terminal chat, streamed, with history; ``--compare BASE`` answers from both models."""
    from zhtune.serve.chat import Participant, chat_loop
    from zhtune.serve.generation import SamplingParams

    tuned = _serving_backend(args, args.model, args.adapter)
    participants = [Participant("tuned" if args.compare else tuned.name, tuned)]
    if args.compare:
        participants.append(Participant("base", _serving_backend(args, args.compare)))
    defaults = tuned.default_sampling
    params = SamplingParams(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    return chat_loop(participants, params, system=args.system)


def serve(args: argparse.Namespace) -> int:
    """``zhtune serve``: the OpenAI-compatible API with /v1/corrections (FastAPI + uvicorn)."""
    try:
        from zhtune.serve.api import ServeLimits
        from zhtune.serve.api import serve as run_server
    except ImportError as exc:
        raise ZhtuneError(f"zhtune serve needs FastAPI and uvicorn ({exc}): pip install 'zhtune[serve]'") from None
    backend = _serving_backend(args, args.model, args.adapter)
    limits = ServeLimits(max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body_bytes)
    where = f"http://{args.host}:{args.port}/v1"
    print(f"serving {backend.name!r} ({backend.template.name} template) at {where}", file=sys.stderr, flush=True)
    run_server(backend, args.host, args.port, args.api_key, limits, args.max_batch)
    return 0


def webui(args: argparse.Namespace) -> int:
    """``zhtune webui``: a Gradio page with correction, chat and training-metrics tabs."""
    try:
        from zhtune.serve.webui import build_page, launch
    except ImportError as exc:
        raise ZhtuneError(f"zhtune webui needs Gradio ({exc}): pip install 'zhtune[webui]'") from None
    from zhtune.serve.batcher import Batcher

    backend = _serving_backend(args, args.model, args.adapter)
    batcher = Batcher(backend).start()
    print(f"web page for {backend.name!r} at http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        launch(build_page(backend, batcher, args.run), args.host, args.port)
    finally:
        batcher.close()
    return 0


class _SubcommandsWithCommonOptions:
    """``add_parser`` that gives every subcommand the common options (``--verbose``)."""

    def __init__(self, subparsers, common: argparse.ArgumentParser):
        self.subparsers, self.common = subparsers, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, parents=[self.common], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zhtune", description="LoRA tuning, merging and CGEC evaluation for Chinese LLMs."
    )
    parser.add_argument("--version", action="version", version=f"zhtune {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="show the libraries' progress bars, warnings and log lines too"
    )
    sub = _SubcommandsWithCommonOptions(parser.add_subparsers(dest="command", metavar="COMMAND"), common)

    p = sub.add_parser("render", help="show what the model sees: rendered prompts, supervised spans, lengths")
    p.add_argument("--tokenizer", required=True, help="local tokenizer or checkpoint directory")
    p.add_argument("--template", required=True, help="chat template name (see `zhtune templates`)")
    p.add_argument("--data", required=True, nargs="+", help="data file(s): JSON, JSON Lines, .gz, para")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N conversations")
    p.add_argument("--out", default=None, help="write {input_ids, labels} JSON Lines here instead of printing")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--show", type=int, default=3, help="how many samples to print (default 3)")
    p.add_argument("--system", default=None, help="override the template's default system prompt")
    p.add_argument("--enable-thinking", action="store_true", help="qwen3: train with <think> blocks")
    p.add_argument("--cutoff-len", type=int, default=2048)
    p.add_argument("--overflow", choices=["truncate", "drop"], default="truncate")
    p.add_argument("--train-on-prompt", action="store_true")
    p.add_argument("--mask-history", action="store_true")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a tokenizer class shipped as code")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=render)

    p = sub.add_parser("train", help="LoRA instruction tuning from a YAML recipe (torchrun/accelerate for N GPUs)")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=train)

    p = sub.add_parser("prepare", help="tokenize and pack a recipe's data once into the cache that train maps")
    p.add_argument("recipe", help="recipe YAML (the data, template, tokenize and model.tokenizer sections count)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for train")
    p.add_argument("--clean", action="store_true", help="remove every prepared data set in the cache folder and exit")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.set_defaults(func=prepare)

    p = sub.add_parser("merge", help="fold LoRA adapters into the base weights, shard by shard, and verify")
    p.add_argument("--base", required=True, help="base checkpoint folder (safetensors)")
    p.add_argument("--adapter", required=True, action="append", help="adapter folder; repeat to apply in order")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="output dtype (default: base's)")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric verification")
    p.add_argument("--allow-base-mismatch", action="store_true", help="merge onto a base with another fingerprint")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped in the checkpoint")
    p.set_defaults(func=merge)

    p = sub.add_parser(
        "convert", help="original ChatGLM-6B/2/3, GLM-4-9B-chat checkpoints (or their LoRA adapters) to native layouts"
    )
    p.add_argument("src", nargs="?", help="checkpoint folder to convert (original, or native with --to chatglm)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--variant",
        choices=["chatglm", "chatglm2", "chatglm3", "glm4"],
        default=None,
        help="the release, when the folder cannot tell (ChatGLM2 vs ChatGLM3 without their code files)",
    )
    p.add_argument(
        "--to",
        choices=["native", "chatglm"],
        default="native",
        help="native (default): no remote code; chatglm: back to the original layout",
    )
    p.add_argument("--original", default=None, help="with --to chatglm: original folder to copy code/tokenizer from")
    p.add_argument("--adapter", default=None, help="convert this peft adapter (trained on the original) instead")
    p.add_argument("--base", default=None, help="with --adapter: the original checkpoint the adapter was trained on")
    p.set_defaults(func=convert)

    p = sub.add_parser("score", help="CGEC score: ChERRANT char-level P/R/F0.5, per-type, over-correction")
    p.add_argument("--hyp", required=True, help="hypothesis para file: id<TAB>source<TAB>hypothesis")
    p.add_argument("--ref", required=True, help="char-level M2 file or multi-reference para file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--tables", default=None, help="folder with ChERRANT's cilin.txt and confusion_dict.txt")
    p.set_defaults(func=score)

    p = sub.add_parser("correct", help="correct sentences with a model (+ adapter): writes id<TAB>src<TAB>hyp")
    p.add_argument("--model", required=True, help="checkpoint folder (a merged model, or the base of --adapter)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder")
    p.add_argument("--input", required=True, help="id<TAB>source lines, or one sentence per line")
    p.add_argument("--output", required=True, help="hypothesis para file to write")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--template", default=None, help="chat template (default: the one recorded at training)")
    p.add_argument("--system", default=None, help="system prompt (default: the one recorded at training)")
    p.add_argument("--instruction", default=None, help="instruction before each sentence (default: the recorded one)")
    p.add_argument("--max-chars", type=int, default=128, help="split longer inputs at sentence ends")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto: bf16 on GPU")
    p.add_argument("--no-speculative", action="store_true", help="plain greedy decoding, no input-copy drafts")
    p.add_argument(
        "--no-batch-invariant",
        action="store_true",
        help="torch's GEMM kernels on the GPU instead of the batch-invariant ones (bf16 outputs may then depend on "
        "--batch-size)",
    )
    p.add_argument("--no-fallback", action="store_true", help="write the model's first line even when it is bad")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    p.set_defaults(func=correct)

    p = sub.add_parser("cgec-data", help="CGEC corpora (para, M2, FCGEC JSON) -> training JSON Lines")
    p.add_argument("--train", nargs="+", required=True, help="training corpora: para, char-level M2 or FCGEC JSON")
    p.add_argument("--exclude", nargs="*", default=[], help="evaluation sets whose sentences must not be trained on")
    p.add_argument("--out", required=True, help="alpaca-format JSON Lines to write")
    p.add_argument("--refs", choices=["first", "each"], default="first", help="first reference or one sample each")
    p.add_argument("--instruction", default=None, help="correction instruction (default: zhtune's)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cgec_data)

    p = sub.add_parser("noise", help="make (noisy, clean) CGEC pairs from correct sentences; print the distribution")
    p.add_argument("--input", required=True, help="correct sentences: one per line, or id<TAB>sentence")
    p.add_argument("--output", default=None, help="para file id<TAB>noisy<TAB>clean to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=noise)

    p = sub.add_parser("tables", help="ChERRANT's lookup tables for zhtune score: `zhtune tables download`")
    tables_sub = p.add_subparsers(dest="tables_command", metavar="ACTION", required=True)
    q = tables_sub.add_parser(
        "download", parents=[common], help="fetch cilin.txt and confusion_dict.txt, check their sha256"
    )
    q.add_argument("--url", default=None, help="base URL of the two files (default: ChERRANT's repository)")
    q.add_argument("--dest", default=None, help="folder to write (default: ~/.cache/zhtune/cherrant_tables)")
    q.set_defaults(func=tables)

    p = sub.add_parser("pipeline", help="instruct LoRA → merge → CGEC LoRA → merge → evaluate, with lineage")
    p.add_argument("recipe", help="pipeline YAML (see recipes/pipeline/)")
    p.add_argument("--status", action="store_true", help="show each stage as done / stale / pending")
    p.set_defaults(func=pipeline)

    p = sub.add_parser("demo", help="the whole pipeline on a tiny model built from packaged text, on CPU")
    p.add_argument("--out", default="zhtune-demo", help="folder for the demo's model, data and run")
    p.set_defaults(func=demo)

    def serving_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="checkpoint folder (a merged model, or the base of --adapter)")
        p.add_argument("--adapter", default=None, help="LoRA adapter folder")
        p.add_argument("--template", default=None, help="chat template (default: the one recorded at training)")
        p.add_argument(
            "--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto: bf16 on a GPU, fp32 on CPU"
        )
        p.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped in the checkpoint")

    p = sub.add_parser("chat", help="chat with a model in the terminal (streamed; /system, /clear, /exit)")
    serving_flags(p)
    p.add_argument("--compare", default=None, metavar="BASE_DIR", help="also answer every question with this model")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: the checkpoint's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=512, help="the longest answer in tokens")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=chat)

    p = sub.add_parser("serve", help="OpenAI-compatible API (+ /v1/corrections) for one GPU or a laptop")
    serving_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=32, help="most chat requests decoded in one batch")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="the largest request body")
    p.set_defaults(func=serve)

    p = sub.add_parser("webui", help="Gradio page: correction with highlighted edits, chat, training metrics")
    serving_flags(p)
    p.add_argument("--run", default=None, help="training output folder whose metrics.jsonl the metrics tab plots")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=webui)

    p = sub.add_parser("templates", help="list chat templates")
    p.set_defaults(func=templates)
    return parser


def main(argv: list[str] | None = None) -> int:
    from zhtune.console import configure_console

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_console(getattr(args, "verbose", False))
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ZhtuneError as exc:
        print(f"zhtune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
