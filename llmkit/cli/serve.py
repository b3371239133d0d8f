"""``llmkit serve``: a model behind the OpenAI API (chat and text completions), with a chat page."""

from __future__ import annotations

import typer

from llmkit.cli._common import trust_remote_code_option, user_errors
from llmkit.errors import UserError, require

#: The longest --batch-wait-ms: a batch may gather for 10x this, holding every request in it
#: (NaN or inf was accepted, and then waited on).
MAX_BATCH_WAIT_MS = 10_000.0


@user_errors
def serve_command(
    model: str = typer.Option(
        None, "--model", "-m", help="Model directory, .gguf file or Hub id.", show_default=False
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    served_name: str = typer.Option(
        None,
        "--served-model-name",
        help="Model id in /v1/models and responses (default: the model's name).",
        show_default=False,
    ),
    max_batch_size: int = typer.Option(
        8, "--max-batch-size", help="Most sequences generated together in one batch."
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", help="Most requests waiting; one more gets 503 with Retry-After."
    ),
    batch_wait_ms: float = typer.Option(
        10.0,
        "--batch-wait-ms",
        help="A batch gathers requests until none arrived for this long (and none is being "
        "prepared), at most 10x this.",
    ),
    default_max_tokens: int = typer.Option(
        256, "--default-max-tokens", help="max_tokens when a request gives none."
    ),
    threads: int = typer.Option(
        None, "--threads", help="Torch threads (default: the free cores).", show_default=False
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Serve a model with OpenAI's API: POST /v1/chat/completions and /v1/completions (streamed
    or not), GET /v1/models and /health, and a chat page at /.

    Chat requests are rendered with the model's chat template and stop at its end-of-turn
    token, as in llmkit chat. Concurrent requests with the same sampling settings (all greedy
    ones; sampled ones with equal temperature/top_p/top_k; a seeded one runs alone) are
    generated together in one left-padded batch, each answer equal to the answer alone. A
    prompt that does not fit in the context with max_tokens is answered 400 before anything
    runs; a client that disconnects stops its generation. Listens on 127.0.0.1 unless --host
    says otherwise. Needs the serve extra: pip install 'llmkit[serve]'.
    """
    require("starlette", "llmkit serve needs starlette", "pip install 'llmkit[serve]'")
    require("uvicorn", "llmkit serve needs uvicorn", "pip install 'llmkit[serve]'")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number", "use 1-65535, e.g. 8000")
    if not 0 <= batch_wait_ms <= MAX_BATCH_WAIT_MS:  # NaN too
        what = "negative" if batch_wait_ms < 0 else f"not a number from 0 to {MAX_BATCH_WAIT_MS:,}"
        raise UserError(f"--batch-wait-ms {batch_wait_ms} is {what}", "e.g. 10")
    from llmkit.serve.app import serve

    serve(
        model,
        host=host,
        port=port,
        served_name=served_name,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        batch_wait=batch_wait_ms / 1000,
        default_max_tokens=default_max_tokens,
        threads=threads,
        trust_remote_code=trust_remote_code,
    )


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""
    app.command("serve")(serve_command)
