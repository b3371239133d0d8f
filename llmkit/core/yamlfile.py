"""Reading a YAML settings file (a training recipe, ``prepare --config``): one rule for what a
broken file says."""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import UserError

_HINT = "fix the file at that place (often a missing quote, bracket, colon or indent)"

#: A number in exponent form without a dot (``1e4``, ``3e-4``): a float in YAML 1.2, a string
#: in the YAML 1.1 that PyYAML implements (its float pattern wants a dot: ``1.0e4``).
_EXPONENT_FLOAT = r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"


def safe_load(text: str) -> object:
    """``yaml.safe_load`` (plain data only), except that ``1e4`` and ``3e-4`` are floats as in
    YAML 1.2 (PyYAML read them as strings: a recipe's ``model.extra: {rope_theta: 1e4}`` went
    to transformers as the string ``'1e4'``, and ``prepare.yaml``'s ``threshold: 8e-1`` was
    refused as "expected float, got str")."""
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(_EXPONENT_FLOAT), list("-+0123456789")
    )
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> object:
    """The parsed content of ``path`` with :func:`safe_load` (PyYAML's ``safe_load``: plain data
    only, no tags that build Python objects), None for an empty file.

    Raises:
        UserError: the file cannot be read, is not UTF-8, or is not valid YAML (naming the
            line and column PyYAML stopped at).
    """
    import yaml

    p = Path(path)
    try:
        return safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"cannot parse {p}{where}: {problem}", _HINT) from None
    except UnicodeDecodeError as err:
        raise UserError(
            f"cannot parse {p}: not UTF-8 text (byte {err.start})", "save the file as UTF-8"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {p}: {err.strerror}", "check the path") from None
