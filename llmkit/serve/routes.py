"""The HTTP endpoints of ``llmkit serve``, one function each, and the bodies they answer with.

:data:`ROUTES` and :data:`EXCEPTION_HANDLERS` are what :func:`llmkit.serve.app.build_app` gives
Starlette; every endpoint finds the server's :class:`~llmkit.serve.app.ServerState` as
``request.app.state.server`` (Starlette's per-app state), so nothing here is built per app.

A completion request goes: read the body (413 past :data:`MAX_BODY_BYTES`) → validate
(:mod:`llmkit.serve.schemas`) → encode and queue (:func:`_submit`) → answer, streamed
(:func:`_stream_response`) or whole (:func:`_whole_response`), while :func:`_watch_disconnect`
cancels the job if the client leaves.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmkit.serve.schemas import (
    ApiError,
    ParsedRequest,
    parse_chat,
    parse_completion,
    parse_json,
    usage,
)

if TYPE_CHECKING:
    from llmkit.serve.app import ServerState

PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'"
)
"""The chat page's Content-Security-Policy: its inline script and style, requests to this server
only — the browser itself holds the page to "no external assets"."""

MAX_BODY_BYTES = 32 * 2**20
"""The largest request body read (32 MiB, some 8 million tokens of text); larger is a 413."""


def _server(request: Request) -> ServerState:
    """The :class:`~llmkit.serve.app.ServerState` of the app that received ``request``."""
    return request.app.state.server


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --- small endpoints --------------------------------------------------------------------------


async def health(request: Request) -> Response:
    """``GET /health``: 200 when the model is ready, 503 while it loads, 500 when it failed."""
    state = _server(request)
    if state.ready.is_set():
        return JSONResponse(
            {"status": "ok", "model": state.served_name, "queued": state.worker.queued()}
        )
    if state.error is not None:
        return JSONResponse({"status": "failed", "error": str(state.error)}, status_code=500)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})


def _model_entry(state: ServerState) -> dict[str, Any]:
    """The served model as ``/v1/models`` lists it."""
    return {
        "id": state.served_name,
        "object": "model",
        "created": state.created,
        "owned_by": "llmkit",
        "context_length": state.positions,
        "max_model_len": state.positions,  # the name vLLM gives it
    }


async def models(request: Request) -> Response:
    """``GET /v1/models``: the one served model."""
    state = _server(request)
    try:
        state.require_ready()
    except ApiError as err:
        return error_response(err)
    return JSONResponse({"object": "list", "data": [_model_entry(state)]})


async def one_model(request: Request) -> Response:
    """``GET /v1/models/{name}``: the served model, or 404 for another name."""
    state = _server(request)
    try:
        state.require_ready()
        name = request.path_params["name"]
        if name != state.served_name:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {state.served_name!r}",
                param="model",
                code="model_not_found",
            )
    except ApiError as err:
        return error_response(err)
    return JSONResponse(_model_entry(state))


async def page(request: Request) -> Response:
    """``GET /``: the chat page, one static file."""
    html = resources.files("llmkit.serve").joinpath("page.html").read_text(encoding="utf-8")
    return HTMLResponse(
        html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP}
    )


# --- completions ------------------------------------------------------------------------------


async def chat(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    return await _complete(request, "chat")


async def completions(request: Request) -> Response:
    """``POST /v1/completions``."""
    return await _complete(request, "completion")


async def _complete(request: Request, kind: str) -> Response:
    """Answer a completion request of ``kind`` (``chat`` or ``completion``)."""
    state = _server(request)
    try:
        parsed, job, lengths = await _submit(request, state, kind)
    except ApiError as err:
        return error_response(err)
    answer = _Answer(state, parsed, job, lengths)
    watcher = asyncio.create_task(_watch_disconnect(request, job, state.worker))
    if parsed.stream:
        return await _stream_response(answer, watcher)
    return await _whole_response(answer, watcher)


async def _submit(
    request: Request, state: ServerState, kind: str
) -> tuple[ParsedRequest, Any, list[int]]:
    """Read, validate and encode the request and queue its job on the worker.

    Returns:
        The parsed request, the queued :class:`~llmkit.serve.worker.Job` (its events go to an
        ``asyncio.Queue`` of this loop) and each prompt's length in tokens.

    Raises:
        ApiError: the model is loading (503), the body is too large (413) or invalid (400), a
            prompt does not fit (400), the queue is full (503).
    """
    state.require_ready()
    body = parse_json(await _read_body(request))
    max_n = state.max_batch_size
    parsed = parse_chat(body, max_n) if kind == "chat" else parse_completion(body, max_n)
    state.worker.expect()  # a batch being gathered waits while this one is prepared
    try:
        job, lengths = await run_in_threadpool(state.make_job, parsed)
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        state.worker.submit(job)
    finally:
        state.worker.unexpect()
    return parsed, job, lengths


async def _read_body(request: Request) -> bytes:
    """The request body, refused with 413 past :data:`MAX_BODY_BYTES` without reading it all."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(
        413,
        f"the request body is over {MAX_BODY_BYTES // 2**20} MiB",
        code="request_too_large",
    )
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_big
        parts.append(part)
    return b"".join(parts)


async def _watch_disconnect(request: Request, job: Any, worker: Any) -> None:
    """Cancel ``job`` as soon as the client's connection closes (a queued job leaves the queue
    at once), and wake its handler with a ``("gone",)`` event (a job that never runs gets no
    other event)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            worker.withdraw(job)
            job.events.put_nowait(("gone",))
            return


async def _whole_response(answer: _Answer, watcher: asyncio.Task) -> Response:
    """Gather the job's text and answer it in one JSON body; an error event is a plain HTTP
    error, a client gone is a 204 nobody reads."""
    job = answer.job
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    try:
        event = await job.events.get()
        while event[0] in ("delta", "finish"):
            if event[0] == "delta":
                texts.setdefault(event[1], []).append(event[2])
            else:
                reasons[event[1]] = event[2]
            event = await job.events.get()
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once done; stops the rows when this handler is torn down
    if event[0] == "error":
        return error_response(event[1])
    if event[0] == "gone":
        return Response(status_code=204)  # nobody is listening
    return JSONResponse(answer.whole(texts, reasons))  # "done"


async def _stream_response(answer: _Answer, watcher: asyncio.Task) -> Response:
    """Answer as server-sent events. The status goes out with the first event, so that a fault
    before any text is a plain HTTP error; after it, faults are error events in the stream."""
    job = answer.job
    first = await job.events.get()
    if first[0] in ("error", "gone"):
        watcher.cancel()
        job.cancel()
        return error_response(first[1]) if first[0] == "error" else Response(status_code=204)
    return StreamingResponse(
        _events(answer, watcher, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(answer: _Answer, watcher: asyncio.Task, first: tuple):
    """The stream's events: the role (chat), content deltas, a ``finish_reason`` chunk per
    choice, then an error event or the usage chunk (when asked for), then ``[DONE]``; nothing
    more once the client is gone."""
    job = answer.job
    try:
        if answer.chat:
            for row in job.rows:
                yield _sse(answer.chunk(row.index, "", role=True))
        event = first
        while event[0] in ("delta", "finish"):
            if event[0] == "delta":
                yield _sse(answer.chunk(event[1], event[2]))
            else:
                yield _sse(answer.chunk(event[1], None if answer.chat else "", event[2]))
            event = await job.events.get()
        if event[0] == "gone":
            return
        if event[0] == "error":
            yield _sse(event[1].body())
        elif answer.parsed.include_usage:  # "done"
            yield _sse(answer.usage_chunk())
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once done; the client left otherwise


def _sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying ``data`` (JSON, or a string as is)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


class _Answer:
    """Builds the response bodies and chunks of one request."""

    def __init__(self, state: ServerState, parsed: ParsedRequest, job: Any, lengths: list[int]):
        self.parsed, self.job = parsed, job
        self.chat = parsed.kind == "chat"
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = state.served_name
        self.prompt_tokens = sum(lengths)
        self.object = "chat.completion" if self.chat else "text_completion"

    def completion_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.job.rows)

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens())

    def chunk(self, index: int, text: str | None, finish: str | None = None, role: bool = False):
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if finish is not None and self.parsed.return_token_ids:
            choice["token_ids"] = list(self.job.rows[index].token_ids)
        body = {
            "id": self.id,
            "object": self.object + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.parsed.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }

    def whole(self, texts: dict[int, list[str]], reasons: dict[int, str]) -> dict[str, Any]:
        choices = []
        for row in self.job.rows:
            text = "".join(texts.get(row.index, []))
            if self.chat:
                choice: dict[str, Any] = {
                    "index": row.index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reasons.get(row.index),
                }
            else:
                choice = {
                    "index": row.index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": reasons.get(row.index),
                }
            if self.parsed.return_token_ids:
                choice["token_ids"] = list(row.token_ids)
            choices.append(choice)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }


# --- errors -----------------------------------------------------------------------------------


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (404 no such route, 405 wrong method) in OpenAI's envelope."""
    status = getattr(exc, "status_code", 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    detail = getattr(exc, "detail", None) or "internal error"
    return error_response(ApiError(status, f"{request.url.path}: {detail}", type=kind))


async def fault(request: Request, exc: Exception) -> Response:
    """Any other exception: logged, and a 500 in OpenAI's envelope."""
    _server(request)._write(f"[serve] internal error on {request.url.path}: {exc!r}\n")
    return error_response(ApiError(500, f"internal error: {exc}", type="server_error"))


ROUTES = [
    Route("/", page, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{name:path}", one_model, methods=["GET"]),
    Route("/v1/chat/completions", chat, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
"""Every route of the server (SPEC §9)."""

EXCEPTION_HANDLERS: dict[Any, Any] = {HTTPException: http_error, Exception: fault}
