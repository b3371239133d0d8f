"""Shards: the inputs cut into independent units of work, in the one-process reading order.

A :class:`Shard` is one of

- a whole file (compressed files, JSON-array files, text files read with a line filter or
  ``split_on="none"``, files smaller than the target, every kind other than those below);
- a line-aligned byte range ``[start, end)`` of a large uncompressed JSON-lines file, or a
  byte range of a large uncompressed text file that starts and ends at a document boundary
  (the first non-blank line after a run of blank lines), read as UTF-8;
- one row group of an uncompressed parquet file;
- one data file of a Hub dataset whose split streams as one part per parquet file (the rows
  before it counted from the files' footers, so that ``where`` numbers the rows of the whole
  split as the one-process reader does); any other Hub dataset is one shard.

Shards are numbered in the order :func:`llmkit.data.readers.read_documents` walks the files
(files in :func:`~llmkit.data.readers.discover_inputs` order, ranges and row groups in file
order), so a document's global position is ``(shard.index, index within the shard)`` and
reading every shard in index order yields exactly the documents of the one-process reader
(:func:`read_shard`; pinned by ``tests/data/test_distributed_shards.py`` on the shared real
corpora).

Planning (:func:`plan_shards`) reads each file that it cuts once, in one process: it computes
the file's SHA-256 (the manifest's ``sha256``), the line number that starts each range (so an
error names ``file:line`` as the one-process reader does) and refuses to cut a file that holds
a NUL byte (under ``on_error="skip"`` the one-process reader skips the rest of such a file, a
rule that only the whole file can follow).
"""

from __future__ import annotations

import codecs
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from llmkit.data.readers import (
    _BOM,
    DEFAULT_ENCODING,
    DEFAULT_MAX_DOCUMENT_BYTES,
    READ_CHUNK,
    InputFile,
    _codec_name,
    _group_lines,
    _Partial,
    _reason,
    check_max_document_bytes,
    document_pieces,
    json_line_records,
    parquet_texts,
    read_documents,
    record_text,
)
from llmkit.errors import UserError

#: Default bytes per byte-range shard of a large plain file (64 MiB, as datatrove's readers
#: default their own ``shuffle_files``-less sharding to whole files; this only sets the grain).
TARGET_SHARD_BYTES = 64 << 20


@dataclass(frozen=True)
class Shard:
    """One unit of reading work.

    Attributes:
        index: global shard number (0-based), the first half of a document's position.
        file: index of the file in the list given to :func:`plan_shards`.
        part: number of this shard within its file (0-based).
        start, end: byte range ``[start, end)`` (None: the whole file).
        row_group: parquet row group (None: not a row group shard).
        first_line: 1-based line number of the range's first line (ranges only).
        first_row: 0-based row number of the row group's (or Hub part's) first row.
        hub_part, hub_parts: a Hub dataset's part (data file) ``hub_part`` of ``hub_parts``
            (:func:`llmkit.data.readers.hub_stream`); None: not a Hub part.
    """

    index: int
    file: int
    part: int
    start: int | None = None
    end: int | None = None
    row_group: int | None = None
    first_line: int = 1
    first_row: int = 0
    hub_part: int | None = None
    hub_parts: int | None = None

    @property
    def id(self) -> str:
        """Stable name: ``f{file:05d}-p{part:05d}`` (the same for the same inputs and target)."""
        return f"f{self.file:05d}-p{self.part:05d}"

    def describe(self, files: Sequence[InputFile]) -> str:
        """``shard 3 (path, bytes 0-1000)`` for messages."""
        path = files[self.file].path
        if self.start is not None:
            where = f"{path}, bytes {self.start}-{self.end}"
        elif self.row_group is not None:
            where = f"{path}, row group {self.row_group}"
        elif self.hub_part is not None:
            where = f"{path}, data file {self.hub_part + 1} of {self.hub_parts}"
        else:
            where = str(path)
        return f"shard {self.index} ({where})"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Shard:
        return cls(**d)


def _cuttable_plain(f: InputFile, split_on: str, line_filter, encoding: str) -> bool:
    if f.compression or f.kind not in ("text", "jsonl"):
        return False
    if encoding == "auto" or _codec_name(encoding) != "utf_8":
        return False
    return not (f.kind == "text" and (split_on == "none" or line_filter is not None))


#: A line this long or shorter is read whole by the one-process reader whatever
#: ``max_document_bytes`` (its smallest value), so its blankness is the reader's.
_SHORT_LINE = 1024


def _is_blank_raw(raw: bytes) -> bool:
    """True for a whole, short line that :func:`~llmkit.data.readers.split_blank_lines`
    treats as blank (only spaces and tabs before its ``\n`` or ``\r\n``)."""
    if len(raw) > _SHORT_LINE or not raw.endswith(b"\n"):
        return False
    if raw.endswith(b"\r\n"):
        raw = raw[:-2] + b"\n"
    return raw.strip(b" \t\n") == b""


def _rest_of_long_line(fh, digest) -> tuple[int, bool, bool]:
    """Read on to the end of a line longer than ``READ_CHUNK`` (hashing it): ``(bytes read,
    a NUL byte seen, the line ended with a newline)``."""
    n, nul = 0, False
    while more := fh.readline(READ_CHUNK):
        digest.update(more)
        nul = nul or b"\x00" in more
        n += len(more)
        if more.endswith(b"\n"):
            return n, nul, True
    return n, nul, False


def _scan_cuts(fh, first: bytes, kind: str, target: int, digest) -> tuple[list, bool]:
    """The rest of a plain file after its ``first`` line, hashed: ``([(offset, line number)]
    of the cut points, a NUL byte seen)``. At each multiple of ``target`` the next boundary
    is taken: a line start for JSON lines; for text, the first non-blank line after a blank
    line; never inside a long line."""
    cuts = [(0, 1)]
    pos, line, want = len(first), 2, target
    seen_blank = kind == "text" and _is_blank_raw(first)
    nul = b"\x00" in first
    while raw := fh.readline(READ_CHUNK):
        digest.update(raw)
        nul = nul or b"\x00" in raw
        boundary = kind == "jsonl" or (seen_blank and not _is_blank_raw(raw))
        if pos >= want and boundary:
            cuts.append((pos, line))
            want = pos + target
        seen_blank = kind == "text" and _is_blank_raw(raw)
        pos += len(raw)
        if raw.endswith(b"\n"):
            line += 1
        elif len(raw) == READ_CHUNK:  # a long line continues: never cut inside it
            n, more_nul, ended = _rest_of_long_line(fh, digest)
            pos, nul, line, seen_blank = pos + n, nul or more_nul, line + ended, False
    return cuts, nul


def _plan_plain(f: InputFile, target: int) -> tuple[list[tuple[int, int, int]], str]:
    """Cut points of a plain file: ``[(start, end, first_line)]`` and the file's SHA-256.

    One pass (:func:`_scan_cuts`): hashes the file and counts lines; at each multiple of
    ``target`` the next boundary is looked for (a line start for JSON lines; for text, the
    first non-blank line after a blank line). A file holding a NUL byte, or a JSON-array
    file, is not cut.
    """
    digest = hashlib.sha256()
    with open(f.path, "rb") as fh:
        first = fh.readline()
        digest.update(first)
        array = f.kind == "jsonl" and first.removeprefix(_BOM).lstrip().startswith(b"[")
        cuts, nul = _scan_cuts(fh, first, f.kind, target, digest)
    if array or nul:
        cuts = [(0, 1)]
    ranges = [
        (start, cuts[i + 1][0] if i + 1 < len(cuts) else f.size_bytes, first_line)
        for i, (start, first_line) in enumerate(cuts)
    ]
    return ranges, digest.hexdigest()


def hub_file_rows(f: InputFile) -> list[int] | None:
    """Rows of each data file of a Hub dataset's split, in the order it streams, when it
    streams as one part per parquet file (``datasets``' parquet builder: the counts are read
    from the files' footers, a small read each); None otherwise (JSON lines, one file, a
    layout this does not know, a footer that cannot be read: the dataset is then one shard,
    which is always right).

    Raises:
        UserError: the dataset cannot be loaded (:func:`llmkit.data.readers.hub_stream`).
    """
    import fsspec
    import pyarrow.parquet as pq

    from llmkit.data.readers import hub_stream

    stream = hub_stream(f)
    kwargs = getattr(getattr(stream, "_ex_iterable", None), "kwargs", None) or {}
    files = kwargs.get("files")
    if not isinstance(files, list) or len(files) < 2 or stream.num_shards != len(files):
        return None
    if not all(isinstance(x, str) and x.endswith(".parquet") for x in files):
        return None
    rows = []
    try:
        for url in files:
            with fsspec.open(url, "rb") as fh:
                rows.append(pq.ParquetFile(fh).metadata.num_rows)
    except Exception:  # noqa: BLE001 - a footer out of reach: read the dataset as one stream
        return None
    return rows


def plan_shards(
    files: Sequence[InputFile],
    *,
    target_bytes: int = TARGET_SHARD_BYTES,
    split_on: str = "blank-lines",
    line_filter: Callable | None = None,
    encoding: str = DEFAULT_ENCODING,
) -> list[Shard]:
    """Cut ``files`` (from :func:`~llmkit.data.readers.discover_inputs`) into shards.

    Sets ``sha256`` of every file it reads whole to plan it (cut plain files, parquet files).

    Args:
        files: the inputs, in reading order.
        target_bytes: a plain file larger than this is cut into ranges of about this size
            (each range ends at the first boundary past its target); a parquet file of more
            than one row group is cut per row group whatever its size.
        split_on, line_filter, encoding: as :func:`~llmkit.data.readers.read_documents` will
            read them (a file whose documents depend on more than their own lines is not cut).

    Returns:
        The shards, ``index`` 0, 1, ... in reading order.
    """
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be positive: {target_bytes}")
    out: list[Shard] = []
    for fi, f in enumerate(files):
        if _cuttable_plain(f, split_on, line_filter, encoding) and f.size_bytes > target_bytes:
            parts = _range_shards(f, fi, len(out), target_bytes)
        elif f.kind == "parquet" and not f.compression:
            parts = _row_group_shards(f, fi, len(out))
        elif f.kind == "hub":
            parts = _hub_shards(f, fi, len(out))
        else:
            parts = []
        out.extend(parts or [Shard(len(out), fi, 0)])
    return out


def _range_shards(f: InputFile, fi: int, index: int, target: int) -> list[Shard]:
    """A large plain file's byte ranges (none when it is not cut); sets its ``sha256``."""
    ranges, f.sha256 = _plan_plain(f, target)
    if len(ranges) < 2:
        return []
    return [
        Shard(index + part, fi, part, start, end, first_line=first_line)
        for part, (start, end, first_line) in enumerate(ranges)
    ]


def _row_group_shards(f: InputFile, fi: int, index: int) -> list[Shard]:
    """A parquet file's row groups (none for one row group, or a file the reader will report
    damaged); sets its ``sha256`` when it is cut."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f.path).metadata
    except Exception:  # noqa: BLE001 - the reader reports a damaged file itself
        return []
    if meta.num_row_groups < 2:
        return []
    with open(f.path, "rb") as fh:
        f.sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    out, row = [], 0
    for g in range(meta.num_row_groups):
        out.append(Shard(index + g, fi, g, row_group=g, first_row=row))
        row += meta.row_group(g).num_rows
    return out


def _hub_shards(f: InputFile, fi: int, index: int) -> list[Shard]:
    """A Hub dataset's parts, one per parquet data file (:func:`hub_file_rows`; none when it
    is read as one stream)."""
    rows = hub_file_rows(f)
    if rows is None:
        return []
    first = np.cumsum([0, *rows[:-1]]).tolist()
    return [
        Shard(index + k, fi, k, first_row=first[k], hub_part=k, hub_parts=len(rows))
        for k in range(len(rows))
    ]


def _skip_line_rest(fh, left: int, chunk_bytes: int) -> int:
    """Read past the rest of a long line (within the range's ``left`` bytes); returns the
    bytes left after it."""
    while left > 0 and (raw := fh.readline(min(chunk_bytes, left))):
        left -= len(raw)
        if raw.endswith(b"\n") or len(raw) < chunk_bytes:
            break
    return left


def _invalid_utf8(source: InputFile, lineno: int, column: int, raw: bytes, err) -> UserError:
    """The reader's error for invalid UTF-8 at ``column`` (0-based, of the line) + the error's
    place in the piece ``raw``."""
    bad = raw[err.start] if err.start < len(raw) else 0
    return UserError(
        f"{source.path}:{lineno}: invalid UTF-8 (byte 0x{bad:02x} at column "
        f"{column + err.start + 1})",
        "pass --encoding auto to detect the file's encoding, or --on-error skip",
    )


def _range_lines(source: InputFile, shard: Shard, on_error: str, chunk_bytes: int) -> Iterator[str]:
    """The lines of a byte range of a UTF-8 file, as :func:`~llmkit.data.readers.iter_lines`
    yields them for those lines (pieces of long lines as ``_Partial``)."""
    decoder = codecs.getincrementaldecoder("utf_8")("strict")
    lineno, column = shard.first_line - 1, 0
    with open(source.path, "rb") as fh:
        fh.seek(shard.start)
        left = shard.end - shard.start
        while left > 0 and (raw := fh.readline(min(chunk_bytes, left))):
            left -= len(raw)
            ends = raw.endswith(b"\n") or len(raw) < chunk_bytes or left == 0
            if column == 0:
                lineno += 1
                raw = raw[len(_BOM) :] if lineno == 1 and raw.startswith(_BOM) else raw
            if raw.endswith(b"\r\n"):
                raw = raw[:-2] + b"\n"
            try:
                line = raw.decode() if ends and column == 0 else decoder.decode(raw, final=ends)
            except UnicodeDecodeError as err:
                decoder.reset()
                error = _invalid_utf8(source, lineno, column, raw, err)
                source.problem(error, "invalid utf-8", on_error)
                left = left if ends else _skip_line_rest(fh, left, chunk_bytes)
                column = 0
                continue
            column = 0 if ends else column + len(raw)
            if ends or line:
                yield line if ends else _Partial(line)


def _range_documents(
    source: InputFile, shard: Shard, split_on: str, on_error: str, max_bytes: int | None
) -> Iterator[str]:
    if source.kind == "text":
        chunk = READ_CHUNK if max_bytes is None else min(READ_CHUNK, max_bytes)
        lines = _range_lines(source, shard, on_error, chunk)
        yield from _group_lines(lines, max_bytes, blank_split=True, source=source)
        return
    text_field = source._text_field
    lines = enumerate(_range_lines(source, shard, on_error, 1 << 62), start=shard.first_line)
    for _, document in json_line_records(
        source,
        lines,
        on_error,
        lambda record, where: record_text(record, where=where, text_field=text_field),
        _reason,
    ):
        yield document


def _row_group_documents(source: InputFile, shard: Shard, on_error: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    text_field = source._text_field
    pf = pq.ParquetFile(source.path)
    if shard.row_group == 0:  # counted once per file, as the one-process reader does
        source.fields.update({n: pf.metadata.num_rows for n in pf.schema_arrow.names})
    yield from parquet_texts(
        pf, source, text_field, on_error, row_group=shard.row_group, first_row=shard.first_row
    )


def shard_source(files: Sequence[InputFile], shard: Shard) -> InputFile:
    """A fresh copy of the shard's file record, with its counters at zero (what reading the
    shard finds is counted there; :func:`merge_file_stats` adds the shards up)."""
    f = files[shard.file]
    return replace(
        f,
        documents=0,
        skipped=Counter(),
        fields=Counter(),
        first_error=None,
        removed_lines=Counter(),
        chat_formats=Counter(),
        documents_split=0,
        pieces=0,
        records_skipped=Counter(),
        hub_part=shard.hub_part,
        hub_parts=shard.hub_parts,
        hub_first_row=shard.first_row if shard.hub_part is not None else 0,
    )


def read_shard(
    files: Sequence[InputFile],
    shard: Shard,
    *,
    source: InputFile | None = None,
    split_on: str = "blank-lines",
    text_field: str = "text",
    on_error: str = "fail",
    line_filter: Callable | None = None,
    encoding: str = DEFAULT_ENCODING,
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES,
    with_url: bool = False,
) -> Iterator:
    """The documents of one shard, in order, as :func:`~llmkit.data.readers.read_documents`
    yields them for that part of the file (``with_url``: ``(url, document)`` pairs, the
    ``WARC-Target-URI`` of a web page, None for other documents; a web archive is always a
    whole-file shard).

    Args:
        files: the list given to :func:`plan_shards`.
        shard: one of its shards.
        source: where to count what is read (documents, skips, fields); by default a fresh
            :func:`shard_source`. A whole-file shard sets its ``sha256`` too.
        split_on, text_field, on_error, line_filter, encoding, max_document_bytes: as
            :func:`~llmkit.data.readers.read_documents` (the same values given to
            :func:`plan_shards`).

    Raises:
        UserError: as :func:`~llmkit.data.readers.read_documents`, naming the file and line.
    """
    if source is None:
        source = shard_source(files, shard)
    if shard.start is None and shard.row_group is None:
        yield from read_documents(
            source,
            split_on=split_on,
            text_field=text_field,
            on_error=on_error,
            line_filter=line_filter,
            encoding=encoding,
            max_document_bytes=max_document_bytes,
            with_url=with_url,
        )
        return
    check_max_document_bytes(max_document_bytes)
    object.__setattr__(source, "_text_field", text_field)
    if shard.start is not None:
        docs = _range_documents(source, shard, split_on, on_error, max_document_bytes)
    else:
        docs = _row_group_documents(source, shard, on_error)
    count = 0
    for doc in docs:
        for piece in document_pieces(source, doc, max_document_bytes):
            count += 1
            yield (None, piece) if with_url else piece
    source.documents = count
    source.sha256 = files[shard.file].sha256


def merge_file_stats(files: Sequence[InputFile], shards: Sequence[Shard], sources) -> None:
    """Add up the per-shard records ``sources`` (in shard order) into ``files``.

    Counters and counts are summed; ``first_error`` is the first shard's that has one;
    ``sha256`` comes from the planner or the whole-file shard.
    """
    seen: set[int] = set()
    for shard, src in zip(shards, sources, strict=True):
        f = files[shard.file]
        if shard.file not in seen:
            seen.add(shard.file)
            f.documents, f.documents_split, f.pieces = 0, 0, 0
            for name in ("skipped", "fields", "removed_lines", "chat_formats", "records_skipped"):
                setattr(f, name, Counter())
            f.first_error = None
        f.documents += src.documents
        f.documents_split += src.documents_split
        f.pieces += src.pieces
        for name in ("skipped", "fields", "removed_lines", "chat_formats", "records_skipped"):
            getattr(f, name).update(getattr(src, name))
        if f.first_error is None:
            f.first_error = src.first_error
        if src.sha256 is not None:
            f.sha256 = src.sha256
        if src.encoding is not None:
            f.encoding, f.encoding_detected = src.encoding, src.encoding_detected
