"""The OpenAI wire format: request validation and response bodies, with no web framework in it.

Requests are validated by hand rather than by a schema library so that every error names the
field it is about in OpenAI's envelope (``{"error": {"message", "type", "param", "code"}}``,
https://platform.openai.com/docs/guides/error-codes), e.g. ``param: "messages[1].role"`` — the
``openai`` client raises ``BadRequestError`` with that ``param`` for a 400, and does not retry it
(it retries 408/409/429 and 5xx).

Supported, as in OpenAI's API reference (Chat Completions and the legacy Completions):
``messages`` (roles system, developer, user, assistant; text content, a string or text parts),
``prompt`` (a string, a list of strings, token ids or lists of token ids), ``max_tokens`` and
``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``n``, ``seed``, ``stop``
(a string or up to 4), ``stream`` and ``stream_options.include_usage``. Two extensions, as vLLM
names them: ``top_k`` (0 or absent: no limit) and ``return_token_ids`` (each choice gets the
generated ``token_ids``). Anything that would change the answer but is not implemented
(``logprobs``, ``tools``, penalties, ``logit_bias``, ``echo``, ``best_of``, a non-text
``response_format``) is a 400 naming it rather than silently ignored; other fields (``user``,
``metadata``, ``model``...) are accepted and ignored — the served model answers whatever
``model`` says.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import json_error_text
from llmkit.generation.settings import GREEDY_BELOW

ROLES = ("system", "developer", "user", "assistant")
"""Chat roles accepted; ``developer`` (OpenAI's newer name for system) is rendered as system."""
MAX_STOP = 4  # OpenAI: "Up to 4 sequences where the API will stop generating further tokens"


class ApiError(Exception):
    """An error answered in OpenAI's envelope.

    Args:
        status: the HTTP status (400 bad input, 503 busy or loading, 500 a fault).
        message: what is wrong, for a person.
        param: the request field at fault (``messages[0].role``), or None.
        code: a machine-readable code (``context_length_exceeded``), or None.
        type: OpenAI's error type (``invalid_request_error``, ``server_error``...).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``, the JSON body of the response or of a stream's error event."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


@dataclass
class Sampling:
    """The decoding settings of one request (the fields that decide which requests may share a
    batch, see :meth:`batch_key`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple | None:
        """Requests with equal keys may run in one batch; None: this one runs alone.

        Greedy requests all share one key (each row's argmax does not depend on the others).
        Sampled requests share a batch when temperature, top_p and top_k are equal (one
        ``model.generate`` applies one setting to all rows). A seeded request runs alone so that
        its text depends on its seed only, not on what else was in the batch.
        """
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k)


@dataclass
class ParsedRequest:
    """A validated request of either endpoint."""

    kind: str  # "chat" or "completion"
    messages: list[dict[str, str]] | None = None
    prompts: list[str | list[int]] = field(default_factory=list)
    max_tokens: int | None = None
    """None: as many as fit, up to the server's default."""
    max_tokens_param: str = "max_tokens"
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object.

    Raises:
        ApiError: 400 when the body is not JSON or not an object, or when a string of it
            holds a lone surrogate escape (``"\\udcff"``: valid JSON, but no UTF-8 text; the
            tokenizer failed on it with a 500).
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        detail = json_error_text(err, line=True)
        raise bad(f"the request body is not valid JSON: {detail}") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        bad_char = err.object[err.start : err.end].encode("unicode_escape").decode("ascii")
        raise bad(
            f"the request body holds a lone surrogate escape ({bad_char}), which is not text"
        ) from None
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _unsupported(body: dict[str, Any], kind: str) -> None:
    """400 for fields that would change the answer but are not implemented."""
    for name in ("frequency_penalty", "presence_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise bad(f"{name} is not supported by this server (only 0)", name)
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported by this server", "logit_bias")
    if kind == "chat":
        _unsupported_in_chat(body)
    else:
        _unsupported_in_completion(body)


def _unsupported_in_chat(body: dict[str, Any]) -> None:
    """:func:`_unsupported`'s fields of ``/v1/chat/completions`` only."""
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported by this server", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise bad("tools and function calling are not supported by this server", "tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format")


def _unsupported_in_completion(body: dict[str, Any]) -> None:
    """:func:`_unsupported`'s fields of ``/v1/completions`` only (its ``logprobs`` is a
    number: any value, 0 included, asks for them)."""
    if body.get("logprobs") is not None:
        raise bad("logprobs are not supported by this server", "logprobs")
    if body.get("echo"):
        raise bad("echo is not supported by this server", "echo")
    if body.get("suffix"):
        raise bad("suffix is not supported by this server", "suffix")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of is not supported by this server (only 1)", "best_of")


def _common(body: dict[str, Any], out: ParsedRequest, max_n: int) -> None:
    """The fields both endpoints share, checked in this order (the first error is answered)."""
    out.max_tokens, out.max_tokens_param = _max_tokens(body, out.kind)
    for name, parse in _SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is not None:
            setattr(out.sampling, name, parse(value))
    out.n = _n(body.get("n"), max_n)
    out.stop = _stop(body.get("stop"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {stream!r}", "stream")
    out.stream = bool(stream)
    out.include_usage = _include_usage(body.get("stream_options"))
    out.return_token_ids = bool(body.get("return_token_ids"))


def _max_tokens(body: dict[str, Any], kind: str) -> tuple[int | None, str]:
    """The answer's token limit and the field that set it: ``max_completion_tokens`` (chat only)
    wins over the deprecated ``max_tokens``, and both are checked when both are given;
    ``(None, "max_tokens")`` when neither is."""
    names = ["max_completion_tokens", "max_tokens"] if kind == "chat" else ["max_tokens"]
    found: tuple[int | None, str] = (None, "max_tokens")
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise bad(f"{name} must be an integer, got {v!r}", name)
        if v < 1:
            raise bad(f"{name} must be at least 1, got {v}", name)
        if found[0] is None:
            found = (v, name)
    return found


def _temperature(t: Any) -> float:
    if not _is_number(t):
        raise bad(f"temperature must be a number, got {t!r}", "temperature")
    if not 0 <= t <= 2:
        raise bad(f"temperature must be between 0 and 2, got {t}", "temperature")
    # below 1e-5 the logits divided by it overflow to inf (a NaN distribution): greedy, as
    # vLLM does under the same threshold (its _SAMPLING_EPS)
    return float(t) if t >= GREEDY_BELOW else 0.0


def _top_p(p: Any) -> float:
    if not _is_number(p) or not 0 < p <= 1:
        raise bad(f"top_p must be a number in (0, 1], got {p!r}", "top_p")
    return float(p)


def _top_k(k: Any) -> int:
    if not _is_int(k) or k < 0 and k != -1:
        raise bad(f"top_k must be a non-negative integer (0: no limit), got {k!r}", "top_k")
    return max(int(k), 0)  # -1 (vLLM's "no limit") is 0


def _seed(s: Any) -> int:
    if not _is_int(s) or not -(2**63) <= s < 2**64:
        # torch.manual_seed's range, [-2**63, 2**64 - 1]
        raise bad(f"seed must be an integer in [-2**63, 2**64 - 1], got {s!r}", "seed")
    return int(s)


_SAMPLING_FIELDS = {"temperature": _temperature, "top_p": _top_p, "top_k": _top_k, "seed": _seed}
"""Each field of :class:`Sampling` (named as in the request) and the function that checks a
value given for it and returns the setting."""


def _n(n: Any, max_n: int) -> int:
    """Completions per prompt: 1 when absent, at most ``max_n``."""
    if n is None:
        return 1
    if not _is_int(n) or not 1 <= n <= max_n:
        raise bad(f"n must be an integer from 1 to {max_n}, got {n!r}", "n")
    return int(n)


def _stop(stop: Any) -> list[str]:
    """The stop strings: none when absent, one string, or a list of up to :data:`MAX_STOP`
    non-empty ones."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop holds {len(stops)} strings; at most {MAX_STOP}", "stop")
    if any(x == "" for x in stops):
        raise bad("stop strings must not be empty", "stop")
    return list(stops)


def _include_usage(opts: Any) -> bool:
    """``stream_options.include_usage``: a usage chunk before ``[DONE]``."""
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    usage = opts.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options")
    return bool(usage)


def _content(value: Any, where: str) -> str:
    """The text of a message's content: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(f"{where}[{j}]: only text content parts are supported", where)
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}].text must be a string", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string or a list of text parts", where)


def parse_chat(body: dict[str, Any], max_n: int = 16) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body.

    Raises:
        ApiError: 400 naming the field at fault.
    """
    out = ParsedRequest(kind="chat")
    if "messages" not in body or body["messages"] is None:
        raise bad("messages is required", "messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of messages", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad(
                f"messages[{i}].role {role!r} is not supported; use one of {', '.join(ROLES)}",
                f"messages[{i}].role",
            )
        if "content" not in m or m["content"] is None:
            raise bad(f"messages[{i}].content is required", f"messages[{i}].content")
        content = _content(m["content"], f"messages[{i}].content")
        parsed.append({"role": "system" if role == "developer" else role, "content": content})
    out.messages = parsed
    _unsupported(body, "chat")
    _common(body, out, max_n)
    return out


def parse_completion(body: dict[str, Any], max_n: int = 16) -> ParsedRequest:
    """Validate a ``/v1/completions`` body.

    Raises:
        ApiError: 400 naming the field at fault.
    """
    out = ParsedRequest(kind="completion")
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(x) for x in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt:
        prompts = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                prompts.append(p)
            elif isinstance(p, list) and p and all(_is_int(x) for x in p):
                prompts.append(list(p))
            else:
                raise bad(
                    f"prompt[{i}] must be a string or a non-empty list of token ids", "prompt"
                )
    else:
        raise bad("prompt must be a string, a list of strings or of token ids", "prompt")
    out.prompts = prompts
    _unsupported(body, "completion")
    _common(body, out, max_n)
    if len(prompts) * out.n > max_n:
        raise bad(f"{len(prompts)} prompts × n={out.n} is more than {max_n} completions", "n")
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
