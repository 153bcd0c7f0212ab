"""The demo pipeline end to end: timing, report, lineage (skip / resume / stale) and exact resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import kill_after_checkpoint
from zhtune.cli import main
from zhtune.pipeline.config import load_pipeline
from zhtune.pipeline.manifest import read_manifest
from zhtune.pipeline.runner import stage_states

STAGES = ["01-instruct", "02-merge_instruct", "03-cgec", "04-merge_cgec", "05-evaluate"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`zhtune demo` as a user runs it: its own process, its console captured, its wall time measured."""
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "zhtune.cli", "demo", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "console.txt").write_text(proc.stdout + proc.stderr)
    return out, seconds


def without_timing(value):
    """``value`` without wall-clock fields (``seconds``, ``wall_s``, ``*_per_s``): they differ between equal runs."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not (k == "seconds" or k.endswith("_s"))}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_without_timing_keeps_everything_else():
    metrics = {"cgec": {"final": {"f0.5": 0.3, "seconds": 0.02, "speed": {"tokens_per_s": 9.0, "accepted": 2}}}}
    assert without_timing(metrics) == {"cgec": {"final": {"f0.5": 0.3, "speed": {"accepted": 2}}}}


def bump_one_weight(model_dir):
    """Change one value of one tensor in place, as a user editing (or re-downloading) weights would."""
    from safetensors.torch import load_file, save_file

    shard = sorted(model_dir.glob("*.safetensors"))[0]
    state = load_file(shard)
    name = next(n for n in state if n.endswith("norm.weight"))
    state[name][0] += 0.5
    save_file(state, shard, metadata={"format": "pt"})


def copy_run(run, dest):
    """A copy of a finished run whose manifests point at the copy (they record absolute paths)."""
    shutil.copytree(run, dest)
    for manifest in dest.glob("*/manifest.json"):
        manifest.write_text(manifest.read_text().replace(str(run), str(dest)))
    return dest


def test_in_place_weight_changes_make_downstream_stages_stale(demo_run, tmp_path):
    out, _ = demo_run
    run = copy_run(out / "run", tmp_path / "run")
    base = tmp_path / "base-model"
    shutil.copytree(out / "base-model", base)
    tree = yaml.safe_load((out / "pipeline.yaml").read_text())
    tree.update(work_dir=str(run), base=str(base))
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))
    assert [s for _n, _k, s in stage_states(load_pipeline(recipe))] == ["done"] * 5  # same bytes: still done
    bump_one_weight(run / "02-merge_instruct" / "model")
    assert [s for _n, _k, s in stage_states(load_pipeline(recipe))] == ["done"] + ["stale"] * 4
    bump_one_weight(base)
    assert [s for _n, _k, s in stage_states(load_pipeline(recipe))] == ["stale"] * 5


def with_work_dir(recipe, work, path):
    tree = yaml.safe_load(recipe.read_text())
    tree["work_dir"] = str(work)
    path.write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))
    return path


def test_demo_learns_to_correct_held_out_sentences(demo_run):
    """The CGEC LoRA's gain is real: F0.5 on held-out test sentences at least 0.25 above the base, over-correction of
    correct sentences below 0.5, scored by the real scorer through the real pipeline, in under 3 minutes."""
    out, seconds = demo_run
    assert seconds < 180
    scores = read_manifest(out / "run" / "05-evaluate")["metrics"]["cgec"]
    final, base = scores["final"]["demo_test"], scores["base"]["demo_test"]
    assert final["f0.5"] - base["f0.5"] >= 0.25, (final, base)
    assert final["overcorrection_rate"] < 0.5
    train_sentences = {line.split("\t")[2] for line in (out / "data" / "cgec_train.para").read_text().splitlines()}
    test_sentences = {line.split("\t")[2] for line in (out / "data" / "cgec_test.para").read_text().splitlines()}
    assert not train_sentences & test_sentences  # held out
    gain = f"| final vs base | demo_test | {round(final['f0.5'] - base['f0.5'], 4)} |"
    assert gain in (out / "run" / "report.md").read_text()


def test_demo_console_speaks_plainly(demo_run):
    out, _ = demo_run
    console = (out / "console.txt").read_text()
    assert "Warning" not in console and "warnings.warn" not in console, console
    assert "Loading weights" not in console and "Writing model shards" not in console
    lines = [line for line in console.splitlines() if line.strip()]
    assert sum(line.startswith("[") for line in lines) >= 5  # one line per stage
    assert any(line.startswith("demo finished in") for line in lines)


def test_verbose_brings_library_output_back():
    code = (
        "import warnings, sys; from zhtune.console import configure_console; configure_console(%s); "
        "import transformers.modeling_utils as m; warnings.warn_explicit('old', FutureWarning, m.__file__, 1, "
        "module='transformers.modeling_utils'); import os; print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))"
    )
    quiet_vars = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in quiet_vars}
    quiet = subprocess.run([sys.executable, "-c", code % "False"], capture_output=True, text=True, env=env)
    loud = subprocess.run([sys.executable, "-c", code % "True"], capture_output=True, text=True, env=env)
    assert "FutureWarning" not in quiet.stderr and quiet.stdout.strip() == "1"
    assert "FutureWarning" in loud.stderr and loud.stdout.strip() == "None"


def test_demo_finishes_with_a_full_report(demo_run):
    out, _seconds = demo_run
    run = out / "run"
    report = (run / "report.md").read_text()
    for section in (
        "## Stages",
        "## Training: instruct",
        "## Training: cgec",
        "## Merge verification: merge_instruct",
        "## Merge verification: merge_cgec",
        "## CGEC evaluation: evaluate",
        "Gain in F0.5",
    ):
        assert section in report
    assert "None" not in report and "FAIL" not in report and "pending" not in report
    assert "| base | demo_test |" in report and "| merge_instruct | demo_test |" in report
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    for stage in STAGES:
        manifest = read_manifest(run / stage)
        assert manifest["status"] == "done" and manifest["wall_s"] > 0 and manifest["peak_rss_mb"] > 0
        assert manifest["inputs"]["model"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / "04-merge_cgec" / "model"
    AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).chat_template


def test_rerun_skips_everything_and_data_change_marks_downstream_stale(demo_run, tmp_path, capsys):
    out, _ = demo_run
    recipe = out / "pipeline.yaml"
    assert [s for _n, _k, s in stage_states(load_pipeline(recipe))] == ["done"] * 5
    assert main(["pipeline", str(recipe)]) == 0
    assert capsys.readouterr().out.count("skipped") == 5
    # change one data file (a copy, so the shared demo stays intact): exactly the stages from the CGEC LoRA on
    data = tmp_path / "cgec_train.para"
    shutil.copy(out / "data" / "cgec_train.para", data)
    tree = yaml.safe_load(recipe.read_text())
    tree["stages"][2]["recipe"]["data"]["paths"] = [str(data)]
    changed = tmp_path / "pipeline.yaml"
    changed.write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))
    states = [s for _n, _k, s in stage_states(load_pipeline(changed))]
    assert states == ["done", "done", "done", "done", "done"]  # same bytes, same fingerprints
    data.write_text(data.read_text() + "x1\t我去了学校。\t我去了学校。\n", encoding="utf-8")
    assert main(["pipeline", "--status", str(changed)]) == 0
    status = capsys.readouterr().out.split("\n")
    assert [line.split()[-1] for line in status if line] == ["done", "done", "stale", "stale", "stale"]


def test_kill_during_second_sft_then_resume_equals_uninterrupted(demo_run, tmp_path):
    out, _ = demo_run
    recipe = with_work_dir(out / "pipeline.yaml", tmp_path / "run", tmp_path / "pipeline.yaml")
    for stage in STAGES[:2]:  # the demo's finished first stages: the new work dir skips them, as a rerun would
        shutil.copytree(out / "run" / stage, tmp_path / "run" / stage)
    # killed right after the CGEC stage's first checkpoint (step 100 of 500)
    killed = [sys.executable, *kill_after_checkpoint(tmp_path, 100, "03-cgec"), "pipeline", str(recipe)]
    proc = subprocess.run(killed, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    latest = tmp_path / "run" / "03-cgec" / "train" / "checkpoints" / "latest"
    assert latest.exists()
    assert read_manifest(tmp_path / "run" / "03-cgec")["status"] == "running"
    assert [s for _n, _k, s in stage_states(load_pipeline(recipe))] == ["done", "done", "pending", "pending", "pending"]
    resumed = subprocess.run(
        [sys.executable, "-m", "zhtune.cli", "pipeline", str(recipe)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    log = resumed.stdout
    assert "[instruct] done, skipped" in log and "[merge_instruct] done, skipped" in log
    assert "[cgec] resuming sft" in log
    ours = without_timing(read_manifest(tmp_path / "run" / "05-evaluate")["metrics"])
    reference = without_timing(read_manifest(out / "run" / "05-evaluate")["metrics"])
    assert json.dumps(ours, sort_keys=True) == json.dumps(reference, sort_keys=True)
    ours_loss = read_manifest(tmp_path / "run" / "03-cgec")["metrics"]
    ref_loss = read_manifest(out / "run" / "03-cgec")["metrics"]
    assert abs(ours_loss["loss"] - ref_loss["loss"]) < 1e-6
