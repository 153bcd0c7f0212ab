"""The real server (uvicorn on a loopback port, in a thread) driven by the official ``openai`` client and httpx:
models, chat completions streamed and not, corrections with offsets, every error in OpenAI's shape, batching of
concurrent requests counted in model batches, a model failure in the middle of a stream."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from tests.helpers import subprocess_env
from tests.serve.conftest import CORRECTIONS, GREETING, TEMPLATE

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-key"
BODY_LIMIT = 100_000


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(backend):
    from zhtune.serve.api import ServeLimits, create_app
    from zhtune.serve.batcher import Batcher

    batcher = Batcher(backend, max_batch=32).start()
    app = create_app(backend, batcher, ServeLimits(max_body_bytes=BODY_LIMIT, max_tokens=256), api_key=KEY)
    sock = _free_socket()
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
    yield SimpleNamespace(base=base, client=client, backend=backend, batcher=batcher)
    uv.should_exit = True
    thread.join(timeout=10)
    batcher.close()


def assert_openai_error(response, status: int, code: str | None = None) -> dict:
    """The body is exactly OpenAI's error object (no FastAPI ``detail``, no traceback)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in response.text
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def _post(server, path: str, content: bytes | str, key: str = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server.base + path, content=content, headers=headers, timeout=120)


def test_models(server):
    assert [m.id for m in server.client.models.list().data] == [server.backend.name]
    assert server.client.models.retrieve(server.backend.name).owned_by == "zhtune"


def test_chat_completion_streamed_and_not(server):
    ask = dict(model=server.backend.name, messages=[{"role": "user", "content": GREETING[0]}], temperature=0)
    plain = server.client.chat.completions.create(**ask)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == GREETING[1] and plain.choices[0].finish_reason == "stop"
    tokens = server.backend.tokenizer.encode(GREETING[1])
    prompt = server.backend.prompt_ids(_conv(GREETING[0]))
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (len(prompt), len(tokens) + 1)  # + <|im_end|>
    assert plain.usage.total_tokens == len(prompt) + len(tokens) + 1
    chunks = list(server.client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content and len([p for p in pieces if p]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    # seeded sampling: the same text streamed and not
    sampled = dict(ask, messages=[{"role": "user", "content": "今天天气怎么样？"}], temperature=1.5, seed=5)
    sampled.update(max_tokens=16, top_p=0.95)
    once = server.client.chat.completions.create(**sampled).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in server.client.chat.completions.create(**sampled, stream=True)
    )
    assert once == streamed and once != plain.choices[0].message.content


def _conv(question: str, system: str | None = None):
    from zhtune.data.conversation import Conversation, Message

    return Conversation((Message("user", question),), system=system)


def test_chat_settings(server):
    name = server.backend.name
    create = server.client.chat.completions.create
    short = create(model=name, messages=[{"role": "user", "content": GREETING[0]}], temperature=0, max_tokens=3)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", 3)
    tiny = create(model=name, messages=[{"role": "user", "content": GREETING[0]}], temperature=1e-9, seed=3)
    assert tiny.choices[0].message.content == GREETING[1]  # a vanishing temperature is greedy, not an overflow
    stopped = create(model=name, messages=[{"role": "user", "content": GREETING[0]}], temperature=0, stop=["小助"])
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("你好！我是", "stop")
    # a system message is the system prompt: it changes the prompt the model sees
    with_system = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": GREETING[0]}]
    answer = create(model=name, messages=with_system, temperature=0, max_tokens=8).usage
    assert answer.prompt_tokens == len(server.backend.prompt_ids(_conv(GREETING[0], "你是一个乐于助人的助手。")))


def test_corrections_give_offsets_into_each_input(server):
    from zhtune.serve.edits import TextEdit, apply_edits

    sources = list(CORRECTIONS)
    body = {"model": server.backend.name, "input": sources}
    result = server.client.post("/corrections", body=body, cast_to=dict)  # as the README shows
    assert result["object"] == "correction" and [d["index"] for d in result["data"]] == [0, 1, 2]
    for source, item in zip(sources, result["data"]):
        assert item["input"] == source and item["corrected"] == CORRECTIONS[source]
        edits = [TextEdit(**e) for e in item["edits"]]
        assert edits and all(source[e.start : e.end] == e.source for e in edits)
        assert apply_edits(source, edits) == item["corrected"]
    assert [[e["type"] for e in d["edits"]] for d in result["data"]] == [["S"], ["R"], ["M"]]
    document = "  我爱北京天按门。他昨天去了学校了。\n这本书很好看"
    doc = server.client.post("/corrections", body={"model": server.backend.name, "input": document}, cast_to=dict)[
        "data"
    ]
    assert len(doc) == 1 and doc[0]["corrected"] == "  我爱北京天安门。他昨天去了学校。\n这本书很好看。"
    assert [(e["start"], e["end"], e["source"], e["target"], e["type"]) for e in doc[0]["edits"]] == [
        (7, 8, "按", "安", "S"),
        (17, 18, "了", "", "R"),
        (26, 26, "", "。", "M"),
    ]
    assert all(document[e["start"] : e["end"]] == e["source"] for e in doc[0]["edits"])


def test_errors_are_openai_errors(server):
    name = server.backend.name
    ok = json.dumps({"model": name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2})
    wrong_key = openai.OpenAI(base_url=server.base, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong_key.models.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    assert_openai_error(_post(server, "/chat/completions", ok, key="sk-wrong"), 401, "invalid_api_key")
    assert_openai_error(httpx.get(server.base + "/models"), 401, "invalid_api_key")  # no key at all
    with pytest.raises(openai.APIStatusError) as exc:
        server.client.chat.completions.create(model=name, messages=[{"role": "user", "content": "好" * BODY_LIMIT}])
    assert exc.value.status_code == 413
    assert_openai_error(_post(server, "/chat/completions", ok[:-1] + " " * BODY_LIMIT + "}"), 413, "request_too_large")
    assert_openai_error(_post(server, "/chat/completions", '{"model": "x", "messages": [}'), 400)
    assert_openai_error(_post(server, "/corrections", b"\xff\xfe not json"), 400)
    with pytest.raises(openai.NotFoundError) as exc:
        server.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "你好"}])
    assert exc.value.code == "model_not_found"
    assert_openai_error(
        _post(server, "/chat/completions", json.dumps({**json.loads(ok), "model": "no-such-model"})),
        404,
        "model_not_found",
    )
    assert_openai_error(_post(server, "/corrections", json.dumps({"model": "nope", "input": "你好"})), 404)
    assert_openai_error(httpx.get(server.base + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)
    bad = {
        "max_tokens over the limit": {"max_tokens": 100_000},
        "temperature out of range": {"temperature": 9},
        "messages missing": {"messages": None},
        "wrong role order": {"messages": [{"role": "assistant", "content": "hi"}]},
        "image content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "n > 1": {"n": 2},
        "seed out of range": {"seed": 2**70},
        "stop not text": {"stop": [1, 2]},
    }
    for why, change in bad.items():
        body = {**json.loads(ok), **change}
        body = {k: v for k, v in body.items() if v is not None}
        error = assert_openai_error(_post(server, "/chat/completions", json.dumps(body)), 400)
        assert error["param"], why
    too_long = {"model": name, "input": ["好" * 600]}  # one sentence over max_sentence_chars
    assert_openai_error(_post(server, "/corrections", json.dumps(too_long)), 400, "input_too_long")
    assert_openai_error(_post(server, "/corrections", json.dumps({"model": name, "input": []})), 400)
    assert_openai_error(_post(server, "/corrections", json.dumps({"model": name, "input": 5})), 400)


def test_concurrent_requests_share_model_batches(server):
    """20 requests queued while the worker is held are decoded together: fewer model batches than requests."""
    name = server.backend.name
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            params = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": i, "max_tokens": 6 + i}
            reply = server.client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": GREETING[0]}], **params
            )
            results[i] = reply.choices[0].message.content
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    before = server.backend.forward_batches
    with server.batcher.hold():
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        assert server.batcher.wait_queued(20, timeout=120), "the 20 requests never reached the queue"
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 20
    batches = server.backend.forward_batches - before
    assert batches == 1 < 20  # everything queued was taken at once (max_batch 32)
    assert all(results[i] == GREETING[1] for i in range(0, 20, 2))  # greedy rows in a padded batch: same answer


def test_one_request_per_batch_is_what_the_count_would_show(server):
    """The counter can fail the test above: with one row per batch, N queued requests take N model batches."""
    name = server.backend.name
    before, server.batcher.max_batch = server.backend.forward_batches, 1
    try:
        with server.batcher.hold():
            threads = [
                threading.Thread(
                    target=server.client.chat.completions.create,
                    kwargs={"model": name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2},
                )
                for _ in range(4)
            ]
            for t in threads:
                t.start()
            assert server.batcher.wait_queued(4, timeout=120)
        for t in threads:
            t.join(timeout=120)
    finally:
        server.batcher.max_batch = 32
    assert server.backend.forward_batches - before == 4


def test_the_error_check_fails_on_fastapis_own_error_shape():
    """LLaMA-Factory's API answers FastAPI's ``{"detail": ...}`` (422): the shape check above rejects it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from zhtune.serve.api import ChatCompletionRequest

    plain = FastAPI()

    @plain.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        return {}

    response = TestClient(plain).post("/v1/chat/completions", content=b'{"model": [}')
    assert "detail" in response.json()
    with pytest.raises(AssertionError):
        assert_openai_error(response, 400)


def test_a_model_failure_mid_stream_ends_the_stream_with_an_error_event(server):
    calls = {"n": 0}

    def fail_on_fourth_step(_module, _args, _output):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")

    handle = server.backend.model.register_forward_hook(fail_on_fourth_step)
    received = []
    try:
        stream = server.client.chat.completions.create(
            model=server.backend.name, messages=[{"role": "user", "content": GREETING[0]}], temperature=0, stream=True
        )
        with pytest.raises(openai.APIError, match="injected failure"):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
        calls["n"] = 0
        with pytest.raises(openai.InternalServerError, match="injected failure"):
            server.client.chat.completions.create(
                model=server.backend.name, messages=[{"role": "user", "content": GREETING[0]}], temperature=0
            )
    finally:
        handle.remove()
    assert "".join(received) and GREETING[1].startswith("".join(received))  # the text before the failure arrived
    again = server.client.chat.completions.create(
        model=server.backend.name, messages=[{"role": "user", "content": GREETING[0]}], temperature=0
    )
    assert again.choices[0].message.content == GREETING[1]  # the worker survived


def test_zhtune_serve_command_binds_to_loopback_and_requires_the_key(corrector):
    """``zhtune serve`` as users start it: default host 127.0.0.1, --api-key enforced."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = subprocess_env()
    cmd = [
        sys.executable,
        "-m",
        "zhtune.cli",
        "serve",
        "--model",
        str(corrector),
        "--template",
        TEMPLATE,
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--model-name",
        "memorized",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any("Uvicorn running on" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        assert any(f"at http://127.0.0.1:{port}/v1" in line for line in lines), lines
        assert any(f"Uvicorn running on http://127.0.0.1:{port}" in line for line in lines), lines  # what it bound
        base = f"http://127.0.0.1:{port}/v1"
        reply = httpx.get(base + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert reply.json()["data"][0]["id"] == "memorized"
        assert_openai_error(httpx.get(base + "/models"), 401)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
