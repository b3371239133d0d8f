"""``llmkit prepare``: raw text files to tokenized, packed training blocks (SPEC §2).

The pipeline, each step a function over documents or batches that could run under another
executor (SPEC §8):

1. read (:mod:`llmkit.data.readers`): files, directories, globs or Hub datasets to a stream of
   documents, written as it comes to an arrow-backed ``datasets.Dataset`` (one process);
2. clean: the steps (:mod:`llmkit.data.steps`) that :func:`llmkit.data.config.build_steps`
   makes of the settings — normalize, the named filters (:mod:`llmkit.data.filters`), the
   signatures of exact and near-duplicate removal (:mod:`llmkit.data.dedup`) — on
   ``num_proc`` processes, then behind a barrier de-duplication's resolve steps in document
   order, then PII redaction (:mod:`llmkit.data.pii`) on ``num_proc`` processes again; run
   by :mod:`llmkit.data.executor`, so the result does not depend on ``num_proc``. The kept
   documents are saved as a dataset (never a Python list), and cached
   (:mod:`llmkit.core.cache`);
3. split: whole documents to train / validation, from ``seed`` (:func:`split_indices`);
4. tokenizer: a byte-level BPE trained on the train documents, or a pretrained one;
5. encode (:func:`encode_batch`): batched, one EOS after every document;
6. pack (:class:`llmkit.data.pack.Packer`): each split concatenated and cut into blocks.

Chat data (``format="chat"``, or detected: :func:`llmkit.data.readers.resolve_format`) takes
the same road with conversations instead of documents: read as records (``messages``,
``prompt``/``response``, Alpaca's ``instruction``/``output``) into their JSON list of messages
with their ``file:line``; cleaned by the same steps (a :class:`llmkit.data.document.Document`
carries the messages); split by conversation; then rendered with a chat template and labelled
(:func:`encode_chat_batch`) and packed whole with :class:`llmkit.data.pack.SFTPacker`
(:func:`_build_chat`), so that each row carries ``input_ids``, ``labels`` and
``position_ids``.

The result is the layout of :mod:`llmkit.core.prepared`, built in a hidden temporary directory
next to the output and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from llmkit.core import atomic
from llmkit.core.cache import (
    CACHE_FORMAT,
    DOCUMENTS,
    DROPPED,
    ENV_MAX_GB,
    CleanCache,
    cache_problem,
    cache_root,
    evict,
    file_sha256,
    fingerprint,
    max_cache_bytes,
    tokenizer_identity,
)
from llmkit.core.manifest import Manifest
from llmkit.core.prepared import DATASET_DICT, MANIFEST, SPLITS, is_prepared
from llmkit.data.clean import StageStats
from llmkit.data.config import PrepareSettings
from llmkit.data.encode import (  # noqa: F401 (re-exported: llmkit.data.pipeline's API)
    BATCH_BYTES,
    BATCH_DOCUMENTS,
    _block_rows,
    _chat_tokenizer,
    _encode_chat_for_map,
    _encode_for_map,
    _encode_raw,
    _sft_rows,
    _tokenizers_single_threaded,
    batch_rows,
    chat_training_text,
    encode_batch,
    encode_chat_batch,
    load_pretrained_tokenizer,
    tokenizer_appends_eos,
)
from llmkit.data.outdir import (
    _check_inputs_outside_output,
    _check_output,
    _concerns_output,
    _missing_parents,
    _os_error_in,
    _output_error,
    _remove_dirs,
    _wrapped,
)
from llmkit.data.pack import Packer, SFTPacker
from llmkit.data.readers import (
    DEFAULT_ENCODING,
    DEFAULT_MAX_DOCUMENT_BYTES,
    InputFile,
    discover_inputs,
    read_conversations,
    read_documents,
    resolve_format,
)
from llmkit.errors import UserError

#: Documents per batch in the clean step (a batch of whole books must fit in memory too).
BATCH_CLEAN = 100
#: Text (UTF-8 bytes) per worker process below which the clean step runs in fewer processes:
#: starting a pool and concatenating its shards (about 0.5 s here) costs more than it saves on
#: a small corpus (cleaning runs at 0.3-3 MB/s per core, depending on the filters).
PARALLEL_MIN_BYTES = 2 << 20
#: The same for the encode step, whose single process already encodes on every core (the
#: ``tokenizers`` Rust encoder is multi-threaded); worker processes only add the Python part.
PARALLEL_MIN_BYTES_ENCODE = 32 << 20


# ---------------------------------------------------------------------------------------------
# Split (encode and pack: llmkit.data.encode).


def split_indices(
    n_documents: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Assign documents ``0..n_documents-1`` to train and validation, deterministically.

    ``round(n_documents * val_fraction)`` documents, at least 1 when ``val_fraction > 0`` and
    there are 2 documents or more (and never all of them), are drawn for validation by a
    ``numpy.random.default_rng(seed)`` permutation. Both index arrays are sorted, so each split
    keeps the documents in their input order.

    Returns:
        ``(train_indices, validation_indices)``, int64 arrays.
    """
    n_val = round(n_documents * val_fraction)
    if val_fraction > 0 and n_documents >= 2:
        n_val = min(max(n_val, 1), n_documents - 1)
    else:
        n_val = 0
    order = np.random.default_rng(seed).permutation(n_documents)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ---------------------------------------------------------------------------------------------
# Console: transient progress bars and one line per finished step, all on stderr.


class _Report:
    """Progress bars (on a terminal only; transient) and log lines on ``console``."""

    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Callable]:
        """A progress bar for one step; yields ``advance(n=1)``."""
        task_id = self.progress.add_task(description, total=total)
        try:
            yield lambda n=1: self.progress.advance(task_id, n)
        finally:
            self.progress.remove_task(task_id)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' own progress bars and warnings for the duration."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _user_error_in(err: BaseException) -> UserError | None:
    """The UserError that ``datasets`` wrapped (DatasetGenerationError), if any."""
    return _wrapped(err, UserError)


def _from_generator(generator: Callable[[], Iterator[dict]], features, cache: Path, name: str):
    """``Dataset.from_generator`` in ``cache``; a UserError raised inside comes out as itself.

    A generator that yields no row gives an empty dataset with ``features`` (``datasets``
    itself refuses to build one).
    """
    from datasets import Dataset

    rows = 0

    def counted() -> Iterator[dict]:
        nonlocal rows
        for row in generator():
            rows += 1
            yield row

    try:
        return Dataset.from_generator(
            counted, features=features, cache_dir=str(cache), fingerprint=f"llmkit-{name}"
        )
    except UserError:
        raise
    except Exception as err:
        inner = _user_error_in(err)
        if inner is not None:
            raise inner from None
        if rows == 0 and isinstance(err, ValueError):
            return Dataset.from_dict({k: [] for k in features}, features=features)
        raise


# ---------------------------------------------------------------------------------------------
# The pipeline.


#: Document-length histogram: bin edges in UTF-8 bytes, powers of 2 from 1 B to 1 GiB.
LENGTH_BINS = np.array([0] + [2**k for k in range(31)], dtype=np.int64)


class LengthHistogram:
    """Counts of document lengths (UTF-8 bytes) in :data:`LENGTH_BINS`; constant memory."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(LENGTH_BINS), dtype=np.int64)

    def add(self, n_bytes: int) -> None:
        self.counts[int(np.searchsorted(LENGTH_BINS, n_bytes, side="right")) - 1] += 1

    def add_all(self, n_bytes: np.ndarray) -> None:
        """:meth:`add` each of ``n_bytes``."""
        bins = np.searchsorted(LENGTH_BINS, n_bytes, side="right") - 1
        self.counts += np.bincount(bins, minlength=len(LENGTH_BINS))[: len(LENGTH_BINS)]

    def as_list(self) -> list[int]:
        return self.counts.tolist()


def default_num_proc() -> int:
    """The CPU cores this process may use (``len(os.sched_getaffinity(0))``; ``os.cpu_count()``
    where affinity is not available)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _procs_for(num_proc: int, n_bytes: int, n_rows: int, per_proc: int | None = None) -> int:
    """Worker processes for a step over ``n_bytes`` of text in ``n_rows`` rows: ``num_proc``,
    but no more than one per ``per_proc`` bytes (:data:`PARALLEL_MIN_BYTES`) and one per row."""
    per_proc = PARALLEL_MIN_BYTES if per_proc is None else per_proc
    return max(1, min(num_proc, n_bytes // max(1, per_proc), n_rows))


def _read_rows(
    files: Sequence[InputFile],
    *,
    kind: str,
    split_on: str,
    text_field: str,
    on_error: str,
    line_filter: Callable | None,
    read_stats: dict,
    advance: Callable,
    histogram: LengthHistogram | None = None,
    encoding: str = DEFAULT_ENCODING,
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES,
) -> Iterator[dict]:
    """Rows ``{"text"}`` of the documents of all files, in order, as read; for chat data
    ``{"text", "where"}``: the conversation's JSON list of messages and its ``file:line``;
    for documents when an input is a web archive ``{"text", "where"}``: the page's URL (None
    for the documents of other inputs)."""
    urls = kind != "chat" and any(f.kind == "warc" for f in files)
    for source in files:
        if kind == "chat":
            for where, text in read_conversations(source, on_error=on_error):
                size = len(text.encode("utf-8"))
                read_stats["documents_out"] += 1
                read_stats["bytes_out"] += size
                if histogram is not None:
                    histogram.add(size)
                advance(size if source.kind != "hub" else 1)
                yield {"text": text, "where": where}
            continue
        for url, text in read_documents(
            source,
            split_on=split_on,
            text_field=text_field,
            on_error=on_error,
            line_filter=line_filter,
            encoding=encoding,
            max_document_bytes=max_document_bytes,
            with_url=True,
        ):
            size = len(text.encode("utf-8"))
            read_stats["documents_out"] += 1
            read_stats["bytes_out"] += size
            if histogram is not None:
                histogram.add(size)
            advance(size if source.kind != "hub" else 1)
            yield {"text": text, "where": url} if urls else {"text": text}


def _read(run: _Run, work: Path) -> tuple[object, dict, LengthHistogram]:
    """Step 1: every input's documents (conversations) in order, written as they come to an
    arrow-backed dataset in ``work`` (rows ``text``, and ``where`` for web pages and
    conversations); returns it, the manifest's ``read`` counts and the lengths as read."""
    from datasets import Features, Value

    from llmkit.data.boilerplate import strip_gutenberg

    s, files = run.settings, run.files
    histogram = LengthHistogram()
    read_stats = read_counts(files)
    web = any(f.kind == "warc" for f in files)  # documents carry their URL ("where")
    with run.report.task(
        "read (documents)" if run.hub else "read (bytes)",
        total=None if run.hub else read_stats["bytes_in"],
    ) as advance:
        raw = _from_generator(
            lambda: _read_rows(
                files,
                kind=run.kind,
                split_on=s.split_on,
                text_field=run.text_field,
                on_error=s.on_error,
                line_filter=strip_gutenberg if run.cfg["gutenberg"] else None,
                read_stats=read_stats,
                advance=advance,
                histogram=histogram,
                encoding=s.encoding,
                max_document_bytes=s.max_document_bytes,
            ),
            Features(
                {
                    "text": Value("string"),
                    **({"where": Value("string")} if run.chat is not None or web else {}),
                }
            ),
            work,
            "documents",
        )
    add_read_counts(read_stats, files)
    return raw, read_stats, histogram


def read_counts(files: Sequence[InputFile], documents_out: int = 0, bytes_out: int = 0) -> dict:
    """The manifest's ``read`` counts: ``files``, ``bytes_in`` (their size on disk),
    ``documents_out`` and ``bytes_out`` (UTF-8) read from them; :func:`add_read_counts` adds
    the rest once they are read."""
    return {
        "files": len(files),
        "bytes_in": sum(f.size_bytes for f in files),
        "documents_out": documents_out,
        "bytes_out": bytes_out,
    }


def add_read_counts(read_stats: dict, files: Sequence[InputFile]) -> None:
    """Add to the manifest's ``read`` counts what the readers counted in ``files`` once they
    were read: ``skipped`` (lines, by reason), ``documents_split`` and ``pieces`` (documents
    over ``max_document_bytes``; only when some were), ``records_skipped`` (web-archive
    records not read; only when some were). Shared by the distributed job, whose files'
    counts are the sums over its shards."""
    read_stats["skipped"] = _sum_counts(f.skipped for f in files)
    split = sum(f.documents_split for f in files)
    if split:
        read_stats["documents_split"] = split
        read_stats["pieces"] = sum(f.pieces for f in files)
    records = _sum_counts(f.records_skipped for f in files)
    if records:
        read_stats["records_skipped"] = records


def _sum_counts(counts) -> dict:
    total: dict = {}
    for c in counts:
        for reason, n in c.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))


def _read_and_clean(
    run: _Run, *, work: Path, dropped_path: Path | None, documents_dir: Path
) -> tuple[object, dict]:
    """Steps 1-2: read the inputs (:func:`_read`), run the cleaning steps over them
    (:func:`llmkit.data.config.build_steps` under :func:`llmkit.data.executor.run_pipeline`),
    save the kept documents at ``documents_dir``; returns them (memory-mapped) and the
    counts of both steps.

    ``work`` holds the intermediate arrow files. With ``keep_dropped`` each dropped document
    is written to ``dropped_path`` (JSON lines: stage, reason, text as the stage received it),
    in document order; a dropped conversation as its ``where`` (``file:line``) and
    ``messages`` as the stage received them.
    """
    from datasets import load_from_disk

    from llmkit.data.config import build_steps
    from llmkit.data.executor import run_pipeline
    from llmkit.data.steps.base import DroppedWriter, merge_dropped

    report, chat = run.report, run.chat is not None
    raw, read_stats, read_lengths = _read(run, work)
    kept_lengths = LengthHistogram()
    stats: list[StageStats] = []  # of the cleaning steps, once they ran
    if len(raw) == 0:
        raise nothing_left(run, read_stats, stats)

    procs = _procs_for(run.num_proc, read_stats["bytes_out"], len(raw))
    writer = DroppedWriter(work / "dropped") if dropped_path is not None else None
    steps = build_steps(run.cfg, writer)
    cleaned, _ = run_pipeline(
        steps, raw, chat=chat, procs=procs, work=work / "clean", task=report.task
    )
    stats = [step.stats for step in steps if step.stats is not None]
    if dropped_path is not None:
        merge_dropped(work / "dropped", dropped_path)
    n_bytes = cleaned.data.column("n_bytes").to_numpy()
    kept_lengths.add_all(n_bytes)
    n_kept = len(cleaned)
    if n_kept == 0:
        raise nothing_left(run, read_stats, stats)
    with report.task("save the cleaned documents"):
        docs = cleaned.select_columns(["text", "n_bytes", *(["where"] if chat else [])])
        docs.save_to_disk(str(documents_dir))
    del raw, cleaned, docs
    info = cleaned_info(run, read_stats, stats, read_lengths, kept_lengths, n_kept)
    report.log(f"{info['summary']}; cleaned in {procs} process{'es' if procs > 1 else ''}")
    return load_from_disk(str(documents_dir)), info


def nothing_left(run: _Run, read_stats: dict, stats: Sequence[StageStats]) -> UserError:
    """The error of a run that kept no document (conversation) after cleaning."""
    chat, skipped = run.chat is not None, read_stats["skipped"]
    what = "conversations" if chat else "documents"
    return UserError(
        f"no {what} left after cleaning ({read_stats['documents_out']} read; "
        f"{_drops(stats)}" + (f"; skipped {_fmt_counts(skipped)}" if skipped else "") + ")",
        "give JSON records of conversations (messages, prompt/response or "
        "instruction/output), or loosen the filters"
        if chat
        else "give files that hold text (the right --text-field for structured files), or "
        "loosen the filters",
    )


def cleaned_info(
    run: _Run,
    read_stats: dict,
    stats: Sequence[StageStats],
    read_lengths: LengthHistogram,
    kept_lengths: LengthHistogram,
    n_kept: int,
) -> dict:
    """What steps 1-2 found, for the manifest and the log (also what the cache keeps):
    ``inputs``, ``stages`` (``read`` then each cleaning step), ``length_histogram`` (UTF-8
    bytes per document in :data:`LENGTH_BINS`, as read and as kept), ``warnings`` (one per
    file with skipped lines), ``summary`` (the line logged) and ``documents`` (kept).
    Shared by the distributed job (:func:`llmkit.data.distributed.job.assemble`), whose
    counts are the sums over its shards."""
    files, chat = run.files, run.chat is not None
    skipped = read_stats["skipped"]
    split = read_stats.get("documents_split", 0)
    summary = (
        f"read {len(files)} {'input(s)' if run.hub else 'file(s)'}, {read_stats['bytes_in']:,} "
        f"bytes: {read_stats['documents_out']:,} {'conversations' if chat else 'documents'}, "
        f"{n_kept:,} kept ({_drops(stats)})"
        + (f"; skipped input lines: {_fmt_counts(skipped)}" if skipped else "")
        + (
            f"; {split:,} document(s) over {run.settings.max_document_bytes:,} bytes cut into "
            f"{read_stats['pieces']:,} pieces"
            if split
            else ""
        )
    )
    return {
        "inputs": [f.as_dict() for f in files],
        "stages": {"read": read_stats, **{st.name: st.as_dict() for st in stats}},
        "length_histogram": {
            "bin_edges_bytes": LENGTH_BINS.tolist(),
            "read": read_lengths.as_list(),
            "kept": kept_lengths.as_list(),
        },
        "warnings": input_warnings(files),
        "summary": summary,
        "documents": n_kept,
    }


def _encode_split(
    docs,
    tokenizer,
    *,
    eos_token_id,
    append_eos,
    num_proc,
    n_bytes,
    name,
    advance,
    cache,
    batch_size=BATCH_DOCUMENTS,
):
    from datasets import Features, List, Value

    features = Features({"input_ids": List(Value("int32"))})
    kwargs = {"tokenizer": tokenizer, "eos_token_id": eos_token_id, "append_eos": append_eos}
    common = dict(
        batched=True,
        batch_size=batch_size,
        writer_batch_size=batch_size,
        remove_columns=docs.column_names,
        features=features,
        new_fingerprint=f"llmkit-encoded-{name}",
        cache_file_name=str(cache / f"encoded-{name}.arrow"),
    )
    procs = _procs_for(num_proc, n_bytes, len(docs), PARALLEL_MIN_BYTES_ENCODE)
    if procs == 1:
        # One process: the Rust encoder (encode_batch_fast) uses every core by itself.

        def encode_and_count(batch: dict) -> dict:
            out = _encode_for_map(batch, **kwargs)
            advance(len(batch["text"]))
            return out

        return docs.map(encode_and_count, **common)
    # Worker processes: each gets a pickled tokenizer. Their tokenizers run one thread each
    # (set before the fork, so that `tokenizers` does not warn about it).
    with _tokenizers_single_threaded():
        encoded = docs.map(_encode_for_map, fn_kwargs=kwargs, num_proc=procs, **common)
    advance(len(docs))
    return encoded


# ---------------------------------------------------------------------------------------------
# Encode a split of conversations on worker processes.


def _encode_chat_split(docs, tokenizer, *, train_on, num_proc, n_bytes, name, advance, cache):
    """Every conversation of a split through :func:`encode_chat_batch`, in order, on up to
    ``num_proc`` processes (rendering a template is Python work: one process per
    :data:`PARALLEL_MIN_BYTES` of conversations)."""
    from datasets import Features, List, Value

    features = Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "error": Value("string"),
            "hint": Value("string"),
            "reason": Value("string"),
            "located": Value("string"),
        }
    )
    common = dict(
        batched=True,
        batch_size=BATCH_CLEAN,
        remove_columns=docs.column_names,
        features=features,
        fn_kwargs={"tokenizer": tokenizer, "train_on": train_on},
        new_fingerprint=f"llmkit-chat-encoded-{name}",
        cache_file_name=str(cache / f"chat-encoded-{name}.arrow"),
    )
    procs = _procs_for(num_proc, n_bytes, len(docs))
    if procs == 1:
        encoded = docs.map(_encode_chat_for_map, **common)
        advance(len(docs))
        return encoded
    with _tokenizers_single_threaded():
        encoded = docs.map(_encode_chat_for_map, num_proc=procs, **common)
    advance(len(docs))
    return encoded


def _ignored_options(
    kind: str,
    requested: str,
    *,
    text_field: str | None,
    chat_flags: Sequence[str],
    encoding: str,
    kinds: Sequence[str],
    name_of: Callable[[str, object], str],
) -> list[str]:
    """One warning line for each option given that does not apply to the data as read
    (``kind``, ``"text"`` or ``"chat"``; ``requested``: the ``--format`` given; ``name_of``:
    how a setting and its value are named, as the user gave them,
    :meth:`llmkit.data.config.PrepareSettings.name_of`)."""
    how = "--format chat" if requested == "chat" else "detected: their first records are"
    out = []
    if kind == "chat":
        if text_field is not None:
            out.append(
                f"{name_of('text_field', text_field)} is ignored: the inputs are read as "
                f"conversations ({how} chat records), whose text is in their messages (pass "
                "--format text to read that field as documents)"
            )
        if encoding != DEFAULT_ENCODING:
            out.append(
                f"{name_of('encoding', encoding)} is ignored: chat records are read as JSON in "
                "UTF-8"
            )
    elif encoding != DEFAULT_ENCODING and not {"text", "jsonl", "csv"} & set(kinds):
        out.append(
            f"{name_of('encoding', encoding)} is ignored: it applies to text, JSON-lines and "
            "CSV files, and parquet files, Hub datasets and web archives declare their own"
        )
    if kind != "chat" and chat_flags:
        what = "documents (--format text)" if requested == "text" else "documents"
        out.append(
            f"{', '.join(chat_flags)} ignored: the inputs are read as {what}, and "
            f"{'these apply' if len(chat_flags) > 1 else 'it applies'} to chat data only "
            "(pass --format chat for conversations)"
        )
    return out


def _hash_inputs(files: Sequence[InputFile], report: _Report) -> list[str]:
    """SHA-256 of every input file (for the fingerprints), with a progress bar."""
    with report.task("hash inputs (bytes)", total=sum(f.size_bytes for f in files)) as advance:
        try:
            return [file_sha256(f.path, advance) for f in files]
        except OSError as err:
            raise UserError(
                f"cannot read {err.filename}: {err.strerror}", "check its permissions"
            ) from None


def _cleaning_fingerprint(
    files: Sequence[InputFile],
    hashes: Sequence[str | None],
    *,
    version: str,
    kind: str,
    split_on: str | None,
    text_field: str | None,
    on_error: str,
    cfg: dict,
    keep_dropped: bool,
    encoding: str = DEFAULT_ENCODING,
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES,
) -> str:
    """The fingerprint of what decides the cleaned documents (see :mod:`llmkit.core.cache`)."""
    return fingerprint(
        {
            "format": CACHE_FORMAT,
            "llmkit": version,
            "inputs": [
                {
                    "path": str(f.path.resolve()),
                    "kind": f.kind,
                    "compression": f.compression,
                    "sha256": h,
                }
                for f, h in zip(files, hashes, strict=True)
            ],
            "read": {
                "format": kind,
                "split_on": split_on,
                "text_field": text_field,
                "on_error": on_error,
                "encoding": encoding,
                "max_document_bytes": max_document_bytes,
            },
            "cleaning": cfg,
            "keep_dropped": keep_dropped,
        }
    )


def _full_fingerprint(cleaning: str, **settings) -> str:
    """The fingerprint of the whole run: the cleaning one and the settings after cleaning."""
    return fingerprint({"cleaning": cleaning, **settings})


def _up_to_date(output: Path, full: str) -> dict | None:
    """The manifest at ``output`` when it was written with fingerprint ``full`` and every file
    it lists is still there; else None."""
    if not is_prepared(output):
        return None
    try:
        manifest = Manifest.model_validate_json((output / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    if (manifest.fingerprint or {}).get("full") != full:
        return None
    files = manifest.files
    if files is None or not all((output / f).is_file() for f in files):
        return None
    return manifest.as_dict()


def _given(**kwargs) -> dict:
    """The keyword settings of :func:`prepare` set to something other than their default."""
    fields = PrepareSettings.model_fields
    return {k: v for k, v in kwargs.items() if v != fields[k].default}


@dataclass
class _Run:
    """What :func:`prepare` decided before building anything (:func:`_plan`): the settings,
    the inputs found, the kind of data, and the cache to use. Every later stage takes it
    instead of the settings one by one."""

    settings: PrepareSettings
    output: Path
    files: list[InputFile]
    kind: str  # "text" or "chat"
    cfg: dict  # the cleaning settings for this kind, as the manifest records them
    num_proc: int
    report: _Report
    warnings: list[str]  # found before building (options ignored, the cache)
    cache: bool
    chat: dict | None = None  # chat data: template, train_on, overlong (as given or default)
    tok: object = None  # a pretrained tokenizer, loaded before reading
    chat_tokenizer: dict = field(default_factory=dict)  # its template: resolved, added_tokens
    hashes: list[str] | None = None
    clean_cache: CleanCache | None = None

    @property
    def hub(self) -> bool:
        return any(f.kind == "hub" for f in self.files)

    @property
    def text_field(self) -> str:
        return "text" if self.settings.text_field is None else self.settings.text_field

    def cleaning_settings(self) -> dict:
        """What decides the cleaned documents (:func:`_cleaning_fingerprint`)."""
        from llmkit import __version__

        s, text = self.settings, self.chat is None
        return dict(
            version=__version__,
            kind=self.kind,
            split_on=s.split_on if text else None,
            text_field=self.text_field if text else None,
            on_error=s.on_error,
            cfg=self.cfg,
            keep_dropped=s.keep_dropped,
            encoding=s.encoding if text else DEFAULT_ENCODING,
            max_document_bytes=s.max_document_bytes if text else None,
        )

    def later_settings(self) -> dict:
        """What decides the rest of the output (:func:`_full_fingerprint`)."""
        s = self.settings
        return dict(
            vocab_size=s.vocab_size if s.tokenizer is None else None,
            tokenizer=tokenizer_identity(s.tokenizer),
            block_size=s.block_size,
            val_fraction=s.val_fraction,
            seed=s.seed,
            plot=s.plot,
            chat=dict(self.chat) if self.chat is not None else None,  # as given, not resolved
        )

    def manifest_settings(self) -> dict:
        """The manifest's ``settings``: every setting as it was used."""
        s, chat = self.settings, self.chat
        text = chat is None
        return {
            "format": self.kind,
            "vocab_size": s.vocab_size if s.tokenizer is None else None,
            "tokenizer": s.tokenizer,
            "block_size": s.block_size,
            "val_fraction": s.val_fraction,
            "seed": s.seed,
            "split_on": s.split_on if text else None,
            "text_field": self.text_field if text else None,
            "encoding": s.encoding if text else None,
            "max_document_bytes": s.max_document_bytes if text else None,
            "chat_template": chat["template"] if chat is not None else None,
            "train_on": chat["train_on"] if chat is not None else None,
            "overlong": chat["overlong"] if chat is not None else None,
            "num_proc": self.num_proc,
            "on_error": s.on_error,
            "keep_dropped": s.keep_dropped,
            "plot": s.plot,
            "hub_split": s.hub_split if self.hub else None,
            "normalization": self.cfg["normalize"]["form"],
            "cleaning": self.cfg,
        }


def prepare(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    vocab_size: int = 1024,
    tokenizer: str | None = None,
    block_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 1337,
    split_on: str = "blank-lines",
    text_field: str | None = None,
    overwrite: bool = False,
    num_proc: int | None = None,
    on_error: str = "fail",
    config: str | Path | dict | PrepareSettings | None = None,
    clean: dict | None = None,
    keep_dropped: bool = False,
    plot: bool = True,
    cache: bool = True,
    hub_split: str = "train",
    format: str = "auto",
    chat_template: str | None = None,
    train_on: str | None = None,
    overlong: str | None = None,
    encoding: str = DEFAULT_ENCODING,
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES,
    console=None,
    trust_remote_code: bool = False,
) -> dict:
    """Clean, split, tokenize and pack raw text (or conversations) into a prepared directory.

    Writes the layout of :mod:`llmkit.core.prepared` at ``output``: ``manifest.json``, the
    tokenizer, and ``train/`` and ``validation/`` datasets whose rows are ``block_size`` int32
    token ids. Everything is built in a hidden directory next to ``output`` and renamed into
    place at the end; on any error nothing at ``output`` changes.

    With ``cache`` (the default), a run whose ``output`` already holds a manifest with the same
    fingerprint (same input bytes, settings and llmkit version; :mod:`llmkit.core.cache`) does
    nothing and returns that manifest; and the cleaned documents of an earlier run with the
    same inputs and reading and cleaning settings are reused from ``$LLMKIT_CACHE``, so that a
    change of tokenizer, block size, split or seed skips reading and cleaning.

    Args:
        inputs: files (``.txt``, ``.md``, ``.jsonl``, ``.json``, ``.csv``, ``.tsv``,
            ``.parquet``; optionally ``.gz``, ``.bz2``, ``.xz`` or ``.zst``), directories
            (searched recursively), glob patterns, or Hub dataset ids (``owner/name``,
            ``owner/name:config``; online only); a list, or one.
        output: the directory to write.
        vocab_size: vocabulary size, in tokens, of the byte-level BPE trained on the train
            documents (ignored with ``tokenizer``; the manifest then records None).
        tokenizer: path (or Hub id, when online) of a pretrained tokenizer to use instead.
        block_size: tokens per block (row).
        val_fraction: share of the documents held out for validation, in [0, 1).
        seed: seed of the train/validation split.
        split_on: ``"blank-lines"`` (a text file is split on runs of blank lines) or ``"none"``
            (one document per text file).
        text_field: the field (a dotted path for nested ones) of a JSON record or Hub dataset
            row, or the column of a CSV/TSV/parquet file, that holds the document (None:
            ``"text"``). Given for chat data, it is ignored with a warning.
        overwrite: replace ``output`` when it already holds a prepared directory.
        num_proc: worker processes for cleaning and encoding (None: every core this process
            may use, :func:`default_num_proc`). A small corpus uses fewer (one per 2 MiB of
            text). The output is the same for any value.
        on_error: ``"fail"`` (default) stops at a binary file, invalid UTF-8, a malformed JSON
            line or a missing field, naming file and line; ``"skip"`` skips and counts them.
        config: a ``prepare.yaml`` (path) or a dict of settings (:mod:`llmkit.data.config`):
            the cleaning sections (normalization, Gutenberg stripping, filters,
            deduplication, PII) and any of the keyword settings here by name; updated by
            ``clean`` and by the keywords given a value other than their default. Or every
            setting at once, a :class:`llmkit.data.config.PrepareSettings` (what the CLI
            builds from defaults < ``--config`` < flags): the keyword settings and ``clean``
            are then not used.
        clean: cleaning settings that override ``config`` (what the CLI flags set).
        keep_dropped: also write ``dropped.jsonl``: each dropped document with its stage and
            reason, for audit.
        plot: write ``lengths.png``, the document-length distributions before and after
            cleaning (matplotlib).
        cache: use the fingerprint and the cleaned-documents cache (False: read and clean
            again, and refuse an existing ``output`` without ``overwrite``).
        hub_split: the split read from Hub dataset inputs.
        format: ``"auto"`` (chat when the first record of every JSON-lines / JSON input is a
            chat record without ``text_field``, :func:`llmkit.data.readers.resolve_format`),
            ``"text"`` (documents) or ``"chat"`` (conversations: ``messages``,
            ``prompt``/``response`` or Alpaca's ``instruction``/``input``/``output`` records,
            :mod:`llmkit.data.sft`). Chat data is cleaned message by message (see
            :mod:`llmkit.data.config`), split by conversation, rendered with a chat template
            and packed whole into rows with ``labels`` and ``position_ids`` (see
            :mod:`llmkit.core.prepared`).
        chat_template: chat data only: ``"auto"`` (the pretrained tokenizer's own template,
            else ChatML), ``"tokenizer"`` (the tokenizer's own; an error when it has none) or
            ``"chatml"`` (:data:`llmkit.data.sft.CHATML`, its marker tokens added to a
            pretrained vocabulary that lacks them: the model's embeddings then grow).
        train_on: chat data only: ``"assistant"`` (loss on the answers and their end-of-turn
            token, -100 elsewhere) or ``"all"`` (every token).
        overlong: chat data only: a conversation longer than ``block_size`` tokens is cut to
            its first ``block_size`` tokens (``"truncate"``) or left out (``"drop"``);
            counted either way. ``chat_template``, ``train_on`` and ``overlong`` default
            (None) to ``"auto"``, ``"assistant"`` and ``"truncate"``; given for text data,
            they are ignored with a warning.
        encoding: how text, JSON-lines and CSV inputs are decoded: ``"utf-8"`` (strict, the
            default), ``"auto"`` (charset-normalizer's guess per file, recorded in the
            manifest's inputs) or a codec name (``cp1252``, ``shift_jis``, ``gb18030``...).
            See :func:`llmkit.data.readers.iter_lines`.
        max_document_bytes: a document longer than this many UTF-8 bytes is cut into pieces
            of at most this size at a paragraph, line, sentence or word boundary
            (:func:`llmkit.data.readers.split_document`), each piece then a document; this
            bounds the memory of every later step. Default
            :data:`llmkit.data.readers.DEFAULT_MAX_DOCUMENT_BYTES` (1 MiB); None: never cut.
            Text documents only (a conversation is never cut).
        console: a ``rich.console.Console`` for progress and the summary (default: stderr).
        trust_remote_code: let a pretrained ``tokenizer`` run Python code of its own (its
            ``auto_map``); False (default): such a tokenizer is refused, its code never runs.

    Returns:
        The manifest (also written to ``output/manifest.json``).

    Raises:
        UserError: bad settings; an input missing, unreadable, binary, not UTF-8, or a
            malformed JSON line (named with file and line); a Hub dataset while offline; no
            documents left after cleaning; fewer tokens than one training block; ``output``
            exists and is not empty without ``overwrite`` (or is not a prepared directory).
            Chat data: a record that is not a conversation (no messages, an unknown role, no
            assistant answer...) or that the chat template cannot render, named with file
            and line (or skipped and counted with ``on_error="skip"``); chat records mixed
            with documents; ``chat_template="tokenizer"`` for a tokenizer without one; no
            conversation left to write.
    """
    from llmkit.core.console import make_console

    started = time.perf_counter()
    console = console if console is not None else make_console(stderr=True)
    if isinstance(config, PrepareSettings):
        settings = config
    else:
        given = _given(
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            block_size=block_size,
            val_fraction=val_fraction,
            seed=seed,
            split_on=split_on,
            text_field=text_field,
            num_proc=num_proc,
            on_error=on_error,
            keep_dropped=keep_dropped,
            plot=plot,
            hub_split=hub_split,
            format=format,
            chat_template=chat_template,
            train_on=train_on,
            overlong=overlong,
            encoding=encoding,
            max_document_bytes=max_document_bytes,
            trust_remote_code=trust_remote_code,
        )
        settings = PrepareSettings.load(config, given | ({"cleaning": clean} if clean else {}))
    run = _plan(inputs, output, settings, _Report(console), cache)
    done = _up_to_date_output(run)
    if done is not None:
        return done
    _claim_output(run, overwrite)
    with _building(run.output) as tmp:
        with _quiet_datasets(), run.report.progress:
            manifest = _build(run, tmp)
        manifest = _finish(run, tmp, manifest)
    _print_summary(console, manifest, run.output, time.perf_counter() - started)
    return manifest


def _plan(inputs, output, settings: PrepareSettings, report: _Report, cache: bool) -> _Run:
    """Find the inputs, tell text from chat data, and warn about options that do not apply;
    nothing is read yet."""
    s = settings
    output = Path(os.path.abspath(output))
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    try:
        _check_inputs_outside_output(inputs, output)
    except OSError as err:
        raise _output_error(err, output, None, "cannot read") from None
    files = discover_inputs(inputs, exclude=[output], hub_split=s.hub_split)
    text_field = "text" if s.text_field is None else s.text_field
    kind = resolve_format(files, s.format, text_field)
    chat_flags = {"chat_template": s.chat_template, "train_on": s.train_on}
    chat_flags["overlong"] = s.overlong
    warnings = _ignored_options(
        kind,
        s.format,
        text_field=s.text_field,
        chat_flags=[s.name_of(key) for key, value in chat_flags.items() if value is not None],
        encoding=s.encoding,
        kinds=[f.kind for f in files],
        name_of=s.name_of,
    )
    chat = None
    if kind == "chat":
        chat = {
            "template": s.chat_template or "auto",
            "train_on": s.train_on or "assistant",
            "overlong": s.overlong or "truncate",
        }
        if s.tokenizer is None and chat["template"] == "tokenizer":
            raise UserError(
                f"{s.name_of('chat_template', 'tokenizer')} needs a pretrained tokenizer with "
                "its own template",
                "pass --tokenizer PATH (an instruct model's), or use --chat-template chatml",
            )
    for warning in warnings:
        report.log(f"[yellow]warning:[/yellow] {warning}")
    return _Run(
        settings=s,
        output=output,
        files=files,
        kind=kind,
        cfg=s.cleaning_for(kind).model_dump(),
        num_proc=default_num_proc() if s.num_proc is None else s.num_proc,
        report=report,
        warnings=warnings,
        cache=cache,
        chat=chat,
    )


def _up_to_date_output(run: _Run) -> dict | None:
    """With the cache on: hash the inputs; the manifest of an output that is up to date (then
    there is nothing to do), else None, and the cleaned-documents cache entry to use."""
    if not run.cache or run.hub:
        return None
    max_cache_bytes()  # a bad LLMKIT_CACHE_MAX_GB fails before anything is read
    with run.report.progress:
        run.hashes = _hash_inputs(run.files, run.report)
    fp_clean = _cleaning_fingerprint(run.files, run.hashes, **run.cleaning_settings())
    fp_full = _full_fingerprint(fp_clean, **run.later_settings())
    done = _up_to_date(run.output, fp_full)
    if done is not None:
        run.report.log(
            f"{run.output} is up to date (same input bytes, settings and llmkit version, "
            f"fingerprint {fp_full[:12]}): nothing to do"
        )
        return done
    root = cache_root()
    problem = cache_problem(root) if root is not None else None
    if problem is not None:
        run.warnings.append(problem)
        run.report.log(f"[yellow]warning:[/yellow] {problem}")
    elif root is not None:
        run.clean_cache = CleanCache(root, fp_clean)
    return None


def _claim_output(run: _Run, overwrite: bool) -> None:
    """Check that the output may be written, and load a pretrained tokenizer (with its chat
    template): both fail before the corpus is read."""
    try:
        _check_output(run.output, overwrite)
    except OSError as err:
        raise _output_error(err, run.output, None, "cannot read") from None
    name = run.settings.tokenizer
    if name is not None:
        run.tok = load_pretrained_tokenizer(name, trust_remote_code=run.settings.trust_remote_code)
        if run.chat is not None:
            run.chat_tokenizer = _chat_tokenizer(run.tok, run.chat["template"], name)


@contextmanager
def _building(output: Path) -> Iterator[Path]:
    """A hidden temporary directory next to ``output``, renamed into place when the block
    ends; on any error it is removed (with the parents it created) and ``output`` is as it
    was. An OS error about the output becomes one UserError."""
    created_parents = _missing_parents(output)
    tmp = atomic.temp_path(output.parent, output.name)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale(output.parent, output.name)
        tmp.mkdir()
    except OSError as err:
        _remove_dirs(created_parents)
        raise _output_error(err, output, tmp, "cannot create") from None
    try:
        yield tmp
        atomic.replace(tmp, output)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created_parents)
        if not isinstance(err, (UserError, KeyboardInterrupt)):
            os_err = _os_error_in(err)
            if os_err is not None and _concerns_output(os_err, output, tmp):
                raise _output_error(os_err, output, tmp) from None
        raise


def _build(run: _Run, tmp: Path) -> dict:
    """The named stages into ``tmp``, the same for documents and conversations (which differ
    only in their tokenizer, encode and pack: :class:`_TextData`, :class:`_ChatData`);
    returns the manifest without version, time, fingerprint and files."""
    data = _ChatData(run) if run.chat is not None else _TextData(run)
    work = tmp / ".cache"
    docs, info, cache_entry = _cleaned_documents(run, tmp)  # 1-2. read and clean
    warnings: list[str] = list(info["warnings"])
    split_docs, split_bytes, rows = _split(run, docs, work, warnings)  # 3. split
    tok = data.tokenizer(split_docs["train"], rows, tmp, warnings)  # 4. tokenizer
    splits = {}
    for name in SPLITS:  # 5-6. encode and pack each split
        blocks, splits[name] = data.encode_and_pack(
            tok, name, split_docs[name], split_bytes[name], rows, work, warnings
        )
        # An empty split still gets one (empty) shard, or load_from_disk cannot read it back.
        blocks.save_to_disk(str(tmp / name), num_shards=1 if len(blocks) == 0 else None)
        run.report.log(data.describe(name, splits[name]))
        del blocks
    for warning in warnings:
        run.report.log(f"[yellow]warning:[/yellow] {warning}")
    del docs, split_docs  # release the memory-mapped cache files
    shutil.rmtree(work, ignore_errors=True)
    return {
        "inputs": info["inputs"],
        "settings": run.manifest_settings(),
        "cache": cache_entry,
        "stages": info["stages"],
        "length_histogram": info["length_histogram"],
        "splits": splits,
        "tokenizer": data.tokenizer_entry(tok),
        **data.extra(info),
        "warnings": warnings,
    }


def _split(run: _Run, docs, work: Path, warnings: list[str]) -> tuple[dict, dict, int]:
    """Whole documents (or conversations) to train and validation (:func:`split_indices`):
    ``(documents by split, UTF-8 bytes by split, documents per batch from here on)``."""
    s = run.settings
    n_bytes = docs.data.column("n_bytes").to_numpy()
    rows = batch_rows(int(n_bytes.max()) if len(n_bytes) else 1)
    train_idx, val_idx = split_indices(len(docs), s.val_fraction, s.seed)
    split_docs = {
        name: docs.select(idx, indices_cache_file_name=str(work / f"indices-{name}.arrow"))
        for name, idx in (("train", train_idx), ("validation", val_idx))
    }
    split_bytes = {
        "train": int(n_bytes[train_idx].sum()),
        "validation": int(n_bytes[val_idx].sum()),
    }
    note_split(run, len(train_idx), len(val_idx), warnings)
    return split_docs, split_bytes, rows


def note_split(run: _Run, n_train: int, n_val: int, warnings: list[str]) -> None:
    """Log the split's sizes; warn (into ``warnings``) when validation came out empty.
    Shared by the distributed job."""
    s = run.settings
    unit = "conversation" if run.chat is not None else "document"
    run.report.log(f"split by {unit} (seed {s.seed}): {n_train:,} train, {n_val:,} validation")
    warnings += split_warnings(unit, s.val_fraction, n_val)


def _finish(run: _Run, tmp: Path, manifest: dict) -> dict:
    """Complete the manifest (version, time, fingerprints, warnings found before building,
    files) and write it with ``dataset_dict.json`` and ``lengths.png`` into ``tmp``."""
    from llmkit import __version__

    if run.warnings:
        manifest["warnings"] = [*run.warnings, *manifest.get("warnings", [])]
    fingerprints = None
    read_hashes = [entry.get("sha256") for entry in manifest["inputs"]]
    if not run.hub and (run.hashes is None or read_hashes == run.hashes):
        fp_clean = _cleaning_fingerprint(run.files, read_hashes, **run.cleaning_settings())
        fingerprints = {
            "cleaning": fp_clean,
            "full": _full_fingerprint(fp_clean, **run.later_settings()),
        }
    manifest = {
        "llmkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprints,
        **manifest,
    }
    # So that datasets.load_from_disk(OUTPUT) gives a DatasetDict (DatasetDict's format).
    (tmp / DATASET_DICT).write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
    if run.settings.plot:
        from llmkit.data.report import plot_lengths

        plot_lengths(manifest["length_histogram"], tmp / "lengths.png")
    written = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
    manifest["files"] = sorted([*written, MANIFEST])
    text = Manifest.model_validate(manifest).to_json()
    (tmp / MANIFEST).write_text(text, encoding="utf-8")
    return json.loads(text)  # what a reader gets back (str keys)


def _cleaned_documents(run: _Run, tmp: Path) -> tuple[object, dict, dict]:
    """Steps 1-2, or their result from the cache: ``(documents, info, cache_entry)``.

    ``cache_entry`` is the manifest's ``cache``: ``used`` (the cleaned documents came from
    the cache), ``stored`` (they were stored there), ``path``, and ``note`` when neither.
    """
    dropped = tmp / DROPPED
    found = _from_cache(run, dropped)
    if found is not None:
        return found
    work = tmp / ".cache"
    entry, note = _new_cache_entry(run)
    try:
        docs, info = _read_and_clean(
            run,
            work=work,
            dropped_path=dropped if run.settings.keep_dropped else None,
            documents_dir=(entry / DOCUMENTS) if entry is not None else work / "kept",
        )
    except BaseException:
        if entry is not None:
            CleanCache.discard([entry])
        raise
    if entry is None:
        return docs, info, {"used": False, "stored": False, "path": None, "note": note}
    return _store_in_cache(run, entry, docs, info, dropped, work)


def _from_cache(run: _Run, dropped: Path) -> tuple[object, dict, dict] | None:
    """The cleaned documents of an earlier run with the same fingerprint, or None."""
    clean_cache, keep_dropped = run.clean_cache, run.settings.keep_dropped
    if clean_cache is None:
        return None
    found = clean_cache.load()
    if found is None or (keep_dropped and not (clean_cache.path / DROPPED).is_file()):
        return None  # none, or an entry damaged by hand: read and clean again
    docs, info = found
    if keep_dropped:
        shutil.copyfile(clean_cache.path / DROPPED, dropped)
    for entry, f in zip(info["inputs"], run.files, strict=True):
        entry["path"] = str(f.path)
    run.report.log(f"{info['summary']}; reused from the cache {clean_cache.path}")
    return docs, info, {"used": True, "stored": False, "path": str(clean_cache.path)}


def _new_cache_entry(run: _Run) -> tuple[Path | None, str | None]:
    """A new cache entry to clean into, or None and why the documents are not cached."""
    clean_cache = run.clean_cache
    if clean_cache is not None:
        try:
            return clean_cache.new_entry(), None
        except OSError as err:
            note = f"cannot write the cache {clean_cache.root}: {err.strerror or err}"
            run.report.log(
                f"[yellow]warning:[/yellow] {note}: the cleaned documents are not cached"
            )
            return None, note
    if run.hub:
        return None, "Hub datasets are not cached"
    if not run.cache:
        return None, "off (--no-cache)"
    root = cache_root()
    return None, "off (LLMKIT_CACHE=off)" if root is None else (cache_problem(root) or "off")


def _store_in_cache(run: _Run, entry: Path, docs, info: dict, dropped: Path, work: Path):
    """Commit the cache entry the documents were saved in (then evict the least recently
    used entries over the bound); when it cannot be, keep them in ``work`` instead."""
    clean_cache, report = run.clean_cache, run.report
    try:
        if [f.sha256 for f in run.files] != run.hashes:
            raise OSError(0, "an input changed while it was read")
        if run.settings.keep_dropped:
            shutil.copyfile(dropped, entry / DROPPED)
        clean_cache.commit(entry, info)
        stored = clean_cache.load()
        if stored is None:
            raise OSError(0, "the entry does not read back")
    except OSError as err:
        # The documents were saved in the entry: save them in the work directory instead.
        from datasets import load_from_disk

        docs.save_to_disk(str(work / "kept"))
        docs = load_from_disk(str(work / "kept"))
        CleanCache.discard([entry])
        reason = f"not stored: {err.strerror or err}"
        return docs, info, {"used": False, "stored": False, "path": None, "note": reason}
    docs = stored[0]
    removed, freed = evict(clean_cache.root.parent, max_cache_bytes(), keep=clean_cache.path)
    if removed:
        report.log(
            f"cache over {max_cache_bytes() / 1e9:g} GB ({ENV_MAX_GB}): removed the {removed} "
            f"least recently used entr{'ies' if removed > 1 else 'y'} ({freed / 1e6:,.1f} MB)"
        )
    return docs, info, {"used": False, "stored": True, "path": str(clean_cache.path)}


def _tokenizer_basics(path: str | None, tok) -> dict:
    """The manifest's ``tokenizer`` fields shared by text and chat data (``path`` None: the
    tokenizer was trained by this run)."""
    return {
        "trained": path is None,
        "path": path,
        "type": "byte-level BPE" if path is None else type(tok).__name__,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }


class _TextData:
    """What documents do in steps 4-6: a byte-level BPE trained on the train documents (or
    the pretrained tokenizer), one EOS after every document, packed into blocks
    (:class:`llmkit.data.pack.Packer`)."""

    unit = "documents"

    def __init__(self, run: _Run):
        self.run = run

    def tokenizer(self, train_docs, rows: int, tmp: Path, warnings: list[str]):
        """Step 4: the tokenizer, saved in ``tmp``."""
        run = self.run
        tok = run.tok
        if tok is None:
            from llmkit.core.tokenizer import train_bpe_tokenizer

            with run.report.task("train tokenizer (documents)", total=len(train_docs)) as adv:

                def texts() -> Iterator[list[str]]:
                    for batch in train_docs.iter(batch_size=rows):
                        yield batch["text"]
                        adv(len(batch["text"]))

                vocab_size = run.settings.vocab_size
                tok = train_bpe_tokenizer(texts(), vocab_size, length=len(train_docs))
        tok.save_pretrained(str(tmp))
        self.use(tok)
        return tok

    def use(self, tok) -> None:
        """Log the tokenizer (trained, or the one given) and note how it ends and starts a
        document (for :meth:`tokenizer_entry`)."""
        if self.run.tok is None:
            self.run.report.log(f"trained a byte-level BPE tokenizer: {len(tok):,} tokens")
        else:
            self.run.report.log(f"tokenizer {self.run.settings.tokenizer}: {len(tok):,} tokens")
        self.appends_eos = tokenizer_appends_eos(tok)
        self.adds_bos = False
        if tok.bos_token_id is not None:
            probe = _encode_raw(tok, ["a"], True)[0]
            self.adds_bos = bool(probe) and probe[0] == tok.bos_token_id

    def encode_and_pack(self, tok, name, docs, n_bytes, rows, work, warnings):
        """Steps 5-6 for one split: ``(blocks, the manifest's entry of the split)``."""
        from datasets import Features, List, Value

        run = self.run
        block_size = run.settings.block_size
        packer = Packer(block_size)
        with run.report.task(f"tokenize {name} (documents)", total=len(docs)) as advance:
            encoded = _encode_split(
                docs,
                tok,
                eos_token_id=tok.eos_token_id,
                append_eos=not self.appends_eos,
                num_proc=run.num_proc,
                n_bytes=n_bytes,
                name=name,
                advance=advance,
                cache=work,
                batch_size=rows,
            )
        with run.report.task(f"pack {name} (documents)", total=len(docs)) as advance:
            blocks = _from_generator(
                lambda: _block_rows(encoded, packer, advance, rows),
                Features({"input_ids": List(Value("int32"))}),
                work,
                f"blocks-{name}",
            )
        entry = self.split_entry(
            name,
            {
                "documents": len(docs),
                "bytes": n_bytes,
                "tokens": packer.tokens_in,
                "blocks": packer.blocks_out,
                "tail_tokens": packer.tail_tokens,
            },
            warnings,
        )
        return blocks, entry

    def split_entry(self, name: str, entry: dict, warnings: list[str]) -> dict:
        """The manifest's ``entry`` of split ``name`` (``documents``, UTF-8 ``bytes``,
        ``tokens`` packed into ``blocks`` rows and ``tail_tokens``), checked: warns when
        validation has no block. Shared by the distributed job.

        Raises:
            UserError: the train split has fewer tokens than one block.
        """
        block_size = self.run.settings.block_size
        documents, tokens, blocks = entry["documents"], entry["tokens"], entry["blocks"]
        if name == "train" and blocks == 0:
            raise UserError(
                f"the training split has {tokens:,} tokens, fewer than one block of {block_size}",
                f"use a smaller --block-size (at most {tokens}) or give more text",
            )
        if name == "validation" and documents and blocks == 0:
            warnings.append(
                f"the validation split has {tokens:,} tokens, fewer than one block of "
                f"{block_size}: it is empty (use a larger --val-fraction or a smaller "
                "--block-size)"
            )
        return entry

    def describe(self, name: str, entry: dict) -> str:
        return (
            f"{name}: {entry['tokens']:,} tokens -> {entry['blocks']:,} blocks of "
            f"{self.run.settings.block_size} (tail {entry['tail_tokens']} tokens)"
        )

    def tokenizer_entry(self, tok) -> dict:
        return {
            **_tokenizer_basics(self.run.settings.tokenizer, tok),
            "adds_bos": self.adds_bos,
            "eos_added_by_tokenizer": self.appends_eos,
        }

    def extra(self, info: dict) -> dict:
        return {}


class _ChatData:
    """What conversations do in steps 4-6: a byte-level BPE trained on the train
    conversations (:func:`chat_training_text`) holding ChatML's marker tokens, with the
    ChatML template, or the pretrained tokenizer whose template :func:`_claim_output` chose;
    each conversation rendered and labelled (:func:`encode_chat_batch`, loss on the answers
    with ``train_on="assistant"``), packed whole (:class:`llmkit.data.pack.SFTPacker`,
    ``overlong`` ones truncated or dropped)."""

    unit = "conversations"

    def __init__(self, run: _Run):
        self.run = run
        self.resolved = run.chat_tokenizer.get("resolved")
        self.added_tokens = list(run.chat_tokenizer.get("added_tokens", ()))
        self.answers_located: dict[str, int] = {}  # how the answers were found, all splits

    def tokenizer(self, train_docs, rows: int, tmp: Path, warnings: list[str]):
        """Step 4: the tokenizer with its chat template, saved in ``tmp``."""
        from llmkit.data.sft import CHATML, end_of_turn_token, ensure_chat_template

        run = self.run
        template = run.chat["template"]
        tok = run.tok
        if tok is None:
            from llmkit.core.tokenizer import train_bpe_tokenizer

            total = len(train_docs)
            with run.report.task("train tokenizer (conversations)", total=total) as advance:

                def texts() -> Iterator[list[str]]:
                    for batch in train_docs.iter(batch_size=BATCH_DOCUMENTS):
                        yield [chat_training_text(json.loads(c)) for c in batch["text"]]
                        advance(len(batch["text"]))

                tok = train_bpe_tokenizer(
                    texts(),
                    run.settings.vocab_size,
                    length=total,
                    extra_special_tokens=CHATML.special_tokens,
                )
            self.resolved = ensure_chat_template(
                tok, CHATML.name if template == "auto" else template
            )
            run.report.log(
                f"trained a byte-level BPE tokenizer: {len(tok):,} tokens (with "
                f"{', '.join(CHATML.special_tokens)})"
            )
        else:
            run.report.log(f"tokenizer {run.settings.tokenizer}: {len(tok):,} tokens")
        tok.save_pretrained(str(tmp))  # with its chat_template: train and chat use the same one
        self.end_of_turn = end_of_turn_token(tok)
        train_on = run.chat["train_on"]
        run.report.log(
            f"chat template: {self.resolved}"
            + (" (the tokenizer's own)" if self.resolved == "tokenizer" else "")
            + f", end of turn {self.end_of_turn!r}, loss on "
            + ("the assistant's answers" if train_on == "assistant" else "every token")
        )
        warnings += chat_tokenizer_warnings(self.resolved, self.added_tokens, len(tok), run.cfg)
        return tok

    def encode_and_pack(self, tok, name, docs, n_bytes, rows, work, warnings):
        """Steps 5-6 for one split: ``(rows, the manifest's entry of the split)``."""
        from datasets import Features, List, Value

        run = self.run
        block_size, overlong = run.settings.block_size, run.chat["overlong"]
        with run.report.task(f"render and tokenize {name} (conversations)", total=len(docs)) as a:
            encoded = _encode_chat_split(
                docs,
                tok,
                train_on=run.chat["train_on"],
                num_proc=run.num_proc,
                n_bytes=n_bytes,
                name=name,
                advance=a,
                cache=work,
            )
        packer = SFTPacker(block_size, pad_token_id=tok.pad_token_id, overlong=overlong)
        skipped: dict[str, int] = {}
        first: list[str] = []
        located: dict[str, int] = {}
        features = Features(
            {k: List(Value("int32")) for k in ("input_ids", "labels", "position_ids")}
        )
        with run.report.task(f"pack {name} (conversations)", total=len(docs)) as a:
            packed = _from_generator(
                lambda: _sft_rows(
                    encoded,
                    packer,
                    on_error=run.settings.on_error,
                    skipped=skipped,
                    first=first,
                    advance=a,
                    located=located,
                ),
                features,
                work,
                f"chat-rows-{name}",
            )
        stats = packer.stats()
        written = stats["conversations"] - stats["dropped"] - stats["no_answer"]
        entry = {
            "documents": len(docs),
            "conversations": len(docs),
            "bytes": n_bytes,
            "tokens": stats["tokens"],
            "blocks": stats["rows"],
            "answer_tokens": stats["answer_tokens"],
            "conversations_written": written,
            "skipped": dict(sorted(skipped.items())),
            "answers_located": dict(sorted(located.items())),
            "packing": stats,
        }
        for rule, n in located.items():  # all splits together, for the manifest's chat section
            self.answers_located[rule] = self.answers_located.get(rule, 0) + n
        warnings += chat_split_warnings(
            name, stats, skipped, first[0] if first else None, block_size, overlong
        )
        if name == "train" and stats["rows"] == 0:
            raise no_training_conversation(stats, skipped, block_size, overlong)
        return packed, entry

    def describe(self, name: str, entry: dict) -> str:
        return (
            f"{name}: {entry['conversations_written']:,} conversations, {entry['tokens']:,} "
            f"tokens ({entry['answer_tokens']:,} trained) -> {entry['blocks']:,} rows of "
            f"{self.run.settings.block_size} ({entry['packing']['pad_tokens']:,} padding)"
        )

    def tokenizer_entry(self, tok) -> dict:
        return {
            **_tokenizer_basics(self.run.settings.tokenizer, tok),
            "pad_token_id": tok.pad_token_id,
            "chat_template": self.resolved,
            "end_of_turn": self.end_of_turn,
            "added_tokens": self.added_tokens,
        }

    def extra(self, info: dict) -> dict:
        return {
            "chat": chat_section(
                self.run.chat,
                self.resolved,
                self.end_of_turn,
                self.answers_located,
                info["inputs"],
            )
        }


def split_warnings(unit: str, val_fraction: float, n_validation: int) -> list[str]:
    """The manifest's warning of a split that left validation empty though asked for
    (``unit``: ``"document"`` or ``"conversation"``)."""
    if val_fraction > 0 and n_validation == 0:
        return [f"only one {unit}: the validation split is empty"]
    return []


def input_warnings(files: Sequence[InputFile]) -> list[str]:
    """The manifest's warning for each input with skipped lines or records (the first one)."""
    return [
        f"{f.path}: skipped {_fmt_counts(f.skipped)} (first: {f.first_error})"
        for f in files
        if f.skipped
    ]


def chat_tokenizer_warnings(
    resolved: str, added_tokens: Sequence[str], n_tokens: int, cfg: dict
) -> list[str]:
    """The manifest's warnings of a chat run's tokenizer step: a template's tokens added to a
    pretrained vocabulary (now ``n_tokens``); web filters turned on (``cfg``: the cleaning
    settings) that judge whole conversations."""
    from llmkit.data.config import WEB_FILTERS

    out = []
    if added_tokens:
        out.append(
            f"the {resolved} template's tokens {', '.join(added_tokens)} were "
            f"added to the vocabulary ({n_tokens:,} tokens now): the model's embeddings "
            f"grow by {len(added_tokens)} untrained rows (llmkit train resizes them)"
        )
    web = [name for name in WEB_FILTERS if cfg["filters"][name]["enabled"]]
    if web:
        out.append(
            f"{', '.join(web)} (written for web pages) judged whole conversations and may "
            "drop short chats; C4's line removal is not applied to conversations"
        )
    return out


def chat_split_warnings(
    name: str, stats: dict, skipped: dict, first: str | None, block_size: int, overlong: str
) -> list[str]:
    """The manifest's warnings of a packed chat split (``stats``: :meth:`llmkit.data.pack.
    SFTPacker.stats`): conversations skipped (by reason, ``first``: the first one's error),
    longer than ``block_size`` (truncated or dropped), left without an answer token."""
    out = []
    if skipped:
        out.append(f"{name}: skipped {_fmt_counts(skipped)} conversation(s) (first: {first})")
    if stats["truncated"] or stats["dropped"]:
        what = "truncated" if overlong == "truncate" else "dropped"
        out.append(
            f"{name}: {stats['truncated'] + stats['dropped']:,} conversation(s) longer than "
            f"--block-size {block_size} were {what}"
        )
    if stats["no_answer"]:
        out.append(
            f"{name}: {stats['no_answer']:,} conversation(s) left no answer token to train "
            "on and were not written"
        )
    return out


def no_training_conversation(
    stats: dict, skipped: dict, block_size: int, overlong: str
) -> UserError:
    """The error of a chat run whose training split packs into no row (``stats``:
    :meth:`llmkit.data.pack.SFTPacker.stats` of the split; ``skipped``: conversations skipped
    by reason)."""
    return UserError(
        f"no training conversation left to write ({stats['conversations']:,} packed: "
        f"{stats['dropped']:,} longer than --block-size {block_size}, "
        f"{stats['no_answer']:,} without an answer token"
        + (f"; skipped {_fmt_counts(skipped)}" if skipped else "")
        + ")",
        "raise --block-size"
        + (", use --overlong truncate" if overlong == "drop" else "")
        + ", or check the conversations",
    )


def chat_section(
    chat: dict, resolved: str, end_of_turn: str | None, answers_located: dict, inputs: list
) -> dict:
    """The manifest's ``chat`` section: the template as resolved, its end-of-turn token, the
    ``train_on`` and ``overlong`` rules (``chat``), how the answers were located (all splits)
    and the record formats read (summed over the ``inputs`` entries)."""
    formats: dict[str, int] = {}
    for entry in inputs:
        for fmt, n in (entry.get("chat_formats") or {}).items():
            formats[fmt] = formats.get(fmt, 0) + n
    return {
        "template": resolved,
        "end_of_turn": end_of_turn,
        "train_on": chat["train_on"],
        "answers_located": dict(sorted(answers_located.items())),
        "overlong": chat["overlong"],
        "columns": ["input_ids", "labels", "position_ids"],
        "cleaning": (
            "normalize and pii on each message's content; filters and de-duplication "
            "on the conversation as text ('role: content' per message); near-duplicate "
            "removal off unless asked (dedup.near)"
        ),
        "record_formats": dict(sorted(formats.items())),
    }


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(counts.items()))


def _drops(stage_stats: Sequence[StageStats]) -> str:
    parts = [f"{n:,} {reason}" for s in stage_stats for reason, n in sorted(s.dropped.items())]
    return "dropped: " + (", ".join(parts) if parts else "none")


def _print_summary(console, manifest: dict, output: Path, seconds: float) -> None:
    """The rich summary tables: stages (documents and bytes in -> out), splits."""
    from rich.table import Table

    stages = Table(title=f"llmkit prepare -> {output}  ({seconds:.1f} s)", title_justify="left")
    for col in ("stage", "documents in -> out", "bytes in -> out", "dropped"):
        stages.add_column(col, justify="left" if col in ("stage", "dropped") else "right")
    read = manifest["stages"]["read"]
    stages.add_row(
        "read",
        f"{read['files']} file(s) -> {read['documents_out']:,}",
        f"{read['bytes_in']:,} -> {read['bytes_out']:,}",
        "",
    )
    for name, st in manifest["stages"].items():
        if name == "read":
            continue
        dropped = ", ".join(f"{n:,} {r}" for r, n in st["dropped"].items()) or "-"
        stages.add_row(
            name,
            f"{st['documents_in']:,} -> {st['documents_out']:,}",
            f"{st['bytes_in']:,} -> {st['bytes_out']:,}",
            dropped,
        )
    splits = Table(title_justify="left")
    chat = manifest["settings"].get("format") == "chat"
    if chat:
        columns = ("split", "conversations", "tokens", "trained tokens", "rows", "padding")
    else:
        columns = ("split", "documents", "bytes", "tokens", "blocks", "tail tokens")
    for col in columns:
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, sp in manifest["splits"].items():
        if chat:
            cells = (
                sp["conversations_written"],
                sp["tokens"],
                sp["answer_tokens"],
                sp["blocks"],
                sp["packing"]["pad_tokens"],
            )
        else:
            cells = (sp["documents"], sp["bytes"], sp["tokens"], sp["blocks"], sp["tail_tokens"])
        splits.add_row(name, *(f"{n:,}" for n in cells))
    tk = manifest["tokenizer"]
    train = manifest["splits"]["train"]
    console.print(stages)
    console.print(splits)
    if chat:
        console.print(
            f"tokenizer: {tk['vocab_size']:,} tokens "
            f"({'trained' if tk['trained'] else tk['path']}), chat template "
            f"{tk['chat_template']}, loss on {manifest['settings']['train_on']} tokens, "
            f"block_size {manifest['settings']['block_size']}",
            highlight=False,
        )
        return
    console.print(
        f"tokenizer: {tk['vocab_size']:,} tokens ({'trained' if tk['trained'] else tk['path']}), "
        f"block_size {manifest['settings']['block_size']}, "
        f"{train['tokens'] / max(1, train['bytes']):.3f} tokens per byte (train)",
        highlight=False,
    )
