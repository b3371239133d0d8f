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
tokenizer   1             without a given tokenizer: a byte-level BPE trained on the train
                          documents in global order
                          (:func:`llmkit.core.tokenizer.train_bpe_tokenizer`)
encode      ``tasks``     for its shards: split by global kept rank
                          (:func:`llmkit.data.pipeline.split_indices`), encode
                          (:func:`llmkit.data.encode.encode_batch`), write tokens (``.npy``)
pack        ``tasks``     for its shards: the blocks that start in its tokens (running totals)
==========  ============  ==========================================================================

:func:`assemble` then writes the output (``train/``, ``validation/``, the tokenizer,
``manifest.json``) in a temporary directory renamed into place.

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
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmkit.core.prepared import DATASET_DICT, MANIFEST, SPLITS
from llmkit.data.distributed import dedup as ddedup
from llmkit.data.distributed.pack import rows_dataset, running_offsets, shard_blocks, split_stats
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

    ``tokenizer`` is a saved ``transformers`` tokenizer directory, or None to train a
    byte-level BPE of ``vocab_size`` tokens on the train split (as ``llmkit prepare``).
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


def plan_job(spec: JobSpec) -> dict:
    """Discover the inputs, cut them into shards and write ``spec.json`` and ``plan.json``
    (once: a rerun over the same work directory keeps the first plan, so shard ids stay).

    Raises:
        UserError: the work directory holds a job with other settings (its completion
            markers would be taken for this job's).
    """
    work = Work(spec.work_dir)
    if work.exists("plan.json"):
        earlier = work.get_json("spec.json")
        now = json.loads(json.dumps(asdict(spec)))
        if earlier != now:
            diff = sorted(k for k in now if earlier.get(k) != now[k])
            raise UserError(
                f"the work directory {spec.work_dir} holds a job with other settings "
                f"({', '.join(diff)})",
                "use another work directory, or remove this one to start over",
            )
        return work.get_json("plan.json")
    files = discover_inputs(spec.inputs, hub_split=spec.hub_split)
    from llmkit.data.boilerplate import strip_gutenberg

    cfg = _cleaning(spec)
    shards = plan_shards(
        files,
        target_bytes=spec.target_shard_bytes,
        split_on=spec.split_on,
        line_filter=strip_gutenberg if cfg["gutenberg"] else None,
        encoding=spec.encoding,
    )
    plan = {
        "files": [
            {
                "path": str(f.path),
                "kind": f.kind,
                "compression": f.compression,
                "size_bytes": f.size_bytes,
                "sha256": f.sha256,
                **(
                    {"hub_config": f.hub_config, "hub_split": f.hub_split}
                    if f.kind == "hub"
                    else {}
                ),
            }
            for f in files
        ],
        "shards": [s.as_dict() for s in shards],
    }
    work.write_bytes("spec.json", json.dumps(asdict(spec), indent=1).encode())
    work.write_bytes("plan.json", json.dumps(plan, indent=1).encode())
    return plan


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
        try:
            self.run(work, spec, files, shards, rank, world_size)
        except _Recorded:
            raise
        except Exception as err:  # a stage-wide step (no shard of its own)
            msg = f"{self.name} task {rank} of {world_size}: {_one_line(err)}"
            work.write_bytes(f"errors/{self.name}-{rank:05d}", msg.encode())
            raise _Recorded(msg) from None
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


def _steps(spec: JobSpec) -> tuple[list, list, list]:
    """The cleaning steps of the job's settings (:func:`llmkit.data.config.build_steps`), cut
    at the de-duplication barrier (:func:`~llmkit.data.distributed.dedup.split_steps`)."""
    from llmkit.data.config import build_steps

    return ddedup.split_steps(build_steps(_cleaning(spec)))


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
    """The arrow schema of a shard's rows: the text, its UTF-8 bytes and each rule's key."""
    from datasets import Features, Value

    from llmkit.data.steps.dedup import key_name

    return Features(
        {
            "text": Value("string"),
            "n_bytes": Value("int64"),
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


class Signatures(Stage):
    """Per shard: read, run the steps before the barrier (normalize, filters, signatures:
    their ``run()``), write the rows that reach the barrier (parquet), each partition's
    de-duplication records (parquet) and the steps' statistics (JSON)."""

    name = "signatures"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        import pyarrow as pa

        from llmkit.data.boilerplate import strip_gutenberg
        from llmkit.data.document import Document
        from llmkit.data.steps.base import run_chain
        from llmkit.data.steps.dedup import key_name

        cfg = _cleaning(spec)
        before, resolves, _ = _steps(spec)
        rules = ddedup.rules_of(resolves)
        names = [key_name(rule) for rule in rules]
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
            )
            read = {"documents_out": 0, "bytes_out": 0}

            def documents():
                for j, text in enumerate(texts):
                    doc = Document(text, j)
                    read["documents_out"] += 1
                    read["bytes_out"] += doc.n_bytes
                    yield doc

            for step in before:
                step.reset_stats()
            rows = [
                {"text": d.text, "n_bytes": d.n_bytes, **{k: d.metadata.get(k) for k in names}}
                for d in run_chain(before, documents(), rank, world_size)
            ]
            put_records(work, shard.index, rows, rules, spec.partitions)
            work.put_table(
                f"rows/s{shard.index:06d}.parquet", pa.Table.from_pylist(rows, schema=schema)
            )
            work.put_json(
                f"sources/s{shard.index:06d}.json",
                {"source": _source_json(source), "read": read, "stats": _stats_json(before)},
            )

        self._per_shard(work, files, shards, rank, world_size, one)


class Groups(Stage):
    name = "groups"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        records = []
        for name in work.listdir(f"records/p{rank:05d}"):
            if name.endswith(".parquet"):
                t = work.get_table(f"records/p{rank:05d}/{name}").to_pydict()
                records.extend(zip(t["rule"], t["key"], t["shard"], t["index"], strict=True))
        groups = ddedup.collision_groups(records)
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


class Admit(Stage):
    """Per shard: the resolve steps with the global decisions, then the steps after the
    barrier (PII), their ``run()`` over the shard's rows; the kept texts (parquet), the
    steps' statistics and the kept count (JSON)."""

    name = "admit"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        import pyarrow as pa

        from llmkit.data.document import Document
        from llmkit.data.steps.base import run_chain
        from llmkit.data.steps.dedup import key_name

        _, resolves, after = _steps(spec)
        rules = ddedup.rules_of(resolves)
        dropped = _dropped(work)

        def one(shard: Shard) -> None:
            rows = work.get_table(f"rows/s{shard.index:06d}.parquet").to_pylist()
            steps = ddedup.decided_steps(resolves, dropped) + after
            for step in after:
                step.reset_stats()

            def documents():
                for j, row in enumerate(rows):
                    doc = Document(row["text"], j, {key_name(r): row[key_name(r)] for r in rules})
                    doc._n_bytes = row["n_bytes"]
                    ddedup.tag_keys(doc.metadata, rules, (shard.index, j))
                    yield doc

            # world_size 1: the decided resolve steps need no global order any more
            kept = [d.text for d in run_chain(steps, documents())]
            work.put_table(
                f"kept/s{shard.index:06d}.parquet", pa.table({"text": pa.array(kept, pa.string())})
            )
            work.put_json(
                f"admitted/s{shard.index:06d}.json",
                {"kept": len(kept), "stats": _stats_json(steps)},
            )

        self._per_shard(work, files, shards, rank, world_size, one)


def _kept_texts(work, shard) -> list[str]:
    return work.get_table(f"kept/s{shard.index:06d}.parquet").column("text").to_pylist()


def _val_indices(work, spec, shards) -> tuple[list[int], np.ndarray, list[int]]:
    from llmkit.data.pipeline import split_indices

    kept_counts = [work.get_json(f"admitted/s{s.index:06d}.json")["kept"] for s in shards]
    _, val_idx = split_indices(sum(kept_counts), spec.val_fraction, spec.seed)
    return running_offsets(kept_counts), val_idx, kept_counts


class TrainTokenizer(Stage):
    """One task: the byte-level BPE trained on the train documents in global order (nothing
    to do when the job names a tokenizer)."""

    name = "tokenizer"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        if spec.tokenizer is not None:
            return
        import tempfile

        from llmkit.core.tokenizer import train_bpe_tokenizer

        offsets, val_idx, kept_counts = _val_indices(work, spec, shards)
        n_train = sum(kept_counts) - len(val_idx)

        def texts() -> Iterator[list[str]]:
            for shard in shards:
                kept = _kept_texts(work, shard)
                first = offsets[shard.index]
                in_val = np.isin(np.arange(first, first + len(kept)), val_idx)
                yield [t for t, v in zip(kept, in_val, strict=True) if not v]

        tok = train_bpe_tokenizer(texts(), spec.vocab_size, length=n_train)
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            for name in sorted(os.listdir(d)):
                work.write_bytes(f"tokenizer/{name}", Path(d, name).read_bytes())


def _load_tokenizer(work, spec):
    """The job's tokenizer: ``spec.tokenizer`` (loaded as ``prepare`` loads it, never running
    code it ships), or the one the tokenizer stage trained (``trust_remote_code=False``: a
    ``tokenizer_config.json`` planted in the work directory that names code is refused)."""
    import tempfile

    from transformers import AutoTokenizer

    from llmkit.data.encode import load_pretrained_tokenizer

    if spec.tokenizer is not None:
        return load_pretrained_tokenizer(spec.tokenizer, trust_remote_code=False)
    with tempfile.TemporaryDirectory() as d:
        for name in work.listdir("tokenizer"):
            Path(d, name).write_bytes(work.read_bytes(f"tokenizer/{name}"))
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False)


class Encode(Stage):
    name = "encode"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        from llmkit.data.encode import encode_batch, tokenizer_appends_eos

        offsets, val_idx, _ = _val_indices(work, spec, shards)
        tok = _load_tokenizer(work, spec)
        append_eos = not tokenizer_appends_eos(tok)

        def one(shard: Shard) -> None:
            texts = _kept_texts(work, shard)
            first = offsets[shard.index]
            in_val = np.isin(np.arange(first, first + len(texts)), val_idx)
            counts = {}
            for name, mask in (("train", ~in_val), ("validation", in_val)):
                sel = [t for t, m in zip(texts, mask, strict=True) if m]
                ids = encode_batch(sel, tok, eos_token_id=tok.eos_token_id, append_eos=append_eos)
                flat = (
                    np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
                    if ids
                    else np.empty(0, dtype=np.int32)
                )
                work.put_array(f"tokens/{name}/s{shard.index:06d}.npy", flat)
                counts[name] = {"documents": len(sel), "tokens": int(flat.size)}
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
            (:class:`datatrove.executor.RayPipelineExecutor`, each stage depending on the one
            before).
        machine, machines: local engine only: this machine's number and how many share the
            work directory.
        options: passed to every executor (``workers`` is capped at each stage's tasks).

    Local executors are not chained with ``depends`` (datatrove's local ``depends`` polls the
    dependency's completion markers every 2 minutes): :func:`run_job` runs them in order and
    waits for the other machines' tasks itself. Completion markers and logs of stage ``s``
    are under ``<work_dir>/logs/<s>``.
    """
    from datatrove.executor import LocalPipelineExecutor

    work = Work(spec.work_dir)
    out: list = []
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
            from llmkit.data.distributed.launch import SafeSlurmExecutor

            ex = SafeSlurmExecutor(
                pipeline,
                tasks=n,
                depends=out[-1] if out else None,
                job_name=f"llmkit-{name}",
                **common,
                **options,
            )
        elif engine == "ray":
            from datatrove.executor import RayPipelineExecutor

            ex = RayPipelineExecutor(
                pipeline, tasks=n, depends=out[-1] if out else None, **common, **options
            )
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
    **options,
) -> None:
    """Plan (once) and run every stage; a rerun skips the tasks already finished.

    With the local engine the stages run one after the other; before a stage starts, every
    task of the stage before must be complete (on this or another machine sharing the work
    directory: its completion markers are polled every ``poll_seconds``). With Slurm or Ray,
    the last stage's executor is run and datatrove submits the chain.

    With ``workers`` > 1 the local engine starts its processes with ``forkserver``
    (datatrove's default), which imports the calling script again: a script that calls this
    must do so under ``if __name__ == "__main__":``. With Slurm, this returns once the job
    arrays are submitted: call :func:`assemble` when they have finished.

    Raises:
        UserError: a task failed: its one line (stage, task, shard, what happened).
    """
    plan_job(spec)
    work = Work(spec.work_dir)
    for name in work.listdir("errors"):
        work.fs.rm(work.path(f"errors/{name}"))
    executors = build_executors(spec, engine, machine=machine, machines=machines, **options)
    try:
        if engine != "local":
            executors[-1].run()
            return
        for ex in executors:
            ex.run()
            while ex.get_incomplete_ranks(skip_completed=True):
                if work.listdir("errors"):
                    raise RuntimeError("a task failed on another machine")
                time.sleep(poll_seconds)
    except Exception as err:
        lines = [work.read_bytes(f"errors/{n}").decode() for n in work.listdir("errors")]
        raise UserError(
            lines[0] if lines else f"a task failed: {_one_line(err)}",
            "fix the cause and run the same command again: finished tasks are skipped",
        ) from None


def completed_tasks(spec: JobSpec) -> dict[str, int]:
    """Completion markers per stage (datatrove's ``logs/<stage>/completions``)."""
    work = Work(spec.work_dir)
    return {name: len(work.listdir(f"logs/{name}/completions")) for name in stage_tasks(spec)}


def _merged_stats(work: Work, plan: dict, shards: Sequence[Shard]) -> tuple[list, dict]:
    """The manifest's ``inputs`` and ``stages`` (``read`` then each stage), added up over the
    shards as ``llmkit prepare`` counts them in one pass."""
    from llmkit.data.distributed.shards import merge_file_stats

    files = _files_from(plan)
    got = [work.get_json(f"sources/s{s.index:06d}.json") for s in shards]
    merge_file_stats(files, shards, [_source_from(g["source"]) for g in got])
    read = {
        "files": len(files),
        "bytes_in": sum(f.size_bytes for f in files),
        "documents_out": sum(g["read"]["documents_out"] for g in got),
        "bytes_out": sum(g["read"]["bytes_out"] for g in got),
    }
    skipped: dict = {}
    for f in files:
        for reason, n in f.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    read["skipped"] = dict(sorted(skipped.items()))
    if sum(f.documents_split for f in files):
        read["documents_split"] = sum(f.documents_split for f in files)
        read["pieces"] = sum(f.pieces for f in files)
    records: dict = {}
    for f in files:
        for reason, n in f.records_skipped.items():
            records[reason] = records.get(reason, 0) + n
    if records:
        read["records_skipped"] = dict(sorted(records.items()))
    total = None
    for s in shards:
        admitted = work.get_json(f"admitted/s{s.index:06d}.json")
        stats = _stats_from(got[s.index]["stats"] + admitted["stats"])
        if total is None:
            total = stats
        else:
            for a, b in zip(total, stats, strict=True):
                a.merge(b)
    return files, {"read": read, **{st.name: st.as_dict() for st in total or []}}


def _tokenizer_entry(spec: JobSpec, tok) -> dict:
    """The manifest's ``tokenizer``, as ``llmkit prepare`` writes it for text data."""
    from llmkit.data.encode import _encode_raw, tokenizer_appends_eos

    adds_bos = False
    if tok.bos_token_id is not None:
        probe = _encode_raw(tok, ["a"], True)[0]
        adds_bos = bool(probe) and probe[0] == tok.bos_token_id
    return {
        "trained": spec.tokenizer is None,
        "path": spec.tokenizer,
        "type": "byte-level BPE" if spec.tokenizer is None else type(tok).__name__,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "adds_bos": adds_bos,
        "eos_added_by_tokenizer": tokenizer_appends_eos(tok),
    }


def _default_settings(spec: JobSpec) -> dict:
    return {
        "format": "text",
        "vocab_size": spec.vocab_size if spec.tokenizer is None else None,
        "tokenizer": spec.tokenizer,
        "block_size": spec.block_size,
        "val_fraction": spec.val_fraction,
        "seed": spec.seed,
        "split_on": spec.split_on,
        "text_field": spec.text_field,
        "encoding": spec.encoding,
        "max_document_bytes": spec.max_document_bytes,
        "on_error": spec.on_error,
        "cleaning": _cleaning(spec),
        "tasks": spec.tasks,
    }


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


def assemble(spec: JobSpec, output: str | Path, settings: dict | None = None) -> dict:
    """Write the prepared directory at ``output`` from the finished job's blocks.

    ``train/`` and ``validation/`` (``input_ids`` rows of ``block_size`` int32, as
    ``llmkit prepare`` writes them), the tokenizer, and ``manifest.json`` (``settings``: the
    given dict, else the job's; ``inputs``, ``stages``, ``splits``, ``tokenizer`` as prepare
    counts them); built under a temporary name beside ``output`` and renamed into place
    (:func:`llmkit.core.atomic.atomic_output`), so ``output`` is either as it was or whole.

    Raises:
        UserError: a file of the work directory is not what the job wrote (refused, nothing
            in it run); ``output`` is unchanged.
    """
    from datetime import datetime, timezone

    from llmkit import __version__
    from llmkit.core.atomic import atomic_output

    work = Work(spec.work_dir)
    plan = work.get_json("plan.json")
    shards = [Shard.from_dict(d) for d in plan["shards"]]
    counts = [work.get_json(f"counts/s{s.index:06d}.json") for s in shards]
    files, stages = _merged_stats(work, plan, shards)
    blocks = {}
    for name in SPLIT_NAMES:
        arrays = [_blocks(work, f"blocks/{name}/s{s.index:06d}.npy", spec) for s in shards]
        blocks[name] = np.concatenate(arrays) if arrays else np.empty((0, spec.block_size))
    tok = _load_tokenizer(work, spec)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output, directory=True) as tmp:
        splits = {}
        for name in SPLIT_NAMES:
            ds = rows_dataset({"input_ids": blocks[name]})  # zero rows too (val_fraction 0)
            ds.save_to_disk(str(tmp / name), num_shards=1 if len(ds) == 0 else None)
            total = sum(c[name]["tokens"] for c in counts)
            splits[name] = {
                "documents": sum(c[name]["documents"] for c in counts),
                **split_stats(total, spec.block_size),
            }
            del ds
        tok.save_pretrained(str(tmp))
        manifest = {
            "llmkit_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": [f.as_dict() for f in files],
            "settings": settings if settings is not None else _default_settings(spec),
            "stages": stages,
            "splits": splits,
            "tokenizer": _tokenizer_entry(spec, tok),
            "executor": {"shards": len(shards), "tasks": spec.tasks},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / DATASET_DICT).write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
    return manifest


def shard_order(shards: Sequence[Shard]) -> list[int]:
    """Shard indexes in global order (for checks)."""
    return [s.index for s in sorted(shards, key=lambda s: s.index)]


# The chat stages subclass Stage and add themselves to STAGE_CLASSES (for the Slurm launcher).
import llmkit.data.distributed.chat  # noqa: E402, F401
