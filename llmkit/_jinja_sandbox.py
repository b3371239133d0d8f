"""The Jinja environment llmkit renders every chat template in: :class:`BoundedSandbox`.

The rules and their reasons are in :mod:`llmkit.templates` (its module docstring); this module
holds only the two jinja2 subclasses that apply them, kept apart because they import jinja2 at
module level: it is imported by :func:`llmkit.templates.bounded_sandbox`, when a template is
rendered, never at start-up. The hooks used are jinja2's documented extension points
(``intercepted_binops`` / ``call_binop``, ``call``, ``concat``, ``code_generator_class``).
"""

from __future__ import annotations

from typing import Any

from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.templates import (
    TemplateTooLarge,
    _bounded,
    _bounded_range,
    _BoundedBuffer,
    _check,
    _check_format,
    _precheck,
    char_limit,
)


class _Generator(CodeGenerator):
    """Jinja's compiler, changed in two places: the output buffer of a ``{% set %}`` block or
    macro is a :class:`~llmkit.templates._BoundedBuffer`, and ``~`` checks its result's size."""

    def buffer(self, frame: Any) -> None:  # {% set %} blocks, macros, call/filter blocks
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.bounded_buffer()")

    def visit_Concat(self, node: Any, frame: Any) -> None:  # the ~ operator
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.bounded_str_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")
        return None


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` whose operators, methods, filters and output are
    bounded by :func:`char_limit`."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check(f"{type(seq).__name__} * {n}", len(seq) * max(n, 0))
        elif op == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check("+", len(left) + len(right))
        elif op == "%":
            _check_format("%", left, right, "%")
        elif op == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                _check(f"{left} ** {right}", abs(left).bit_length() * max(right, 0) // 3)
        return super().call_binop(context, op, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, list, tuple, dict)) and name:
            _precheck(name, owner, args, kwargs, method=True)
        result = ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            _check(f"{name or 'a call'}()", len(result))
        return result

    def bounded_buffer(self) -> list:
        return _BoundedBuffer()

    def bounded_str_join(self, items: Any) -> str:
        parts = [str(x) for x in items]
        _check("~", sum(len(p) for p in parts))
        return "".join(parts)

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        limit, total, out = char_limit(), 0, []
        for piece in pieces:
            total += len(piece)
            if total > limit:
                raise TemplateTooLarge("the rendered text", total, limit)
            out.append(piece)
        return "".join(out)

    def _wrap_filters(self) -> None:
        for name, func in list(self.filters.items()):
            if not getattr(func, "_llmkit_bounded", False):
                self.filters[name] = _bounded(name, func)
        lipsum = self.globals.get("lipsum")
        if lipsum is not None and not getattr(lipsum, "_llmkit_bounded", False):

            def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100):  # noqa: A002
                _check("lipsum()", abs(int(n)) * abs(int(max)) * 12)
                return lipsum(n, html, min, max)

            bounded_lipsum._llmkit_bounded = True  # type: ignore[attr-defined]
            self.globals["lipsum"] = bounded_lipsum
        self.globals["range"] = _bounded_range

    def from_string(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        self._wrap_filters()  # transformers adds tojson after building the environment
        return super().from_string(source, *args, **kwargs)
