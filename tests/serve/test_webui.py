"""The web page: the diff markup, the metrics plots from metrics.jsonl, and the correction tab driven in headless
Chromium (Debian's ``chromium`` and ``chromium-driver``) with a screenshot saved as a test artifact."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from tests.serve.conftest import CORRECTIONS, GREETING
from zhtune.serve.edits import TextEdit

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_diff_html_marks_deletions_and_insertions():
    from zhtune.serve.webui import diff_html

    text = "我爱<北京>天按门了。"
    edits = [TextEdit(7, 8, "按", "安", "S"), TextEdit(9, 10, "了", "", "R"), TextEdit(11, 11, "", "！", "M")]
    assert diff_html(text, edits) == (
        '<div class="zhtune-diff" data-edits="3">我爱&lt;北京&gt;天'
        '<del title="S" data-type="S">按</del><ins title="S" data-type="S">安</ins>门'
        '<del title="R" data-type="R">了</del>。<ins title="M" data-type="M">！</ins></div>'
    )


def test_metrics_figures_plot_the_run(tmp_path):
    from zhtune.serve.webui import metrics_figures

    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 11)]
    rows += [{"step": 5, "eval_loss": 0.9}, {"step": 10, "eval_loss": 0.5}]
    rows += [
        {"step": 5, "cgec_f0.5": 0.1, "cgec_precision": 0.2, "cgec_recall": 0.05, "cgec_fallbacks": {}},
        {"step": 10, "cgec_f0.5": 0.3, "cgec_precision": 0.4, "cgec_recall": 0.15, "cgec_fallbacks": {}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loss, cgec, note = metrics_figures(str(tmp_path))
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss.axes[0].lines}
    assert lines["loss"] == (list(range(1, 11)), [3.0 / s for s in range(1, 11)])
    assert lines["eval_loss"] == ([5, 10], [0.9, 0.5])
    curves = {line.get_label(): list(line.get_ydata()) for line in cgec.axes[0].lines}
    assert curves == {"cgec_f0.5": [0.1, 0.3], "cgec_precision": [0.2, 0.4], "cgec_recall": [0.05, 0.15]}
    assert "14 rows" in note
    assert metrics_figures(str(tmp_path / "missing"))[:2] == (None, None)


@pytest.fixture(scope="module")
def page_url(backend):
    pytest.importorskip("gradio")
    from zhtune.serve.batcher import Batcher
    from zhtune.serve.webui import build_page, launch

    batcher = Batcher(backend).start()
    page = build_page(backend, batcher)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(page, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()
    batcher.close()


def _chromium(profile: str):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed "
    "(apt-get install chromium chromium-driver; .ci/run installs them)",
)
def test_correction_tab_in_headless_chromium(page_url, backend):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    source = "我爱北京天按门。他昨天去了学校了。"
    expected = backend.correct([source])[0][0]
    assert expected.corrected == "".join(CORRECTIONS[s] for s in ("我爱北京天按门。", "他昨天去了学校了。"))
    with tempfile.TemporaryDirectory() as profile:
        driver = _chromium(profile)
        try:
            driver.get(page_url)
            wait = WebDriverWait(driver, 90)
            box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#correction-input textarea")))
            box.send_keys(source)
            driver.find_element(By.CSS_SELECTOR, "#correction-submit").click()
            shown = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#correction-result .zhtune-diff")))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#correction-result del"))
            deleted = [e.text for e in shown.find_elements(By.CSS_SELECTOR, "del")]
            inserted = [e.text for e in shown.find_elements(By.CSS_SELECTOR, "ins")]
            assert deleted == [e.source for e in expected.edits if e.source] == ["按", "了"]
            assert inserted == [e.target for e in expected.edits if e.target] == ["安"]
            assert shown.get_attribute("data-edits") == str(len(expected.edits))
            color = shown.find_element(By.CSS_SELECTOR, "del").value_of_css_property("background-color")
            assert color.replace(" ", "") in ("rgb(255,221,221)", "rgba(255,221,221,1)")  # our stylesheet applied
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "webui-correction.png"
            driver.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 10_000
            # the chat tab answers too (sampled at the checkpoint's temperature: only that an answer comes)
            driver.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Chat']").click()
            chat = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input textarea")))
            chat.send_keys(GREETING[0] + "\n")
            bot = '#chat-log [data-testid="bot"]'
            wait.until(lambda d: any(e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, bot)))
            driver.save_screenshot(str(ARTIFACTS / "webui-chat.png"))
        finally:
            driver.quit()
