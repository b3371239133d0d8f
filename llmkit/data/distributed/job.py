"""The distributed prepare job: stages as plain ``fn(data, rank, world_size)`` callables, run
by datatrove's executors over a shared work directory (any fsspec path).

Stages, each one job array that starts when every task of the one before has finished
(Slurm and Ray: datatrove's ``depends``; local: :func:`run_job` waits for the markers):

==========  ============  ==========================================================================
stage       tasks         what one task does
==========  ============  ==========================================================================
signatures  ``tasks``     for its shards (``shard.index % world_size == rank``): read
                          (:func:`~llmkit.data.distributed.shards.read_shard`), run the steps
                          before the de-duplication barrier (:func:`llmkit.data.config.
                          build_steps`, their ``run()``), write the rows that reach it (parquet),
                          each partition's dedup records (parquet) and the statistics (JSON)
groups      partitions    the collision groups of one partition (JSON)
resolve     1             the greedy resolve over the colliding documents (``dropped.json``)
admit       ``tasks``     for its shards: the resolve steps with those decisions, then the steps
                          after the barrier (PII); the kept texts (parquet), statistics, count
tokenizer   1             the split by global kept rank
                          (:func:`llmkit.data.pipeline.split_indices`): each shard's
                          validation documents (``.npy``); without a given tokenizer, a
                          byte-level BPE trained on the train documents in global order
                          (:func:`llmkit.core.tokenizer.train_bpe_tokenizer`)
encode      ``tasks``     for its shards: split as the tokenizer task wrote it, encode
                          (:func:`llmkit.data.encode.encode_batch`), write tokens (``.npy``)
pack        ``tasks``     for its shards: the blocks that start in its tokens (running totals)
==========  ============  ==========================================================================

:func:`assemble` then writes the output as ``llmkit prepare`` writes it in one process
(``train/``, ``validation/``, the tokenizer, ``dropped.jsonl``, ``lengths.png``,
``manifest.json``, from prepare's own functions) in a temporary directory renamed into
place.

Every file a task writes goes to a temporary name renamed into place, so a task killed mid-way
leaves nothing its rerun would read; datatrove's completion markers
(``logs/<stage>/completions/<rank>``) are written only once a task has finished, so a rerun of
the same command skips finished tasks. A failing task records one line naming the stage, task
and shard (``errors/``), which :func:`run_job` raises as a :class:`~llmkit.errors.UserError`.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmkit.core.prepared import SPLITS
from llmkit.data.distributed import dedup as ddedup
from llmkit.data.distributed.pack import running_offsets, shard_blocks, split_stats
from llmkit.data.distributed.shards import (
    TARGET_SHARD_BYTES,
    Shard,
    plan_shards,
    read_shard,
    shard_source,
)
from llmkit.data.readers import (
    DEFAULT_ENCODING,
    DEFAULT_MAX_DOCUMENT_BYTES,
    InputFile,
    discover_inputs,
)
from llmkit.errors import UserError

STAGES = ("signatures", "groups", "resolve", "admit", "tokenizer", "encode", "pack")
SPLIT_NAMES = SPLITS
#: Set to ``"<stage>:<rank>"`` to make that task stop (sleep) after its first shard, for the
#: fault tests (a task killed mid-way).
ENV_HANG = "LLMKIT_DIST_HANG"


@dataclass
class JobSpec:
    """Everything a task needs; saved as ``spec.json`` in the work directory.

    ``tokenizer`` is the pretrained tokenizer given (a directory, a ``.gguf`` file or a Hub
    id, as ``llmkit prepare --tokenizer`` takes it), or None to train a byte-level BPE of
    ``vocab_size`` tokens on the train split (as ``llmkit prepare``). A given one is loaded
    once, before the job, and saved in the work directory's ``tokenizer/``
    (:func:`put_tokenizer`), which every stage loads; ``tokenizer_files`` identifies its
    bytes (:func:`llmkit.core.cache.tokenizer_identity`), so that a changed tokenizer is not
    mixed with tokens encoded by the old one. ``keep_dropped``: the stages also write each
    dropped document (``dropped/``), for ``dropped.jsonl``.
    """

    work_dir: str
    inputs: list[str]
    tokenizer: str | None = None
    vocab_size: int = 1024
    block_size: int = 128
    val_fraction: float = 0.1
    seed: int = 1337
    split_on: str = "blank-lines"
    text_field: str = "text"
    on_error: str = "fail"
    encoding: str = DEFAULT_ENCODING
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES
    cleaning: dict = field(default_factory=dict)
    keep_dropped: bool = False
    tokenizer_files: dict | None = None
    tasks: int = 1
    partitions: int = 1
    target_shard_bytes: int = TARGET_SHARD_BYTES
    #: ``"text"`` (documents) or ``"chat"`` (conversations: the stages of
    #: :mod:`llmkit.data.distributed.chat`), with ``chat``: ``template``, ``train_on``,
    #: ``overlong`` as ``prepare`` resolves them.
    format: str = "text"
    chat: dict | None = None
    #: The split read from Hub dataset inputs (each Hub dataset is one shard, read by
    #: prepare's own streaming reader).
    hub_split: str = "train"


# ---------------------------------------------------------------------------------------------
# The work directory (fsspec).


def _foreign(path: str, what: str) -> UserError:
    return UserError(
        f"{path} is {what}: not written by llmkit, refused (nothing in it was run)",
        "someone else may have written to the work directory: use one only you can write",
    )


class Work:
    """The shared work directory: atomic writes (temporary name, then rename)."""

    def __init__(self, url: str):
        from fsspec.core import url_to_fs

        self.url = url
        self.fs, self.root = url_to_fs(url)

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{target}.tmp-{secrets.token_hex(4)}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, target)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def put_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj).encode("utf-8"))

    def get_json(self, rel: str):
        """A JSON file of the job (never anything that runs code when read).

        Raises:
            UserError: the file is not JSON (not written by this job).
        """
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _foreign(self.path(rel), "not JSON") from None

    def put_table(self, rel: str, table) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def get_table(self, rel: str):
        """A parquet file of the job (plain columns; parquet holds no code).

        Raises:
            UserError: the file is not parquet.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(self.read_bytes(rel)))
        except (pa.ArrowInvalid, OSError):
            raise _foreign(self.path(rel), "not parquet") from None

    def put_array(self, rel: str, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        self.write_bytes(rel, buf.getvalue())

    def get_array(self, rel: str) -> np.ndarray:
        """A ``.npy`` array of numbers, read with ``allow_pickle=False`` (an object array, a
        pickle, is refused).

        Raises:
            UserError: the file is not a plain ``.npy`` array.
        """
        try:
            return np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise _foreign(self.path(rel), "not a plain .npy array") from None

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        if not self.fs.isdir(self.path(rel)):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))


def _files_from(plan: dict) -> list[InputFile]:
    return [
        InputFile(
            Path(f["path"]),
            f["kind"],
            f["compression"],
            f["size_bytes"],
            f["sha256"],
            hub_config=f.get("hub_config"),
            hub_split=f.get("hub_split"),
        )
        for f in plan["files"]
    ]


def _mtime_ns(f: InputFile) -> int | None:
    """An input file's modification time (ns); None for a Hub dataset or a file gone."""
    if f.kind == "hub":
        return None
    try:
        return os.stat(f.path).st_mtime_ns
    except OSError:
        return None


def _changed_input(plan: dict, files: Sequence[InputFile], hashes: dict | None) -> str | None:
    """How the inputs found now differ from the ones ``plan`` was cut from, in words naming
    the input (``None``: the same). A file is the same when its size is, and its SHA-256
    (``hashes``: path → hash as ``prepare`` hashes them for its fingerprint, against the one
    planned)
    when both are known, else its modification time (``mtime_ns``)."""
    planned = {f["path"]: f for f in plan["files"]}
    now = {str(f.path): (f, (hashes or {}).get(str(f.path))) for f in files}
    for path in sorted(now.keys() - planned.keys()):
        return f"input {path} is new"
    for path in sorted(planned.keys() - now.keys()):
        return f"input {path} is gone"
    for path, (f, sha) in now.items():
        was = planned[path]
        if f.kind == "hub":
            continue
        if f.size_bytes != was["size_bytes"]:
            return f"input {path} changed ({was['size_bytes']:,} bytes then, {f.size_bytes:,} now)"
        if sha is not None and was.get("sha256") is not None:
            if sha != was["sha256"]:
                return f"input {path} changed (other bytes, same size)"
        elif "mtime_ns" in was and was["mtime_ns"] != _mtime_ns(f):  # (older plans: none)
            return f"input {path} changed (modified)"
    return None


def plan_job(spec: JobSpec, hashes: dict[str, str] | None = None) -> dict:
    """Discover the inputs, cut them into shards and write ``spec.json`` and ``plan.json``
    (once: a rerun over the same work directory keeps the first plan, so shard ids stay).

    ``plan.json`` records each input's path, size, SHA-256 (of the bytes planned from) and
    modification time (``mtime_ns``): a rerun whose inputs differ is refused, as the tasks
    already finished read the old bytes. ``hashes``: the inputs' SHA-256 as ``prepare``
    computed them for its fingerprint (input path → hash; None: not computed),
    compared with the planned ones where both are known, else the modification times are.

    Raises:
        UserError: an input was added, removed or changed since the work directory was
            planned (naming it); the work directory holds a job with other settings (its
            completion markers would be taken for this job's); it cannot be created or
            written (an OS error, a path fsspec does not know).
    """
    with on_work_dir(spec.work_dir):
        work = Work(spec.work_dir)
        planned = work.exists("plan.json")
        if planned:
            plan, earlier = work.get_json("plan.json"), work.get_json("spec.json")
    if planned:
        files = discover_inputs(spec.inputs, hub_split=spec.hub_split)
        changed = _changed_input(plan, files, hashes)
        if changed is not None:
            raise UserError(
                f"{changed} since the work directory {spec.work_dir} was planned (its "
                "finished tasks read the old inputs)",
                "use a new --work-dir, or delete this one to start over",
            )
        now = json.loads(json.dumps(asdict(spec)))
        if earlier != now:
            diff = sorted(k for k in now if earlier.get(k) != now[k])
            raise UserError(
                f"the work directory {spec.work_dir} holds a job with other settings "
                f"({', '.join(diff)})",
                "use another work directory, or remove this one to start over",
            )
        return plan
    plan = _new_plan(spec)
    with on_work_dir(spec.work_dir):
        work.write_bytes("spec.json", json.dumps(asdict(spec), indent=1).encode())
        work.write_bytes("plan.json", json.dumps(plan, indent=1).encode())
    return plan


@contextmanager
def on_work_dir(url: str) -> Iterator[None]:
    """Within the block, an error of the work directory itself (an ``OSError``, or the
    ``ValueError``/``ImportError`` fsspec raises for a protocol it does not know or lacks
    the package of) is one :func:`work_dir_error`."""
    try:
        yield
    except (OSError, ValueError, ImportError) as err:
        raise work_dir_error(url, err) from None


def work_dir_error(url: str, err: BaseException) -> UserError:
    """The one line of an error about the work directory itself (an ``OSError``, or the
    ``ValueError``/``ImportError`` fsspec raises for a protocol it does not know or lacks
    the package of)."""
    if isinstance(err, OSError) and err.strerror:
        why = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        why = f"{type(err).__name__}: {err}".splitlines()[0]
    return UserError(
        f"cannot use --work-dir {url} ({why})",
        "give a directory you can write (local, or a URL fsspec knows: s3://, gs://...)",
    )


def open_work_dir(url: str) -> Work:
    """The work directory, created if missing: checked before anything is written.

    Raises:
        UserError: it cannot be created (:func:`work_dir_error`).
    """
    with on_work_dir(url):
        work = Work(url)
        work.fs.makedirs(work.root, exist_ok=True)
        if not work.fs.isdir(work.root):
            raise NotADirectoryError(20, "Not a directory", url)
    return work


def _new_plan(spec: JobSpec) -> dict:
    """The inputs found and their shards (``plan.json``)."""
    files = discover_inputs(spec.inputs, hub_split=spec.hub_split)
    mtimes = [_mtime_ns(f) for f in files]  # before reading: an edit while planning shows
    from llmkit.data.boilerplate import strip_gutenberg

    cfg = _cleaning(spec)
    shards = plan_shards(
        files,
        target_bytes=spec.target_shard_bytes,
        split_on=spec.split_on,
        line_filter=strip_gutenberg if cfg["gutenberg"] else None,
        encoding=spec.encoding,
    )
    return {
        "files": [
            {
                "path": str(f.path),
                "kind": f.kind,
                "compression": f.compression,
                "size_bytes": f.size_bytes,
                "sha256": f.sha256,
                "mtime_ns": mtime,
                **(
                    {"hub_config": f.hub_config, "hub_split": f.hub_split}
                    if f.kind == "hub"
                    else {}
                ),
            }
            for f, mtime in zip(files, mtimes, strict=True)
        ],
        "shards": [s.as_dict() for s in shards],
    }


def _cleaning(spec: JobSpec) -> dict:
    from llmkit.data.config import default_config, merge

    return merge(default_config(), spec.cleaning or {})


# ---------------------------------------------------------------------------------------------
# Stages.


def _one_line(err: BaseException) -> str:
    if isinstance(err, UserError):
        return err.message + (f" — {err.hint}" if getattr(err, "hint", None) else "")
    return f"{type(err).__name__}: {err}".splitlines()[0]


class _Recorded(RuntimeError):
    """A task's failure, already written to ``errors/`` as one line."""


def _task_record(stage: str, start: float) -> dict:
    """What a finished task records in ``taskstats/<stage>-<rank>.json`` (for benchmarks and
    for users sizing tasks): ``start`` and ``end`` (epoch seconds) and ``max_rss``, the peak
    resident set of the task's process so far in bytes (``getrusage``; the process may have
    run other tasks before: with one local worker every task runs in the CLI's process)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "stage": stage,
        "start": start,
        "end": time.time(),
        "max_rss": rss if sys.platform == "darwin" else rss * 1024,
    }


class Stage:
    """A plain ``fn(data, rank, world_size)`` callable for datatrove's executors."""

    name = "stage"

    def __init__(self, work_dir: str):
        self.work_dir = work_dir

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        work = Work(self.work_dir)
        spec = JobSpec(**work.get_json("spec.json"))
        plan = work.get_json("plan.json")
        files = _files_from(plan)
        shards = [Shard.from_dict(d) for d in plan["shards"]]
        work.write_bytes(f"runs/{self.name}-{rank:05d}-{secrets.token_hex(4)}", b"")
        start = time.time()
        try:
            self.run(work, spec, files, shards, rank, world_size)
        except _Recorded:
            raise
        except Exception as err:  # a stage-wide step (no shard of its own)
            msg = f"{self.name} task {rank} of {world_size}: {_one_line(err)}"
            work.write_bytes(f"errors/{self.name}-{rank:05d}", msg.encode())
            raise _Recorded(msg) from None
        work.put_json(f"taskstats/{self.name}-{rank:05d}.json", _task_record(self.name, start))
        return data

    def run(self, work, spec, files, shards, rank, world_size) -> None:  # pragma: no cover
        raise NotImplementedError

    def _per_shard(self, work, files, shards, rank, world_size, fn) -> None:
        hang = os.environ.get(ENV_HANG) == f"{self.name}:{rank}"
        mine = [s for s in shards if s.index % world_size == rank]
        for k, shard in enumerate(mine):
            try:
                fn(shard)
            except Exception as err:
                msg = (
                    f"{self.name} task {rank} of {world_size}, {shard.describe(files)}: "
                    f"{_one_line(err)}"
                )
                work.write_bytes(f"errors/{self.name}-{rank:05d}", msg.encode())
                raise _Recorded(msg) from None
            if hang and k == 0:
                work.write_bytes(f"hang/{self.name}-{rank:05d}", str(os.getpid()).encode())
                while True:
                    time.sleep(1)


def _steps(spec: JobSpec, writer=None) -> tuple[list, list, list]:
    """The cleaning steps of the job's settings (:func:`llmkit.data.config.build_steps`, the
    dropped documents to ``writer``), cut at the de-duplication barrier
    (:func:`~llmkit.data.distributed.dedup.split_steps`)."""
    from llmkit.data.config import build_steps

    return ddedup.split_steps(build_steps(_cleaning(spec), writer))


def _dropped_writer(spec: JobSpec):
    """With ``keep_dropped``: a :class:`~llmkit.data.steps.base.DroppedWriter` into a local
    temporary folder (its files go to the work directory per shard, :func:`_put_dropped`);
    else None."""
    if not spec.keep_dropped:
        return None
    import tempfile

    from llmkit.data.steps.base import DroppedWriter

    return DroppedWriter(tempfile.mkdtemp(prefix="llmkit-dropped-"))


def _put_dropped(work: Work, writer, shard: Shard) -> None:
    """Move what ``writer`` holds (the documents one shard's steps dropped, keyed by their
    index in the shard as read) to ``dropped/s<shard>/`` of the work directory; a rerun of
    the shard writes the same names."""
    if writer is None:
        return
    writer.close()
    for path in sorted(writer.folder.glob("*.jsonl")):
        work.write_bytes(f"dropped/s{shard.index:06d}/{path.name}", path.read_bytes())
        path.unlink()


def _stats_json(steps) -> list[dict]:
    return [
        {
            "name": st.name,
            "documents_in": st.documents_in,
            "documents_out": st.documents_out,
            "bytes_in": st.bytes_in,
            "bytes_out": st.bytes_out,
            "dropped": dict(st.dropped),
            "counts": dict(st.counts),
            "template": st.template,
        }
        for st in (step.stats for step in steps)
        if st is not None
    ]


def _stats_from(entries: list[dict]) -> list:
    from collections import Counter

    from llmkit.data.steps.base import StageStats

    out = []
    for e in entries:
        e = dict(e)
        e["dropped"], e["counts"] = Counter(e["dropped"]), Counter(e["counts"])
        out.append(StageStats(**e))
    return out


def _source_json(source: InputFile) -> dict:
    from dataclasses import fields

    return {
        f.name: str(v) if isinstance(v := getattr(source, f.name), Path) else v
        for f in fields(source)
    }


def _source_from(entry: dict) -> InputFile:
    from collections import Counter

    entry = dict(entry)
    entry["path"] = Path(entry["path"])
    for name in ("skipped", "fields", "removed_lines", "chat_formats", "records_skipped"):
        entry[name] = Counter(entry[name])
    return InputFile(**entry)


def _row_schema(rules):
    """The arrow schema of a shard's rows: the document's index in the shard as read (``id``),
    the text, its UTF-8 bytes, ``where`` (a web page's URL, a conversation's ``file:line``;
    what ``--keep-dropped`` writes of it) and each rule's key."""
    from datasets import Features, Value

    from llmkit.data.steps.dedup import key_name

    return Features(
        {
            "id": Value("int64"),
            "text": Value("string"),
            "n_bytes": Value("int64"),
            "where": Value("string"),
            **{key_name(rule): rule.key_feature() for rule in rules},
        }
    ).arrow_schema


def put_records(work: Work, shard: int, rows: list[dict], rules, partitions: int) -> None:
    """Write a shard's de-duplication records, one parquet file per partition
    (:func:`~llmkit.data.distributed.dedup.shard_records` of its rows)."""
    import pyarrow as pa

    by_part = ddedup.shard_records(rows, shard, rules, partitions)
    for p, recs in enumerate(by_part):
        cols = list(zip(*recs, strict=True)) if recs else [[], [], [], []]
        table = pa.table(
            {
                "rule": pa.array(cols[0], pa.int32()),
                "key": pa.array(cols[1], pa.binary()),
                "shard": pa.array(cols[2], pa.int64()),
                "index": pa.array(cols[3], pa.int64()),
            }
        )
        work.put_table(f"records/p{p:05d}/s{shard:06d}.parquet", table)


def put_signed_shard(work, spec, shard, docs, writer, rules, schema) -> None:
    """The signatures stage's output for one shard, for documents and conversations alike:
    ``docs`` (what passed the steps before the barrier, consumed here) as rows
    (``rows/s<index>.parquet``: ``id`` as read, the text stored, its bytes, ``where``, each
    rule's key), each partition's de-duplication records (:func:`put_records`) and the
    dropped documents (``--keep-dropped``)."""
    import pyarrow as pa

    from llmkit.data.steps.dedup import key_name

    names = [key_name(rule) for rule in rules]
    rows = [
        {
            "id": d.id,
            "text": d.stored(),
            "n_bytes": d.n_bytes,
            "where": d.metadata.get("where"),
            **{k: d.metadata.get(k) for k in names},
        }
        for d in docs
    ]
    _put_dropped(work, writer, shard)
    put_records(work, shard.index, rows, rules, spec.partitions)
    work.put_table(f"rows/s{shard.index:06d}.parquet", pa.Table.from_pylist(rows, schema=schema))


class Signatures(Stage):
    """Per shard: read, run the steps before the barrier (normalize, filters, signatures:
    their ``run()``), write the rows that reach the barrier (parquet), each partition's
    de-duplication records (parquet) and the steps' statistics (JSON)."""

    name = "signatures"

    def run(self, work, spec, files, shards, rank, world_size) -> None:

        from llmkit.data.boilerplate import strip_gutenberg
        from llmkit.data.document import Document
        from llmkit.data.pipeline import LengthHistogram
        from llmkit.data.steps.base import run_chain

        cfg = _cleaning(spec)
        writer = _dropped_writer(spec)
        before, resolves, _ = _steps(spec, writer)
        rules = ddedup.rules_of(resolves)
        schema = _row_schema(rules)

        def one(shard: Shard) -> None:
            source = shard_source(files, shard)
            texts = read_shard(
                files,
                shard,
                source=source,
                split_on=spec.split_on,
                text_field=spec.text_field,
                on_error=spec.on_error,
                line_filter=strip_gutenberg if cfg["gutenberg"] else None,
                encoding=spec.encoding,
                max_document_bytes=spec.max_document_bytes,
                with_url=True,
            )
            read = {"documents_out": 0, "bytes_out": 0}
            lengths = LengthHistogram()

            def documents():
                for j, (url, text) in enumerate(texts):
                    doc = Document(text, j, {"where": url})  # a web page's URL, as prepare's
                    read["documents_out"] += 1
                    read["bytes_out"] += doc.n_bytes
                    lengths.add(doc.n_bytes)
                    yield doc

            for step in before:
                step.reset_stats()
            docs = run_chain(before, documents(), rank, world_size)
            put_signed_shard(work, spec, shard, docs, writer, rules, schema)
            work.put_json(
                f"sources/s{shard.index:06d}.json",
                {
                    "source": _source_json(source),
                    "read": read,
                    "lengths": lengths.as_list(),
                    "stats": _stats_json(before),
                },
            )

        self._per_shard(work, files, shards, rank, world_size, one)


def _repeated_records(work: Work, partition: int) -> list[tuple[int, bytes, int, int]]:
    """The records ``(rule, key, shard, index)`` of a partition whose ``(rule, key)`` is held
    by two records or more: every record that can be in a collision group
    (:func:`~llmkit.data.distributed.dedup.collision_groups` keeps the groups of two
    documents or more, which only such keys can form).

    Counted in arrow (``group_by``), so that only those records become Python objects:
    every record of a partition as Python tuples took about 1 KB each (with the groups'
    sets), a few hundred MB per million records.

    Raises:
        UserError: a records file is not parquet (one without these columns raises
            KeyError, which :func:`~llmkit.data.distributed.prepare.prepare_distributed`
            reports as a file llmkit did not write).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    prefix = f"records/p{partition:05d}"
    tables = [
        work.get_table(f"{prefix}/{name}").select(["rule", "key", "shard", "index"])
        for name in work.listdir(prefix)
        if name.endswith(".parquet")
    ]
    if not tables:
        return []
    table = pa.concat_tables(tables)
    counts = table.group_by(["rule", "key"], use_threads=False).aggregate([("shard", "count")])
    repeated = counts.filter(pc.greater(counts["shard_count"], 1))["key"]
    # a key repeated under one rule selects its records under every rule; a (rule, key)
    # held once among them forms no group in collision_groups
    table = table.filter(pc.is_in(table["key"], value_set=repeated)).to_pydict()
    return list(zip(table["rule"], table["key"], table["shard"], table["index"], strict=True))


class Groups(Stage):
    name = "groups"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        groups = ddedup.collision_groups(_repeated_records(work, rank))
        work.put_json(f"groups/p{rank:05d}.json", [[r, members] for r, members in groups])


class Resolve(Stage):
    """One task: the greedy resolve over the colliding documents (``dropped.json``)."""

    name = "resolve"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        from llmkit.data.steps.dedup import key_name

        rules = ddedup.rules_of(_steps(spec)[1])
        groups = []
        for p in range(spec.partitions):
            for r, members in work.get_json(f"groups/p{p:05d}.json"):
                groups.append((r, [tuple(m) for m in members]))
        sigs = None
        need = ddedup.signatures_needed(rules)
        if need:  # the signatures of the colliding documents only
            colliding = {m for _, members in groups for m in members}
            sigs = {i: {} for i in need}
            for shard in shards:
                if not any(s == shard.index for s, _ in colliding):
                    continue
                rows = work.get_table(f"rows/s{shard.index:06d}.parquet").to_pydict()
                for i in need:
                    bands, keys = rules[i].bands, rows[key_name(rules[i])]
                    for j, key in enumerate(keys):
                        if (shard.index, j) in colliding and key is not None:
                            sigs[i][(shard.index, j)] = np.asarray(key[bands:])
        dropped = ddedup.resolve(groups, rules, sigs)
        work.put_json(
            "dropped.json", [[s, j, r, why] for (s, j), (r, why) in sorted(dropped.items())]
        )


def _dropped(work) -> dict:
    return {(s, j): (r, why) for s, j, r, why in work.get_json("dropped.json")}


def admit_shards(stage, work, spec, files, shards, rank, world_size, make_document, columns):
    """The admit stage of both paths, per shard of this task: the resolve steps with the
    global decisions, then the steps after the barrier (PII), over the shard's rows; writes
    the kept documents (``kept/s<index>.parquet``: ``columns(kept)``, a dict of pyarrow
    arrays), the dropped ones (``--keep-dropped``), and the kept count, the steps' statistics
    and the length histogram (``admitted/s<index>.json``).

    Args:
        make_document: ``(row, metadata) -> Document`` of one stored row (its ``id`` is the
            read position, for ``dropped.jsonl``).
    """
    from llmkit.data.pipeline import LengthHistogram
    from llmkit.data.steps.base import run_chain
    from llmkit.data.steps.dedup import key_name

    writer = _dropped_writer(spec)
    _, resolves, after = _steps(spec, writer)
    rules = ddedup.rules_of(resolves)
    dropped = _dropped(work)

    def one(shard: Shard) -> None:
        rows = work.get_table(f"rows/s{shard.index:06d}.parquet").to_pylist()
        # world_size 1: the decided resolve steps need no global order any more
        steps = ddedup.decided_steps(resolves, dropped) + after
        for step in after:
            step.reset_stats()

        def documents():
            for j, row in enumerate(rows):
                metadata = {key_name(r): row[key_name(r)] for r in rules}
                metadata["where"] = row["where"]
                doc = make_document(row, metadata)
                doc._n_bytes = row["n_bytes"]
                ddedup.tag_keys(doc.metadata, rules, (shard.index, j))
                yield doc

        kept = list(run_chain(steps, documents()))
        lengths = LengthHistogram()
        for d in kept:
            lengths.add(d.n_bytes)
        _put_dropped(work, writer, shard)
        work.put_table(f"kept/s{shard.index:06d}.parquet", _table(columns(kept)))
        work.put_json(
            f"admitted/s{shard.index:06d}.json",
            {"kept": len(kept), "lengths": lengths.as_list(), "stats": _stats_json(steps)},
        )

    stage._per_shard(work, files, shards, rank, world_size, one)


def _table(columns: dict):
    import pyarrow as pa

    return pa.table(columns)


class Admit(Stage):
    """Per shard: the resolve steps with the global decisions, then the steps after the
    barrier (PII), their ``run()`` over the shard's rows; the kept texts (parquet), the
    steps' statistics and the kept count (JSON) (:func:`admit_shards`)."""

    name = "admit"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        import pyarrow as pa

        from llmkit.data.document import Document

        def make_document(row, metadata):
            return Document(row["text"], row["id"], metadata)  # id: as read, for dropped

        def columns(kept):
            return {"text": pa.array([d.text for d in kept], pa.string())}

        admit_shards(self, work, spec, files, shards, rank, world_size, make_document, columns)


def _kept_texts(work, shard) -> list[str]:
    return work.get_table(f"kept/s{shard.index:06d}.parquet").column("text").to_pylist()


def _val_indices(work, spec, shards) -> tuple[list[int], np.ndarray, list[int]]:
    from llmkit.data.pipeline import split_indices

    kept_counts = [work.get_json(f"admitted/s{s.index:06d}.json")["kept"] for s in shards]
    _, val_idx = split_indices(sum(kept_counts), spec.val_fraction, spec.seed)
    return running_offsets(kept_counts), val_idx, kept_counts


def _shard_validation(val_idx: np.ndarray, first: int, n: int) -> np.ndarray:
    """The positions within a shard (its documents ``first .. first + n - 1`` in global kept
    order) of its validation documents; ``val_idx`` is sorted."""
    lo, hi = np.searchsorted(val_idx, [first, first + n])
    return (val_idx[lo:hi] - first).astype(np.int64)


def _write_split(work, spec, shards) -> tuple[list[int], np.ndarray, list[int]]:
    """Draw the split once (:func:`_val_indices`: a permutation of every kept document, 8
    bytes each) and write each shard's validation positions (``split/s<index>.npy``), so
    that each encode task reads its own shards' only (it drew the whole permutation before:
    50 M documents took 11 s and 0.9 GB per task)."""
    offsets, val_idx, kept_counts = _val_indices(work, spec, shards)
    for shard in shards:
        local = _shard_validation(val_idx, offsets[shard.index], kept_counts[shard.index])
        work.put_array(f"split/s{shard.index:06d}.npy", local)
    return offsets, val_idx, kept_counts


def _in_validation(work, shard, n: int) -> np.ndarray:
    """Booleans: which of the shard's ``n`` kept documents are in the validation split.

    Raises:
        UserError: the shard's split file holds positions outside ``0 .. n - 1`` (not what
            the job wrote).
    """
    rel = f"split/s{shard.index:06d}.npy"
    local = work.get_array(rel)
    if (
        local.ndim != 1
        or local.dtype.kind not in "iu"
        or (local.size and (local.min() < 0 or local.max() >= n))
    ):
        raise _foreign(work.path(rel), f"not positions among the shard's {n} documents")
    mask = np.zeros(n, dtype=bool)
    mask[local] = True
    return mask


class TrainTokenizer(Stage):
    """One task: the split (each shard's validation documents, :func:`_write_split`), then
    the byte-level BPE trained on the train documents in global order; with a given
    tokenizer, its files in ``tokenizer/`` (:func:`put_tokenizer`) when the driver has not
    put them there."""

    name = "tokenizer"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        offsets, val_idx, kept_counts = _write_split(work, spec, shards)
        if spec.tokenizer is not None:  # given: put there by the driver (put_tokenizer)
            if not work.listdir("tokenizer"):  # run_job called without it: load it here
                from llmkit.data.encode import load_pretrained_tokenizer

                put_tokenizer(work, load_pretrained_tokenizer(spec.tokenizer))
            return
        import tempfile

        from llmkit.core.tokenizer import train_bpe_tokenizer

        n_train = sum(kept_counts) - len(val_idx)

        def texts() -> Iterator[list[str]]:
            for shard in shards:
                kept = _kept_texts(work, shard)
                in_val = np.zeros(len(kept), dtype=bool)
                in_val[_shard_validation(val_idx, offsets[shard.index], len(kept))] = True
                yield [t for t, v in zip(kept, in_val, strict=True) if not v]

        tok = train_bpe_tokenizer(texts(), spec.vocab_size, length=n_train)
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            for name in sorted(os.listdir(d)):
                work.write_bytes(f"tokenizer/{name}", Path(d, name).read_bytes())


def put_tokenizer(work: Work, tok) -> None:
    """Save a given (pretrained) tokenizer, loaded once by the driver, as the job's
    ``tokenizer/`` directory (``save_pretrained``'s files), which every stage loads
    (:func:`_load_tokenizer`): a ``.gguf`` file or a Hub id is resolved once, not by each
    task (a task may have no Hub access, or a cold conversion cache)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        for name in sorted(os.listdir(d)):
            work.write_bytes(f"tokenizer/{name}", Path(d, name).read_bytes())


def _load_tokenizer(work, spec):
    """The job's tokenizer from the work directory's ``tokenizer/``: the one given
    (:func:`put_tokenizer`; loaded as ``prepare`` loads a tokenizer directory) or the one the
    tokenizer stage trained; never running code (``trust_remote_code=False``: a
    ``tokenizer_config.json`` planted in the work directory that names code is refused).

    Raises:
        UserError: ``tokenizer/`` holds files that are not a tokenizer (not llmkit's).
    """
    import tempfile

    from transformers import AutoTokenizer

    from llmkit.data.encode import load_pretrained_tokenizer

    with tempfile.TemporaryDirectory() as d:
        for name in work.listdir("tokenizer"):
            Path(d, name).write_bytes(work.read_bytes(f"tokenizer/{name}"))
        try:
            if spec.tokenizer is not None:
                return load_pretrained_tokenizer(d, trust_remote_code=False)
            return AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        except (UserError, ValueError, OSError, TypeError, KeyError) as err:
            # a file of another kind (a pickle, a link to a system file...) in tokenizer/
            what = f"not a tokenizer ({type(err).__name__})"
            raise _foreign(work.path("tokenizer"), what) from None


def _encode_flat(texts: Sequence[str], tok, append_eos: bool) -> np.ndarray:
    """The token ids of ``texts``, each ending with one EOS (:func:`llmkit.data.encode.
    encode_batch`), concatenated: int32, 1-D.

    Encoded in batches of at most :data:`~llmkit.data.encode.BATCH_DOCUMENTS` documents and
    :data:`~llmkit.data.encode.BATCH_BYTES` of text, as ``prepare`` encodes, each batch's ids
    turned into an int32 array at once: the ids of a whole shard as Python lists took about
    100 bytes per token (a 25 MB shard of 10.5 M tokens peaked 1083 MiB over its texts; now
    160 MiB), the array takes 4.
    """
    from itertools import chain

    from llmkit.data.encode import BATCH_BYTES, BATCH_DOCUMENTS, encode_batch

    parts: list[np.ndarray] = []

    def flush(batch: list[str]) -> None:
        ids = encode_batch(batch, tok, eos_token_id=tok.eos_token_id, append_eos=append_eos)
        n = sum(len(x) for x in ids)
        parts.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=n))

    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text.encode("utf-8"))
        if len(batch) >= BATCH_DOCUMENTS or size >= BATCH_BYTES:
            flush(batch)
            batch, size = [], 0
    if batch:
        flush(batch)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


class Encode(Stage):
    name = "encode"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        from llmkit.data.encode import tokenizer_appends_eos

        tok = _load_tokenizer(work, spec)
        append_eos = not tokenizer_appends_eos(tok)

        def one(shard: Shard) -> None:
            texts = _kept_texts(work, shard)
            in_val = _in_validation(work, shard, len(texts))
            counts = {}
            for name, mask in (("train", ~in_val), ("validation", in_val)):
                sel = [t for t, m in zip(texts, mask, strict=True) if m]
                flat = _encode_flat(sel, tok, append_eos)
                work.put_array(f"tokens/{name}/s{shard.index:06d}.npy", flat)
                counts[name] = {
                    "documents": len(sel),
                    "bytes": sum(len(t.encode("utf-8")) for t in sel),
                    "tokens": int(flat.size),
                }
            work.put_json(f"counts/s{shard.index:06d}.json", counts)

        self._per_shard(work, files, shards, rank, world_size, one)


class Pack(Stage):
    name = "pack"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        counts = [work.get_json(f"counts/s{s.index:06d}.json") for s in shards]

        def following(name: str, index: int) -> Iterator[np.ndarray]:
            for s in shards[index + 1 :]:
                if counts[s.index][name]["tokens"]:
                    yield work.get_array(f"tokens/{name}/s{s.index:06d}.npy")

        def one(shard: Shard) -> None:
            for name in SPLIT_NAMES:
                n = [c[name]["tokens"] for c in counts]
                offsets = running_offsets(n)
                own = work.get_array(f"tokens/{name}/s{shard.index:06d}.npy")
                blocks = shard_blocks(
                    own, offsets[shard.index], sum(n), spec.block_size, following(name, shard.index)
                )
                work.put_array(f"blocks/{name}/s{shard.index:06d}.npy", blocks)

        self._per_shard(work, files, shards, rank, world_size, one)


STAGE_CLASSES = {
    c.name: c for c in (Signatures, Groups, Resolve, Admit, TrainTokenizer, Encode, Pack)
}


def stage_tasks(spec: JobSpec) -> dict[str, int]:
    """Tasks of each stage, in order: ``tasks``, ``partitions``, 1, ``tasks``, 1, ``tasks``,
    ``tasks`` (chat data: :func:`llmkit.data.distributed.chat.chat_stage_tasks`)."""
    if spec.format == "chat":
        from llmkit.data.distributed.chat import chat_stage_tasks

        return chat_stage_tasks(spec)
    return {
        "signatures": spec.tasks,
        "groups": spec.partitions,
        "resolve": 1,
        "admit": spec.tasks,
        "tokenizer": 1,
        "encode": spec.tasks,
        "pack": spec.tasks,
    }


# ---------------------------------------------------------------------------------------------
# Executors (datatrove).


def _machine_share(n: int, machine: int, machines: int) -> tuple[int, int]:
    """``(local_rank_offset, local_tasks)`` of ``machine`` among ``machines`` for ``n`` tasks."""
    per = -(-n // machines)
    offset = min(machine * per, n)
    return offset, max(0, min(per, n - offset))


#: Modules the forkserver of the local executor imports once, before it forks the worker
#: processes of every stage (each worker would import them again otherwise: about 0.7 s per
#: stage for the job and its cleaning steps, 3 s per encode task for ``transformers``'
#: tokenizer classes, which import torch). ``"__main__"`` is datatrove's default. The
#: forkserver starts with the first stage, which takes those seconds once.
FORKSERVER_PRELOAD = (
    "__main__",
    "llmkit.data.distributed.job",
    "datatrove.executor.local",
    "llmkit.data.config",
    "pyarrow.parquet",
    "pyarrow.acero",  # the groups stage's group_by (0.75 s the first time in a process)
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_fast",
)


def _preload_forkserver() -> None:
    """Have the forkserver (of ``multiprocess``, which datatrove's local executor uses)
    import :data:`FORKSERVER_PRELOAD` once; a module that fails to import is skipped there
    (and imported by the task that needs it). No effect once the forkserver runs."""
    import multiprocess

    multiprocess.get_context("forkserver").set_forkserver_preload(list(FORKSERVER_PRELOAD))


def build_executors(
    spec: JobSpec, engine: str = "local", *, machine: int = 0, machines: int = 1, **options
) -> list:
    """One datatrove executor per stage (:data:`STAGES` order).

    Args:
        spec: the job.
        engine: ``"local"`` (:class:`datatrove.executor.LocalPipelineExecutor`, ``workers``
            processes; with ``machines`` > 1 this machine runs its share
            ``local_rank_offset``/``local_tasks`` of every stage), ``"slurm"``
            (:class:`datatrove.executor.SlurmPipelineExecutor`, its array tasks running
            :mod:`llmkit.data.distributed.launch` rather than a pickle: ``partition``, ``time``,
            ``cpus_per_task``, ``mem_per_cpu_gb``, ``sbatch_args``, ``venv_path``...; each
            stage's job array depends on the one before, ``afterok``) or ``"ray"``
            (:class:`datatrove.executor.RayPipelineExecutor`, not chained: see below).
        machine, machines: local engine only: this machine's number and how many share the
            work directory.
        options: passed to every executor (``workers`` is capped at each stage's tasks).

    Local and Ray executors are not chained with ``depends``: :func:`run_job` runs them in
    order and checks each stage itself. datatrove's local ``depends`` polls the dependency's
    completion markers every 2 minutes; its Ray executor does not raise when a task fails, and
    a stage that ``depends`` on it then waits for the missing task forever (it logs
    "Dependency job still has 1/2 tasks. Waiting..." every 2 minutes). Completion markers
    and logs of stage ``s`` are under ``<work_dir>/logs/<s>``.
    """
    from datatrove.executor import LocalPipelineExecutor

    work = Work(spec.work_dir)
    out: list = []
    if engine == "local" and options.get("workers", 2) != 1:
        _preload_forkserver()
    for name, n in stage_tasks(spec).items():
        pipeline = [STAGE_CLASSES[name](spec.work_dir)]
        common = {"logging_dir": work.url.rstrip("/") + f"/logs/{name}"}
        if engine == "local":
            opts = dict(options)
            if "workers" in opts:
                opts["workers"] = max(1, min(opts["workers"], n))
            offset, local = _machine_share(n, machine, machines)
            ex = LocalPipelineExecutor(
                pipeline, tasks=n, local_tasks=local, local_rank_offset=offset, **common, **opts
            )
        elif engine == "slurm":
            from llmkit.data.distributed.launch import SafeSlurmExecutor, slurm_tag

            opts = dict(options)
            opts["sbatch_args"] = {"comment": slurm_tag(work.url), **opts.get("sbatch_args", {})}
            ex = SafeSlurmExecutor(
                pipeline,
                tasks=n,
                depends=out[-1] if out else None,
                job_name=f"llmkit-{name}",
                **common,
                **opts,
            )
        elif engine == "ray":
            from datatrove.executor import RayPipelineExecutor

            ex = RayPipelineExecutor(pipeline, tasks=n, **common, **options)
        else:
            raise UserError(f"unknown executor {engine!r}", "use local, slurm or ray")
        out.append(ex)
    return out


def run_job(
    spec: JobSpec,
    engine: str = "local",
    *,
    machine: int = 0,
    machines: int = 1,
    poll_seconds: float = 1.0,
    hashes: dict[str, str] | None = None,
    **options,
) -> None:
    """Plan (once) and run every stage; a rerun skips the tasks already finished.

    ``hashes``: the inputs' SHA-256 if known, for :func:`plan_job`'s check that the inputs
    are the ones planned.

    With the local engine the stages run one after the other; before a stage starts, every
    task of the stage before must be complete (on this or another machine sharing the work
    directory: its completion markers are polled every ``poll_seconds``). With Ray too, one
    stage after the other; a stage whose tasks did not all complete (datatrove's Ray executor
    returns when a task failed, without raising) stops the job. With Slurm, the last stage's
    executor is run and datatrove submits the chain.

    With ``workers`` > 1 the local engine starts its processes with ``forkserver``
    (datatrove's default), which imports the calling script again: a script that calls this
    must do so under ``if __name__ == "__main__":``. With Slurm, this returns once the job
    arrays are submitted: call :func:`assemble` when they have finished. A task of an
    earlier submission that failed (its line is in ``errors/``) is reported here, and nothing
    is submitted: it would fail again, and the arrays after it are still queued, never to
    start (Slurm's ``DependencyNeverSatisfied``). Nor is anything submitted while jobs of
    this work directory are queued or running (their ``--comment``, :func:`~llmkit.data.
    distributed.launch.slurm_tag`, in ``squeue``): their unfinished tasks would run twice.

    Raises:
        UserError: a task failed: its one line (stage, task, shard, what happened); with
            Slurm, also a task of an earlier submission, jobs still queued, or sbatch failed
            (:class:`~llmkit.data.distributed.launch.SbatchFailed`: its reason); the errors of
            :func:`plan_job`.
    """
    plan_job(spec, hashes)
    work = Work(spec.work_dir)
    failed = sorted(work.listdir("errors"))
    if engine == "slurm" and failed:
        raise UserError(
            work.read_bytes(f"errors/{failed[0]}").decode(errors="replace"),
            "the job arrays after it will never start: scancel them (squeue -u $USER), fix "
            f"the cause, delete {work.url.rstrip('/')}/errors and run the same command: finished "
            "tasks are skipped",
        )
    if engine == "slurm":
        from llmkit.data.distributed.launch import queued_jobs, slurm_tag

        if queued := queued_jobs(slurm_tag(work.url)):
            raise UserError(
                f"{len(queued)} Slurm jobs of the work directory {work.url} are still queued "
                f"or running ({', '.join(queued[:4])}{', ...' if len(queued) > 4 else ''})",
                "run the same command again once squeue -u $USER shows none of them (or "
                "scancel them): submitting now would run their tasks twice",
            )
    for name in failed:
        work.fs.rm(work.path(f"errors/{name}"))
    executors = build_executors(spec, engine, machine=machine, machines=machines, **options)
    try:
        if engine == "slurm":
            from llmkit.data.distributed.launch import submitting_with_sbatch

            with submitting_with_sbatch():
                executors[-1].run()
            return
        for name, ex in zip(stage_tasks(spec), executors, strict=True):
            ex.run()
            while missing := ex.get_incomplete_ranks(skip_completed=True):
                if work.listdir("errors"):
                    raise RuntimeError("a task failed on another machine")
                if engine == "ray":  # every task has ended: the missing ones failed
                    raise RuntimeError(f"{name} tasks {missing} did not complete on Ray")
                time.sleep(poll_seconds)
    except Exception as err:
        from llmkit.data.distributed.launch import SbatchFailed

        if isinstance(err, SbatchFailed):  # its own line: sbatch's reason
            raise
        lines = [work.read_bytes(f"errors/{n}").decode() for n in work.listdir("errors")]
        raise UserError(
            lines[0] if lines else f"a task failed: {_one_line(err)}",
            "fix the cause and run the same command again: finished tasks are skipped",
        ) from None


def completed_tasks(spec: JobSpec) -> dict[str, int]:
    """Completion markers per stage (datatrove's ``logs/<stage>/completions``)."""
    work = Work(spec.work_dir)
    return {name: len(work.listdir(f"logs/{name}/completions")) for name in stage_tasks(spec)}


def _merged_stats(work: Work, plan: dict, shards: Sequence[Shard]) -> tuple[list, dict, list]:
    """What the shards counted, added up as ``llmkit prepare`` counts them in one pass:
    ``(files, read, stats)``: the input files with their readers' counts, the manifest's
    ``read`` stage, and the cleaning steps' :class:`~llmkit.data.steps.base.StageStats`."""
    from llmkit.data.distributed.shards import merge_file_stats
    from llmkit.data.pipeline import add_read_counts, read_counts

    files = _files_from(plan)
    got = [work.get_json(f"sources/s{s.index:06d}.json") for s in shards]
    merge_file_stats(files, shards, [_source_from(g["source"]) for g in got])
    read = read_counts(
        files,
        documents_out=sum(g["read"]["documents_out"] for g in got),
        bytes_out=sum(g["read"]["bytes_out"] for g in got),
    )
    add_read_counts(read, files)
    total = None
    for s in shards:
        admitted = work.get_json(f"admitted/s{s.index:06d}.json")
        stats = _stats_from(got[s.index]["stats"] + admitted["stats"])
        if total is None:
            total = stats
        else:
            for a, b in zip(total, stats, strict=True):
                a.merge(b)
    return files, read, total or []


def _lengths(work: Work, shards: Sequence[Shard], rel: str):
    """The document-length histogram of ``rel`` (``sources`` as read, ``admitted`` as kept),
    added up over the shards (:class:`llmkit.data.pipeline.LengthHistogram`)."""
    from llmkit.data.pipeline import LengthHistogram

    total = LengthHistogram()
    for s in shards:
        counts = np.asarray(work.get_json(f"{rel}/s{s.index:06d}.json")["lengths"], np.int64)
        if counts.shape != total.counts.shape:
            raise _foreign(work.path(f"{rel}/s{s.index:06d}.json"), "of another shape")
        total.counts += counts
    return total


def _blocks(work: Work, rel: str, spec: JobSpec) -> np.ndarray:
    """A shard's packed blocks: integers, ``(rows, block_size)``.

    Raises:
        UserError: the file holds another shape or type (not what the job wrote).
    """
    arr = work.get_array(rel)
    if arr.ndim != 2 or arr.shape[1] != spec.block_size or arr.dtype.kind not in "iu":
        raise _foreign(
            work.path(rel),
            f"an array of {arr.dtype} {tuple(arr.shape)}, not blocks of {spec.block_size} ids",
        )
    return arr


def _write_dropped(work: Work, shards: Sequence[Shard], out: Path) -> None:
    """``dropped.jsonl`` at ``out``: each shard's dropped documents (every step's file) merged
    in the order they were read (:func:`llmkit.data.steps.base.merge_dropped`), the shards in
    order: the file ``llmkit prepare --keep-dropped`` writes in one process."""
    import tempfile

    from llmkit.data.steps.base import merge_dropped

    with open(out, "wb") as dst, tempfile.TemporaryDirectory() as d:
        for s in shards:
            folder = Path(d, f"s{s.index:06d}")
            folder.mkdir()
            for name in work.listdir(f"dropped/s{s.index:06d}"):
                if name.endswith(".jsonl"):
                    (folder / name).write_bytes(work.read_bytes(f"dropped/s{s.index:06d}/{name}"))
            merge_dropped(folder, Path(d, "merged.jsonl"))
            dst.write(Path(d, "merged.jsonl").read_bytes())
            shutil.rmtree(folder)


def settings_of(spec: JobSpec, **more):
    """The :class:`~llmkit.data.config.PrepareSettings` of a job (``more``: other settings,
    e.g. ``plot``)."""
    from llmkit.data.config import PrepareSettings

    return PrepareSettings.load(
        None,
        {
            "vocab_size": spec.vocab_size,
            "tokenizer": spec.tokenizer,
            "block_size": spec.block_size,
            "val_fraction": spec.val_fraction,
            "seed": spec.seed,
            "split_on": spec.split_on,
            "text_field": spec.text_field,
            "on_error": spec.on_error,
            "encoding": spec.encoding,
            "max_document_bytes": spec.max_document_bytes,
            "keep_dropped": spec.keep_dropped,
            "cleaning": dict(spec.cleaning or {}),
            "hub_split": spec.hub_split,
            **(
                {
                    "format": "chat",
                    "chat_template": spec.chat["template"],
                    "train_on": spec.chat["train_on"],
                    "overlong": spec.chat["overlong"],
                }
                if spec.format == "chat"
                else {}
            ),
            **more,
        },
    )


def _run_of(spec: JobSpec, output: str | Path):
    """The in-process run (:func:`llmkit.data.pipeline._plan`) of a job's settings, for
    :func:`assemble` called without one (no plot, quiet, its given tokenizer loaded)."""
    from rich.console import Console

    from llmkit.data.encode import load_pretrained_tokenizer
    from llmkit.data.pipeline import _plan, _Report

    settings = settings_of(spec, plot=False)
    run = _plan(spec.inputs, output, settings, _Report(Console(quiet=True)), cache=False)
    if spec.tokenizer is not None:
        run.tok = load_pretrained_tokenizer(spec.tokenizer, trust_remote_code=False)
        if run.chat is not None:
            from llmkit.data.encode import _chat_tokenizer

            run.chat_tokenizer = _chat_tokenizer(run.tok, run.chat["template"], spec.tokenizer)
    return run


def finish_output(work, spec, shards, run, tmp, data, tok, info, splits, warnings, settings):
    """The end of both paths' assembly: ``dropped.jsonl`` (``--keep-dropped``), the warnings,
    and the manifest in prepare's key order (``data.extra``: the chat section, nothing for
    documents), written and ``tmp`` moved into place by prepare's own ``_finish``."""
    from llmkit.core.cache import DROPPED
    from llmkit.data import pipeline as pl

    if spec.keep_dropped:
        _write_dropped(work, shards, tmp / DROPPED)
    for warning in warnings:
        run.report.log(f"[yellow]warning:[/yellow] {warning}")
    manifest = {
        "inputs": info["inputs"],
        "settings": {**run.manifest_settings(), **(settings or {})},
        "cache": _cache_entry(run),
        "stages": info["stages"],
        "length_histogram": info["length_histogram"],
        "splits": splits,
        "tokenizer": data.tokenizer_entry(tok),
        **data.extra(info),
        "warnings": warnings,
        "executor": {"shards": len(shards), "tasks": spec.tasks},
    }
    return pl._finish(run, tmp, manifest)


def assemble(spec: JobSpec, output: str | Path, settings: dict | None = None, run=None) -> dict:
    """Write the prepared directory at ``output`` from the finished job, as ``llmkit
    prepare`` writes it in one process.

    ``train/`` and ``validation/`` (``input_ids`` rows of ``block_size`` int32), the
    tokenizer's files (byte for byte the ones the job used), ``dropped.jsonl`` (with
    ``keep_dropped``), ``lengths.png`` (with ``plot``), ``dataset_dict.json`` and
    ``manifest.json``: the in-process manifest's every entry, from the same functions
    (:func:`llmkit.data.pipeline.cleaned_info`, ``_finish``...): fingerprints, inputs,
    settings, cache, stages, length histograms, splits, tokenizer, warnings, files; plus
    ``executor`` (``shards``, ``tasks``). ``settings`` entries are added to the manifest's
    ``settings`` (the executor's). ``run``: the in-process run
    (:func:`llmkit.data.pipeline._plan`) this job stands for; None: made from ``spec``
    (quiet, without plot). Built in a temporary directory beside ``output`` and renamed into
    place, so ``output`` is either as it was or whole.

    Raises:
        UserError: a file of the work directory is not what the job wrote (refused, nothing
            in it run); no document left after cleaning; fewer train tokens than one block
            (as ``prepare``); ``output`` is unchanged.
    """
    from datasets import Features, List, Value

    from llmkit.data import pipeline as pl

    if run is None:
        run = _run_of(spec, output)
    work = Work(spec.work_dir)
    plan = work.get_json("plan.json")
    shards = [Shard.from_dict(d) for d in plan["shards"]]
    files, read, stats = _merged_stats(work, plan, shards)
    run.files = files
    kept = [work.get_json(f"admitted/s{s.index:06d}.json")["kept"] for s in shards]
    if sum(kept) == 0:
        raise pl.nothing_left(run, read, stats)
    info = pl.cleaned_info(
        run, read, stats, _lengths(work, shards, "sources"), _lengths(work, shards, "admitted"),
        sum(kept),
    )  # fmt: skip
    counts = [work.get_json(f"counts/s{s.index:06d}.json") for s in shards]
    blocks = {}  # every file read and checked before anything is logged or written
    for name in SPLIT_NAMES:
        arrays = [_blocks(work, f"blocks/{name}/s{s.index:06d}.npy", spec) for s in shards]
        blocks[name] = np.concatenate(arrays) if arrays else np.empty((0, spec.block_size))
    tok = run.tok if spec.tokenizer is not None else _load_tokenizer(work, spec)
    run.report.log(f"{info['summary']}; cleaned in {spec.tasks} task(s) over {len(shards)} shards")
    warnings: list[str] = list(info["warnings"])
    n_split = {name: sum(c[name]["documents"] for c in counts) for name in SPLIT_NAMES}
    pl.note_split(run, n_split["train"], n_split["validation"], warnings)
    data = pl._TextData(run)
    data.use(tok)
    splits = {}
    for name in SPLIT_NAMES:
        entry = {
            "documents": n_split[name],
            "bytes": sum(c[name]["bytes"] for c in counts),
            **split_stats(sum(c[name]["tokens"] for c in counts), spec.block_size),
        }
        splits[name] = data.split_entry(name, entry, warnings)
    with pl._building(run.output) as tmp:
        features = Features({"input_ids": List(Value("int32"))})
        for name in SPLIT_NAMES:

            def rows(b=blocks[name]):
                for r in b:
                    yield {"input_ids": r}

            with pl._quiet_datasets():  # as prepare writes them (its dataset fingerprint too)
                ds = pl._from_generator(rows, features, tmp / ".cache", f"blocks-{name}")
                ds.save_to_disk(str(tmp / name), num_shards=1 if len(ds) == 0 else None)
            run.report.log(data.describe(name, splits[name]))
            del ds
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        for name in work.listdir("tokenizer"):
            (tmp / name).write_bytes(work.read_bytes(f"tokenizer/{name}"))
        manifest = finish_output(
            work, spec, shards, run, tmp, data, tok, info, splits, warnings, settings
        )
    return manifest


def _cache_entry(run) -> dict:
    """The manifest's ``cache`` of a distributed run: the cleaned-documents cache is not used
    (the work directory holds them); the note says why, as ``prepare`` says it when off."""
    from llmkit.data.pipeline import _new_cache_entry

    if run.clean_cache is None:
        note = _new_cache_entry(run)[1]  # off: --no-cache, LLMKIT_CACHE=off, unwritable...
    else:
        note = "not used with --executor (the work directory holds the cleaned documents)"
    return {"used": False, "stored": False, "path": None, "note": note}


def shard_order(shards: Sequence[Shard]) -> list[int]:
    """Shard indexes in global order (for checks)."""
    return [s.index for s in sorted(shards, key=lambda s: s.index)]


# The chat stages subclass Stage and add themselves to STAGE_CLASSES (for the Slurm launcher).
import llmkit.data.distributed.chat  # noqa: E402, F401
