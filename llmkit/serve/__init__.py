"""``llmkit serve``: a model behind OpenAI's wire format, batched, streamed, with a chat page.

- :mod:`llmkit.serve.schemas` — request validation and OpenAI's error envelope (no framework).
- :mod:`llmkit.serve.worker` — the thread that owns the model and batches compatible requests.
- :mod:`llmkit.serve.routes` — the HTTP endpoints, one function each, and the server-sent events.
- :mod:`llmkit.serve.app` — the server's state (model, worker, encoding), the app, :func:`serve`.
- ``page.html`` — the chat page served at ``/``.

Needs the ``serve`` extra (``pip install 'llmkit[serve]'``: Starlette and uvicorn).
"""

from __future__ import annotations

from typing import Any


def serve(*args: Any, **kwargs: Any) -> None:
    """Serve a model over HTTP; see :func:`llmkit.serve.app.serve`."""
    from llmkit.serve.app import serve as _serve

    _serve(*args, **kwargs)
