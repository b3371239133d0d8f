"""The HTTP side of ``llmkit serve``: a Starlette app speaking OpenAI's wire format (SPEC §9).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events
or not), ``GET /v1/models`` (with ``context_length``), ``GET /health`` (503 while the model
loads, 200 when ready) and ``GET /`` (the chat page, one static file).

A request is validated (:mod:`llmkit.serve.schemas`), rendered with the model's chat template
exactly as ``llmkit chat`` does (:func:`~llmkit.generation.generate.encode_chat`), measured
against the context — prompt + ``max_tokens`` over the model's positions is a 400 before
anything is queued — then handed to the :class:`~llmkit.serve.worker.BatchWorker`. A full queue
is a 503 with ``Retry-After``. A stream opens with the role, carries content deltas, closes each
choice with a ``finish_reason`` chunk (``stop`` or ``length``), then usage when
``stream_options.include_usage`` asks, then ``data: [DONE]``. An error before the stream starts is
a plain HTTP error; after, an ``error`` event then ``[DONE]``. A client that disconnects (the
connection's ``http.disconnect``, watched while waiting) cancels its rows at the next step.

Starlette (the toolkit FastAPI is built on) is used directly: the routes validate by hand to
name each field in OpenAI's errors, so FastAPI's request models would add nothing but start-up.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmkit.errors import UserError
from llmkit.runtime import check_threads
from llmkit.serve.schemas import (
    ApiError,
    ParsedRequest,
    bad,
    parse_chat,
    parse_completion,
    parse_json,
    usage,
)


class ServerState:
    """The model (once loaded), the worker, and what the routes need to answer.

    Args:
        model: what :func:`~llmkit.core.loading.load_model_and_tokenizer` loads.
        served_name: the id in ``/v1/models`` and in responses (default: the model's name).
        device, dtype: as for loading.
        max_batch_size, max_queue, batch_wait: see :class:`~llmkit.serve.worker.BatchWorker`.
        default_max_tokens: ``max_tokens`` when a request gives none (capped by the room left
            in the context).
        threads: torch threads (None: :func:`llmkit.runtime.choose_threads`, the free cores).
        trust_remote_code: let a model run Python code of its own (as ``llmkit generate``).
        on_fatal: called with the error when the model fails to load (the CLI stops the server).
    """

    def __init__(
        self,
        model: str | None,
        *,
        served_name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait: float = 0.01,
        default_max_tokens: int = 256,
        threads: int | None = None,
        trust_remote_code: bool = False,
        log: Any = sys.stderr,
        on_fatal: Any = None,
    ):
        self.model_arg = model
        self.served_name = served_name
        self.device, self.dtype = device, dtype
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.default_max_tokens = default_max_tokens
        self.threads = threads
        self.trust_remote_code = trust_remote_code
        self.log = log
        self.on_fatal = on_fatal
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.model: Any = None
        self.tokenizer: Any = None
        self.worker: Any = None
        self.positions: int | None = None
        self.max_token_bytes = 1
        self.has_template = False

    # --- loading ------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model and start the worker (run on a thread; ``/health`` says 503 until
        done). A failure is kept in ``error`` and passed to ``on_fatal``."""
        try:
            import torch

            from llmkit.core.loading import load_model_and_tokenizer, model_max_positions
            from llmkit.runtime import announce_threads, apply_threads
            from llmkit.serve.worker import BatchWorker

            apply_threads(self.threads)
            model, tokenizer, source = load_model_and_tokenizer(
                self.model_arg,
                device=self.device,
                dtype=self.dtype,
                trust_remote_code=self.trust_remote_code,
            )
            self.model, self.tokenizer = model, tokenizer
            self.served_name = self.served_name or _name_of(source)
            self.positions = model_max_positions(model)
            self.max_token_bytes = max(
                (len(t.encode("utf-8")) for t in tokenizer.get_vocab()), default=1
            )
            self.has_template = bool(getattr(tokenizer, "chat_template", None))
            self.worker = BatchWorker(
                model,
                tokenizer,
                max_batch_size=self.max_batch_size,
                max_queue=self.max_queue,
                batch_wait=self.batch_wait,
                tokenizer_lock=self.lock,
                log=self.log,
            )
            self.worker.start()
            announce_threads(self.log)
            self.ready.set()
            self._write(
                f"[serve] ready: {self.served_name} (context {self.positions}, "
                f"{torch.get_num_threads()} threads, batches of up to {self.max_batch_size}, "
                f"queue {self.max_queue}"
                + ("" if self.has_template else "; no chat template: /v1/completions only")
                + ")\n"
            )
        except BaseException as err:  # noqa: BLE001 - reported to the CLI, which exits
            self.error = err
            if self.on_fatal is not None:
                self.on_fatal(err)

    def _write(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line)
            self.log.flush()

    def require_ready(self) -> None:
        if not self.ready.is_set():
            raise ApiError(
                503,
                "the model is still loading",
                code="model_loading",
                type="server_error",
                headers={"Retry-After": "2"},
            )

    # --- requests -----------------------------------------------------------------------------

    def _over_context(self, text: str, label: str) -> None:
        """A 400 at once when ``text`` surely has more tokens than the model's positions,
        without tokenizing all of it (answered in well under a second whatever its length):
        every token covers at most ``max_token_bytes`` bytes of text (× 4 for a normalizer
        that shrinks text, as NFKC turns 4-byte mathematical letters into 1-byte ones), and the
        first ``16 × positions`` characters alone may already hold too many tokens."""
        if self.positions is None:
            return
        at_least = len(text.encode("utf-8")) // (4 * self.max_token_bytes)
        cut = 16 * self.positions
        if at_least <= self.positions and len(text) > cut:
            with self.lock:
                prefix = self.tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
            at_least = len(prefix) - 1  # the cut may split the last word's tokens
        if at_least > self.positions:
            raise bad(
                f"this model's maximum context length is {self.positions} tokens; the "
                f"{label} alone is at least {at_least} tokens. Shorten the {label}",
                "messages" if label == "messages" else "prompt",
                "context_length_exceeded",
            )

    def encode(self, parsed: ParsedRequest) -> list[list[int]]:
        """Token ids of each prompt, the chat template applied for a chat request (as
        ``llmkit chat`` renders it). Runs on a worker thread of the event loop.

        Raises:
            ApiError: 400 for a prompt over the context, token ids outside the vocabulary,
                a model without a chat template or a template that refuses the conversation.
        """
        from llmkit.generation.generate import chat_text, encode_prompt

        if parsed.kind == "chat":
            if not self.has_template:
                raise bad(
                    "the served model's tokenizer has no chat template (it is not a chat model)",
                    "messages",
                    "no_chat_template",
                )
            try:
                with self.lock:
                    text = chat_text(self.tokenizer, parsed.messages)
            except Exception as err:  # the template's own rule, e.g. roles must alternate
                raise bad(f"the chat template refused the messages: {err}", "messages") from None
            self._over_context(text, "messages")
            with self.lock:
                ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return [ids]
        out = []
        vocab = len(self.tokenizer)
        for p in parsed.prompts:
            if isinstance(p, list):
                if any(not 0 <= t < vocab for t in p):
                    raise bad(f"prompt token ids must be in [0, {vocab})", "prompt")
                out.append(list(p))
                continue
            self._over_context(p, "prompt")
            with self.lock:
                out.append(encode_prompt(self.tokenizer, p))
        return out

    def make_job(self, parsed: ParsedRequest) -> tuple[Any, list[int]]:
        """The worker's job for a request, and each prompt's length in tokens.

        Raises:
            ApiError: as :meth:`encode`; 400 ``context_length_exceeded`` when a prompt and
                ``max_tokens`` do not fit in the model's positions.
        """
        from llmkit.serve.worker import Job, Row

        ids = self.encode(parsed)
        what = "messages" if parsed.kind == "chat" else "prompt"
        rows = []
        for p, row_ids in enumerate(ids):
            room = None if self.positions is None else self.positions - len(row_ids)
            if parsed.max_tokens is None:
                if room is not None and room < 1:
                    raise bad(
                        f"this model's maximum context length is {self.positions} tokens; the "
                        f"{what} is {len(row_ids)} tokens, which leaves no room to answer. "
                        f"Shorten the {what}",
                        what,
                        "context_length_exceeded",
                    )
                limit = (
                    self.default_max_tokens if room is None else min(self.default_max_tokens, room)
                )
            else:
                limit = parsed.max_tokens
                if room is not None and limit > room:
                    raise bad(
                        f"this model's maximum context length is {self.positions} tokens; you "
                        f"asked for {len(row_ids) + limit} ({len(row_ids)} in the {what}, "
                        f"{limit} in {parsed.max_tokens_param}). Shorten the {what} or lower "
                        f"{parsed.max_tokens_param}",
                        what,
                        "context_length_exceeded",
                    )
            for j in range(parsed.n):
                rows.append(Row(row_ids, limit, parsed.stop, index=p * parsed.n + j))
        return Job(rows=rows, sampling=parsed.sampling), [len(r) for r in ids]


def _name_of(source: str) -> str:
    """The served model's id: a path's last part (a .gguf file without its suffix)."""
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        return path.stem
    return path.name if (path.exists() or source.startswith((".", "/", "~"))) else source


PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'"
)
"""The chat page's Content-Security-Policy: its inline script and style, requests to this server
only — the browser itself holds the page to "no external assets"."""

MAX_BODY_BYTES = 32 * 2**20
"""The largest request body read (32 MiB, some 8 million tokens of text); larger is a 413."""


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


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


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


def build_app(state: ServerState) -> Starlette:
    """The Starlette app for ``state`` (its model loaded by the caller, or being loaded)."""

    async def health(request: Request) -> Response:
        if state.ready.is_set():
            return JSONResponse(
                {"status": "ok", "model": state.served_name, "queued": state.worker.queued()}
            )
        if state.error is not None:
            return JSONResponse({"status": "failed", "error": str(state.error)}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})

    def model_entry() -> dict[str, Any]:
        return {
            "id": state.served_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llmkit",
            "context_length": state.positions,
            "max_model_len": state.positions,  # the name vLLM gives it
        }

    async def models(request: Request) -> Response:
        try:
            state.require_ready()
        except ApiError as err:
            return error_response(err)
        return JSONResponse({"object": "list", "data": [model_entry()]})

    async def one_model(request: Request) -> Response:
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
        return JSONResponse(model_entry())

    async def page(request: Request) -> Response:
        html = resources.files("llmkit.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(
            html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP}
        )

    async def chat(request: Request) -> Response:
        return await _complete(request, "chat")

    async def completions(request: Request) -> Response:
        return await _complete(request, "completion")

    async def _complete(request: Request, kind: str) -> Response:
        try:
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
        except ApiError as err:
            return error_response(err)
        answer = _Answer(state, parsed, job, lengths)
        watcher = asyncio.create_task(_watch_disconnect(request, job, state.worker))
        if parsed.stream:
            # The status goes out with the first event, so that a fault before any text is a
            # plain HTTP error; after it, faults are error events in the stream.
            first = await job.events.get()
            if first[0] in ("error", "gone"):
                watcher.cancel()
                job.cancel()
                return (
                    error_response(first[1]) if first[0] == "error" else Response(status_code=204)
                )
            return StreamingResponse(
                _stream(answer, watcher, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str] = {}
        try:
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    texts.setdefault(event[1], []).append(event[2])
                elif event[0] == "finish":
                    reasons[event[1]] = event[2]
                elif event[0] == "error":
                    return error_response(event[1])
                elif event[0] == "gone":
                    return Response(status_code=204)  # nobody is listening
                elif event[0] == "done":
                    break
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once done; stops the rows when this handler is torn down
        return JSONResponse(answer.whole(texts, reasons))

    async def _stream(answer: _Answer, watcher: asyncio.Task, first: tuple):
        job = answer.job
        try:
            if answer.chat:
                for row in job.rows:
                    yield _sse(answer.chunk(row.index, "", role=True))
            event = first
            while True:
                if event[0] == "delta":
                    yield _sse(answer.chunk(event[1], event[2]))
                elif event[0] == "finish":
                    yield _sse(answer.chunk(event[1], None if answer.chat else "", event[2]))
                elif event[0] == "error":
                    yield _sse(event[1].body())
                    break
                elif event[0] == "gone":
                    return
                elif event[0] == "done":
                    if answer.parsed.include_usage:
                        yield _sse(answer.usage_chunk())
                    break
                event = await job.events.get()
            yield _sse("[DONE]")
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once done; the client left otherwise

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        kind = "invalid_request_error" if status < 500 else "server_error"
        detail = getattr(exc, "detail", None) or "internal error"
        return error_response(ApiError(status, f"{request.url.path}: {detail}", type=kind))

    async def fault(request: Request, exc: Exception) -> Response:
        state._write(f"[serve] internal error on {request.url.path}: {exc!r}\n")
        return error_response(ApiError(500, f"internal error: {exc}", type="server_error"))

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, Exception: fault}
    )


def _bind(host: str, port: int) -> Any:
    """A socket bound to ``host:port`` (port 0: a free one), so that a busy port or a bad
    address is one clear error before anything loads.

    Raises:
        UserError: the address cannot be resolved or bound.
    """
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"--host {host}: {err}", "use an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {err.strerror or err}",
            "is another server using the port? pass --port N",
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 8,
    max_queue: int = 64,
    batch_wait: float = 0.01,
    default_max_tokens: int = 256,
    threads: int | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Serve ``model`` over HTTP until interrupted (``llmkit serve``).

    The server listens at once and loads the model on a thread (``/health`` answers 503 until
    it is ready); when the model fails to load the server stops and the error is raised.

    Raises:
        UserError: bad options; the model does not load.
    """
    import uvicorn

    if max_batch_size < 1:
        raise UserError(f"--max-batch-size {max_batch_size} must be at least 1")
    if max_queue < 0:
        raise UserError(f"--max-queue {max_queue} must be 0 or more")
    if default_max_tokens < 1:
        raise UserError(f"--default-max-tokens {default_max_tokens} must be at least 1")
    check_threads(threads)  # validates --threads now
    server_box: dict[str, Any] = {}

    def on_fatal(err: BaseException) -> None:
        server = server_box.get("server")
        if server is not None:
            server.should_exit = True

    state = ServerState(
        model,
        served_name=served_name,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        batch_wait=batch_wait,
        default_max_tokens=default_max_tokens,
        threads=threads,
        trust_remote_code=trust_remote_code,
        on_fatal=on_fatal,
    )
    app = build_app(state)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,  # open streams get 3 s, then are closed (and cancelled)
    )
    server = uvicorn.Server(config)
    server_box["server"] = server
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(
        f"[serve] listening on http://{shown}:{sock.getsockname()[1]} (loading the model...)\n"
    )
    sys.stderr.flush()
    loader = threading.Thread(target=state.load, name="llmkit-serve-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.worker is not None:
            state.worker.shutdown()
    if state.error is not None:
        if isinstance(state.error, UserError):
            raise state.error
        raise UserError(f"the model failed to load: {state.error}")
