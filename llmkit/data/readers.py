"""Find the input files of ``llmkit prepare`` and read them as a stream of documents.

Supported inputs (SPEC §2), each optionally compressed with ``.gz``, ``.bz2``, ``.xz`` or
``.zst``:

- ``.txt``, ``.md``: plain UTF-8 text, split into documents on runs of blank lines (lines that
  hold only spaces and tabs) or kept whole (``split_on="none"``);
- ``.jsonl``: JSON lines, one object per line, the document in ``text_field``;
- ``.json``: a JSON array of objects when the file starts with ``[`` (read whole, so one such
  file must fit in memory), JSON lines otherwise (Dolma's ``.json.gz`` are JSON lines);
- ``.csv``, ``.tsv``: a header row, then one document per row in the column ``text_field``
  (quoting read strictly: a quote left open is an error naming its line, see
  :func:`_csv_documents`);
- ``.parquet``: the column ``text_field`` read in record batches (a compressed ``.parquet.gz``
  is decompressed into memory first, since parquet needs random access);
- ``.warc``, ``.warc.gz`` (web archives) and ``.wet``, ``.warc.wet.gz`` (their extracted
  text): one document per ``response`` / ``resource`` record (the main text of an HTML page)
  or ``conversion`` record (plain text), with its URL, record id and date
  (:func:`read_warc`); the archive's other records are skipped and counted;
- a Hugging Face Hub dataset id, when online: an input that is not a local path and looks
  like ``owner/name`` or ``owner/name:config`` (and has no supported file extension) is read
  with ``datasets.load_dataset(..., split=..., streaming=True)``, record by record, the
  document in ``text_field``. Offline (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``, or
  the Hub's host unreachable within :data:`HUB_TIMEOUT` seconds) it is a one-line
  :class:`~llmkit.errors.UserError` before anything is read.

Chat data (``llmkit prepare --format chat``) is read from JSON lines, JSON arrays and Hub
datasets by :func:`read_conversations`: each record becomes a conversation
(:func:`llmkit.data.sft.conversation_from_record`) with its place, ``file:line``.
:func:`resolve_format` tells chat records from documents for ``--format auto``.

``text_field`` may be a dotted path into nested objects (``metadata.body``; parquet structs
too). Other fields of a record are not kept with the document, but how many records carried
each top-level field is counted per file (``InputFile.fields``, in the manifest).

Text files are read line by line in binary (a line longer than :data:`READ_CHUNK` in pieces),
and the file's SHA-256 is computed on the bytes as they are read. A UTF-8 byte-order mark at
the start of a file is removed. They are decoded as UTF-8, strictly, unless ``encoding`` says
otherwise: ``"auto"`` (charset-normalizer's guess, per file, :func:`detect_encoding`) or a
codec name (``cp1252``, ``shift_jis``, ``gb18030``...). A file that is not UTF-8 is an error
whose hint names the encoding charset-normalizer detects in it.

Every document longer than ``max_document_bytes`` (default :data:`DEFAULT_MAX_DOCUMENT_BYTES`,
1 MiB) is cut into pieces at paragraph, line, sentence or word boundaries
(:func:`split_document`), each piece then a document: text files as they are read, so memory
holds at most about that much of a file at a time, whatever its lines or ``split_on``.

Bad input — a binary file (a NUL byte), a line that is not valid UTF-8 (or the encoding
given), a malformed JSON line or CSV row, a record without the text field, a damaged WARC
record — is a :class:`~llmkit.errors.UserError` naming the file and line (record) under
``on_error="fail"`` (the default). Under ``on_error="skip"`` the line (the rest of
the file, for a binary file) is skipped and counted by reason in ``InputFile.skipped``; there is
no silent fallback decoding.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.data.choices import FORMATS, ON_ERROR, SPLIT_MODES
from llmkit.errors import UserError, json_error_text

#: File kind by extension.
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet",)
#: Web archives: WARC (``.warc``, ``.warc.gz``) and WET (``.wet``, ``.warc.wet.gz``).
WARC_SUFFIXES = (".warc", ".wet")


def _zstd(f):
    try:
        import zstandard
    except ImportError as err:  # pragma: no cover - zstandard is a dependency
        raise UserError(".zst input needs the zstandard package", "pip install zstandard") from err
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f), 1 << 20)


#: Compression by extension, each with the function that wraps a binary file object.
COMPRESSIONS: dict[str, Callable[[io.BufferedIOBase], io.BufferedIOBase]] = {
    ".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    ".bz2": lambda f: bz2.BZ2File(f, mode="rb"),
    ".xz": lambda f: lzma.LZMAFile(f, mode="rb"),
    ".zst": _zstd,
}
#: File kinds that can hold chat records.
CHAT_KINDS = ("jsonl", "hub")
#: Non-blank lines of a JSON-lines file looked at to detect its format.
PEEK_LINES = 100
_GLOB_CHARS = set("*?[")
_BOM = b"\xef\xbb\xbf"


@dataclass
class InputFile:
    """One input file and what reading it found.

    ``sha256`` and ``documents`` are filled in by :func:`read_documents` once the file has been
    read to its end.
    """

    path: Path  # for a Hub dataset, its id (owner/name, without the config)
    kind: str  # "text", "jsonl", "csv", "parquet" or "hub"
    compression: str | None  # ".gz", ".bz2", ".xz", ".zst" or None
    size_bytes: int  # size on disk, in bytes (0 for a Hub dataset)
    sha256: str | None = None  # of the bytes on disk
    documents: int = 0  # documents read from the file, before any cleaning
    skipped: Counter = field(default_factory=Counter)  # lines skipped (on_error="skip"), by reason
    fields: Counter = field(default_factory=Counter)  # records per top-level field (structured)
    first_error: str | None = None  # the first skipped problem, "file:line: what"
    removed_lines: Counter = field(default_factory=Counter)  # lines cut by a rule, by rule
    hub_config: str | None = None  # a Hub dataset's configuration (subset)
    hub_split: str | None = None  # a Hub dataset's split
    chat_formats: Counter = field(default_factory=Counter)  # chat records read, by format
    encoding: str | None = None  # the codec the file was decoded with, when not UTF-8 strict
    encoding_detected: bool = False  # ``encoding`` was detected (``--encoding auto``)
    documents_split: int = 0  # documents longer than the maximum, cut into pieces
    pieces: int = 0  # the pieces they were cut into (counted in ``documents``)
    records_skipped: Counter = field(default_factory=Counter)  # web-archive records not read
    # A part of a Hub dataset's stream (``prepare --executor``: one shard per data file): part
    # ``hub_part`` of ``hub_parts`` (:meth:`datasets.IterableDataset.shard`, contiguous), whose
    # first row is row ``hub_first_row + 1`` of the whole split. None: the whole stream.
    hub_part: int | None = None
    hub_parts: int | None = None
    hub_first_row: int = 0

    def as_dict(self) -> dict:
        """The manifest entry: path, size, sha256, documents, skips and fields seen."""
        entry = {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "documents": self.documents,
        }
        if self.kind == "hub":
            entry.update(hub=True, config=self.hub_config, split=self.hub_split)
        if self.skipped:
            entry["skipped"] = dict(sorted(self.skipped.items()))
            entry["first_error"] = self.first_error
        if self.fields:
            entry["fields"] = dict(sorted(self.fields.items()))
        if self.chat_formats:
            entry["chat_formats"] = dict(sorted(self.chat_formats.items()))
        if self.encoding is not None:
            entry["encoding"] = self.encoding
            entry["encoding_detected"] = self.encoding_detected
        if self.documents_split:
            entry["documents_split"] = self.documents_split
            entry["pieces"] = self.pieces
        if self.records_skipped:
            entry["records_skipped"] = dict(sorted(self.records_skipped.items()))
        for rule, n in sorted(self.removed_lines.items()):
            entry[f"{rule}_lines_removed"] = n
        return entry

    def problem(self, err: UserError, reason: str, on_error: str) -> None:
        """Raise ``err`` under ``on_error="fail"``; count it under ``"skip"``."""
        if on_error != "skip":
            raise err
        self.skipped[reason] += 1
        if self.first_error is None:
            self.first_error = err.message


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
    if suffixes[-1] in CSV_SUFFIXES:
        return "csv", compression
    if suffixes[-1] in PARQUET_SUFFIXES:
        return "parquet", compression
    if suffixes[-1] in WARC_SUFFIXES:
        return "warc", compression
    return None


def _supported_list() -> str:
    kinds = ", ".join(
        TEXT_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES + WARC_SUFFIXES
    )
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


#: A Hub dataset id: ``owner/name``, optionally ``:config``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")
#: Seconds to wait for the Hub's host before calling it unreachable.
HUB_TIMEOUT = 3.0
_TRUE = ("1", "ON", "YES", "TRUE")


def looks_like_hub_id(item: str) -> bool:
    """True when ``item`` has the shape of a Hub dataset id (``owner/name[:config]``) and no
    supported file extension (``data/corpus.txt`` is a missing file, not a dataset)."""
    if not _HUB_ID.match(item):
        return False
    return file_kind(Path(item.split(":")[0])) is None


def hub_unreachable() -> str | None:
    """Why the Hub cannot be used now (offline mode, or its host not answering), or None.

    The offline variables are ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE``. Otherwise a TCP
    connection to the host of ``HF_ENDPOINT`` (default huggingface.co, port 443) is tried for
    at most :data:`HUB_TIMEOUT` seconds, unless a proxy is configured (then the download itself
    finds out).
    """
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        value = os.environ.get(var, "").strip()
        if value.upper() in _TRUE:
            return f"offline mode ({var}={value})"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT).close()
    except OSError as err:
        return f"no network ({host}:{port}: {err.strerror or type(err).__name__})"
    return None


def _hub_input(item: str, split: str) -> InputFile:
    name, _, config = item.partition(":")
    why = hub_unreachable()
    if why is not None:
        raise UserError(
            f"{item} is not a local path, and the Hub dataset {name} cannot be loaded: {why}",
            "check the path if you meant a local file; for a Hub dataset go online "
            "(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)",
        )
    return InputFile(Path(name), "hub", None, 0, hub_config=config or None, hub_split=split)


def discover_inputs(
    inputs: Iterable[str | Path],
    *,
    exclude: Iterable[str | Path] = (),
    hub_split: str = "train",
) -> list[InputFile]:
    """Expand files, directories (recursive) and globs into the list of files to read.

    Order is deterministic: inputs in the order given, directory and glob matches sorted by
    path. A file reached twice is read once. Inside a directory or a glob, files of other
    types are skipped; a file named explicitly must be of a supported type. An input that is
    not a local path but looks like a Hub dataset id (:func:`looks_like_hub_id`) is a Hub
    dataset, read from its split ``hub_split``.

    Args:
        inputs: paths of files or directories, glob patterns (``data/**/*.txt``), or Hub
            dataset ids (``owner/name``, ``owner/name:config``).
        exclude: paths whose files are never inputs (the output directory being replaced).
        hub_split: the split read from Hub datasets.

    Raises:
        UserError: a path does not exist, a glob matches nothing, a directory holds no
            supported file, a file named explicitly has an unsupported type, ``inputs``
            is empty, or a Hub dataset is named while offline (:func:`hub_unreachable`).
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
        elif not path.exists() and looks_like_hub_id(str(item)):
            found.append(_hub_input(str(item), hub_split))
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


def _open_binary(source: InputFile, digest) -> tuple[io.BufferedIOBase, _HashingReader, object]:
    path = source.path
    try:
        raw_file = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}", "check its permissions") from err
    hashing = _HashingReader(raw_file, digest)
    stream: io.BufferedIOBase = io.BufferedReader(hashing, 1 << 20)
    if source.compression:
        stream = COMPRESSIONS[source.compression](stream)
    return stream, hashing, raw_file


_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)


def _zstd_error() -> tuple[type[BaseException], ...]:
    try:
        import zstandard

        return (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover
        return ()


#: The default of ``--encoding``: UTF-8, strictly (a byte that is not UTF-8 is an error).
DEFAULT_ENCODING = "utf-8"
#: ``--encoding auto``: detect each file's encoding (:func:`detect_encoding`).
AUTO_ENCODING = "auto"
#: Bytes at the start of a file (decompressed) that :func:`detect_encoding` looks at.
DETECT_BYTES = 1 << 20
#: Among the candidates charset-normalizer ranks equal (same chaos and coherence, e.g.
#: windows-1250 and windows-1252 on French text), the first of this list wins: the legacy
#: encodings in order of their share of web sites (W3Techs, "Usage statistics of character
#: encodings for websites", 2024: windows-1252, windows-1251, Shift_JIS, EUC-KR, GB2312/GBK,
#: EUC-JP, Big5...). charset-normalizer's own ``best()`` breaks such ties by its internal order
#: (alphabetical for single-byte code pages) and names windows-1250 for French text.
ENCODING_PREFERENCE = (
    "utf_8",
    "ascii",
    "cp1252",
    "latin_1",
    "iso8859_15",
    "cp1251",
    "koi8_r",
    "cp932",
    "shift_jis",
    "cp949",
    "euc_kr",
    "gb18030",
    "gbk",
    "gb2312",
    "euc_jp",
    "big5",
    "cp950",
    "big5hkscs",
    "cp1250",
    "iso8859_2",
    "cp1253",
    "cp1254",
    "cp1255",
    "cp1256",
    "cp1257",
    "cp1258",
    "cp874",
)
#: Bytes of a text file read at a time: a line longer than this is read in pieces, so memory
#: never holds more than one piece of a line (plus the document being built, which
#: ``max_document_bytes`` bounds).
READ_CHUNK = 1 << 20
#: The default maximum size of one document, in UTF-8 bytes (``--max-document-bytes``). A
#: longer document is cut into pieces of at most this size (:func:`split_document`). Why
#: 1 MiB: the memory the later steps take grows with the size of the longest document — about
#: 100 times it in the BPE trainer's pre-tokenization and 50 times it in MinHash shingling
#: (measured on a 5 MB document: +502 MB and +266 MB) — so a 1 MiB bound keeps each step near
#: 100 MB per worker on any input. It keeps whole what the published web rules call a document
#: (Gopher's quality filter drops pages over 100,000 words, about 0.6 MB of English; Rae et
#: al. 2021, appendix A.1.1) and a novel such as Pride and Prejudice (0.76 MB).
DEFAULT_MAX_DOCUMENT_BYTES = 1 << 20
#: The smallest ``--max-document-bytes`` accepted.
MIN_MAX_DOCUMENT_BYTES = 1024


class _Partial(str):
    """A piece of a line longer than :data:`READ_CHUNK` (the line goes on in the next one)."""

    __slots__ = ()


def _codec_name(encoding: str, setting: str = "--encoding") -> str:
    """The Python codec name of ``encoding`` (``"Shift-JIS"`` -> ``"shift_jis"``).

    ``setting`` is how an error names where the encoding came from: the flag (default), the
    setting in a YAML file (``"encoding in prepare.yaml:"``) or the file it was detected in.

    Raises:
        UserError: an unknown encoding, or one that is not ASCII-compatible (UTF-16/32: their
            line breaks are not the byte 0x0A, so the file cannot be read line by line).
    """
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(
            f"{setting} {encoding!r} is not an encoding Python knows",
            "give a name such as utf-8, cp1252, cp1251, shift_jis, gb18030, big5, euc_kr, or "
            "auto to detect it",
        ) from None
    try:
        ascii_ok = "a\n".encode(name) == b"a\n"
    except (UnicodeError, LookupError):  # pragma: no cover - a codec without an encoder
        ascii_ok = False
    if not ascii_ok:
        raise UserError(
            f"{setting} {encoding}: llmkit reads text line by line and needs an encoding that "
            "keeps ASCII as it is (UTF-16 and UTF-32 do not)",
            f"convert the file first: iconv -f {name.upper()} -t UTF-8",
        )
    return name.replace("-", "_")


def _iconv_name(codec: str) -> str:
    return codec.upper().replace("_", "-")


#: Candidates whose chaos (charset-normalizer's mess ratio, 0 to 1) is within this of the best
#: one's are named too in the hint of a non-UTF-8 file: on a short sample a Korean and a
#: Japanese code page can both decode it (cp949 0.0, cp932 0.025 on one line of Japanese).
CLOSE_CHAOS = 0.05


def guess_encodings(sample: bytes) -> list[str]:
    """The likely encodings of ``sample`` (Python codec names such as ``"cp932"``), most likely
    first: charset-normalizer's candidates, ties broken by :data:`ENCODING_PREFERENCE`, then
    those within :data:`CLOSE_CHAOS` of the first; ``[]`` when it finds none.

    Pure ASCII is reported as ``["ascii"]``. A sample that ends inside a multi-byte character is
    cut at its last line break first.
    """
    from charset_normalizer import from_bytes

    cut = sample.rfind(b"\n")
    if 0 < cut < len(sample) - 1:
        sample = sample[: cut + 1]
    if sample.isascii():
        return ["ascii"]
    results = list(from_bytes(sample))
    if not results:
        return []

    def rank(match) -> int:
        names = [match.encoding, *match.encoding_aliases]
        return min(
            (ENCODING_PREFERENCE.index(n) for n in names if n in ENCODING_PREFERENCE),
            default=len(ENCODING_PREFERENCE),
        )

    ordered = sorted(results, key=lambda m: (m.chaos, -m.coherence, rank(m)))
    best = ordered[0]
    return [m.encoding for m in ordered if m.chaos <= best.chaos + CLOSE_CHAOS]


def guess_encoding(sample: bytes) -> str | None:
    """The most likely encoding of ``sample`` (:func:`guess_encodings`), or None."""
    found = guess_encodings(sample)
    return found[0] if found else None


def _read_sample(source: InputFile, limit: int = DETECT_BYTES) -> bytes:
    """The first ``limit`` bytes of a file, decompressed (for encoding detection)."""
    stream, _, raw_file = _open_binary(source, hashlib.sha256())
    try:
        return stream.read(limit)
    except _READ_ERRORS + _zstd_error():
        return b""
    finally:
        raw_file.close()


def detect_encoding(source: InputFile) -> str:
    """The codec to decode ``source`` with under ``--encoding auto``: :func:`guess_encoding`
    on its first :data:`DETECT_BYTES` (decompressed); UTF-8 for ASCII or UTF-8 text.

    Raises:
        UserError: no encoding fits (a binary file), or the one found is not ASCII-compatible.
    """
    sample = _read_sample(source)
    if sample.startswith(_BOM):
        return "utf_8"
    guess = guess_encoding(sample) if sample else "ascii"
    if guess is None:
        raise UserError(
            f"{source.path}: cannot detect its encoding",
            "name it with --encoding NAME (e.g. cp1252, shift_jis, gb18030, big5)",
        )
    if guess in ("ascii", "utf_8"):
        return "utf_8"
    return _codec_name(guess, f"{source.path}: its detected encoding")


def _encoding_hint(source: InputFile, line: bytes, more: Iterator[bytes]) -> str:
    """The hint of an invalid-UTF-8 error: the encoding charset-normalizer finds in the
    offending line and up to :data:`DETECT_BYTES` of what follows it, named with the flag and
    the ``iconv`` command that decode it."""
    sample = bytearray(line)
    for chunk in more:
        sample += chunk
        if len(sample) >= DETECT_BYTES:
            break
    try:
        found = guess_encodings(bytes(sample))
    except Exception:  # pragma: no cover - the detector must never hide the real error
        found = []
    guess = found[0] if found else None
    if guess in (None, "ascii", "utf_8"):
        return (
            "convert the file to UTF-8 (its encoding could not be detected: find it, then "
            "`iconv -f ENCODING -t UTF-8`), pass --encoding NAME, or pass --on-error skip"
        )
    others = [n for n in found[1:3] if n not in ("ascii", "utf_8")]
    maybe = f", else {' or '.join(others)}" if others else ""
    return (
        f"it looks like {guess} (detected by charset-normalizer{maybe}): pass --encoding "
        f"{guess} (or --encoding auto), or convert it: `iconv -f {_iconv_name(guess)} -t UTF-8`"
    )


def iter_lines(
    source: InputFile,
    on_error: str = "fail",
    *,
    encoding: str = DEFAULT_ENCODING,
    chunk_bytes: int | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a file, decoded, line ends kept.

    A leading UTF-8 byte-order mark is removed and ``\\r\\n`` line ends become ``\\n``.
    ``source.sha256`` is set when the file has been read to its end; ``source.encoding`` (and
    ``encoding_detected``) when ``encoding`` is not the default.

    Args:
        source: the file.
        on_error: ``"fail"`` raises on a binary file or a line that is not in the encoding;
            ``"skip"`` skips the line (the rest of the file for a binary one) and counts it in
            ``source.skipped`` (``"invalid utf-8"`` / ``"invalid <codec>"``, ``"binary"``).
        encoding: ``"utf-8"`` (strict, the default), ``"auto"`` (:func:`detect_encoding`, per
            file) or a codec name (``cp1252``, ``shift_jis``, ``gb18030``...); decoding is
            strict in every case.
        chunk_bytes: read at most this many bytes at a time: a longer line comes as several
            pieces with the same line number, all but its last a ``_Partial`` (a ``str``).
            None: whole lines. Under ``on_error="skip"`` a bad byte in such a line skips the
            rest of the line from the piece that holds it (the pieces before are out already).

    Raises:
        UserError: the file cannot be read or decompressed; an unknown or non-ASCII-compatible
            ``encoding``; under ``on_error="fail"`` also a NUL byte (binary) or a line that is
            not valid in the encoding (the line is named, and the hint names the encoding
            charset-normalizer detects).
    """
    path = source.path
    if encoding == AUTO_ENCODING:
        codec = detect_encoding(source)
        source.encoding, source.encoding_detected = codec, True
    else:
        codec = _codec_name(encoding)
        if codec != "utf_8":
            source.encoding, source.encoding_detected = codec, False
    what = "UTF-8" if codec == "utf_8" else codec
    decoder = codecs.getincrementaldecoder(codec)("strict")
    digest = hashlib.sha256()
    stream, hashing, raw_file = _open_binary(source, digest)
    limit = -1 if chunk_bytes is None else chunk_bytes
    try:
        lineno = 0
        column = 0  # bytes of the current line before this piece
        try:
            while raw := stream.readline(limit):
                # The line ends here: a line break, or the end of the file (readline returns
                # less than the limit without a line break only there).
                ends = raw.endswith(b"\n") or limit < 0 or len(raw) < limit
                if column == 0:
                    lineno += 1
                if lineno == 1 and column == 0 and raw.startswith(_BOM) and codec == "utf_8":
                    raw = raw[len(_BOM) :]
                if b"\x00" in raw:
                    source.problem(
                        UserError(
                            f"{path}:{lineno}: looks like a binary file (NUL byte)",
                            "give text files only (a UTF-16 file must be converted to "
                            "UTF-8: iconv -f UTF-16 -t UTF-8), or pass --on-error skip",
                        ),
                        "binary",
                        on_error,
                    )
                    break  # skip: the rest of a binary file is not text either
                if raw.endswith(b"\r\n"):
                    raw = raw[:-2] + b"\n"
                try:
                    if ends and column == 0:  # a whole line (the usual case): no state
                        line = raw.decode(codec)
                    else:
                        line = decoder.decode(raw, final=ends)
                except UnicodeDecodeError as err:
                    decoder.reset()
                    col = column + err.start + 1
                    bad = raw[err.start] if err.start < len(raw) else 0
                    if on_error != "skip":
                        rest = iter(lambda: stream.read(1 << 16), b"")
                        hint = (
                            _encoding_hint(source, raw, rest)
                            if codec == "utf_8"
                            else f"it is not {codec}: pass --encoding auto to detect it, "
                            "or --on-error skip"
                        )
                    else:
                        hint = None
                    source.problem(
                        UserError(
                            f"{path}:{lineno}: invalid {what} (byte 0x{bad:02x} at column {col})",
                            hint,
                        ),
                        f"invalid {what.lower()}",
                        on_error,
                    )
                    if not ends:  # skip the rest of this line
                        while (raw := stream.readline(limit)) and len(raw) == limit:
                            if raw.endswith(b"\n"):
                                break
                    column = 0
                    continue
                if ends:
                    column = 0
                    yield lineno, line
                else:
                    column += len(raw)
                    if line:
                        yield lineno, _Partial(line)
            if column and (tail := decoder.decode(b"", final=True)):  # pragma: no cover
                yield lineno, tail
        except UnicodeDecodeError as err:  # the file ends inside a multi-byte character
            source.problem(
                UserError(f"{path}:{lineno}: invalid {what} at the end of the file ({err.reason})"),
                f"invalid {what.lower()}",
                on_error,
            )
        except _READ_ERRORS + _zstd_error() as err:
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


def _n_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


#: Where :func:`split_document` prefers to cut, best first: a paragraph break, a line break,
#: the end of a sentence (Latin and CJK punctuation), a space.
_CUTS = (
    b"\n\n",
    b"\n",
    *(p.encode("utf-8") for p in (". ", "! ", "? ", "\u3002", "\uff01", "\uff1f", "\uff0e")),
    b" ",
    b"\t",
)


def split_document(text: str, max_bytes: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_bytes`` UTF-8 bytes (``[text]`` when it fits).

    Each cut is made in the second half of the window that ends ``max_bytes`` after the
    previous cut, at the last of the first of these found there: a paragraph break, a line
    break, a sentence end (``. ``, ``! ``, ``? ``, ``。``, ``！``, ``？``), a space or tab;
    failing all (a long run without whitespace), at the last character boundary. The
    separator stays at the end of the piece before the cut, so ``"".join(pieces) == text``;
    every piece but the last holds at least ``max_bytes // 2`` bytes.

    Raises:
        ValueError: ``max_bytes`` below 4 (one UTF-8 character).
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be at least 4: {max_bytes}")
    if len(text) * 4 <= max_bytes:
        return [text]
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        low = start + max_bytes // 2
        cut = -1
        for sep in _CUTS:
            i = data.rfind(sep, low, end)
            if i >= 0:
                cut = i + len(sep)
                break
        if cut < 0:
            cut = end
            while cut > start + 1 and (data[cut] & 0xC0) == 0x80:  # inside a character
                cut -= 1
        pieces.append(data[start:cut].decode("utf-8"))
        start = cut
    pieces.append(data[start:].decode("utf-8"))
    return pieces


def split_blank_lines(lines: Iterable[str], max_bytes: int | None = None) -> Iterator[str]:
    """Group lines (line ends kept) into documents separated by runs of blank lines.

    A blank line holds only spaces and tabs. A document is its lines joined, without the line
    break that ends its last line; this is ``re.split(r"\\n(?:[ \\t]*\\n)+", text)`` computed a
    line at a time, except that blank lines at the start and end of the text give no document.

    With ``max_bytes``, a document that grows past ``max_bytes`` UTF-8 bytes is cut
    (:func:`split_document`) as it is read, so memory holds at most ``max_bytes`` plus one line
    (or one :data:`READ_CHUNK` piece of a longer line).
    """
    return _group_lines(lines, max_bytes, blank_split=True)


def _group_lines(
    lines: Iterable[str],
    max_bytes: int | None,
    *,
    blank_split: bool,
    source: InputFile | None = None,
):
    current: list[str] = []
    size = 0
    cut = 0  # pieces already yielded of the current document

    def end_document() -> None:
        nonlocal cut
        if cut and source is not None:
            source.documents_split += 1
            source.pieces += cut + 1
        cut = 0

    content = False  # current holds a character that is not whitespace
    in_line = False  # the previous piece was a _Partial: this one continues its line
    limit = max_bytes if max_bytes is not None else float("inf")
    for line in lines:
        partial = line.__class__ is _Partial
        blank = not in_line and not partial and not line.strip(" \t\n")
        in_line = partial
        if blank and blank_split:
            if content:
                yield _join(current)
                end_document()
            current, size, content = [], 0, False
            continue
        current.append(line)
        content = content or not blank
        size += len(line) if line.isascii() else len(line.encode("utf-8"))
        if size > limit:
            pieces = split_document("".join(current), max_bytes)
            yield from pieces[:-1]
            cut += len(pieces) - 1
            current = [pieces[-1]]
            size = _n_bytes(pieces[-1])
    if current and (content or not blank_split):
        yield _join(current) if blank_split else "".join(current)
        end_document()


def _join(lines: list[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text


def _text_documents(
    source: InputFile,
    split_on: str,
    on_error: str,
    line_filter: Callable | None,
    encoding: str = DEFAULT_ENCODING,
    max_bytes: int | None = None,
) -> Iterator[str]:
    chunk = READ_CHUNK if max_bytes is None else min(READ_CHUNK, max_bytes)
    lines: Iterable[str] = (
        line for _, line in iter_lines(source, on_error, encoding=encoding, chunk_bytes=chunk)
    )
    if line_filter is not None:
        lines = line_filter(lines, source)
    if split_on == "none":
        if max_bytes is None:
            yield "".join(lines)
        else:
            yield from _group_lines(lines, max_bytes, blank_split=False, source=source)
    else:
        yield from _group_lines(lines, max_bytes, blank_split=True, source=source)


def get_field(record: dict, text_field: str):
    """``record[text_field]``, following a dotted path into nested objects.

    A key that itself holds a dot (``{"a.b": ...}``) is found before the path is split.

    Raises:
        KeyError: the path does not lead to a value.
    """
    if text_field in record:
        return record[text_field]
    value = record
    for part in text_field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(text_field)
        value = value[part]
    return value


def record_text(record, *, where: str, text_field: str) -> str:
    """The document in one record (a JSON object, a CSV row, a parquet row).

    Raises:
        UserError: the record is not an object, or has no string at ``text_field``; the
            message names ``where`` (``file:line``).
    """
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object, found {type(record).__name__}",
            "each line must be one JSON object",
            reason="not an object",
        )
    try:
        value = get_field(record, text_field)
    except KeyError:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise UserError(
            f"{where}: no field {text_field!r} (fields: {keys})",
            "choose the field holding the text with --text-field (a.b for nested fields)",
            reason="missing field",
        ) from None
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field {text_field!r} is {type(value).__name__}, not a string",
            "choose the field holding the text with --text-field",
            reason="field not a string",
        )
    return value


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
        record = json.loads(line.rstrip("\n"))
    except (ValueError, RecursionError) as err:
        raise UserError(
            f"{where}: malformed JSON ({json_error_text(err)})",
            "expected JSON lines (one object per line) or one JSON array of objects; "
            "--on-error skip skips such lines",
            reason="malformed json",
        ) from None
    return record_text(record, where=where, text_field=text_field)


def _reason(err: UserError) -> str:
    """The manifest's reason for a skipped text record: the error's ``reason`` code (every
    record error of :func:`record_text` and the readers carries one), else ``"bad record"``.
    Never read from the message."""
    return err.reason or "bad record"


def _count_fields(source: InputFile, record) -> None:
    if isinstance(record, dict):
        source.fields.update(record.keys())


#: Turns one parsed record into the document string: ``convert(record, where)``; raises
#: UserError naming ``where`` (``file:line``) for a bad record.
Convert = Callable[[object, str], str]


def _text_convert(text_field: str) -> Convert:
    def convert(record, where: str) -> str:
        return record_text(record, where=where, text_field=text_field)

    return convert


def _jsonl_records(
    source: InputFile,
    on_error: str,
    convert: Convert,
    reason: Callable[[UserError], str],
    encoding: str = DEFAULT_ENCODING,
) -> Iterator[tuple[str, str]]:
    """``(where, document)`` of each record of a JSON-lines file (or a JSON array file)."""
    lines = iter_lines(source, on_error, encoding=encoding)
    first = next(lines, None)
    if first is None:
        return
    if first[0] == 1 and first[1].lstrip().startswith("["):
        yield from _json_array_records(source, first[1], lines, on_error, convert, reason)
        return
    yield from json_line_records(source, itertools.chain([first], lines), on_error, convert, reason)


def json_line_records(
    source: InputFile,
    numbered_lines: Iterable[tuple[int, str]],
    on_error: str,
    convert: Convert,
    reason: Callable[[UserError], str],
) -> Iterator[tuple[str, str]]:
    """``(where, document)`` of each ``(line number, line)`` of JSON lines: blank lines
    skipped; malformed JSON and records ``convert`` refuses are problems of ``source`` (one
    line naming ``file:line``; counted and skipped under ``on_error="skip"``)."""
    for lineno, line in numbered_lines:
        if not line.strip():
            continue
        where = f"{source.path}:{lineno}"
        try:
            record = json.loads(line.rstrip("\n"))
        except (ValueError, RecursionError) as err:
            source.problem(
                UserError(
                    f"{where}: malformed JSON ({json_error_text(err)})",
                    "expected JSON lines (one object per line) or one JSON array of objects; "
                    "--on-error skip skips such lines",
                ),
                "malformed json",
                on_error,
            )
            continue
        _count_fields(source, record)
        try:
            yield where, convert(record, where)
        except UserError as err:
            source.problem(err, reason(err), on_error)


def _json_line(err: BaseException) -> str:
    """``:LINE`` of a JSON parse error, ``""`` when it has none (a ``RecursionError``)."""
    lineno = getattr(err, "lineno", None)
    return f":{lineno}" if lineno is not None else ""


def _json_array_records(
    source: InputFile,
    first: str,
    rest: Iterator[tuple[int, str]],
    on_error: str,
    convert: Convert,
    reason: Callable[[UserError], str],
) -> Iterator[tuple[str, str]]:
    """A ``.json`` file holding one array of objects (read whole)."""
    text = first + "".join(line for _, line in rest)
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise UserError(
            f"{source.path}{_json_line(err)}: malformed JSON ({json_error_text(err)})",
            "expected JSON lines (one object per line) or one JSON array of objects",
        ) from None
    if not isinstance(records, list):  # pragma: no cover - starts with "[" so it is a list
        raise UserError(f"{source.path}: expected a JSON array")
    for i, record in enumerate(records):
        _count_fields(source, record)
        where = f"{source.path}: item {i}"
        try:
            if not isinstance(record, dict):
                raise UserError(
                    f"{where}: expected a JSON object, found {type(record).__name__}",
                    "a .json file must hold JSON lines or one JSON array of objects",
                    reason="not an object",
                )
            yield where, convert(record, where)
        except UserError as err:
            source.problem(err, reason(err), on_error)


#: The longest CSV/TSV field read, in characters (64 MiB): a row is read whole before its
#: document is cut to ``max_document_bytes``, and a field this long is most likely a quote left
#: open that swallowed the rest of the file.
CSV_MAX_FIELD = 1 << 26


def _csv_documents(
    source: InputFile, text_field: str, on_error: str, encoding: str = DEFAULT_ENCODING
) -> Iterator[str]:
    """Rows of a CSV (comma) or TSV (tab) file with a header; the column ``text_field``.

    Quoting is read strictly (``csv`` with ``strict=True``), which is what makes a quote left
    open visible: a quoted field runs to the next quote, swallowing the line breaks and rows
    in between, so an unterminated quote either reaches the end of the file inside the field
    or closes on a later quote that is followed by something other than a delimiter or a line
    break. Both are errors naming the line where the record began (``file:line``), not where
    the reader noticed. Under ``on_error="skip"`` that record is counted (``"malformed
    csv"``) and reading resumes on the line after its first one, so the rows it had swallowed
    are read back. What cannot be told from valid CSV is a stray quote that a later stray
    quote closes just before a delimiter or line break: that is a legal multi-line field.

    A field longer than :data:`CSV_MAX_FIELD` is an error of the same kind: a quote left open
    in a large file would otherwise make the field grow to the end of the file, in memory.
    """
    delimiter = "\t" if ".tsv" in [s.lower() for s in source.path.suffixes] else ","
    csv.field_size_limit(CSV_MAX_FIELD)
    numbered = iter_lines(source, on_error, encoding=encoding)
    pending: list[tuple[int, str]] = []  # lines given back after a malformed record
    record: list[tuple[int, str]] = []  # the lines of the record being parsed

    def feed() -> Iterator[str]:
        while True:
            if pending:
                item = pending.pop(0)
            else:
                item = next(numbered, None)
                if item is None:
                    return
            record.append(item)
            yield item[1]

    def new_reader():
        return csv.reader(feed(), delimiter=delimiter, strict=True)

    reader = new_reader()
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise UserError(f"{source.path}:1: malformed header ({err})") from None
    column = text_field.split(".")[0] if text_field not in header else text_field
    if column not in header:
        raise UserError(
            f"{source.path}:1: no column {text_field!r} (columns: {', '.join(header[:8])})",
            "choose the column holding the text with --text-field",
        )
    index = header.index(column)
    source.fields.update(header)
    while True:
        record.clear()
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            lines = list(record)
            first = lines[0][0] if lines else "?"
            last = lines[-1][0] if lines else "?"
            eof = "end of data" in str(err)
            too_long = "field larger than field limit" in str(err)
            if too_long:
                what = (
                    f"a field that begins on line {first} runs past {CSV_MAX_FIELD:,} "
                    f"characters (to line {last}): a quote left open?"
                )
                hint = (
                    "close the quote, or give such long texts as JSON lines or text files; "
                    "--on-error skip skips this row and reads the next ones"
                )
            elif eof or first != last:
                what = (
                    f"a quoted field opened on line {first} is never closed (it runs to "
                    + ("the end of the file" if eof else f"line {last}")
                    + f", {len(lines)} lines)"
                )
                hint = (
                    'close the quote (a quote inside a quoted field is written twice: ""), '
                    "or pass --on-error skip to skip this row and read the next ones"
                )
            else:
                what = f"malformed CSV row ({err})"
                hint = "fix the quoting of this row, or pass --on-error skip"
            source.problem(
                UserError(f"{source.path}:{first}: {what}", hint), "malformed csv", on_error
            )
            # Read again from the line after the record's first: the rows it swallowed.
            pending[:0] = lines[1:]
            reader = new_reader()
            continue
        if not row:
            continue
        if index >= len(row):
            line = record[0][0] if record else reader.line_num
            source.problem(
                UserError(
                    f"{source.path}:{line}: row has {len(row)} fields, no {text_field!r}",
                    "every row needs the text column",
                ),
                "missing field",
                on_error,
            )
            continue
        yield row[index]


def _parquet_documents(source: InputFile, text_field: str, on_error: str) -> Iterator[str]:
    """The column ``text_field`` of a parquet file, one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    stream, hashing, raw_file = _open_binary(source, digest)
    try:
        if source.compression:
            data: object = pa.BufferReader(stream.read())
        else:
            data = raw_file
        try:
            pf = pq.ParquetFile(data)
        except (pa.ArrowException, OSError) as err:
            raise UserError(
                f"cannot read {source.path} as parquet: {err}",
                "the file is truncated or not in the format its extension says",
            ) from err
        source.fields.update({n: pf.metadata.num_rows for n in pf.schema_arrow.names})
        yield from parquet_texts(pf, source, text_field, on_error)
        if source.compression:
            hashing.drain()
        else:
            raw_file.seek(0)
            while chunk := raw_file.read(1 << 20):
                digest.update(chunk)
        source.sha256 = digest.hexdigest()
    finally:
        raw_file.close()


def parquet_texts(
    pf,
    source: InputFile,
    text_field: str,
    on_error: str,
    *,
    row_group: int | None = None,
    first_row: int = 0,
) -> Iterator[str]:
    """The strings of ``text_field`` (a column, or ``column.key`` inside a struct column) of
    an open ``pyarrow.parquet.ParquetFile``, 1000 rows at a time: every row group, or only
    ``row_group`` (whose first row is row ``first_row + 1`` of the file, for messages). A row
    whose field is missing or not a string is a problem of ``source`` (one line naming the
    row; counted and skipped under ``on_error="skip"``).

    Raises:
        UserError: the file has no such column.
    """
    names = pf.schema_arrow.names
    column = text_field if text_field in names else text_field.split(".")[0]
    if column not in names:
        raise UserError(
            f"{source.path}: no column {text_field!r} (columns: {', '.join(names[:8])})",
            "choose the column holding the text with --text-field",
        )
    groups = None if row_group is None else [row_group]
    row = first_row
    for batch in pf.iter_batches(batch_size=1000, row_groups=groups, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            if column != text_field:
                try:
                    value = get_field({column: value}, text_field)
                except KeyError:
                    value = None
            if not isinstance(value, str):
                source.problem(
                    UserError(
                        f"{source.path}: row {row}: field {text_field!r} is "
                        f"{type(value).__name__}, not a string",
                        "choose the column holding the text with --text-field",
                    ),
                    "missing field" if value is None else "field not a string",
                    on_error,
                )
                continue
            yield value


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def hub_stream(source: InputFile):
    """The split of a Hub dataset, streamed (``datasets.load_dataset(..., streaming=True)``, a
    ``datasets.IterableDataset``); only part ``source.hub_part`` of ``source.hub_parts`` when
    set (contiguous: the parts in order are the whole stream in order).

    Raises:
        UserError: the dataset, its configuration or split cannot be loaded (one line).
    """
    import datasets

    name = str(source.path)
    try:
        # no dataset script ever runs: datasets 4+ has none, 3.x would ask on stdin if unset
        stream = datasets.load_dataset(
            name,
            source.hub_config,
            split=source.hub_split,
            streaming=True,
            trust_remote_code=False,
        )
        if source.hub_parts is not None:
            stream = stream.shard(source.hub_parts, source.hub_part, contiguous=True)
        return stream
    except Exception as err:  # not found, gated, no such split or config, network
        raise UserError(
            f"cannot load the Hub dataset {name}"
            + (f" ({source.hub_config})" if source.hub_config else "")
            + f", split {source.hub_split!r}: {_short(err)}",
            "check the dataset id, its configuration (owner/name:config) and --split",
        ) from err


def _hub_records(
    source: InputFile, on_error: str, convert: Convert, reason: Callable[[UserError], str]
) -> Iterator[tuple[str, str]]:
    """The records of a Hub dataset's split (or of a part of it), streamed
    (:func:`hub_stream`); ``where`` numbers the rows of the whole split."""
    name = str(source.path)
    records = iter(hub_stream(source))
    row = source.hub_first_row
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:
            raise UserError(
                f"cannot read the Hub dataset {name} after row {row}: {_short(err)}",
                "check the network and retry",
            ) from err
        row += 1
        _count_fields(source, record)
        where = f"{name}: row {row}"
        try:
            yield where, convert(record, where)
        except UserError as err:
            source.problem(err, reason(err), on_error)


# ---------------------------------------------------------------------------------------------
# Web archives (WARC, WET).

#: WARC record types read as documents: ``response`` and ``resource`` (HTML through main-text
#: extraction, plain text as it is) and WET's ``conversion`` (plain text). Every other type
#: (``warcinfo``, ``request``, ``revisit``, ``metadata``...) is skipped and counted.
WARC_DOCUMENT_TYPES = ("response", "resource", "conversion")
#: Content types read as HTML, and as plain text.
HTML_TYPES = ("text/html", "application/xhtml+xml")
PLAIN_TYPES = ("text/plain",)


@dataclass
class WarcDocument:
    """One document of a web archive, with where it came from."""

    text: str
    url: str | None  # WARC-Target-URI
    record_id: str | None  # WARC-Record-ID
    date: str | None  # WARC-Date
    record_type: str  # response, resource or conversion
    content_type: str | None  # of the payload (the HTTP Content-Type for a response)

    def metadata(self) -> dict:
        """``url``, ``record_id``, ``date``, ``record_type``, ``content_type``."""
        return {
            "url": self.url,
            "record_id": self.record_id,
            "date": self.date,
            "record_type": self.record_type,
            "content_type": self.content_type,
        }


def _media_type(content_type: str | None) -> tuple[str, str | None]:
    """``("text/html", "utf-8")`` from ``"text/html; charset=UTF-8"``."""
    if not content_type:
        return "", None
    parts = [p.strip() for p in content_type.split(";")]
    charset = None
    for p in parts[1:]:
        key, _, value = p.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip("\"'") or None
    return parts[0].lower(), charset


def _html_main_text(body: bytes, url: str | None) -> str | None:
    try:
        import trafilatura
    except ImportError as err:
        raise UserError(
            "reading the HTML pages of a WARC file needs the trafilatura package",
            "pip install 'llmkit[html]'",
        ) from err
    # trafilatura decodes the bytes itself (the page's <meta charset>, else detection).
    # favor_recall: its default precision mode returns nothing for short pages (example.com's
    # 170 characters); what is kept is left to the filters, as for every other input.
    return trafilatura.extract(
        body, url=url, include_comments=False, include_tables=True, favor_recall=True
    )


def _plain_text(body: bytes, charset: str | None) -> str:
    """Plain text of a record: UTF-8 (WET files are UTF-8), else the declared charset.

    Raises:
        UnicodeDecodeError: it is neither.
    """
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        if charset:
            try:
                return body.decode(_codec_name(charset))
            except (UserError, UnicodeDecodeError):
                pass
        raise


def read_warc(source: InputFile, on_error: str = "fail") -> Iterator[WarcDocument]:
    """The documents of a WARC or WET file (warcio's ``ArchiveIterator``), one per record.

    - ``response`` records (HTTP, de-chunked and decompressed by warcio) with status 200 and
      ``resource`` records: an HTML payload gives its main text (trafilatura, as
      ``--html`` does for other inputs: a web page's markup, menus and footers are never
      training text, so in a WARC this extraction is always on); a ``text/plain`` payload
      is read as it is; any other content type (images, PDF, scripts) is skipped;
    - ``conversion`` records (WET): plain UTF-8 text as it is;
    - every other record type is skipped.

    Skipped records are counted in ``source.records_skipped`` by reason (``warcinfo``,
    ``request``, ``revisit``, ``metadata``, ``http status 404``, ``content type image/png``,
    ``no main text``, ``empty``): they are the archive's structure, not errors. A damaged
    record (cut short, or a ``Content-Length`` that does not match: warcio then finds no
    blank line after the record) and a compressed file cut short are errors naming the file,
    the record and its byte offset; under ``on_error="skip"`` the record (the rest of the file
    when the compression is cut) is counted in ``source.skipped`` (``"damaged record"``) and
    reading goes on. ``source.sha256`` is set at the end.

    Raises:
        UserError: see above; HTML records without the trafilatura package installed.
    """
    import contextlib

    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    path = source.path
    digest = hashlib.sha256()
    stream, hashing, raw_file = _open_binary(source, digest)
    number = 0
    offset = 0
    try:
        # warcio writes its own warnings on stderr: they become one-line errors below.
        with contextlib.redirect_stderr(io.StringIO()):
            records = ArchiveIterator(stream, check_digests=False)
            try:
                for record in records:
                    number += 1
                    if record.format != "warc":  # warcio reads any text as ARC records
                        raise ArchiveLoadFailed(f"record {number} is not a WARC record")
                    errors_before = records.err_count
                    rtype = record.rec_type
                    headers = record.rec_headers
                    url = headers.get_header("WARC-Target-URI")
                    body = b""
                    if rtype in WARC_DOCUMENT_TYPES:
                        body = record.content_stream().read()
                    records.read_to_end(record)
                    offset = records.get_record_offset()  # (reads the record to its end)
                    left = getattr(record.raw_stream, "limit", 0)
                    if records.err_count > errors_before or left:
                        source.problem(
                            UserError(
                                f"{path}: record {number} ({rtype}"
                                + (f" {url}" if url else "")
                                + f", at byte {offset}) is damaged: cut short, or its "
                                "Content-Length does not match its content",
                                "the file is truncated or corrupt: fetch it again, or pass "
                                "--on-error skip to skip the record",
                            ),
                            "damaged record",
                            on_error,
                        )
                        continue
                    if rtype not in WARC_DOCUMENT_TYPES:
                        source.records_skipped[rtype] += 1
                        continue
                    if rtype == "response":
                        http = record.http_headers
                        status = http.get_statuscode() if http is not None else None
                        if status is not None and status != "200":
                            source.records_skipped[f"http status {status}"] += 1
                            continue
                        content_type = http.get_header("Content-Type") if http else None
                    else:
                        content_type = headers.get_header("Content-Type")
                    media, charset = _media_type(content_type)
                    if rtype == "conversion" and not media:
                        media = "text/plain"
                    if media in HTML_TYPES:
                        text = _html_main_text(body, url)
                        if text is None:
                            source.records_skipped["no main text"] += 1
                            continue
                    elif media in PLAIN_TYPES:
                        try:
                            text = _plain_text(body, charset)
                        except UnicodeDecodeError as err:
                            source.problem(
                                UserError(
                                    f"{path}: record {number} ({url}, at byte {offset}): "
                                    f"invalid UTF-8 (byte 0x{body[err.start]:02x} at "
                                    f"{err.start})",
                                    "pass --on-error skip to skip such records",
                                ),
                                "invalid utf-8",
                                on_error,
                            )
                            continue
                    else:
                        source.records_skipped[f"content type {media or 'none'}"] += 1
                        continue
                    if not text.strip():
                        source.records_skipped["empty"] += 1
                        continue
                    yield WarcDocument(
                        text=text,
                        url=url,
                        record_id=headers.get_header("WARC-Record-ID"),
                        date=headers.get_header("WARC-Date"),
                        record_type=rtype,
                        content_type=content_type,
                    )
                # warcio takes a read error for the end of the archive: read on, to see it.
                stream.read(1)
            except ArchiveLoadFailed as err:
                source.problem(
                    UserError(
                        (
                            f"{path}: not a WARC file ({_short(err)})"
                            if number <= 1
                            else f"{path}: damaged after record {number - 1} ({_short(err)})"
                        ),
                        "give .warc/.warc.gz/.wet files as the crawler wrote them, or pass "
                        "--on-error skip to keep the records before the damage",
                    ),
                    "damaged record",
                    on_error,
                )
            except _READ_ERRORS + _zstd_error() as err:
                source.problem(
                    UserError(
                        f"cannot read {path} after record {number} (byte {offset}): {_short(err)}",
                        "the file is truncated or not in the format its extension says; "
                        "--on-error skip keeps the records before the damage",
                    ),
                    "damaged record",
                    on_error,
                )
        hashing.drain()
        source.sha256 = digest.hexdigest()
    finally:
        raw_file.close()


def document_pieces(source: InputFile, doc: str, max_document_bytes: int | None) -> list[str]:
    """``doc`` cut into pieces of at most ``max_document_bytes`` (:func:`split_document`;
    None: whole), counted on ``source`` (``documents_split``, ``pieces``) when it is cut."""
    if max_document_bytes is None or len(doc) <= max_document_bytes // 4:
        return [doc]
    pieces = split_document(doc, max_document_bytes)
    if len(pieces) > 1:
        source.documents_split += 1
        source.pieces += len(pieces)
    return pieces


def read_documents(
    source: InputFile,
    *,
    split_on: str = "blank-lines",
    text_field: str = "text",
    on_error: str = "fail",
    line_filter: Callable[[Iterable[str], InputFile], Iterable[str]] | None = None,
    encoding: str = DEFAULT_ENCODING,
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES,
    with_url: bool = False,
) -> Iterator:
    """Yield the documents of one input file, as read (not yet normalized).

    When the file has been read to its end, ``source.sha256`` and ``source.documents`` are set
    (``documents`` counts the pieces of a document that was cut).

    Args:
        source: a file from :func:`discover_inputs`.
        split_on: ``"blank-lines"`` or ``"none"`` (one document per file); text files only.
        text_field: the field (dotted path for nested ones) or column holding the document;
            structured files only.
        on_error: ``"fail"`` or ``"skip"`` (see the module docstring).
        line_filter: a function over the lines of a text file (and the file) applied before
            the split into documents, e.g. :func:`llmkit.data.boilerplate.strip_gutenberg`.
        encoding: how text, JSON-lines and CSV files are decoded: ``"utf-8"`` (strict, the
            default), ``"auto"`` (detected per file) or a codec name (:func:`iter_lines`).
        max_document_bytes: a document longer than this (UTF-8 bytes) is cut into pieces of
            at most this size (:func:`split_document`), each then a document; counted in
            ``source.documents_split`` and ``source.pieces``. None: never cut. A text file is
            cut as it is read, so memory never holds more than about this much of it; a
            record of a structured file (a JSON line, a CSV row, a WARC record) is read
            whole, then cut.
        with_url: yield ``(url, document)``: the ``WARC-Target-URI`` of a web-archive record
            (for each of its pieces), None for other inputs.

    Raises:
        UserError: see :func:`iter_lines`, :func:`parse_jsonl_line`, :func:`read_warc`;
            ``max_document_bytes`` below :data:`MIN_MAX_DOCUMENT_BYTES`.
    """
    if split_on not in SPLIT_MODES:
        raise UserError(f"--split-on {split_on!r} is not one of {', '.join(SPLIT_MODES)}")
    if on_error not in ON_ERROR:
        raise UserError(f"--on-error {on_error!r} is not one of {', '.join(ON_ERROR)}")
    check_max_document_bytes(max_document_bytes)
    convert = _text_convert(text_field)
    if source.kind == "hub":
        docs = (doc for _, doc in _hub_records(source, on_error, convert, _reason))
    elif source.kind == "jsonl":
        docs = (doc for _, doc in _jsonl_records(source, on_error, convert, _reason, encoding))
    elif source.kind == "csv":
        docs = _csv_documents(source, text_field, on_error, encoding)
    elif source.kind == "parquet":
        docs = _parquet_documents(source, text_field, on_error)
    elif source.kind == "warc":
        docs = (d for d in read_warc(source, on_error))
    else:
        docs = _text_documents(
            source, split_on, on_error, line_filter, encoding, max_document_bytes
        )
    count = 0
    for doc in docs:
        url = None
        if isinstance(doc, WarcDocument):
            url, doc = doc.url, doc.text
        for piece in document_pieces(source, doc, max_document_bytes):
            count += 1
            yield (url, piece) if with_url else piece
    source.documents = count


def check_max_document_bytes(
    max_document_bytes: int | None, name: str = "--max-document-bytes"
) -> None:
    """Raises UserError for a ``--max-document-bytes`` below :data:`MIN_MAX_DOCUMENT_BYTES`
    (``name``: how the message names the setting, the flag by default)."""
    if max_document_bytes is not None and max_document_bytes < MIN_MAX_DOCUMENT_BYTES:
        raise UserError(
            f"{name} {max_document_bytes} is too small",
            f"use at least {MIN_MAX_DOCUMENT_BYTES} (default {DEFAULT_MAX_DOCUMENT_BYTES:,}, "
            "1 MiB); longer documents are cut into pieces of at most this size",
        )


# ---------------------------------------------------------------------------------------------
# Chat records (``--format chat``).


def _chat_reason(err: UserError) -> str:
    """The manifest's reason for a skipped chat record (``InputFile.skipped``): the error's
    ``reason`` code (every record error of :mod:`llmkit.data.sft` and of the readers carries
    one), else ``"bad chat record"``. Never read from the message, so rewording a message never
    changes a manifest."""
    return err.reason or "bad chat record"


def conversation_json(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as the string the pipeline carries: its JSON list of messages (UTF-8
    kept, ``{"role", "content"}`` per message). :func:`json.loads` gives it back."""
    return json.dumps(list(messages), ensure_ascii=False)


def conversation_convert(source: InputFile) -> Convert:
    """The :data:`Convert` of chat records: a record to its :func:`conversation_json`
    (:func:`llmkit.data.sft.conversation_from_record`), counted by format in
    ``source.chat_formats``. Used for whole files and for line ranges of one
    (:mod:`llmkit.data.distributed.chat`)."""
    from llmkit.data.sft import conversation_from_record, detect_chat_format

    def convert(record, where: str) -> str:
        messages = conversation_from_record(record, where=where)
        source.chat_formats[detect_chat_format(record)] += 1
        return conversation_json(messages)

    return convert


def read_conversations(source: InputFile, *, on_error: str = "fail") -> Iterator[tuple[str, str]]:
    """Yield ``(where, conversation)`` for each chat record of a JSON-lines / JSON file or Hub
    dataset: ``where`` is ``file:line`` (``file: item i`` in a JSON array, ``name: row i``
    on the Hub), ``conversation`` the :func:`conversation_json` of
    :func:`llmkit.data.sft.conversation_from_record` (formats ``messages``, ShareGPT's
    ``conversations``, ``prompt``/``response`` and Alpaca's ``instruction``/``input``/``output``).

    The records read are counted by format in ``source.chat_formats``; ``source.sha256`` and
    ``source.documents`` are set when the file has been read to its end.

    Raises:
        UserError: the file is not JSON lines, JSON or a Hub dataset; and as
            :func:`read_documents`. Under ``on_error="fail"`` also a record that is not a
            conversation — no ``messages`` / ``conversations`` / ``prompt`` / ``instruction``,
            an unknown role (a ShareGPT ``from`` other than human, gpt, system),
            no assistant message, an empty turn... — named with file and line; under
            ``"skip"`` it is counted in ``source.skipped`` by reason.
    """
    if on_error not in ON_ERROR:
        raise UserError(f"--on-error {on_error!r} is not one of {', '.join(ON_ERROR)}")
    if source.kind not in CHAT_KINDS:
        raise UserError(
            f"{source.path}: chat data must be JSON lines or a JSON array (.jsonl, .json)",
            "give the conversations as JSON records, or use --format text for plain documents",
        )
    convert = conversation_convert(source)
    if source.kind == "hub":
        records = _hub_records(source, on_error, convert, _chat_reason)
    else:
        records = _jsonl_records(source, on_error, convert, _chat_reason)
    count = 0
    for where, conversation in records:
        count += 1
        yield where, conversation
    source.documents = count


def peek_record(source: InputFile) -> object | None:
    """The first JSON object of a JSON-lines or JSON-array file, or None when none is found
    among its first :data:`PEEK_LINES` non-blank lines (or the file cannot be read: reading
    it later reports why). Reads only what it needs; counts nothing."""
    if source.kind != "jsonl":
        return None
    try:
        stream, _, raw_file = _open_binary(source, hashlib.sha256())
    except UserError:
        return None
    try:
        seen = 0
        for lineno, raw in enumerate(stream, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            if seen == 0 and line.lstrip().startswith("["):  # one JSON array: read it whole
                text = line + b"".join(stream).decode("utf-8", errors="replace")
                try:
                    records = json.loads(text)
                except (ValueError, RecursionError):
                    return None
                return next((r for r in records if isinstance(r, dict)), None)
            seen += 1
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if isinstance(record, dict):
                return record
            if seen >= PEEK_LINES:
                return None
    except _READ_ERRORS + _zstd_error():
        return None
    finally:
        raw_file.close()
    return None


def is_chat_record(record: object, text_field: str = "text") -> bool:
    """True when ``record`` has the keys of a chat format (``messages``, ``conversations``,
    ``prompt``, ``instruction``; :func:`llmkit.data.sft.detect_chat_format`) and not
    ``text_field``: a record that holds the text field is a document, whatever else it
    holds."""
    from llmkit.data.sft import detect_chat_format

    if not isinstance(record, dict) or detect_chat_format(record) is None:
        return False
    try:
        get_field(record, text_field)
    except KeyError:
        return True
    return False


def resolve_format(files: Sequence[InputFile], requested: str, text_field: str = "text") -> str:
    """``"text"`` or ``"chat"``: what the inputs hold.

    ``requested`` ``"text"`` or ``"chat"`` is taken as it is (``"chat"`` only for JSON lines,
    JSON and Hub inputs). ``"auto"`` looks at the first record of each JSON-lines / JSON
    file (:func:`peek_record`): chat when every file's first record is a chat record
    (:func:`is_chat_record`), text when none is; text files, CSV/TSV and parquet are text,
    and so is a Hub dataset (not looked at: pass ``--format chat``).

    Raises:
        UserError: an unknown ``requested``; ``"chat"`` with a file that cannot hold chat
            records; under ``"auto"``, chat records in some inputs and documents in others.
    """
    if requested not in FORMATS:
        raise UserError(f"--format {requested!r} is not one of: {', '.join(FORMATS)}")
    if requested == "chat":
        for f in files:
            if f.kind not in CHAT_KINDS:
                raise UserError(
                    f"{f.path}: chat data must be JSON lines or a JSON array (.jsonl, .json)",
                    "give only .jsonl/.json files with --format chat, or use --format text",
                )
        return "chat"
    if requested == "text":
        return "text"
    chat = [f for f in files if f.kind == "jsonl" and is_chat_record(peek_record(f), text_field)]
    if not chat:
        return "text"
    if len(chat) < len(files):
        other = next(f for f in files if f not in chat)
        raise UserError(
            f"{chat[0].path} holds chat records but {other.path} holds documents",
            "prepare them in separate runs, or force one reading with --format chat / text",
        )
    return "chat"
