"""``report.md`` and ``report.html`` (PNG plots embedded) from the stage manifests of a pipeline run."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from zhtune.pipeline.config import PipelineConfig
from zhtune.pipeline.manifest import read_manifest

APPROXIMATE = (
    " These numbers are approximate: ChERRANT's lookup tables (cilin.txt, confusion_dict.txt) were not found, so every"
    " character substitution gets ChERRANT's unknown-class cost and a few edits can be split or merged differently from"
    " the official scorer; gains between models stay comparable. Run `zhtune tables download` for exact figures."
)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sections(config: PipelineConfig, plans) -> list[tuple[str, str, list[Path]]]:
    """``(title, markdown body, images)`` per report section."""
    manifests = [(p, read_manifest(p.dir) or {}) for p in plans]
    stages = [
        [
            p.config.name,
            p.config.kind,
            m.get("status", "pending"),
            p.fingerprint,
            m.get("wall_s", "-"),
            round(m["peak_rss_mb"]) if m.get("peak_rss_mb") else "-",
        ]
        for p, m in manifests
    ]
    out = [
        (
            "Stages",
            f"Base model: `{config.base}` · template `{config.template}` · work dir `{config.work_dir}`\n\n"
            + _table(["stage", "kind", "status", "input fingerprint", "wall s", "peak RSS MB"], stages),
            [],
        )
    ]
    for p, m in manifests:
        if p.config.kind != "sft" or m.get("status") != "done":
            continue
        met = m["metrics"]
        body = (
            f"Trained on `{m['inputs']['model']}` with {', '.join(f'`{f}`' for f in m['inputs']['data'])}.\n\n"
            + _table(
                ["steps", "final train loss", "final eval loss", "tokens/s"],
                [
                    [
                        met.get("step"),
                        round(met.get("loss", float("nan")), 4),
                        round(met["eval_loss"], 4) if "eval_loss" in met else "no validation split",
                        met.get("tokens_per_s"),
                    ]
                ],
            )
        )
        if met.get("best"):
            body += "\n\nBest in-training CGEC F0.5: " + ", ".join(f"{k} {v}" for k, v in met["best"].items())
        images = [Path(m["outputs"]["loss_png"])] if m["outputs"].get("loss_png") else []
        out.append((f"Training: {p.config.name}", body, images))
    for p, m in manifests:
        if p.config.kind != "merge" or m.get("status") != "done":
            continue
        checks = m["metrics"]["checks"]
        body = (
            f"`{m['inputs']['adapter']}` merged into `{m['inputs']['model']}` → `{m['outputs']['model']}` "
            f"({m['metrics']['tensors_changed']} tensors changed).\n\n"
            + _table(["check", "result"], [[k, "pass" if v else "FAIL"] for k, v in checks.items()])
        )
        out.append((f"Merge verification: {p.config.name}", body, []))
    for p, m in manifests:
        if p.config.kind != "eval_cgec" or m.get("status") != "done":
            continue
        rows = []
        results = m["metrics"]["cgec"]
        for model_name, sets in results.items():
            for set_name, r in sets.items():
                rows.append(
                    [
                        model_name,
                        set_name,
                        r["sentences"],
                        r["tp"],
                        r["fp"],
                        r["fn"],
                        r["precision"],
                        r["recall"],
                        r["f0.5"],
                        r["overcorrection_rate"],
                        sum(r["fallbacks"].values()),
                    ]
                )
        scorer = m["metrics"].get("scorer", "ChERRANT char-level")
        note = APPROXIMATE if "approximate" in scorer else ""
        body = f"Scorer: {scorer}.{note}\n\n" + _table(
            ["model", "set", "sentences", "TP", "FP", "FN", "P", "R", "F0.5", "over-correction", "fallbacks"], rows
        )
        gains = []
        for other in (k for k in results if k != "final"):
            for set_name, r in results["final"].items():
                gains.append([f"final vs {other}", set_name, round(r["f0.5"] - results[other][set_name]["f0.5"], 4)])
        if gains:
            body += "\n\nGain in F0.5:\n\n" + _table(["comparison", "set", "ΔF0.5"], gains)
        out.append((f"CGEC evaluation: {p.config.name}", body, []))
    return out


def write_report(config: PipelineConfig, plans) -> list[Path]:
    """Write ``WORK/report.md`` and ``WORK/report.html``; return their paths."""
    work = Path(config.work_dir)
    sections = _sections(config, plans)
    md = ["# zhtune pipeline report", ""]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>zhtune pipeline report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .5em}</style><h1>zhtune pipeline report</h1>",
    ]
    for title, body, images in sections:
        md += [f"## {title}", "", body, ""]
        md += [
            f"![{title}]({img.relative_to(work) if img.is_relative_to(work) else img})"
            for img in images
            if img.exists()
        ]
        parts.append(f"<h2>{html.escape(title)}</h2>" + _md_to_html(body))
        for img in images:
            if img.exists():
                data = base64.b64encode(img.read_bytes()).decode()
                parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    (work / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (work / "report.html").write_text("\n".join(parts) + "\n", encoding="utf-8")
    return [work / "report.md", work / "report.html"]


def _md_to_html(body: str) -> str:
    """Enough Markdown for the report: paragraphs and pipe tables."""
    out, table = [], []
    for line in body.split("\n") + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            rows = [[c.strip() for c in r.strip("|").split("|")] for r in table if not r.startswith("|---")]
            out.append(
                "<table>"
                + "".join(
                    "<tr>"
                    + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row)
                    + "</tr>"
                    for i, row in enumerate(rows)
                )
                + "</table>"
            )
            table = []
        if line.strip():
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    return "\n".join(out)
