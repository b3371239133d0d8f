"""Chat data (conversations) across tasks, with the rows of one process.

The stages of a chat job (``JobSpec.format == "chat"``), each a job array as in
:mod:`llmkit.data.distributed.job` (whose ``groups`` and ``resolve`` stages it shares):

===============  ==========  ===================================================================
stage            tasks       what one task does
===============  ==========  ===================================================================
chat_signatures  ``tasks``   for its shards: the chat records read as ``prepare`` reads them
                             (:func:`read_chat_shard`: a whole file with :func:`llmkit.data.
                             readers.read_conversations`, a line range of a large JSON-lines
                             file with the same record rule), each conversation a
                             :class:`~llmkit.data.document.Document` of its messages; the steps
                             before the de-duplication barrier; rows (with ``where``,
                             ``file:line``), dedup records, statistics
groups, resolve  as text     the collision groups and the greedy resolve
chat_admit       ``tasks``   the resolve steps with the global decisions, then PII (per
                             message); the kept conversations (JSON, bytes, ``where``)
chat_tokenizer   1           without a given tokenizer: a byte-level BPE with ChatML's marker
                             tokens trained on the train conversations in global order
                             (:func:`llmkit.data.encode.chat_training_text`), and its template;
                             with one: its template resolved (``chat_tokenizer.json``)
chat_encode      ``tasks``   for its shards: split by global kept rank, rendered and labelled
                             (:func:`llmkit.data.encode.encode_chat_batch`); each
                             conversation's fate and its packed length (what
                             :class:`~llmkit.data.pack.SFTPacker` writes of it: truncated,
                             dropped, no answer), the per-conversation counters
chat_layout      1           the greedy packing rule over the packed lengths only, in global
                             order (:func:`row_of_each`): each conversation's row, and which
                             shard owns each row (the shard of its first conversation); the
                             first failed conversation in order under ``--on-error fail``
chat_pack        ``tasks``   for its shards: the rows it owns, packed by a fresh
                             :class:`~llmkit.data.pack.SFTPacker` from the conversations of
                             those rows (its own, and the first ones of the next shards when
                             its last row runs on)
===============  ==========  ===================================================================

:func:`assemble_chat` writes ``train/`` and ``validation/`` (``input_ids``, ``labels``,
``position_ids``), the tokenizer with its chat template and ``manifest.json``.

Why the rows are the same: :class:`~llmkit.data.pack.SFTPacker` is greedy and in order, and
where a conversation goes depends only on the packed lengths before it; what it writes of a
conversation (truncated, dropped, nothing without an answer) depends only on the conversation.
So the counters are sums over conversations, the rows are found from the lengths alone in one
cheap pass, and any run of whole rows packed by a fresh packer is the same rows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from llmkit.core.prepared import SPLITS
from llmkit.data.distributed import dedup as ddedup
from llmkit.data.distributed.job import (
    STAGE_CLASSES,
    JobSpec,
    Stage,
    Work,
    _dropped_writer,
    _foreign,
    _load_tokenizer,
    _merged_stats,
    _row_schema,
    _source_json,
    _stats_json,
    _steps,
    _val_indices,
    admit_shards,
    put_signed_shard,
    put_tokenizer,
)
from llmkit.data.distributed.shards import Shard, _range_lines, shard_source
from llmkit.data.readers import (
    InputFile,
    _chat_reason,
    conversation_convert,
    json_line_records,
    read_conversations,
)
from llmkit.errors import UserError

#: Conversations per call of :func:`llmkit.data.encode.encode_chat_batch` (as ``prepare``).
BATCH_CONVERSATIONS = 100
#: The three int32 columns of a chat row, in the order ``prepare`` writes them.
COLUMNS = ("input_ids", "labels", "position_ids")


def chat_stage_tasks(spec: JobSpec) -> dict[str, int]:
    """Tasks of each chat stage, in order (see the module docstring)."""
    return {
        "chat_signatures": spec.tasks,
        "groups": spec.partitions,
        "resolve": 1,
        "chat_admit": spec.tasks,
        "chat_tokenizer": 1,
        "chat_encode": spec.tasks,
        "chat_layout": 1,
        "chat_pack": spec.tasks,
    }


def read_chat_shard(
    files: Sequence[InputFile], shard: Shard, source: InputFile, on_error: str
) -> Iterator[tuple[str, str]]:
    """``(where, conversation JSON)`` of each chat record of one shard, in order, as
    :func:`llmkit.data.readers.read_conversations` yields them for that part of the file
    (counted on ``source``: ``chat_formats``, ``fields``, ``skipped``, ``documents``).

    Raises:
        UserError: as :func:`~llmkit.data.readers.read_conversations`, naming file and line.
    """
    if shard.start is None:
        yield from read_conversations(source, on_error=on_error)
        return
    lines = enumerate(_range_lines(source, shard, on_error, 1 << 62), start=shard.first_line)
    count = 0
    convert = conversation_convert(source)
    for where, conversation in json_line_records(source, lines, on_error, convert, _chat_reason):
        count += 1
        yield where, conversation
    source.documents = count
    source.sha256 = files[shard.file].sha256


def _chat_row_schema(rules):
    """A shard's rows: the index in the shard as read (``id``), the text stored (the
    messages' JSON), its bytes, ``where`` (``file:line``), each rule's key."""
    return _row_schema(rules)


class ChatSignatures(Stage):
    """Per shard: read the conversations, run the steps before the barrier, write the rows,
    the dedup records and the statistics (as :class:`~llmkit.data.distributed.job.
    Signatures` for documents)."""

    name = "chat_signatures"

    def run(self, work, spec, files, shards, rank, world_size) -> None:

        from llmkit.data.document import Document
        from llmkit.data.pipeline import LengthHistogram
        from llmkit.data.steps.base import run_chain

        writer = _dropped_writer(spec)
        before, resolves, _ = _steps(spec, writer)
        rules = ddedup.rules_of(resolves)
        schema = _chat_row_schema(rules)

        def one(shard: Shard) -> None:
            source = shard_source(files, shard)
            read = {"documents_out": 0, "bytes_out": 0}
            lengths = LengthHistogram()

            def documents():
                records = read_chat_shard(files, shard, source, spec.on_error)
                for j, (where, text) in enumerate(records):
                    size = len(text.encode("utf-8"))
                    read["documents_out"] += 1
                    read["bytes_out"] += size
                    lengths.add(size)
                    yield Document.conversation(json.loads(text), j, {"where": where})

            for step in before:
                step.reset_stats()
            docs = run_chain(before, documents(), rank, world_size)
            put_signed_shard(work, spec, shard, docs, writer, rules, schema)
            work.put_json(
                f"sources/s{shard.index:06d}.json",
                {
                    "source": _source_json(source),
                    "read": read,
                    "stats": _stats_json(before),
                    "lengths": lengths.as_list(),
                },
            )

        self._per_shard(work, files, shards, rank, world_size, one)


class ChatAdmit(Stage):
    """Per shard: the resolve steps with the global decisions, then the steps after the
    barrier (PII, per message); the kept conversations (``text``: JSON of the messages,
    ``n_bytes``, ``where``), the statistics and the kept count (:func:`~llmkit.data.
    distributed.job.admit_shards`)."""

    name = "chat_admit"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        import pyarrow as pa

        from llmkit.data.document import Document

        def make_document(row, metadata):
            return Document.conversation(json.loads(row["text"]), row["id"], metadata)

        def columns(kept):
            return {
                "text": pa.array([d.stored() for d in kept], pa.string()),
                "n_bytes": pa.array([d.n_bytes for d in kept], pa.int64()),
                "where": pa.array([d.metadata.get("where") for d in kept], pa.string()),
            }

        admit_shards(self, work, spec, files, shards, rank, world_size, make_document, columns)


def _split_masks(shard: Shard, n: int, offsets, val_idx) -> dict[str, np.ndarray]:
    """Which of a shard's ``n`` kept conversations go to each split (by global kept rank:
    ``offsets``, ``val_idx`` of :func:`~llmkit.data.distributed.job._val_indices`)."""
    first = offsets[shard.index]
    in_val = np.isin(np.arange(first, first + n), val_idx)
    return {"train": ~in_val, "validation": in_val}


class ChatTokenizer(Stage):
    """One task: the tokenizer and its chat template. Without ``--tokenizer``: a byte-level
    BPE trained on the train conversations in global order with ChatML's marker tokens,
    given the template ``prepare`` gives it; with one: nothing to train. Writes
    ``chat_tokenizer.json`` (the template resolved, the tokens it added)."""

    name = "chat_tokenizer"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        if spec.tokenizer is not None:  # given: put there by the driver, with its template
            if not work.exists("chat_tokenizer.json"):  # run_job called without it: here
                from llmkit.data.encode import _chat_tokenizer, load_pretrained_tokenizer

                tok = load_pretrained_tokenizer(spec.tokenizer, trust_remote_code=False)
                meta = _chat_tokenizer(tok, spec.chat["template"], spec.tokenizer)
                put_tokenizer(work, tok)
                put_chat_tokenizer(work, meta)
            return
        import tempfile

        from llmkit.core.tokenizer import train_bpe_tokenizer
        from llmkit.data.encode import chat_training_text
        from llmkit.data.sft import CHATML, ensure_chat_template

        offsets, val_idx, kept_counts = _val_indices(work, spec, shards)

        def texts() -> Iterator[list[str]]:
            for shard in shards:
                kept = work.get_table(f"kept/s{shard.index:06d}.parquet").column("text")
                masks = _split_masks(shard, len(kept), offsets, val_idx)
                yield [
                    chat_training_text(json.loads(c))
                    for c, train in zip(kept.to_pylist(), masks["train"], strict=True)
                    if train
                ]

        tok = train_bpe_tokenizer(
            texts(),
            spec.vocab_size,
            length=sum(kept_counts) - len(val_idx),
            extra_special_tokens=CHATML.special_tokens,
        )
        template = spec.chat["template"]
        resolved = ensure_chat_template(tok, CHATML.name if template == "auto" else template)
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            for name in sorted(os.listdir(d)):
                work.write_bytes(f"tokenizer/{name}", Path(d, name).read_bytes())
        work.put_json("chat_tokenizer.json", {"resolved": resolved, "added_tokens": []})


def put_chat_tokenizer(work: Work, meta: dict) -> None:
    """Record the chat template of the job's tokenizer (``{"resolved", "added_tokens"}``:
    what :func:`llmkit.data.encode._chat_tokenizer` gave a tokenizer loaded once by the
    driver, which saved it with that template: :func:`~llmkit.data.distributed.job.
    put_tokenizer`)."""
    work.put_json(
        "chat_tokenizer.json",
        {"resolved": meta["resolved"], "added_tokens": list(meta.get("added_tokens", []))},
    )


def load_chat_tokenizer(work: Work, spec: JobSpec):
    """``(tokenizer, {"resolved", "added_tokens"})`` of the work directory: the given
    tokenizer as the driver saved it with the chat template ``prepare`` gives it (a
    ``.gguf`` file or Hub id resolved once, not by each task), or the one the
    ``chat_tokenizer`` stage trained (its template saved with it); ``trust_remote_code=
    False``.

    Raises:
        UserError: the record of its template is not what the job wrote.
    """
    tok = _load_tokenizer(work, spec)
    meta = work.get_json("chat_tokenizer.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("resolved"), str):
        raise _foreign(work.path("chat_tokenizer.json"), "not the chat tokenizer's record")
    return tok, meta


def _encoded_table(cols: dict):
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return pa.table(
        {
            "input_ids": pa.array(cols["input_ids"], ints),
            "labels": pa.array(cols["labels"], ints),
        }
    )


def _fates(cols: dict, packer) -> dict:
    """What becomes of each encoded conversation of a split (``cols``: the columns of
    :func:`llmkit.data.encode.encode_chat_batch`), in order, as ``prepare``'s packing step
    counts it: a failed one is skipped by reason (the first kept as ``failed``); the others
    go through ``packer`` (a fresh :class:`~llmkit.data.pack.SFTPacker`: what it writes of a
    conversation does not depend on the rows before it), and the ones it writes are kept
    with their packed lengths. Returns ``written`` (``input_ids``, ``labels`` as encoded),
    ``lengths``, ``skipped``, ``answers_located``, ``failed``."""
    out = {
        "written": {"input_ids": [], "labels": []},
        "lengths": [],
        "skipped": {},
        "answers_located": {},
        "failed": None,
    }
    skipped, located = out["skipped"], out["answers_located"]
    for i, error in enumerate(cols["error"]):
        if error is not None:
            reason = cols["reason"][i] or "render failed"
            skipped[reason] = skipped.get(reason, 0) + 1
            if out["failed"] is None:
                out["failed"] = {k: cols[k][i] for k in ("error", "hint", "reason")}
            continue
        for rule, n in json.loads(cols["located"][i] or "{}").items():
            located[rule] = located.get(rule, 0) + n
        before = packer.tokens
        packer.add([(cols["input_ids"][i], cols["labels"][i])])
        if packer.tokens > before:  # written: its packed length
            out["lengths"].append(packer.tokens - before)
            out["written"]["input_ids"].append(cols["input_ids"][i])
            out["written"]["labels"].append(cols["labels"][i])
    return out


def _encode_conversations(tok, texts: list[str], wheres: list[str], train_on: str) -> dict:
    """:func:`llmkit.data.encode.encode_chat_batch` over batches of
    :data:`BATCH_CONVERSATIONS`, the columns joined."""
    from llmkit.data.encode import encode_chat_batch

    cols: dict[str, list] = {
        k: [] for k in ("input_ids", "labels", "error", "hint", "reason", "located")
    }
    for b in range(0, len(texts), BATCH_CONVERSATIONS):
        end = b + BATCH_CONVERSATIONS
        out = encode_chat_batch(texts[b:end], wheres[b:end], tok, train_on=train_on)
        for k in cols:
            cols[k].extend(out[k])
    return cols


class ChatEncode(Stage):
    """Per shard and split: render and label each conversation; keep the ones
    :class:`~llmkit.data.pack.SFTPacker` writes (``chat_encoded``, their ids and labels as
    encoded) with their packed lengths (``chat_lengths``); count what the packer counts of
    each conversation, the skipped ones by reason, the first failure and how the answers
    were located (``chat_counts``)."""

    name = "chat_encode"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        from llmkit.data.pack import SFTPacker

        offsets, val_idx, _ = _val_indices(work, spec, shards)
        tok, _ = load_chat_tokenizer(work, spec)
        train_on, overlong = spec.chat["train_on"], spec.chat["overlong"]

        def one(shard: Shard) -> None:
            kept = work.get_table(f"kept/s{shard.index:06d}.parquet").to_pydict()
            masks = _split_masks(shard, len(kept["text"]), offsets, val_idx)
            counts = {}
            for name, mask in masks.items():
                idx = np.flatnonzero(mask)
                texts = [kept["text"][i] for i in idx]
                cols = _encode_conversations(tok, texts, [kept["where"][i] for i in idx], train_on)
                packer = SFTPacker(
                    spec.block_size, pad_token_id=tok.pad_token_id, overlong=overlong
                )
                fate = _fates(cols, packer)
                rel = f"{name}/s{shard.index:06d}"
                work.put_table(f"chat_encoded/{rel}.parquet", _encoded_table(fate["written"]))
                work.put_array(f"chat_lengths/{rel}.npy", np.asarray(fate["lengths"], np.int64))
                stats = packer.stats()
                stats["rows"] = stats["pad_tokens"] = 0  # the layout's, not per shard
                counts[name] = {
                    "conversations": len(idx),
                    "bytes": int(sum(kept["n_bytes"][i] for i in idx)),
                    "stats": stats,
                    **{k: fate[k] for k in ("skipped", "answers_located", "failed")},
                }
            work.put_json(f"chat_counts/s{shard.index:06d}.json", counts)

        self._per_shard(work, files, shards, rank, world_size, one)


def assign_rows(
    lengths: np.ndarray, block_size: int, state: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, tuple[int, int]]:
    """The row of each written conversation of a split under :class:`~llmkit.data.pack.
    SFTPacker`'s greedy rule, from their packed lengths alone (each 1 to ``block_size``, in
    order): a conversation goes at the end of the open row when it fits in the room left,
    else it closes that row and opens the next; a row filled exactly is closed.

    Args:
        lengths: packed lengths, in order.
        block_size: tokens per row.
        state: ``(open row, tokens in it)`` before the first of them (the state after the
            shards before, so that shards can be laid out one after the other).

    Returns:
        The row numbers, and the state after the last one; the rows written in all are
        ``row + (1 if fill else 0)`` of the final state.
    """
    rows = np.empty(len(lengths), dtype=np.int64)
    row, fill = state
    for i, m in enumerate(np.asarray(lengths).tolist()):
        if fill + m > block_size:
            row, fill = row + 1, 0
        rows[i] = row
        fill += m
        if fill == block_size:
            row, fill = row + 1, 0
    return rows, (row, fill)


def _opened(state: tuple[int, int]) -> int:
    """Rows opened so far in a layout state (the open one counts once it holds a token)."""
    return state[0] + (1 if state[1] else 0)


def _split_totals(counts: list[dict], name: str) -> tuple[dict, dict, dict]:
    """``(packer counters, skipped by reason, answers located)`` of a split, over shards."""
    stats: dict[str, int] = {}
    skipped: dict[str, int] = {}
    located: dict[str, int] = {}
    for c in counts:
        for total, part in ((stats, c[name]["stats"]), (skipped, c[name]["skipped"])):
            for k, n in part.items():
                total[k] = total.get(k, 0) + n
        for k, n in c[name]["answers_located"].items():
            located[k] = located.get(k, 0) + n
    return stats, skipped, located


class ChatLayout(Stage):
    """One task: under ``--on-error fail`` the first conversation that failed to render, in
    order (train, then validation, as ``prepare`` meets them); each conversation's row
    (:func:`assign_rows` over the shards in order, ``chat_rows``) and the rows each shard
    owns, those its conversations open (``chat_layout.json``: per split, ``[first row,
    rows]`` per shard, and the total)."""

    name = "chat_layout"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        from llmkit.data.pipeline import no_training_conversation

        counts = [work.get_json(f"chat_counts/s{s.index:06d}.json") for s in shards]
        layout: dict = {"rows": {}, "owned": {}}
        for name in SPLITS:
            if spec.on_error != "skip":
                failed = next((c[name]["failed"] for c in counts if c[name]["failed"]), None)
                if failed is not None:
                    raise UserError(failed["error"], failed["hint"], reason=failed["reason"])
            state, owned = (0, 0), []
            for s in shards:
                first = _opened(state)
                lengths = work.get_array(f"chat_lengths/{name}/s{s.index:06d}.npy")
                if lengths.ndim != 1 or ((lengths < 1) | (lengths > spec.block_size)).any():
                    raise _foreign(work.path(f"chat_lengths/{name}"), "not packed lengths")
                rows, state = assign_rows(lengths, spec.block_size, state)
                work.put_array(f"chat_rows/{name}/s{s.index:06d}.npy", rows)
                owned.append([first, _opened(state) - first])
            layout["owned"][name] = owned
            layout["rows"][name] = _opened(state)
            if name == "train" and _opened(state) == 0:
                stats, skipped, _ = _split_totals(counts, name)
                raise no_training_conversation(
                    stats, skipped, spec.block_size, spec.chat["overlong"]
                )
        work.put_json("chat_layout.json", layout)


def _empty_rows(block_size: int) -> dict[str, np.ndarray]:
    return {c: np.empty((0, block_size), dtype=np.int32) for c in COLUMNS}


def _row_conversations(work: Work, name: str, shards: Sequence[Shard], first: int, end: int):
    """``(input_ids, labels)`` of the written conversations of rows ``[first, end)`` of a
    split, in order: from the first of ``shards`` (the one that owns the rows) and on into
    the next ones as long as the last row runs on."""
    for s in shards:
        rows = work.get_array(f"chat_rows/{name}/s{s.index:06d}.npy")
        take = (rows >= first) & (rows < end)
        if take.any():
            t = work.get_table(f"chat_encoded/{name}/s{s.index:06d}.parquet")
            ids, labels = t.column("input_ids").to_pylist(), t.column("labels").to_pylist()
            if len(ids) != len(rows):
                raise _foreign(work.path(f"chat_encoded/{name}"), "not the encoded shard")
            for k in np.flatnonzero(take):
                yield ids[k], labels[k]
        if rows.size and rows[-1] >= end:
            return


class ChatPack(Stage):
    """Per shard and split: the rows it owns (``[first, first + n)``), packed by a fresh
    :class:`~llmkit.data.pack.SFTPacker` from its conversations of those rows and, when its
    last row runs on, the first conversations of the next shards (``chat_blocks``)."""

    name = "chat_pack"

    def run(self, work, spec, files, shards, rank, world_size) -> None:
        from llmkit.data.pack import SFTPacker

        layout = work.get_json("chat_layout.json")
        tok, _ = load_chat_tokenizer(work, spec)
        T, pad = spec.block_size, tok.pad_token_id

        def one(shard: Shard) -> None:
            for name in SPLITS:
                first, n = layout["owned"][name][shard.index]
                out = _empty_rows(T)
                if n:
                    packer = SFTPacker(T, pad_token_id=pad, overlong=spec.chat["overlong"])
                    convs = _row_conversations(work, name, shards[shard.index :], first, first + n)
                    parts = [packer.add(convs), packer.flush()]
                    out = {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}
                if len(out["input_ids"]) != n:
                    raise ValueError(f"packed {len(out['input_ids'])} rows, the layout says {n}")
                for c in COLUMNS:
                    work.put_array(f"chat_blocks/{name}/{c}/s{shard.index:06d}.npy", out[c])

        self._per_shard(work, files, shards, rank, world_size, one)


def _chat_blocks(work: Work, name: str, shards: Sequence[Shard], block_size: int) -> dict:
    """A split's rows, the shards' in order: int32 ``(rows, block_size)`` per column.

    Raises:
        UserError: a file holds another shape or type (not what the job wrote).
    """
    out = {}
    for c in COLUMNS:
        arrays = []
        for s in shards:
            rel = f"chat_blocks/{name}/{c}/s{s.index:06d}.npy"
            arr = work.get_array(rel)
            if arr.ndim != 2 or arr.shape[1] != block_size or arr.dtype.kind not in "iu":
                raise _foreign(work.path(rel), f"an array of {arr.dtype} {tuple(arr.shape)}")
            arrays.append(arr)
        out[c] = np.concatenate(arrays) if arrays else _empty_rows(block_size)[c]
    return out


def _split_entry(counts: list[dict], name: str, rows: int, block_size: int) -> dict:
    """The manifest's entry of a split, as ``prepare`` writes it for conversations."""
    stats, skipped, located = _split_totals(counts, name)
    stats["rows"] = rows
    stats["pad_tokens"] = rows * block_size - stats["tokens"]
    from llmkit.data.pack import SFTPacker

    stats = {k: int(stats.get(k, 0)) for k in SFTPacker.COUNTERS}
    n = sum(c[name]["conversations"] for c in counts)
    return {
        "documents": n,
        "conversations": n,
        "bytes": sum(c[name]["bytes"] for c in counts),
        "tokens": stats["tokens"],
        "blocks": rows,
        "answer_tokens": stats["answer_tokens"],
        "conversations_written": stats["conversations"] - stats["dropped"] - stats["no_answer"],
        "skipped": dict(sorted(skipped.items())),
        "answers_located": dict(sorted(located.items())),
        "packing": stats,
    }


def _chat_data(run, tok, meta: dict, counts: list[dict], splits: dict, warnings: list[str]):
    """prepare's :class:`llmkit.data.pipeline._ChatData` of a finished job: its template
    (``meta``), end of turn and answers located; logs what prepare's tokenizer step logs and
    adds its warnings and each split's (``splits``: the manifest's entries) to ``warnings``,
    in prepare's order."""
    from llmkit.data import pipeline as pl
    from llmkit.data.sft import CHATML, end_of_turn_token

    data = pl._ChatData(run)
    data.resolved, data.added_tokens = meta["resolved"], list(meta.get("added_tokens", []))
    data.end_of_turn = end_of_turn_token(tok)
    if run.tok is None:
        run.report.log(
            f"trained a byte-level BPE tokenizer: {len(tok):,} tokens (with "
            f"{', '.join(CHATML.special_tokens)})"
        )
    else:
        run.report.log(f"tokenizer {run.settings.tokenizer}: {len(tok):,} tokens")
    run.report.log(
        f"chat template: {data.resolved}"
        + (" (the tokenizer's own)" if data.resolved == "tokenizer" else "")
        + f", end of turn {data.end_of_turn!r}, loss on "
        + ("the assistant's answers" if run.chat["train_on"] == "assistant" else "every token")
    )
    warnings += pl.chat_tokenizer_warnings(data.resolved, data.added_tokens, len(tok), run.cfg)
    for name in SPLITS:
        entry = splits[name]
        for rule, n in entry["answers_located"].items():
            data.answers_located[rule] = data.answers_located.get(rule, 0) + n
        first = next((c[name]["failed"]["error"] for c in counts if c[name]["failed"]), None)
        warnings += pl.chat_split_warnings(
            name,
            entry["packing"],
            entry["skipped"],
            first,
            run.settings.block_size,
            run.chat["overlong"],
        )
    return data


def _save_rows(run, tmp: Path, name: str, rows: dict) -> None:
    """A split's rows saved at ``tmp/name`` as prepare saves them (``Dataset.from_generator``
    with its features and fingerprint name, so ``state.json`` is the same bytes)."""
    from datasets import Features, List, Value

    from llmkit.data import pipeline as pl

    features = Features({c: List(Value("int32")) for c in COLUMNS})

    def gen():
        for i in range(len(rows["input_ids"])):
            yield {c: rows[c][i] for c in COLUMNS}

    with pl._quiet_datasets():
        ds = pl._from_generator(gen, features, tmp / ".cache", f"chat-rows-{name}")
        ds.save_to_disk(str(tmp / name), num_shards=1 if len(ds) == 0 else None)
    del ds
    shutil.rmtree(tmp / ".cache", ignore_errors=True)


def assemble_chat(
    spec: JobSpec, output: str | Path, settings: dict | None = None, run=None
) -> dict:
    """Write the prepared directory of a finished chat job at ``output``, as ``llmkit
    prepare`` writes it in one process: ``train/`` and ``validation/`` (``input_ids``,
    ``labels``, ``position_ids``: int32 rows of ``block_size``, saved as prepare saves them,
    its dataset fingerprint too), the tokenizer with its chat template, ``dropped.jsonl``
    (with ``keep_dropped``), ``lengths.png`` (with ``plot``), ``dataset_dict.json`` and
    ``manifest.json`` from prepare's own functions (:func:`llmkit.data.pipeline.
    cleaned_info`, ``_ChatData``, ``_finish``...), plus ``executor``. ``settings``: entries
    added to the manifest's ``settings`` (the executor's); ``run``: the in-process run this
    job stands for (None: made from ``spec``, quiet, without plot). Built in a temporary
    directory beside ``output`` and renamed into place (as :func:`~llmkit.data.distributed.
    job.assemble`).

    Raises:
        UserError: a file of the work directory is not what the job wrote; no conversation
            left after cleaning (as ``prepare``); ``output`` is unchanged.
    """
    from llmkit.data import pipeline as pl
    from llmkit.data.distributed.job import _lengths, _run_of, finish_output

    run = run if run is not None else _run_of(spec, output)
    work = Work(spec.work_dir)
    plan = work.get_json("plan.json")
    shards = [Shard.from_dict(d) for d in plan["shards"]]
    files, read, stats = _merged_stats(work, plan, shards)
    run.files = files
    kept = sum(work.get_json(f"admitted/s{s.index:06d}.json")["kept"] for s in shards)
    if kept == 0:
        raise pl.nothing_left(run, read, stats)
    info = pl.cleaned_info(
        run, read, stats, _lengths(work, shards, "sources"), _lengths(work, shards, "admitted"),
        kept,
    )  # fmt: skip
    counts = [work.get_json(f"chat_counts/s{s.index:06d}.json") for s in shards]
    layout = work.get_json("chat_layout.json")
    blocks = {name: _chat_blocks(work, name, shards, spec.block_size) for name in SPLITS}
    tok, meta = load_chat_tokenizer(work, spec)
    tok = run.tok if spec.tokenizer is not None else tok  # the command's, saved as prepare
    run.report.log(f"{info['summary']}; cleaned in {spec.tasks} task(s) over {len(shards)} shards")
    warnings: list[str] = list(info["warnings"])
    n_val = sum(c["validation"]["conversations"] for c in counts)
    pl.note_split(run, sum(c["train"]["conversations"] for c in counts), n_val, warnings)
    splits = {
        name: _split_entry(counts, name, layout["rows"][name], spec.block_size) for name in SPLITS
    }
    data = _chat_data(run, tok, meta, counts, splits, warnings)
    with pl._building(run.output) as tmp:
        for name in SPLITS:
            _save_rows(run, tmp, name, blocks[name])
            run.report.log(data.describe(name, splits[name]))
        if spec.tokenizer is None:  # the trained files as written (byte for byte prepare's)
            for name in work.listdir("tokenizer"):
                (tmp / name).write_bytes(work.read_bytes(f"tokenizer/{name}"))
        else:
            tok.save_pretrained(str(tmp))
        return finish_output(
            work, spec, shards, run, tmp, data, tok, info, splits, warnings, settings
        )


STAGE_CLASSES.update(
    {
        c.name: c
        for c in (ChatSignatures, ChatAdmit, ChatTokenizer, ChatEncode, ChatLayout, ChatPack)
    }
)
