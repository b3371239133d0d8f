"""Reading a YAML settings file (a training recipe, ``prepare --config``): one rule for what a
broken file says."""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import UserError

_HINT = "fix the file at that place (often a missing quote, bracket, colon or indent)"


def read_yaml(path: str | Path) -> object:
    """The parsed content of ``path`` with PyYAML's ``safe_load`` (plain data only: no tags
    that build Python objects), None for an empty file.

    Raises:
        UserError: the file cannot be read, is not UTF-8, or is not valid YAML (naming the
            line and column PyYAML stopped at).
    """
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
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
