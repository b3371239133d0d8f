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

The endpoints themselves are in :mod:`llmkit.serve.routes`; this module holds the state they
share (:class:`ServerState`: the model, the worker, encoding and the context checks), the app
and :func:`serve`. Starlette (the toolkit FastAPI is built on) is used directly: the routes
validate by hand to name each field in OpenAI's errors, so FastAPI's request models would add
nothing but start-up.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from llmkit.errors import UserError
from llmkit.runtime import check_threads
from llmkit.serve.routes import EXCEPTION_HANDLERS, ROUTES
from llmkit.serve.schemas import ApiError, ParsedRequest, bad


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
            from llmkit.generation.cpu_path import auto_cpu_path
            from llmkit.runtime import announce_threads, apply_threads
            from llmkit.serve.worker import BatchWorker

            apply_threads(self.threads)
            model, tokenizer, source = load_model_and_tokenizer(
                self.model_arg,
                device=self.device,
                dtype=self.dtype,
                trust_remote_code=self.trust_remote_code,
            )
            model, _choice = auto_cpu_path(model, tokenizer, self.dtype, err=self.log)
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
        from llmkit.generation.prompts import chat_text, encode_prompt

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


def build_app(state: ServerState) -> Starlette:
    """The Starlette app for ``state`` (its model loaded by the caller, or being loaded): the
    routes of :mod:`llmkit.serve.routes`, which find ``state`` as ``app.state.server``."""
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS)
    app.state.server = state
    return app


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
