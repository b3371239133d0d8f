"""Rendering a chat template: the one guarded place where llmkit runs a tokenizer's Jinja.

A chat template is code that comes with a model (``chat_template.jinja``, the
``chat_template`` key of ``tokenizer_config.json`` or ``chat_template.json``, or a GGUF file's
``tokenizer.chat_template``). transformers renders it in Jinja's immutable sandbox, so a
template cannot reach Python objects; it can still fail: a Jinja syntax error, an operation the
sandbox blocks (``SecurityError``), an undefined name (``UndefinedError``), the template's own
``raise_exception(...)`` (``TemplateError``) or an ordinary Python error inside an expression.
:func:`render_chat` turns each into one :class:`~llmkit.errors.UserError` naming the file the
template came from and what to do, so ``generate --chat``, ``chat``, ``eval --chat`` and
``prepare --format chat`` never show a traceback.

**Bounded by design.** Jinja's sandbox stops a template from reaching Python objects and caps
``range()``, but not the size of what it builds: ``{{ 'a' * 1000000000 }}`` (27 characters) asks
for gigabytes. llmkit installs :class:`BoundedSandbox` as the environment transformers compiles
every chat template with (``transformers.utils.chat_template_utils`` builds an
``ImmutableSandboxedEnvironment``; llmkit substitutes a subclass of it, so rendering, filters,
globals and whitespace rules stay transformers' own and the text is identical). It checks,
*before* computing them, the size of what the operators ``*``, ``+``, ``%``, ``**`` and ``~``,
string methods (``center``, ``ljust``, ``join``, ``format``, ``replace``, ``zfill``...), and the
filters (``center``, ``indent``, ``join``, ``format``, ``replace``, ``tojson``...) would produce,
and caps the rendered text and the text of every ``{% set %}`` block and macro (through the
environment's ``code_generator_class``); over :func:`char_limit` characters the render stops
with one :class:`~llmkit.errors.UserError` naming the template's file and the limit. All
``range()`` calls of one render together yield at most :data:`RANGE_BUDGET` items (Jinja caps
each at 100,000; nested they would loop 10^10 times). Not bounded: the time spent in nested
loops over a long string or list that write nothing.

**The end of a turn.** The template's end-of-turn token is found here too, by one rule
(:func:`end_of_turn_token`; its id :func:`end_of_turn_ids`): ``prepare --format chat`` records
it as the stop token, and ``generate``, ``chat`` and ``serve`` end a reply on it.

No torch here; jinja2 is imported when a template is rendered.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import UserError

#: Files a tokenizer directory may keep its chat template in, in the order transformers reads
#: them (the ``.jinja`` file wins over the JSON keys).
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


#: The floor of the size limit on what a chat template builds: any string or list it makes, and
#: the rendered text, in characters (items for lists). Raised to 4x the conversation's own size
#: for long conversations (:func:`char_limit`).
MIN_CHAR_LIMIT = 4_000_000
_LIMIT: contextvars.ContextVar[int] = contextvars.ContextVar("llmkit_template_limit")


class TemplateTooLarge(Exception):
    """A chat template tried to build a value or a text longer than the limit."""

    def __init__(self, what: str, size: int, limit: int, unit: str = "characters") -> None:
        super().__init__(f"{what} would make {size:,} {unit}, over the limit of {limit:,}")
        self.limit = limit
        self.rule = (
            f"llmkit caps what a template builds at max({MIN_CHAR_LIMIT:,}, 4x the "
            "conversation's size) characters"
            if unit == "characters"
            else f"llmkit caps the items of all range() calls of one render at {limit:,}"
        )


def char_limit(messages: Any = None) -> int:
    """The most characters a chat template may build while rendering ``messages``:
    ``max(MIN_CHAR_LIMIT, 4 * len(json.dumps(messages)))``; the current render's limit when
    ``messages`` is None."""
    if messages is None:
        return _LIMIT.get(MIN_CHAR_LIMIT)
    try:
        size = len(json.dumps(messages, default=str))
    except (TypeError, ValueError):
        size = 0
    return max(MIN_CHAR_LIMIT, 4 * size)


def _size(value: Any) -> int:
    """Length of a string or a container (items, not deep), 1 for anything else."""
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    return 1


def _check(what: str, size: int) -> None:
    limit = char_limit()
    if size > limit:
        raise TemplateTooLarge(what, size, limit)


#: Widths and precisions of printf-style (``%-08.3f``) and ``str.format`` (``{0:>20.3}``) fields.
_WIDTHS = {
    "%": re.compile(r"%[#0\- +]*(\d*)(?:\.(\d*))?"),
    "{}": re.compile(r"\{[^{}:]*:[^{}\d]*(\d*)(?:\.(\d*))?"),
}


def _check_format(what: str, fmt: Any, args: Any, style: str) -> None:
    """``fmt % args`` / ``fmt.format(*args)``: no width or precision over the limit, and at most
    (fields x the arguments' total size) plus the format's own length."""
    if not isinstance(fmt, str):
        return
    for match in _WIDTHS[style].finditer(fmt):
        for digits in filter(None, match.groups()):
            if len(digits) > 12 or int(digits) > char_limit():
                _check(f"{what} with a width of {digits[:20]}", int(digits[:20]))
    items = args if isinstance(args, (list, tuple)) else [args]
    values = list(items) + (list(args.values()) if isinstance(args, dict) else [])
    if ("*" in fmt and style == "%") or (":{" in fmt and style == "{}"):  # '%*d', '{:{}}'
        _check_ints(what, values, {})
    fields = fmt.count("%") + fmt.count("{") + 1
    _check(what, len(fmt) + fields * sum(len(str(v)) if isinstance(v, str) else 32 for v in values))


def _check_ints(what: str, args: Any, kwargs: dict[str, Any]) -> None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            _check(f"{what} with an argument of {value}", abs(value))


def _precheck(
    name: str, obj: Any, args: tuple, kwargs: dict[str, Any], method: bool = False
) -> None:
    """Refuse a string method or filter whose result would be over the limit, before it runs."""
    what = f"{name}()"
    if name == "join":
        _precheck_join(what, obj, args, kwargs)
    elif name == "replace":
        _precheck_replace(what, obj, args, kwargs)
    elif name in ("format", "format_map"):  # the filter is printf-style, the method str.format
        _check_format(what, obj, list(args) + list(kwargs.values()), "{}" if method else "%")
    else:
        if name == "tojson":
            _precheck_tojson(args, kwargs)
        elif name == "indent":
            _precheck_indent(what, obj, args, kwargs)
        _check_ints(what, args, kwargs)  # center(n), ljust(n), zfill(n), truncate(n)...


def _precheck_join(what: str, obj: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    if len(args) >= 1 and isinstance(obj, str):  # sep.join(items)
        items, sep = args[0], obj
    else:  # items|join(sep)
        items, sep = obj, (args[0] if args else kwargs.get("d", ""))
    if isinstance(items, (list, tuple, dict, set, frozenset, str)):
        parts = sum(len(x) if isinstance(x, str) else 32 for x in items)
        _check(what, parts + len(str(sep)) * len(items))


def _precheck_replace(what: str, obj: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    old = args[0] if args else kwargs.get("old", "")
    new = args[1] if len(args) > 1 else kwargs.get("new", "")
    if isinstance(obj, str) and isinstance(old, str) and isinstance(new, str):
        count = obj.count(old) if old else len(obj) + 1
        _check(what, len(obj) + count * max(0, len(new) - len(old)))


def _precheck_tojson(args: tuple, kwargs: dict[str, Any]) -> None:
    indent = args[1] if len(args) > 1 else kwargs.get("indent")
    if indent is not None:
        _check(
            f"tojson() with an indent of {indent!r}",
            64 * _size(indent) if isinstance(indent, str) else int(indent) * 64,
        )


def _precheck_indent(what: str, obj: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    width = args[0] if args else kwargs.get("width", 4)
    if isinstance(obj, str) and isinstance(width, int):
        _check(what, len(obj) + (obj.count("\n") + 1) * abs(width))
    elif isinstance(width, str) and isinstance(obj, str):
        _check(what, len(obj) + (obj.count("\n") + 1) * len(width))


def _bounded(name: str, func: Any) -> Any:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        # filters get (value, ...) or (context/env, value, ...) when they pass one
        from jinja2 import Environment
        from jinja2.nodes import EvalContext
        from jinja2.runtime import Context

        first = 0
        while first < len(args) and isinstance(args[first], (Environment, EvalContext, Context)):
            first += 1
        obj = args[first] if first < len(args) else None
        _precheck(name, obj, args[first + 1 :], kwargs)
        result = func(*args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            _check(f"{name}()", len(result))
        return result

    bounded.__name__ = getattr(func, "__name__", name)
    bounded.__wrapped__ = func
    for attr in ("jinja_pass_arg",):
        if hasattr(func, attr):
            setattr(bounded, attr, getattr(func, attr))
    bounded._llmkit_bounded = True
    return bounded


class _BoundedBuffer(list):
    """The output buffer of a ``{% set %}`` block or a macro: its text is capped like the
    rendered text (a block that writes a literal in nested loops would grow without end)."""

    size = 0

    def _add(self, items: Any) -> None:
        self.size += sum(len(x) if isinstance(x, str) else 16 for x in items)
        if self.size > char_limit():
            raise TemplateTooLarge("a {% set %} block or macro", self.size, char_limit())

    def append(self, item: Any) -> None:
        self._add((item,))
        super().append(item)

    def extend(self, items: Any) -> None:
        items = list(items)
        self._add(items)
        super().extend(items)


#: Items all ``range()`` calls of one render may yield together (Jinja caps each at 100,000;
#: nested loops over ranges would otherwise run 10^10 times).
RANGE_BUDGET = 1_000_000
_RANGES: contextvars.ContextVar[list[int]] = contextvars.ContextVar("llmkit_template_ranges")


def _bounded_range(*args: int) -> range:
    from jinja2.sandbox import safe_range

    rng = safe_range(*args)
    spent = _RANGES.get(None)
    if spent is not None:
        spent[0] += len(rng)
        if spent[0] > RANGE_BUDGET:
            raise TemplateTooLarge("range() calls", spent[0], RANGE_BUDGET, "items")
    return rng


def bounded_sandbox() -> type:
    """The environment class transformers compiles chat templates with (see the module
    docstring): jinja2's ``ImmutableSandboxedEnvironment`` with its documented hooks
    (``intercepted_binops`` / ``call_binop``, ``call``, ``concat``, ``code_generator_class``)
    checking sizes before anything is built. Defined in :mod:`llmkit._jinja_sandbox`, which
    imports jinja2 (so only when a template is rendered); one class for the process."""
    from llmkit._jinja_sandbox import BoundedSandbox

    return BoundedSandbox


def _install() -> Any:
    """Make transformers compile chat templates in :func:`bounded_sandbox`; returns its
    ``_compile_jinja_template``."""
    from llmkit.core.compat import compile_chat_templates_in

    return compile_chat_templates_in(bounded_sandbox())


def _file_holds(path: Path, template: str) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".jinja":
        return text == template or text.strip() == template.strip()
    try:
        value = json.loads(text).get("chat_template")
    except (ValueError, AttributeError, RecursionError):
        return False
    if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
        return any(isinstance(v, dict) and v.get("template") == template for v in value)
    return value == template


def template_source(tokenizer: Any) -> str:
    """Where ``tokenizer``'s chat template comes from, for messages: the file in the tokenizer's
    directory that holds it (e.g. ``runs/x/chat_template.jinja``), the ``.gguf`` file, or
    ``"the tokenizer's chat template"`` when it was set in memory (e.g. llmkit's chatml)."""
    template = getattr(tokenizer, "chat_template", None)
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if name and isinstance(template, str):
        root = Path(name)
        if root.is_dir():
            for file in TEMPLATE_FILES:
                if (root / file).is_file() and _file_holds(root / file, template):
                    return str(root / file)
            # a .gguf loaded in place: transformers names its directory, not the file
            ggufs = sorted(root.glob("*.gguf"))
            if len(ggufs) == 1:
                return f"{ggufs[0]} (its tokenizer.chat_template)"
        elif root.suffix == ".gguf":
            return f"{root} (its tokenizer.chat_template)"
    return "the tokenizer's chat template"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    where: str | None = None,
) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, ...)``, with every failure of
    the template as one :class:`~llmkit.errors.UserError`.

    Args:
        tokenizer: a transformers tokenizer with a ``chat_template``.
        messages: ``{"role", "content"}`` dicts.
        add_generation_prompt: end with the prompt of the assistant's turn.
        where: a prefix for the message (e.g. ``"data.jsonl:3"``, the record being rendered).

    Returns:
        The rendered text.

    Raises:
        UserError: the template has a Jinja syntax error (line named), does something the
            sandbox blocks, uses an undefined name, refuses the conversation through
            ``raise_exception``, or fails otherwise; the message names the template's file.
    """
    with _guarded(tokenizer, messages, where):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    if add_generation_prompt and not text.strip():
        raise template_error(tokenizer, _EmptyPrompt(), where)
    return text


@contextlib.contextmanager
def _guarded(tokenizer: Any, messages: Any, where: str | None) -> Iterator[None]:
    """Run a render of ``tokenizer``'s template in :func:`bounded_sandbox`, with the size
    limits of ``messages``; any failure becomes :func:`template_error`'s one line."""
    token = _LIMIT.set(char_limit(messages))
    ranges = _RANGES.set([0])
    try:
        compile_template = _install()
        template = tokenizer.get_chat_template()
        if not isinstance(compile_template(template).environment, bounded_sandbox()):
            raise RuntimeError("transformers did not compile the chat template in llmkit's sandbox")
        yield
    except UserError:
        raise
    except Exception as err:  # any template failure: classified below, never a traceback
        raise template_error(tokenizer, err, where) from err
    finally:
        _LIMIT.reset(token)
        _RANGES.reset(ranges)


#: A ``{% generation %}`` tag, as transformers recognizes it (``chat_template_utils.
#: render_jinja_template``).
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


def has_generation_markers(tokenizer: Any) -> bool:
    """True when ``tokenizer``'s chat template marks the assistant's text with
    ``{% generation %}...{% endgeneration %}`` (transformers' ``return_assistant_tokens_mask``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is rendered
        template = template.get("default")
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def generation_spans(
    tokenizer: Any, messages: list[dict[str, str]], *, where: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered (``add_generation_prompt=False``) and the character spans of
    its ``{% generation %}`` blocks, in order.

    The spans are those from which ``tokenizer.apply_chat_template(messages, tokenize=True,
    return_dict=True, return_assistant_tokens_mask=True)`` builds its ``assistant_masks``
    (transformers ``tokenization_utils_base.py``: a token is masked when it overlaps a span);
    they come from ``transformers.utils.chat_template_utils.render_jinja_template``, called as
    ``apply_chat_template`` calls it, in the same guarded sandbox as :func:`render_chat`.
    The text is first rendered by :func:`render_chat` (so that the size limit on the whole
    text applies) and must be the same.

    Raises:
        UserError: as :func:`render_chat`; the template has no ``{% generation %}`` tag.
    """
    if not has_generation_markers(tokenizer):
        raise UserError(
            f"{where + ': ' if where else ''}the chat template has no {{% generation %}} tag",
            "locate the answers with llmkit.data.sft.answer_spans instead",
        )
    text = render_chat(tokenizer, messages, where=where)
    from transformers.utils.chat_template_utils import render_jinja_template

    with _guarded(tokenizer, messages, where):
        rendered, spans = render_jinja_template(
            conversations=[messages],
            chat_template=tokenizer.get_chat_template(),
            return_assistant_tokens_mask=True,
            add_generation_prompt=False,
            **tokenizer.special_tokens_map,
        )
    if rendered[0] != text:
        raise UserError(
            f"{where + ': ' if where else ''}the chat template renders differently when its "
            "{% generation %} blocks are tracked",
            "fix the template so that its text does not depend on the tracking",
            reason="render failed",
        )
    return text, [(int(s), int(e)) for s, e in spans[0]]


class _EmptyPrompt(Exception):
    pass


def template_error(tokenizer: Any, err: BaseException, where: str | None = None) -> UserError:
    """The one-line :class:`UserError` for an exception raised while rendering ``tokenizer``'s
    chat template (see :func:`render_chat`). Its ``reason`` (the code ``prepare`` counts a
    skipped conversation by) is ``"template refused"`` for the template's own
    ``raise_exception``, else ``"render failed"``."""
    import jinja2.exceptions as jx

    source = template_source(tokenizer)
    named = source != "the tokenizer's chat template"
    the = f"the chat template in {source}" if named else source
    fix = f"fix the template in {source}" if named else "fix the chat template"
    prefix = f"{where}: " if where else ""
    detail = _first_line(err)
    if isinstance(err, TemplateTooLarge):
        return UserError(
            f"{prefix}{the} was stopped: {detail} ({err.rule})",
            f"a chat template that builds that much is broken or hostile; {fix}",
            reason="render failed",
        )
    if isinstance(err, _EmptyPrompt):
        return UserError(
            f"{prefix}{the} renders the conversation as empty text: there is no prompt to continue",
            f"{fix} so that it writes the messages, or use a model whose template works",
            reason="render failed",
        )
    if isinstance(err, jx.TemplateSyntaxError):
        line = f" at line {err.lineno}" if err.lineno else ""
        return UserError(
            f"{prefix}{the} has a Jinja syntax error{line}: {detail}",
            f"{fix}, or use a model whose template works",
            reason="render failed",
        )
    if isinstance(err, jx.SecurityError):
        return UserError(
            f"{prefix}{the} was stopped by Jinja's sandbox: {detail}",
            "the template tries to reach Python internals; use a template from a source you "
            f"trust ({fix})",
            reason="render failed",
        )
    if isinstance(err, jx.UndefinedError):
        return UserError(
            f"{prefix}{the} uses an undefined name: {detail}",
            f"{fix}; the variables a template gets are messages, add_generation_prompt and "
            "the tokenizer's special tokens",
            reason="render failed",
        )
    if type(err) is jx.TemplateError:  # the template's raise_exception(...)
        return UserError(
            f"{prefix}{the} refused the conversation: {detail}",
            "check the roles and their order, or choose another template",
            reason="template refused",
        )
    return UserError(
        f"{prefix}{the} failed to render: {type(err).__name__}: {detail}",
        f"{fix}, or use a model whose template works",
        reason="render failed",
    )


# ---------------------------------------------------------------------------------------------
# The end of an assistant's turn: one rule, used by prepare (the stop token it records) and by
# generate/chat/serve (an id that ends a reply).

#: The answer rendered to find what the template writes after an answer: distinctive, so that
#: no template's own text (a default system prompt, a role name) contains it.
END_OF_TURN_PROBE = "llmkit end-of-turn probe"


def special_token_texts(tokenizer: Any) -> list[str]:
    """The texts of ``tokenizer``'s special tokens, longest first: the named ones (EOS, BOS,
    PAD...) and every added token marked special (chat markers such as ``<|im_end|>`` are often
    only the latter). Whitespace-only tokens are left out."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(token.content)
    return sorted((t for t in found if t and not t.isspace()), key=len, reverse=True)


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant's answer, or None.

    ``<|im_end|>`` for ChatML (and SmolLM2), ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for
    Gemma, ``<|end|>`` for Phi-3, ``</s>`` for Llama 2. Found by rendering a user message and
    the answer :data:`END_OF_TURN_PROBE` with the tokenizer's own template and reading what
    follows the answer, whitespace skipped: the longest special token it starts with. So it
    works for any template, and does not depend on how the answers of a conversation are
    located. A model trained on such conversations ends its answers with this token, whatever
    its config's ``eos_token_id`` says: generation stops on it (:func:`end_of_turn_ids`).

    Raises:
        UserError: the tokenizer has no chat template, or the template fails on (or refuses)
            the probe conversation (:func:`render_chat`).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template: there is no end of turn to find",
            "use a tokenizer with a chat template (or prepare --chat-template chatml)",
        )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": END_OF_TURN_PROBE},
    ]
    text = render_chat(tokenizer, messages, where="end-of-turn probe")
    if not isinstance(text, str) or END_OF_TURN_PROBE not in text:
        return None  # the template does not write the answer as given: no guess
    after = text[text.rindex(END_OF_TURN_PROBE) + len(END_OF_TURN_PROBE) :].lstrip()
    return next((t for t in special_token_texts(tokenizer) if after.startswith(t)), None)


# tokenizer -> (chat_template, end-of-turn ids): rendering a template costs ~1 ms a call, and
# generate asks once per batch
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The id of :func:`end_of_turn_token`: ``[id]``, or ``[]`` when there is none — no chat
    template, a template that fails on (or refuses) the probe conversation, or plain text
    after the answer. Cached per tokenizer and template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    try:
        cached = _END_OF_TURN.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == template:
        return list(cached[1])
    try:
        token = end_of_turn_token(tokenizer)
    except UserError:  # a template with rules of its own (roles, alternation): no guess
        token = None
    found = [] if token is None else [int(tokenizer.convert_tokens_to_ids(token))]
    try:
        _END_OF_TURN[tokenizer] = (template, found)
    except TypeError:
        pass
    return list(found)
