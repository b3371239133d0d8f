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

No torch here; jinja2 is imported only when a template fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmkit.errors import UserError

#: Files a tokenizer directory may keep its chat template in, in the order transformers reads
#: them (the ``.jinja`` file wins over the JSON keys).
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def _file_holds(path: Path, template: str) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".jinja":
        return text == template or text.strip() == template.strip()
    try:
        value = json.loads(text).get("chat_template")
    except (ValueError, AttributeError):
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
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # any template failure: classified below, never a traceback
        raise template_error(tokenizer, err, where) from err


def template_error(tokenizer: Any, err: BaseException, where: str | None = None) -> UserError:
    """The one-line :class:`UserError` for an exception raised while rendering ``tokenizer``'s
    chat template (see :func:`render_chat`)."""
    import jinja2.exceptions as jx

    source = template_source(tokenizer)
    named = source != "the tokenizer's chat template"
    the = f"the chat template in {source}" if named else source
    fix = f"fix the template in {source}" if named else "fix the chat template"
    prefix = f"{where}: " if where else ""
    detail = _first_line(err)
    if isinstance(err, jx.TemplateSyntaxError):
        line = f" at line {err.lineno}" if err.lineno else ""
        return UserError(
            f"{prefix}{the} has a Jinja syntax error{line}: {detail}",
            f"{fix}, or use a model whose template works",
        )
    if isinstance(err, jx.SecurityError):
        return UserError(
            f"{prefix}{the} was stopped by Jinja's sandbox: {detail}",
            "the template tries to reach Python internals; use a template from a source you "
            f"trust ({fix})",
        )
    if isinstance(err, jx.UndefinedError):
        return UserError(
            f"{prefix}{the} uses an undefined name: {detail}",
            f"{fix}; the variables a template gets are messages, add_generation_prompt and "
            "the tokenizer's special tokens",
        )
    if type(err) is jx.TemplateError:  # the template's raise_exception(...)
        return UserError(
            f"{prefix}{the} refused the conversation: {detail}",
            "check the roles and their order, or choose another template",
        )
    return UserError(
        f"{prefix}{the} failed to render: {type(err).__name__}: {detail}",
        f"{fix}, or use a model whose template works",
    )
