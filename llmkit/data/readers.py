"""Find the input files of ``llmkit prepare`` and read them as a stream of documents.

Supported inputs (SPEC §2), each optionally compressed with ``.gz``, ``.bz2`` or ``.xz``:

- ``.txt``, ``.md``: plain UTF-8 text, split into documents on runs of blank lines (lines that
  hold only spaces and tabs) or kept whole (``split_on="none"``);
- ``.jsonl``, ``.json``: JSON lines, one object per line, the document in ``text_field``.

Files are read line by line in binary, so memory holds one document at a time (the whole file
only with ``split_on="none"``), and the file's SHA-256 is computed on the bytes as they are read.
Every problem is a :class:`~llmkit.errors.UserError` naming the file (and line).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import UserError

#: File kind by extension.
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
#: Compression by extension, each with the function that wraps a binary file object.
COMPRESSIONS: dict[str, Callable[[io.BufferedIOBase], io.BufferedIOBase]] = {
    ".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    ".bz2": lambda f: bz2.BZ2File(f, mode="rb"),
    ".xz": lambda f: lzma.LZMAFile(f, mode="rb"),
}
SPLIT_MODES = ("blank-lines", "none")
_GLOB_CHARS = set("*?[")
_BOM = b"\xef\xbb\xbf"


@dataclass
class InputFile:
    """One input file and what reading it found.

    ``sha256`` and ``documents`` are filled in by :func:`read_documents` once the file has been
    read to its end.
    """

    path: Path
    kind: str  # "text" or "jsonl"
    compression: str | None  # ".gz", ".bz2", ".xz" or None
    size_bytes: int  # size on disk, in bytes
    sha256: str | None = None  # of the bytes on disk
    documents: int = 0  # documents read from the file, before any cleaning

    def as_dict(self) -> dict:
        """The manifest entry: path, size in bytes, sha256, documents."""
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "documents": self.documents,
        }


def file_kind(path: Path) -> tuple[str, str | None] | None:
    """``(kind, compression)`` of a file from its extensions, or None when unsupported.

    ``corpus.jsonl.gz`` is ``("jsonl", ".gz")``; ``notes.md`` is ``("text", None)``.
    """
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSIONS:
        compression = suffixes.pop()
    if not suffixes:
        return None
    if suffixes[-1] in TEXT_SUFFIXES:
        return "text", compression
    if suffixes[-1] in JSONL_SUFFIXES:
        return "jsonl", compression
    return None


def _supported_list() -> str:
    kinds = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES)
    return f"{kinds} (optionally {', '.join(COMPRESSIONS)})"


def _walk(directory: Path) -> Iterator[Path]:
    """Files under ``directory``, recursively, in sorted order; hidden entries skipped."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _is_under(path: Path, parents: Sequence[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == p or p in resolved.parents for p in parents)


def discover_inputs(
    inputs: Iterable[str | Path], *, exclude: Iterable[str | Path] = ()
) -> list[InputFile]:
    """Expand files, directories (recursive) and globs into the list of files to read.

    Order is deterministic: inputs in the order given, directory and glob matches sorted by
    path. A file reached twice is read once. Inside a directory or a glob, files of other
    types are skipped; a file named explicitly must be of a supported type.

    Args:
        inputs: paths of files or directories, or glob patterns (``data/**/*.txt``).
        exclude: paths whose files are never inputs (the output directory being replaced).

    Raises:
        UserError: a path does not exist, a glob matches nothing, a directory holds no
            supported file, a file named explicitly has an unsupported type, or ``inputs``
            is empty.
    """
    excluded = [Path(p).resolve() for p in exclude]
    found: list[InputFile] = []
    seen: set[Path] = set()

    def add(path: Path) -> bool:
        kind = file_kind(path)
        if kind is None or _is_under(path, excluded):
            return False
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(InputFile(path, kind[0], kind[1], path.stat().st_size))
        return True

    items = list(inputs)
    if not items:
        raise UserError("no input given", "name one or more files, directories or globs")
    for item in items:
        path = Path(item)
        if not path.exists() and _GLOB_CHARS & set(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not matches:
                raise UserError(f"no file matches {item}", "check the pattern (quote it)")
            if not [f for f in files if add(f)]:
                raise UserError(
                    f"no supported file matches {item}", f"supported: {_supported_list()}"
                )
        elif not path.exists():
            raise UserError(f"{path} does not exist", "check the path")
        elif path.is_dir():
            if not [f for f in _walk(path) if add(f)]:
                raise UserError(
                    f"{path} holds no supported text file",
                    f"supported: {_supported_list()}",
                )
        elif path.is_file():
            if file_kind(path) is None:
                raise UserError(
                    f"{path} is not a supported file type", f"supported: {_supported_list()}"
                )
            add(path)
        else:
            raise UserError(f"{path} is not a regular file or a directory")
    if not found:
        raise UserError("no input file left to read", "the inputs are all inside the output")
    return found


class _HashingReader(io.RawIOBase):
    """A raw binary reader that updates a hash with every byte read through it."""

    def __init__(self, raw, digest):
        self._raw = raw
        self.digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
        return n

    def drain(self) -> None:
        """Read (and hash) what is left, so the digest covers the whole file."""
        while chunk := self._raw.read(1 << 20):
            self.digest.update(chunk)


def iter_lines(source: InputFile) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a file, decoded as UTF-8, line ends kept.

    A leading UTF-8 byte-order mark is removed and ``\\r\\n`` line ends become ``\\n``.
    ``source.sha256`` is set when the file has been read to its end.

    Raises:
        UserError: the file cannot be read or decompressed, holds a NUL byte (binary), or is
            not valid UTF-8 (the line is named).
    """
    path = source.path
    digest = hashlib.sha256()
    try:
        raw_file = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}", "check its permissions") from err
    try:
        hashing = _HashingReader(raw_file, digest)
        stream: io.BufferedIOBase = io.BufferedReader(hashing, 1 << 20)
        if source.compression:
            stream = COMPRESSIONS[source.compression](stream)
        lineno = 0
        try:
            for lineno, raw in enumerate(stream, 1):
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                if b"\x00" in raw:
                    raise UserError(
                        f"{path} looks like a binary file (NUL byte on line {lineno})",
                        "give UTF-8 text files only (a UTF-16 file must be converted to UTF-8)",
                    )
                if raw.endswith(b"\r\n"):
                    raw = raw[:-2] + b"\n"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(
                        f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[err.start]:02x} at "
                        f"column {err.start + 1})",
                        "convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`",
                    ) from None
                yield lineno, line
        except (OSError, EOFError, lzma.LZMAError) as err:
            raise UserError(
                f"cannot read {path} after line {lineno}: {err}",
                "the file is truncated or not in the format its extension says",
            ) from err
        hashing.drain()
        source.sha256 = digest.hexdigest()
    finally:
        raw_file.close()


def _is_blank(line: str) -> bool:
    return line.strip(" \t\n") == ""


def split_blank_lines(lines: Iterable[str]) -> Iterator[str]:
    """Group lines (line ends kept) into documents separated by runs of blank lines.

    A blank line holds only spaces and tabs. A document is its lines joined, without the line
    break that ends its last line; this is ``re.split(r"\\n(?:[ \\t]*\\n)+", text)`` computed a
    line at a time, except that blank lines at the start and end of the text give no document.
    """
    current: list[str] = []
    for line in lines:
        if _is_blank(line):
            if current:
                yield _join(current)
                current = []
        else:
            current.append(line)
    if current:
        yield _join(current)


def _join(lines: list[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text


def _text_documents(source: InputFile, split_on: str) -> Iterator[str]:
    lines = (line for _, line in iter_lines(source))
    if split_on == "none":
        yield "".join(lines)
    else:
        yield from split_blank_lines(lines)


def parse_jsonl_line(line: str, *, path: Path, lineno: int, text_field: str) -> str | None:
    """The document of one JSON line (None for a blank line).

    Raises:
        UserError: the line is not a JSON object, or has no string in ``text_field``; the
            message names ``path:lineno``.
    """
    if not line.strip():
        return None
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except ValueError as err:
        raise UserError(
            f"{where}: malformed JSON ({err.msg} at column {err.colno})",
            "each line must be one JSON object (.json files are read as JSON lines too)",
        ) from None
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object, found {type(record).__name__}",
            "each line must be one JSON object",
        )
    if text_field not in record:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise UserError(
            f"{where}: no field {text_field!r} (fields: {keys})",
            "choose the field holding the text with --text-field",
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field {text_field!r} is {type(value).__name__}, not a string",
            "choose the field holding the text with --text-field",
        )
    return value


def _jsonl_documents(source: InputFile, text_field: str) -> Iterator[str]:
    for lineno, line in iter_lines(source):
        text = parse_jsonl_line(line, path=source.path, lineno=lineno, text_field=text_field)
        if text is not None:
            yield text


def read_documents(
    source: InputFile, *, split_on: str = "blank-lines", text_field: str = "text"
) -> Iterator[str]:
    """Yield the documents of one input file, as read (not yet normalized).

    When the file has been read to its end, ``source.sha256`` and ``source.documents`` are set.

    Args:
        source: a file from :func:`discover_inputs`.
        split_on: ``"blank-lines"`` or ``"none"`` (one document per file); text files only.
        text_field: the JSON field holding the document; JSON-lines files only.

    Raises:
        UserError: see :func:`iter_lines` and :func:`parse_jsonl_line`.
    """
    if split_on not in SPLIT_MODES:
        raise UserError(f"--split-on {split_on!r} is not one of {', '.join(SPLIT_MODES)}")
    if source.kind == "jsonl":
        docs = _jsonl_documents(source, text_field)
    else:
        docs = _text_documents(source, split_on)
    count = 0
    for doc in docs:
        count += 1
        yield doc
    source.documents = count
