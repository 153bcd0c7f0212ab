"""``zhtune serve``: an OpenAI-compatible HTTP API (FastAPI) with a correction endpoint, for one GPU or a laptop.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (streamed as server-sent events
ending with ``data: [DONE]``, or one JSON answer; ``temperature`` (0 is greedy), ``top_p``, ``max_tokens``, ``stop``,
``seed``; ``usage`` counts) and ``POST /v1/corrections`` (``{"model", "input": "a document" | ["sentences", ...]}`` →
for each input the corrected text and its ``edits``, character offsets into that input).

Every model call goes through one :class:`~zhtune.serve.batcher.Batcher`, so concurrent requests share model
batches. Every error a client can cause is answered in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx status — FastAPI's ``{"detail": ...}`` would break OpenAI clients: malformed JSON and invalid
fields 400, a missing or wrong API key 401, an unknown model or route 404, a body over ``max_body_bytes`` 413, a prompt,
input or ``max_tokens`` over its limit 400. A model failure is a 500 in the same shape (no traceback), or, once a stream
has begun, an error event that ends it.

Not here: multiple models, several choices (``n`` > 1), tools, log-probabilities; serving at scale is vLLM's job (see
the README).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhtune.data.conversation import Conversation, Message
from zhtune.errors import ZhtuneError
from zhtune.serve.backend import Backend
from zhtune.serve.batcher import Batcher, Job
from zhtune.serve.generation import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for.

    Attributes:
        max_body_bytes: request body size (413 above it).
        max_prompt_tokens: rendered chat prompt length in tokens.
        max_tokens: the largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` when a request gives none.
        max_input_chars: characters over all inputs of one correction request.
        max_inputs: inputs in one correction request.
        max_sentence_chars: one sentence (text between sentence ends) to correct.
        max_stop: stop strings in one request.
    """

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    default_max_tokens: int = 512
    max_input_chars: int = 20_000
    max_inputs: int = 256
    max_sentence_chars: int = 512
    max_stop: int = 4


class APIError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request bodies ---------------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send ``name`` and other fields this server does not use

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)


class CorrectionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str]


# -- request -> model inputs ------------------------------------------------------------------------------------
def _text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for k, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"only text content is supported, got {part.type!r}", f"messages[{index}].content[{k}]")
        parts.append(part.text)
    return "".join(parts)


def to_conversation(messages: list[ChatMessage]) -> Conversation:
    """Leading system (or developer) messages become the system prompt; the rest must alternate user and
    assistant, starting and ending with user.

    Raises:
        APIError: 400 naming the message out of place.
    """
    system, turns = [], []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system":
            if turns:
                raise APIError(400, "system messages must come before the conversation", f"messages[{i}].role")
            system.append(_text(m, i))
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise APIError(400, f"expected a {expected} message here, got {role}", f"messages[{i}].role")
        turns.append(Message(role, _text(m, i)))
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must be a user message", "messages")
    return Conversation(tuple(turns), system="\n".join(system) if system else None)


def sampling_params(req: ChatCompletionRequest, defaults: SamplingParams, limits: ServeLimits) -> SamplingParams:
    """The request's decoding settings, within ``limits``; unset ones from ``defaults`` (the checkpoint's).

    Raises:
        APIError: 400 for ``max_tokens`` over the limit, too many stop strings, ``n`` other than 1.
    """
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}", "max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings are allowed", "stop")
    return SamplingParams(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        max_tokens=max_tokens,
        stop=stop,
        seed=req.seed,
    )


# -- jobs on the batcher, awaited from the event loop ---------------------------------------------------------
def _submit(batcher: Batcher, kind: str, payload) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    return batcher.submit(Job(kind, payload, emit)), events


async def _result(batcher: Batcher, kind: str, payload):
    job, events = _submit(batcher, kind, payload)
    try:
        while True:
            event, value = await events.get()
            if event == "done":
                return value
            if event == "error":
                raise APIError(500, value, code="model_error")
    finally:
        job.cancelled.set()


def _usage(completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(batcher: Batcher, payload, head: dict, include_usage: bool):
    """The server-sent events of one streamed completion."""
    job, events = _submit(batcher, "chat", payload)

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            event, value = await events.get()
            if event == "delta":
                yield _sse(chunk({"content": value}))
            elif event == "done":
                yield _sse(chunk({}, value.finish_reason))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(value)})
                yield _sse("[DONE]")
                return
            else:
                error = {"message": value, "type": "server_error", "param": None, "code": "model_error"}
                yield _sse({"error": error})
                return
    finally:
        job.cancelled.set()


# -- the guard: API key and body size, before FastAPI reads anything ------------------------------------------
class RequestGuard:
    """ASGI middleware: 401 without the right ``Authorization: Bearer KEY`` (when a key is set), 413 for a body
    over ``max_body_bytes`` (the body is read here, within the limit, and handed on)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            error = APIError(
                401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )
            return await error.response()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more and size <= 16 * self.max_body:  # drain an oversized body (to answer it) up to a point
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size <= self.max_body:
                chunks.append(body)
            more = message.get("more_body", False)
        if size > self.max_body:
            error = APIError(413, f"the request body is over {self.max_body} bytes", code="request_too_large")
            return await error.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError(
                400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            ).response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def crash(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()


def create_app(
    backend: Backend, batcher: Batcher, limits: ServeLimits = ServeLimits(), api_key: str | None = None
) -> FastAPI:
    """The FastAPI application serving ``backend`` through ``batcher`` (started and closed by the caller)."""
    app = FastAPI(title="zhtune", docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    _install_error_handlers(app)
    created = int(time.time())
    card = {"id": backend.name, "object": "model", "created": created, "owned_by": "zhtune"}

    def check_model(name: str) -> None:
        if name != backend.name:
            raise APIError(
                404, f"the model {name!r} does not exist; this server has {backend.name!r}", "model", "model_not_found"
            )

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        params = sampling_params(req, backend.default_sampling, limits)
        try:
            prompt = backend.prompt_ids(to_conversation(req.messages))
        except ZhtuneError as exc:
            raise APIError(400, str(exc), "messages") from None
        if len(prompt) > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this server allows {limits.max_prompt_tokens}",
                "messages",
                "context_length_exceeded",
            )
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _stream(batcher, (prompt, params), {**head, "object": "chat.completion.chunk"}, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        completion = await _result(batcher, "chat", (prompt, params))
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": None,
            "finish_reason": completion.finish_reason,
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(completion)}

    @app.post("/v1/corrections")
    async def corrections(req: CorrectionRequest):
        check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        check_correction_input(texts, backend, limits)
        results = await _result(batcher, "correct", texts)
        data = [
            {"index": i, "input": r.input, "corrected": r.corrected, "edits": [e.as_dict() for e in r.edits]}
            for i, r in enumerate(results)
        ]
        return {
            "id": f"corr-{uuid.uuid4().hex}",
            "object": "correction",
            "created": int(time.time()),
            "model": backend.name,
            "data": data,
        }

    return app


def check_correction_input(texts: list[str], backend: Backend, limits: ServeLimits) -> None:
    """Raises APIError (400) for no inputs, too many, too many characters, or a sentence too long to correct."""
    if not texts:
        raise APIError(400, "input is an empty list", "input")
    if len(texts) > limits.max_inputs:
        raise APIError(400, f"{len(texts)} inputs; this server allows {limits.max_inputs} per request", "input")
    total = sum(len(t) for t in texts)
    if total > limits.max_input_chars:
        raise APIError(
            400,
            f"{total} characters; this server allows {limits.max_input_chars} per request",
            "input",
            "input_too_long",
        )
    for i, text in enumerate(texts):
        for offset, piece in backend.pieces(text):
            if len(piece) > limits.max_sentence_chars:
                raise APIError(
                    400,
                    f"input {i}: a sentence of {len(piece)} characters without a sentence end at "
                    f"offset {offset} (at most {limits.max_sentence_chars}); split it with 。！？",
                    "input",
                    "input_too_long",
                )


def serve(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServeLimits = ServeLimits(),
    max_batch: int = 32,
) -> None:
    """Serve ``backend`` with uvicorn until interrupted."""
    import uvicorn

    batcher = Batcher(backend, max_batch).start()
    try:
        uvicorn.run(create_app(backend, batcher, limits, api_key), host=host, port=port, log_level="info")
    finally:
        batcher.close()
