"""The output directory of ``llmkit prepare``: what may be replaced, inputs kept outside it,
the temporary directory renamed into place, and OS errors about it as one-line user errors.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from llmkit.core.manifest import Manifest
from llmkit.core.prepared import DATASET_DICT, MANIFEST, SPLITS, is_prepared
from llmkit.data.readers import _GLOB_CHARS, _walk, file_kind
from llmkit.errors import UserError

E = TypeVar("E", bound=BaseException)

#: What ``llmkit prepare`` writes at the top of OUTPUT besides the splits (the tokenizer files
#: vary with the tokenizer; see :func:`_written_by_prepare`).
_OWN_NAMES = frozenset(
    {
        MANIFEST,
        DATASET_DICT,
        "lengths.png",
        "dropped.jsonl",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
    }
)


def _check_output(output: Path, overwrite: bool) -> None:
    for parent in output.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(
                f"cannot create {output}: {parent} is a file, not a directory",
                "choose another --output",
            )
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} exists and is not a directory", "choose another --output")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UserError(
                f"{output} already exists and is not empty",
                "pass --overwrite to replace it, or choose another --output",
            )
        if not is_prepared(output):
            raise UserError(
                f"{output} is not a directory written by llmkit prepare; refusing to replace it",
                "choose another --output, or empty or remove it yourself",
            )


def _written_by_prepare(output: Path) -> set[Path]:
    """Files (resolved) under ``output`` that an earlier ``llmkit prepare`` wrote there.

    The manifest lists them (``files``); a manifest from before that list is judged by name:
    the splits, the manifest and plot, and the tokenizer files.
    """
    if not is_prepared(output):
        return set()
    try:
        listed = Manifest.model_validate_json((output / MANIFEST).read_text(encoding="utf-8")).files
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        listed = None
    if listed is not None:
        return {(output / x).resolve() for x in listed}
    own = set()
    for path in output.rglob("*"):
        rel = path.relative_to(output)
        top = rel.parts[0]
        if top in SPLITS or (
            len(rel.parts) == 1 and (top in _OWN_NAMES or top.startswith("tokenizer"))
        ):
            own.add(path.resolve())
    return own


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _check_inputs_outside_output(inputs: Sequence[str | Path], output: Path) -> None:
    """Refuse inputs that lie inside ``output`` (which --overwrite would delete).

    A file or directory named as an input may not be ``output`` or lie inside it. A file that
    a glob or a directory search finds inside ``output`` is refused too, unless an earlier
    ``llmkit prepare`` wrote it there (those are skipped, as before).
    """
    out = output.resolve()
    own: set[Path] | None = None

    def refuse(what: str) -> UserError:
        return UserError(
            f"input {what} lies inside --output {output}, which llmkit prepare replaces",
            "move the input out of the output directory, or choose another --output",
        )

    def check_found(path: Path, what: str) -> None:
        nonlocal own
        resolved = path.resolve()
        if not _inside(resolved, out):
            return
        if own is None:
            own = _written_by_prepare(out)
        if resolved not in own:
            raise refuse(what)

    for item in inputs:
        path = Path(item)
        if not path.exists() and _GLOB_CHARS & set(str(item)):
            for match in glob.glob(str(item), recursive=True):
                m = Path(match)
                if m.is_file() and file_kind(m) is not None:
                    check_found(m, f"{m} (matched by {item})")
            continue
        if not path.exists():
            continue  # discover_inputs names it
        resolved = path.resolve()
        if _inside(resolved, out):
            raise refuse(str(path))
        if path.is_dir() and _inside(out, resolved) and out.is_dir():
            # OUTPUT inside an input directory: its own files are skipped, anyone else's
            # would be read and then deleted.
            for f in _walk(out):
                if file_kind(f) is not None:
                    check_found(f, f"{f} (in directory {path})")


def _remove_dirs(created: list[Path]) -> None:
    """Remove the (empty) directories this run created, innermost first."""
    for parent in created:
        try:
            parent.rmdir()
        except OSError:
            break


def _wrapped(err: BaseException, kind: type[E]) -> E | None:
    """``err`` if it is a ``kind``, or the ``kind`` a library wrapped into it (following
    ``__cause__`` / ``__context__``, e.g. through ``datasets``' DatasetGenerationError)."""
    seen = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _os_error_in(err: BaseException) -> OSError | None:
    """``err`` if it is an OSError, or the OSError a library wrapped into it."""
    return _wrapped(err, OSError)


def _concerns_output(err: OSError, output: Path, tmp: Path | None) -> bool:
    """True when ``err`` names no file, or one at the output (not an input being read)."""
    names = [n for n in (err.filename, err.filename2) if n is not None]
    if not names:
        return True
    for n in names:
        path = Path(os.path.abspath(n))
        if _inside(path, output) or _inside(output, path):  # OUTPUT, inside it, or a parent
            return True
        if tmp is not None and _inside(path, tmp):
            return True
        if path.parent == output.parent and path.name.startswith(f".{output.name}."):
            return True  # the temporary or the old OUTPUT renamed aside
    return False


def _output_error(
    err: OSError, output: Path, tmp: Path | None, verb: str = "cannot write"
) -> UserError:
    """A one-line UserError for an OSError creating, writing or renaming ``output``."""
    import errno

    reason = err.strerror or str(err) or type(err).__name__
    where = ""
    if err.filename is not None:
        name = str(err.filename)
        if tmp is not None and name.startswith(str(tmp)):
            name = str(output) + name[len(str(tmp)) :]
        if Path(name) != output:
            where = f" ({name})"
    hints = {
        errno.EACCES: "check the permissions, or choose another --output",
        errno.EPERM: "check the permissions, or choose another --output",
        errno.EROFS: "the file system is read-only: choose another --output",
        errno.ENOSPC: "the disk is full: free space or choose another --output",
        errno.EDQUOT: "the disk quota is exceeded: free space or choose another --output",
        errno.ENOTDIR: "a parent of --output is a file: choose another --output",
        errno.EEXIST: "a parent of --output is a file: choose another --output",
    }
    hints[errno.ENOENT] = f"is {output.parent} a writable directory? or choose another --output"
    hint = hints.get(err.errno, "choose another --output")
    return UserError(f"{verb} {output}: {reason}{where}", hint)


def _missing_parents(path: Path) -> list[Path]:
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing
