"""The HTTP application: routes, authentication, body limits, error shapes.

Nothing a client sends names a file: requests carry messages and knobs only; the model, the
snapshot directory and the replay map are fixed at start-up, and tool-call ids are hashed
before they touch a path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ds4_agent.agent.server_anthropic import KEEPALIVE as ANTH_KEEPALIVE
from ds4_agent.agent.server_anthropic import AnthropicResponse
from ds4_agent.agent.server_convert import GenRequest, from_anthropic, from_openai
from ds4_agent.agent.server_errors import ApiError, Dialect, from_validation_error
from ds4_agent.agent.server_events import Accepted, Done, Event, Failed, Usage
from ds4_agent.agent.server_openai import KEEPALIVE as OAI_KEEPALIVE
from ds4_agent.agent.server_openai import OpenAIResponse
from ds4_agent.agent.server_render import render_prompt
from ds4_agent.agent.server_replay import ReplayMap
from ds4_agent.agent.server_responses import KEEPALIVE as RESP_KEEPALIVE
from ds4_agent.agent.server_responses import (
    ResponsesRequest,
    ResponsesResponse,
    from_responses,
)
from ds4_agent.agent.server_schemas import ChatCompletionRequest, MessagesRequest
from ds4_agent.agent.server_worker import Job, Worker
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ds4_agent.server")

DEFAULT_MAX_BODY = 32 * 1024 * 1024


@dataclass
class AppConfig:
    model_name: str
    fingerprint: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    keepalive_s: float = 10.0
    default_thinking: bool = True
    aliases: list[str] = field(default_factory=list)
    ctx: int = 0


# The model card reserves think-max for contexts of at least 384K tokens (ds4 does the same).
THINK_MAX_MIN_CTX = 393_216


def _dialect(request: Request) -> Dialect:
    return "anthropic" if request.url.path.startswith("/v1/messages") else "openai"


def _error(err: ApiError, dialect: Dialect) -> JSONResponse:
    return JSONResponse(err.body(dialect), status_code=err.status)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


class ApiKeyMiddleware:
    """Rejects /v1/ requests without the key before any body is read (plain ASGI, so
    streaming responses and disconnect detection pass through untouched)."""

    def __init__(self, app: Any, key: bytes) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = {k.lower(): v for k, v in scope["headers"]}
            got = headers.get(b"x-api-key", b"")
            auth = headers.get(b"authorization", b"")
            if auth[:7].lower() == b"bearer ":
                got = auth[7:].strip()
            # compare_digest: the time taken does not depend on how much of the key matched.
            if not hmac.compare_digest(got, self.key):
                msg = (
                    "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
                    if not got
                    else "invalid API key"
                )
                dialect: Dialect = (
                    "anthropic" if scope["path"].startswith("/v1/messages") else "openai"
                )
                await _error(ApiError(401, msg, code="invalid_api_key"), dialect)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def create_app(worker: Worker, replay: ReplayMap, config: AppConfig) -> FastAPI:
    app = FastAPI(title="ds4-agent", docs_url=None, redoc_url=None, openapi_url=None)
    models = [config.model_name, *config.aliases]
    key = config.api_key.encode() if config.api_key else None

    if key is not None:
        app.add_middleware(ApiKeyMiddleware, key=key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc, _dialect(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        if exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        return _error(ApiError(exc.status_code, msg), _dialect(request))

    def check_model(name: str, dialect: Dialect) -> None:
        if name not in models:
            raise ApiError(
                404,
                f"model '{name}' is not served here; available: {', '.join(models)}",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "busy": worker.busy, "queued": worker.queued()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in models]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id, "openai")
        return _model_card(model_id)

    async def submit(request: Request, gen: GenRequest, prefix: str) -> tuple[Job, Event]:
        if gen.reasoning_effort == "max" and config.ctx < THINK_MAX_MIN_CTX:
            gen.reasoning_effort = "high"
        rendered = await asyncio.to_thread(render_prompt, gen, replay)
        job = Job(
            gen,
            rendered.text,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            id_prefix=prefix,
            segments=rendered.segments,
        )
        worker.submit(job)
        # Wait until the worker has tokenized the prompt (or refused it), watching for a
        # client that gives up while queued.
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel.set()
                        raise ApiError(400, "client disconnected") from None
                    continue
                if isinstance(ev, Failed):
                    raise ApiError(ev.status, ev.message, param=ev.param)
                return job, ev
        except asyncio.CancelledError:
            job.cancel.set()  # the handler itself was cancelled (shutdown, disconnect)
            raise

    async def events(job: Job, keepalive: bytes) -> AsyncIterator[Event | bytes]:
        """Worker events; `keepalive` whenever nothing happened for a while."""
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=config.keepalive_s)
            except TimeoutError:
                yield keepalive
                continue
            yield ev
            if isinstance(ev, Done | Failed):
                return

    async def respond(
        request: Request,
        job: Job,
        first: Event,
        out: Any,
        stream: bool,
        opening: Callable[[], list[bytes]],
        keepalive: bytes,
        anthropic: bool = False,
    ) -> Response:
        """The job's answer rendered by `out`: one JSON body, or (when `stream`) `opening()`
        then the job's events as server-sent events."""
        if isinstance(first, Done):  # cancelled before it started
            out.on(first)
            return JSONResponse(out.body())
        if not stream:
            await collect(request, job, out)
            return JSONResponse(out.body())

        async def body() -> AsyncIterator[bytes]:
            try:
                for frame in opening():
                    yield frame
                async for ev in events(job, keepalive):
                    if isinstance(ev, bytes):
                        yield ev
                    elif isinstance(ev, Failed):
                        yield _stream_error(ev, anthropic=anthropic)
                        return
                    else:
                        for frame in out.on(ev):
                            yield frame
            finally:
                job.cancel.set()  # no-op when finished; stops the worker when the client left

        return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)

    async def collect(request: Request, job: Job, sink: Any) -> None:
        try:
            await _collect(request, job, sink)
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    async def _collect(request: Request, job: Job, sink: Any) -> None:
        # Events can arrive faster than any timeout, so look for a disconnect by the clock.
        loop = asyncio.get_running_loop()
        next_check = loop.time() + 0.5
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                ev = None
            if loop.time() >= next_check:
                next_check = loop.time() + 0.5
                if await request.is_disconnected():
                    job.cancel.set()
                    return
            if ev is None:
                continue
            if isinstance(ev, Failed):
                raise ApiError(ev.status, ev.message, param=ev.param)
            sink.on(ev)
            if isinstance(ev, Done):
                return

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        raw = await _read_json(request, config.max_body_bytes)
        req = _validated(ChatCompletionRequest, raw)
        check_model(req.model, "openai")
        gen = from_openai(req, raw, config.default_thinking)
        job, first = await submit(request, gen, "call_")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        out = OpenAIResponse(req.model, config.fingerprint, include_usage)
        return await respond(
            request, job, first, out, req.stream, lambda: [out.start()], OAI_KEEPALIVE
        )

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        raw = await _read_json(request, config.max_body_bytes)
        req = _validated(MessagesRequest, raw)
        check_model(req.model, "anthropic")
        gen = from_anthropic(req, raw)
        job, first = await submit(request, gen, "toolu_")
        out = AnthropicResponse(req.model)

        def opening() -> list[bytes]:
            assert isinstance(first, Accepted)  # streaming starts only after acceptance
            return [out.start(Usage(first.prompt_tokens, first.cached_tokens, 0))]

        return await respond(
            request, job, first, out, req.stream, opening, ANTH_KEEPALIVE, anthropic=True
        )

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        raw = await _read_json(request, config.max_body_bytes)
        req = _validated(ResponsesRequest, raw)
        check_model(req.model, "openai")
        gen = from_responses(req, config.default_thinking)
        job, first = await submit(request, gen, "call_")
        out = ResponsesResponse(req.model)
        return await respond(request, job, first, out, req.stream, out.start, RESP_KEEPALIVE)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict[str, Any]:
        raw = await _read_json(request, config.max_body_bytes)
        raw.setdefault("max_tokens", 1)
        req = _validated(MessagesRequest, raw)
        check_model(req.model, "anthropic")
        rendered = await asyncio.to_thread(render_prompt, from_anthropic(req, raw), replay)
        n = await asyncio.to_thread(lambda: len(worker.cache.tokenize(rendered.segments)))
        return {"input_tokens": n}

    return app


_M = TypeVar("_M", bound=BaseModel)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "ds4-agent"}


def _validated(model: type[_M], raw: Any) -> _M:
    """The request body as `model`, or a 400 naming the offending field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise from_validation_error(e) from None


def _stream_error(ev: Failed, anthropic: bool = False) -> bytes:
    err = ApiError(ev.status, ev.message, param=ev.param)
    data = json.dumps(err.body("anthropic" if anthropic else "openai"), ensure_ascii=False)
    prefix = b"event: error\n" if anthropic else b""
    return prefix + b"data: " + data.encode() + b"\n\n"
