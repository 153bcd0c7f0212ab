"""``zhtune webui``: a Gradio page to show a model to colleagues (``pip install 'zhtune[webui]'``).

Three tabs: **Correction** (the input with deletions struck through and insertions underlined, each edit's type on
hover, and the edit list), **Chat** (streamed, with a system prompt and temperature), **Metrics** (a training run's
loss and CGEC curves from its ``metrics.jsonl``). Model calls go through the same :class:`Batcher` as the API, so
several visitors share model batches. The page binds to 127.0.0.1 unless told otherwise, fetches no web fonts and
sends no analytics.
"""

from __future__ import annotations

import html
import os
import queue
from pathlib import Path

from zhtune.data.conversation import Conversation, Message
from zhtune.serve.backend import Backend
from zhtune.serve.batcher import Batcher, Job
from zhtune.serve.edits import TextEdit
from zhtune.serve.generation import SamplingParams
from zhtune.train.metrics import read_metrics

LOSS_KEYS = ("loss", "eval_loss")
CGEC_KEYS = ("cgec_f0.5", "cgec_precision", "cgec_recall")
_CSS = """
.zhtune-diff { font-size: 1.15em; line-height: 2; white-space: pre-wrap; }
.zhtune-diff del { background: #fdd; color: #a00; text-decoration: line-through; }
.zhtune-diff ins { background: #dfd; color: #070; text-decoration: underline; }
"""


def diff_html(text: str, edits: list[TextEdit]) -> str:
    """``text`` as HTML with each edit's source in ``<del>`` and its target in ``<ins>`` (type in ``title``)."""
    out, pos = [], 0
    for e in edits:
        out.append(html.escape(text[pos : e.start]))
        title = f' title="{e.type}" data-type="{e.type}"'
        if e.source:
            out.append(f"<del{title}>{html.escape(e.source)}</del>")
        if e.target:
            out.append(f"<ins{title}>{html.escape(e.target)}</ins>")
        pos = e.end
    out.append(html.escape(text[pos:]))
    return f'<div class="zhtune-diff" data-edits="{len(edits)}">{"".join(out)}</div>'


def _content_text(content) -> str:
    """A Gradio chat message's content as text (a string, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list | tuple):
        return "".join(_content_text(c) for c in content)
    return ""


def history_messages(history: list) -> list[Message]:
    """Gradio's ``[{"role", "content"}, ...]`` history as user/assistant messages."""
    turns = []
    for m in history or []:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if role in ("user", "assistant"):
            turns.append(Message(role, _content_text(content)))
    return turns


def metrics_figures(run_dir: str):
    """``(loss figure, CGEC figure, message)`` from ``run_dir/metrics.jsonl``; figures are None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir)) if run_dir else []
    if not rows:
        return None, None, f"no metrics in {Path(run_dir or '.') / 'metrics.jsonl'}"
    figures = []
    for keys, ylabel in ((LOSS_KEYS, "loss"), (CGEC_KEYS, "CGEC score")):
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float)] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            figures.append(None)
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
        for key, points in series.items():
            ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", label=key, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        figures.append(fig)
    return figures[0], figures[1], f"{len(rows)} rows from {Path(run_dir) / 'metrics.jsonl'}"


def build_page(backend: Backend, batcher: Batcher, run_dir: str | None = None):
    """The Gradio page (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def correct(text: str):
        if not text or not text.strip():
            return '<div class="zhtune-diff" data-edits="0"></div>', []
        try:
            result = batcher.run("correct", [text])[0]
        except RuntimeError as exc:  # the model failed on this batch: say so on the page
            raise gr.Error(str(exc)) from None
        table = [[e.start, e.end, e.source, e.target, e.type] for e in result.edits]
        return diff_html(text, result.edits), table

    def chat(message, history, system, temperature):
        turns = tuple(history_messages(history)) + (Message("user", _content_text(message)),)
        conv = Conversation(turns, system=system or None)
        params = SamplingParams(temperature=float(temperature), top_p=backend.default_sampling.top_p)
        events: queue.Queue = queue.Queue()
        job = batcher.submit(Job("chat", (backend.prompt_ids(conv), params), events.put))
        text = ""
        try:
            while True:
                event, value = events.get()
                if event == "delta":
                    text += value
                    yield text
                elif event == "done":
                    yield value.text
                    return
                else:
                    raise gr.Error(value)
        finally:
            job.cancelled.set()

    with gr.Blocks(title=f"zhtune · {backend.name}") as page:
        gr.Markdown(f"## zhtune · {backend.name}")
        with gr.Tab("Correction"):
            source = gr.Textbox(label="Text to correct", lines=4, elem_id="correction-input")
            submit = gr.Button("Correct", variant="primary", elem_id="correction-submit")
            shown = gr.HTML(elem_id="correction-result")
            table = gr.Dataframe(headers=["start", "end", "source", "target", "type"], label="Edits", interactive=False)
            submit.click(correct, source, [shown, table])
        with gr.Tab("Chat"):
            system = gr.Textbox(label="System prompt (empty: the template's default)", render=False)
            temperature = gr.Slider(
                0, 2, value=backend.default_sampling.temperature, step=0.05, label="Temperature", render=False
            )
            gr.ChatInterface(
                chat,
                chatbot=gr.Chatbot(elem_id="chat-log", render=False),
                textbox=gr.Textbox(elem_id="chat-input", placeholder="Ask something", render=False),
                additional_inputs=[system, temperature],
            )
        with gr.Tab("Metrics"):
            run = gr.Textbox(label="Training run folder (holding metrics.jsonl)", value=run_dir or "")
            plot = gr.Button("Plot")
            note = gr.Markdown()
            loss_plot = gr.Plot(label="loss")
            cgec_plot = gr.Plot(label="CGEC")
            plot.click(metrics_figures, run, [loss_plot, cgec_plot, note])
            if run_dir:
                page.load(metrics_figures, run, [loss_plot, cgec_plot, note])
    return page


def launch(page, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve ``page`` (no share link, system fonts only); with ``block=False`` return once it is up."""
    import gradio as gr

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return page.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=True,
        footer_links=[],
        theme=theme,
        css=_CSS,
    )
