"""Run a pipeline with lineage: skip what is done, resume what was interrupted, redo what is stale.

Every stage gets a folder ``WORK/NN-name`` and a ``manifest.json`` (inputs and their fingerprints, outputs, metrics,
wall time, peak memory). A stage's fingerprint hashes its own settings, the contents of the data files it reads and
the fingerprint of the stage before it (the first one hashes the base model's content), so changing a data
file changes exactly that stage and everything after it. A stage whose manifest says ``done`` with the same
fingerprint is skipped; one left ``running`` with the same fingerprint is resumed (``sft`` from its last
checkpoint); a stale one (or one after a stage that ran) is removed and run again. Models count by content: a
stage whose input model, or a merge whose output model, has other bytes than when it ran is stale
(:mod:`zhtune.pipeline.manifest`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.memory import peak_rss_mb, reset_peak_rss
from zhtune.model.checkpoint_files import MERGE_REPORT, base_fingerprint, file_sha256
from zhtune.pipeline.config import PipelineConfig, StageConfig
from zhtune.pipeline.manifest import model_fingerprint_or_none, read_manifest, stale_reason, write_manifest


@dataclass
class StagePlan:
    index: int
    config: StageConfig
    dir: Path
    fingerprint: str
    data_files: dict[str, str]  # path -> sha256


def _data_files(stage: StageConfig) -> list[str]:
    if stage.kind == "sft":
        recipe = stage.recipe or {}
        paths = list((recipe.get("data") or {}).get("paths") or [])
        cgec = ((recipe.get("eval") or {}).get("cgec") or {}).get("data")
        return paths + ([cgec] if cgec else [])
    if stage.kind == "eval_cgec":
        return [p for s in stage.sets for p in (s.input, s.ref)]
    return []


def plan_pipeline(config: PipelineConfig) -> list[StagePlan]:
    """Fingerprint every stage (cheap: tensor headers and file hashes only)."""
    work = Path(config.work_dir)
    prev = hashlib.sha256(f"{base_fingerprint(config.base)}|{config.template}|{config.system}".encode()).hexdigest()
    plans = []
    for i, stage in enumerate(config.stages):
        files = {p: file_sha256(Path(p)) for p in _data_files(stage)}
        # files count by content, not by path: a moved or copied data file with the same bytes changes nothing
        settings = _by_content(dataclasses.asdict(stage), files)
        payload = json.dumps({"prev": prev, "stage": settings}, sort_keys=True)
        prev = hashlib.sha256(payload.encode()).hexdigest()
        plans.append(StagePlan(i, stage, work / f"{i + 1:02d}-{stage.name}", prev[:16], files))
    return plans


def _by_content(value, files: dict[str, str]):
    if isinstance(value, str):
        return f"sha256:{files[value]}" if value in files else value
    if isinstance(value, dict):
        return {k: _by_content(v, files) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_by_content(v, files) for v in value]
    return value


def stage_states(config: PipelineConfig) -> list[tuple[str, str, str]]:
    """``(name, kind, state)`` with state ``done``, ``stale`` (its settings, data or models changed since it ran, or a
    stage before it is stale) or ``pending``."""
    out, upstream_stale = [], False
    for plan in plan_pipeline(config):
        m = read_manifest(plan.dir)
        if m is None:
            state = "pending"
        elif m["fingerprint"] != plan.fingerprint or upstream_stale or (m["status"] == "done" and stale_reason(m)):
            state = "stale"
        else:
            state = "done" if m["status"] == "done" else "pending"
        upstream_stale = upstream_stale or state == "stale"
        out.append((plan.config.name, plan.config.kind, state))
    return out


class PipelineRunner:
    """Holds the lineage while stages run: the current model, the last adapter, named models for comparison."""

    def __init__(self, config: PipelineConfig, log=print):
        self.config, self.log = config, log
        self.current_model = config.base
        self.last_adapter: str | None = None
        self.models = {"base": config.base}

    def run(self) -> dict:
        plans = plan_pipeline(self.config)
        Path(self.config.work_dir).mkdir(parents=True, exist_ok=True)
        summary, rerun = {"stages": []}, False
        for plan in plans:
            m = read_manifest(plan.dir)
            same = bool(m and m["fingerprint"] == plan.fingerprint and not rerun)
            why = stale_reason(m) if same and m["status"] == "done" else None
            if same and m["status"] == "done" and not why:
                self.log(f"[{plan.config.name}] done, skipped")
                self._adopt(plan.config, m["outputs"])
                summary["stages"].append({"name": plan.config.name, "action": "skipped"})
                continue
            rerun = True  # everything after a stage that runs sees new inputs
            resume = same and m["status"] == "running"
            if m and not resume:
                why = why or "its settings, data or an earlier stage changed"
                self.log(f"[{plan.config.name}] stale ({why}), running again")
                shutil.rmtree(plan.dir)
            plan.dir.mkdir(parents=True, exist_ok=True)
            manifest = {
                "name": plan.config.name,
                "kind": plan.config.kind,
                "status": "running",
                "fingerprint": plan.fingerprint,
                "inputs": self._inputs(plan),
                "started": time.time(),
            }
            write_manifest(plan.dir, manifest)
            self.log(f"[{plan.config.name}] {'resuming' if resume else 'running'} {plan.config.kind}")
            reset_peak_rss()
            t0 = time.perf_counter()
            outputs, metrics = getattr(self, f"_run_{plan.config.kind}")(plan, resume)
            manifest.update(
                status="done",
                outputs=outputs,
                metrics=metrics,
                wall_s=round(time.perf_counter() - t0, 2),
                peak_rss_mb=peak_rss_mb(),
            )
            write_manifest(plan.dir, manifest)
            self._adopt(plan.config, outputs)
            summary["stages"].append({"name": plan.config.name, "action": "resumed" if resume else "ran"})
        from zhtune.pipeline.report import write_report

        summary["report"] = [str(p) for p in write_report(self.config, plans)]
        return summary

    def _inputs(self, plan: StagePlan) -> dict:
        inputs = {
            "model": self.current_model,
            "model_fingerprint": model_fingerprint_or_none(self.current_model),
            "data": plan.data_files,
        }
        if plan.config.kind == "merge":
            inputs["adapter"] = self.last_adapter
        return inputs

    def _adopt(self, stage: StageConfig, outputs: dict) -> None:
        if stage.kind == "sft":
            self.last_adapter = outputs["adapter"]
        elif stage.kind == "merge":
            self.current_model = outputs["model"]
            self.models[stage.name] = outputs["model"]

    # -- stages -------------------------------------------------------------------------------------------------
    def _run_sft(self, plan: StagePlan, resume: bool) -> tuple[dict, dict]:
        from zhtune.config import recipe_from_dict
        from zhtune.gec.train_eval import build_evaluators
        from zhtune.train.loop import train

        tree = copy.deepcopy(plan.config.recipe or {})
        tree.setdefault("model", {})["path"] = self.current_model
        tree["model"].setdefault("trust_remote_code", self.config.trust_remote_code)
        tree.setdefault("template", {}).setdefault("name", self.config.template)
        if self.config.system is not None:
            tree["template"].setdefault("system", self.config.system)
        out = plan.dir / "train"
        tree.setdefault("output", {})["dir"] = str(out)
        if resume and (out / "checkpoints" / "latest").exists():
            tree.setdefault("train", {})["resume_from"] = "latest"
        elif out.exists():
            shutil.rmtree(out)  # interrupted before its first checkpoint: start the stage over
        recipe = recipe_from_dict(tree, f"stage {plan.config.name}")
        summary = train(recipe, build_evaluators(recipe))
        metrics = {k: v for k, v in summary["last"].items() if isinstance(v, (int, float))}
        if summary.get("best"):
            metrics["best"] = summary["best"]
        return {"adapter": summary["adapter"], "loss_png": summary.get("plot"), "train_dir": str(out)}, metrics

    def _run_merge(self, plan: StagePlan, resume: bool) -> tuple[dict, dict]:
        from zhtune.merge.merge import merge_adapters, write_report
        from zhtune.merge.verify import verify_merge

        out = plan.dir / "model"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        remote = self.config.trust_remote_code
        dtype = plan.config.dtype
        result = merge_adapters(self.current_model, [self.last_adapter], out, dtype, trust_remote_code=remote)
        checks = None
        if plan.config.verify:
            checks = verify_merge(Path(self.current_model), [Path(self.last_adapter)], out, trust_remote_code=remote)
        report = write_report(result, checks, plan.config.dtype, time.perf_counter() - t0 - result.seconds)
        if report["passed"] is False:
            failed = [c["check"] for c in report["checks"] if not c["passed"]]
            raise ZhtuneError(f"stage {plan.config.name}: merge verification failed: {failed}")
        outputs = {"model": str(out), "model_fingerprint": result.fingerprint, "merge_report": str(out / MERGE_REPORT)}
        return outputs, {
            "verified": report["passed"],
            "checks": {c["check"]: c["passed"] for c in report["checks"]},
            "tensors_changed": report["tensors_changed"],
        }

    def _run_eval_cgec(self, plan: StagePlan, resume: bool) -> tuple[dict, dict]:
        """Correct and score every set with the final model and each compared one, one model in memory at a time
        (bf16 on a GPU), each prompted as it was trained (its recorded template, system prompt and instruction;
        the pipeline's template and system and the last sft stage's instruction where nothing is recorded)."""
        import gc

        import torch

        from zhtune.gec.align import CharAligner
        from zhtune.gec.correct import correct_and_score, correction_settings, corrector, read_inputs
        from zhtune.gec.scorer import reference_edits
        from zhtune.gec.tables import tables_or_empty
        from zhtune.model.load import load_for_inference, recorded_settings
        from zhtune.model.tokenizer import load_tokenizer

        semantic, confusion, tables = tables_or_empty()
        aligner = CharAligner(semantic, confusion)
        defaults = {"template": self.config.template, "system": self.config.system}
        for stage in self.config.stages[: plan.index]:
            data = ((stage.recipe or {}).get("data") or {}) if stage.kind == "sft" else {}
            if data.get("cgec_instruction") is not None:
                defaults["instruction"] = data["cgec_instruction"]
        results: dict[str, dict] = {}
        named = [("final", self.current_model)] + [(c, self.models[c]) for c in plan.config.compare]
        # the references are aligned once per set (the slow part), not once per compared model
        refs_of = {s.name: reference_edits(s.ref, aligner, s.limit or None) for s in plan.config.sets}
        for model_name, path in named:
            recorded = {k: v for k, v in recorded_settings(path).items() if v is not None}
            settings = correction_settings({**defaults, **recorded})
            tokenizer = load_tokenizer(path, self.config.trust_remote_code)
            model = load_for_inference(path, trust_remote_code=self.config.trust_remote_code)
            generator = corrector(model, tokenizer, settings)
            try:
                for s in plan.config.sets:
                    rows, refs = read_inputs(s.input)[: s.limit or None], refs_of[s.name]
                    out_para = plan.dir / f"{model_name}.{s.name}.para"
                    r = correct_and_score(
                        generator, rows, refs, aligner, out_para, plan.config.batch_size, settings.instruction
                    )
                    results.setdefault(model_name, {})[s.name] = r
            finally:
                generator.close()
                del generator, model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        scorer = "ChERRANT char-level" if tables else "ChERRANT char-level, approximate (tables not found)"
        return {"hypotheses": sorted(str(p) for p in plan.dir.glob("*.para"))}, {"cgec": results, "scorer": scorer}
