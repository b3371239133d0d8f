"""``llmkit prepare``: raw text files to tokenized, packed training blocks (SPEC §2).

The pipeline, each step a function over documents or batches that could run under another
executor (SPEC §8):

1. read (:mod:`llmkit.data.readers`): files, directories, globs or Hub datasets to a stream of
   documents, written as it comes to an arrow-backed ``datasets.Dataset`` (one process);
2. clean: the chain of stages of :mod:`llmkit.data.clean` configured by
   :mod:`llmkit.data.config` — normalize, the named filters (:mod:`llmkit.data.filters`),
   exact and near-duplicate removal (:mod:`llmkit.data.dedup`), PII redaction
   (:mod:`llmkit.data.pii`). The per-document work (every document stage, and the dedup
   keys: hashes and MinHash signatures) runs under ``Dataset.map`` on ``num_proc``
   processes (:func:`llmkit.data.clean.process_document`), each document becoming a row of
   columns (its text, sizes, drop reason, counts, keys); then one pass in document order
   admits or drops each document at the dedup stages and adds up the counts from the columns
   (:func:`llmkit.data.clean.admit_document`). So the result does not depend on
   ``num_proc``. The kept documents are saved as a dataset (never a Python list), and cached
   (:mod:`llmkit.data.cache`);
3. split: whole documents to train / validation, from ``seed`` (:func:`split_indices`);
4. tokenizer: a byte-level BPE trained on the train documents, or a pretrained one;
5. encode (:func:`encode_batch`): batched, one EOS after every document;
6. pack (:class:`llmkit.data.pack.Packer`): each split concatenated and cut into blocks.

Chat data (``format="chat"``, or detected: :func:`llmkit.data.readers.resolve_format`) takes
the same road with conversations instead of documents: read as records (``messages``,
``prompt``/``response``, Alpaca's ``instruction``/``output``) into their JSON list of messages
with their ``file:line``; cleaned by the same stages adapted to conversations
(:func:`llmkit.data.config.build_stages`); split by conversation; then rendered with a chat
template and labelled (:func:`encode_chat_batch`) and packed whole with
:class:`llmkit.data.pack.SFTPacker` (:func:`_build_chat`), so that each row carries
``input_ids``, ``labels`` and ``position_ids``.

The result is the layout of :mod:`llmkit.data.prepared`, built in a hidden temporary directory
next to the output and renamed into place only when complete.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np

from llmkit.data.cache import (
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
from llmkit.data.clean import (
    StageStats,
    admit_document,
    count_document,
    process_document,
    received_text,
)
from llmkit.data.pack import OVERLONG_RULES, Packer, SFTPacker
from llmkit.data.prepared import DATASET_DICT, MANIFEST, SPLITS, is_prepared
from llmkit.data.readers import (
    _GLOB_CHARS,
    DEFAULT_ENCODING,
    DEFAULT_MAX_DOCUMENT_BYTES,
    FORMATS,
    ON_ERROR,
    SPLIT_MODES,
    InputFile,
    _walk,
    discover_inputs,
    file_kind,
    read_conversations,
    read_documents,
    resolve_format,
)
from llmkit.data.sft import TRAIN_ON
from llmkit.errors import UserError

E = TypeVar("E", bound=BaseException)

#: Documents per batch in the encode and pack steps (memory holds one batch of documents).
BATCH_DOCUMENTS = 1000
#: Documents per batch in the clean step (a batch of whole books must fit in memory too).
BATCH_CLEAN = 100
#: Text (UTF-8 bytes) per batch in the tokenizer-training, encode and pack steps: a batch
#: holds at most BATCH_DOCUMENTS documents and, when they are long, only as many as fit in
#: this much text (at least one; :func:`batch_rows`). Encoding takes about 200 bytes per token
#: while a batch is in flight (the Rust encodings, then the ids as Python ints): measured here,
#: 16 MiB batches of 1 MiB documents peaked at 1.2 GB, so 4 MiB keeps it near 0.3 GB.
BATCH_BYTES = 4 << 20
#: Text (UTF-8 bytes) per worker process below which the clean step runs in fewer processes:
#: starting a pool and concatenating its shards (about 0.5 s here) costs more than it saves on
#: a small corpus (cleaning runs at 0.3-3 MB/s per core, depending on the filters).
PARALLEL_MIN_BYTES = 2 << 20
#: The same for the encode step, whose single process already encodes on every core (the
#: ``tokenizers`` Rust encoder is multi-threaded); worker processes only add the Python part.
PARALLEL_MIN_BYTES_ENCODE = 32 << 20
#: The smallest byte-level BPE vocabulary: 256 byte symbols and <|endoftext|>.
MIN_VOCAB_SIZE = 257
#: Upper bounds of --vocab-size and --block-size (larger values are mistakes that would only
#: fail deep inside the tokenizer trainer or ``datasets``).
MAX_VOCAB_SIZE = 2**24
MAX_BLOCK_SIZE = 2**20
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


# ---------------------------------------------------------------------------------------------
# Pure steps: split, encode.


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


def _encode_raw(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: the Rust encoder, without offsets
        encodings = backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def tokenizer_appends_eos(tokenizer) -> bool:
    """True when ``tokenizer`` itself ends an encoded text with its EOS token."""
    eos = tokenizer.eos_token_id
    with_special = _encode_raw(tokenizer, ["a"], True)[0]
    without = _encode_raw(tokenizer, ["a"], False)[0]
    return bool(with_special) and with_special[-1] == eos and (not without or without[-1] != eos)


def encode_batch(
    texts: list[str], tokenizer, *, eos_token_id: int, append_eos: bool = True
) -> list[list[int]]:
    """Token ids of each document, with exactly one EOS at its end.

    The tokenizer's own special tokens are added (a tokenizer that adds BOS gives one BOS per
    document); ``eos_token_id`` is appended when ``append_eos`` is true, which it must be
    unless the tokenizer already appends EOS itself (:func:`tokenizer_appends_eos`).

    Args:
        texts: a batch of documents.
        tokenizer: a ``transformers`` tokenizer (the fast Rust encoder is used when present).
        eos_token_id: the id that ends each document.
        append_eos: append ``eos_token_id`` to each document.

    Returns:
        One list of token ids per document.
    """
    ids = _encode_raw(tokenizer, texts, True)
    if append_eos:
        for row in ids:
            row.append(eos_token_id)
    return ids


def _encode_for_map(batch: dict, tokenizer, eos_token_id: int, append_eos: bool) -> dict:
    """``datasets.map`` form of :func:`encode_batch` (top level, so that it pickles)."""
    ids = encode_batch(batch["text"], tokenizer, eos_token_id=eos_token_id, append_eos=append_eos)
    return {"input_ids": ids}


# ---------------------------------------------------------------------------------------------
# Output directory: built under a temporary name, renamed into place.


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
        listed = json.loads((output / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list) and all(isinstance(x, str) for x in listed):
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


def _remove_stale_temporaries(output: Path) -> None:
    """Delete ``.NAME.tmp-PID-*`` directories left by a killed run whose process is gone."""
    for tmp in output.parent.glob(f".{glob.escape(output.name)}.tmp-*-*"):
        try:
            pid = int(tmp.name[len(f".{output.name}.tmp-") :].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive under another user, or cannot tell: leave it
            continue


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename ``tmp`` to ``output``; an existing ``output`` is renamed aside, then deleted."""
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        os.rename(tmp, output)
        return
    old = output.parent / f".{output.name}.old-{secrets.token_hex(4)}"
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


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


def _validate_settings(
    *,
    vocab_size: int,
    tokenizer: str | None,
    block_size: int,
    val_fraction: float,
    split_on: str,
    text_field: str,
    num_proc: int | None,
    on_error: str = "fail",
    seed: int = 0,
    format: str = "auto",
    chat_template: str = "auto",
    train_on: str = "assistant",
    overlong: str = "truncate",
) -> None:
    from llmkit.data.sft import CHAT_TEMPLATES, OWN_TEMPLATE

    if format not in FORMATS:
        raise UserError(f"--format {format!r} is not one of: {', '.join(FORMATS)}")
    templates = ("auto", OWN_TEMPLATE, *CHAT_TEMPLATES)
    if chat_template not in templates:
        raise UserError(f"--chat-template {chat_template!r} is not one of: {', '.join(templates)}")
    if train_on not in TRAIN_ON:
        raise UserError(f"--train-on {train_on!r} is not one of: {', '.join(TRAIN_ON)}")
    if overlong not in OVERLONG_RULES:
        raise UserError(f"--overlong {overlong!r} is not one of: {', '.join(OVERLONG_RULES)}")
    if on_error not in ON_ERROR:
        raise UserError(f"--on-error {on_error!r} is not one of: {', '.join(ON_ERROR)}")
    if tokenizer is None and vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is too small",
            f"a byte-level BPE needs 256 byte symbols plus <|endoftext|>: use at least "
            f"{MIN_VOCAB_SIZE}",
        )
    if tokenizer is None and vocab_size > MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is too large",
            f"use at most {MAX_VOCAB_SIZE:,} (2**24); 1024-65536 is usual",
        )
    if block_size < 2:
        raise UserError(
            f"--block-size {block_size} is too small",
            "a block needs at least 2 tokens (one input and its next-token target)",
        )
    if block_size > MAX_BLOCK_SIZE:
        raise UserError(
            f"--block-size {block_size} is too large",
            f"use at most {MAX_BLOCK_SIZE:,} (2**20) tokens per block",
        )
    if not 0 <= val_fraction < 1:
        raise UserError(
            f"--val-fraction {val_fraction} is outside [0, 1)",
            "give the share of documents held out for validation, e.g. 0.1",
        )
    if split_on not in SPLIT_MODES:
        raise UserError(f"--split-on {split_on!r} is not one of: {', '.join(SPLIT_MODES)}")
    if not text_field:
        raise UserError("--text-field is empty", "name the JSON field holding the text")
    if num_proc is not None and num_proc < 1:
        raise UserError(
            f"--num-proc {num_proc} must be at least 1",
            f"give 1 to {default_num_proc()} worker processes, or leave it out to use every "
            f"usable core ({default_num_proc()} here)",
        )
    if seed < 0:
        raise UserError(f"--seed {seed} is negative", "give a seed of 0 or more")


#: Document-length histogram: bin edges in UTF-8 bytes, powers of 2 from 1 B to 1 GiB.
LENGTH_BINS = np.array([0] + [2**k for k in range(31)], dtype=np.int64)


class LengthHistogram:
    """Counts of document lengths (UTF-8 bytes) in :data:`LENGTH_BINS`; constant memory."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(LENGTH_BINS), dtype=np.int64)

    def add(self, n_bytes: int) -> None:
        self.counts[int(np.searchsorted(LENGTH_BINS, n_bytes, side="right")) - 1] += 1

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
            advance(size if source.kind != "hub" else 1)
            yield {"text": text, "where": url} if urls else {"text": text}


#: Documents done per worker rank of the running clean map, shared with forked workers (a
#: ``multiprocessing`` RawArray, one slot per rank, so no lock is needed); None when none runs.
#: Under a start method other than fork the workers do not see it, and the bar jumps at the end.
_PROGRESS = None


def _clean_columns(stages: Sequence, keep_text: bool) -> list[str]:
    """The columns :func:`_clean_batch` writes (a chat run's ``where`` passes through)."""
    cols = ["text", "n_bytes", "sizes", "drop_stage", "drop_reason", "counts"]
    corpus = [i for i, s in enumerate(stages) if not s.stateless]
    cols += [f"key_{i}" for i in corpus]
    if keep_text:
        cols += ["dropped_text"] + [f"text_{i}" for i in corpus]
    return cols


def _clean_features(stages: Sequence, keep_text: bool, chat: bool = False):
    from datasets import Features, List, Value

    features = {
        **({"where": Value("string")} if chat else {}),
        "text": Value("string"),
        "n_bytes": Value("int64"),
        "sizes": List(Value("int64")),
        "drop_stage": Value("int32"),
        "drop_reason": Value("string"),
        "counts": Value("string"),
    }
    for i, stage in enumerate(stages):
        if not stage.stateless:
            features[f"key_{i}"] = stage.key_feature()
    if keep_text:
        features["dropped_text"] = Value("string")
        for i, stage in enumerate(stages):
            if not stage.stateless:
                features[f"text_{i}"] = Value("string")
    return Features(features)


def _clean_batch(batch: dict, rank: int | None, *, stages, keep_text: bool, columns) -> dict:
    """``datasets.map`` form of :func:`llmkit.data.clean.process_document` (top level, so
    that it pickles by reference into the worker processes)."""
    rows = [process_document(text, stages, keep_text=keep_text) for text in batch["text"]]
    if _PROGRESS is not None:
        _PROGRESS[rank or 0] += len(rows)
    return {c: [row.get(c) for row in rows] for c in columns}


@contextmanager
def _worker_progress(advance: Callable, ranks: int) -> Iterator[None]:
    """Advance a progress bar from the documents the map's workers report in
    :data:`_PROGRESS` (polled by a thread every 0.2 s)."""
    global _PROGRESS
    from multiprocessing.sharedctypes import RawArray

    _PROGRESS = RawArray("q", ranks)
    slots = _PROGRESS
    stop = threading.Event()
    done = 0

    def poll() -> None:
        nonlocal done
        while not stop.wait(0.2):
            now = sum(slots)
            if now > done:
                advance(now - done)
                done = now

    thread = threading.Thread(target=poll, name="llmkit-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if sum(slots) > done:
            advance(sum(slots) - done)
        _PROGRESS = None


def _clean_map(raw, stages: list, *, keep_text: bool, procs: int, work: Path, advance):
    """Every document through :func:`process_document`, on ``procs`` processes (a chat run's
    ``where`` column is kept as it is)."""
    columns = _clean_columns(stages, keep_text)
    chat = "where" in raw.column_names
    kwargs = dict(
        batched=True,
        batch_size=BATCH_CLEAN,
        writer_batch_size=BATCH_CLEAN,
        with_rank=True,
        remove_columns=[c for c in raw.column_names if c != "where"],
        features=_clean_features(stages, keep_text, chat),
        fn_kwargs={"stages": stages, "keep_text": keep_text, "columns": columns},
        cache_file_name=str(work / "cleaned.arrow"),
        new_fingerprint="llmkit-cleaned",
        num_proc=procs if procs > 1 else None,
    )
    with _worker_progress(advance, procs):
        return raw.map(_clean_batch, **kwargs)


def _read_and_clean(
    files: list[InputFile],
    *,
    work: Path,
    report: _Report,
    split_on: str,
    text_field: str,
    on_error: str,
    cfg: dict,
    keep_dropped: bool,
    dropped_path: Path | None,
    num_proc: int,
    documents_dir: Path,
    kind: str = "text",
    encoding: str = DEFAULT_ENCODING,
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES,
) -> tuple[object, dict]:
    """Steps 1-2: read ``files``, clean the documents, save the kept ones at
    ``documents_dir``; returns them (memory-mapped) and the counts of both steps.

    ``work`` holds the intermediate arrow files. With ``keep_dropped`` each dropped document
    is written to ``dropped_path`` (JSON lines: stage, reason, text as the stage received it),
    in document order; a dropped conversation (``kind="chat"``) as its ``where``
    (``file:line``) and ``messages`` as the stage received them.
    """
    from datasets import Features, Value, load_from_disk

    from llmkit.data.boilerplate import strip_gutenberg
    from llmkit.data.config import build_stages

    chat = kind == "chat"
    stages = build_stages(cfg, kind)
    read_stats = {
        "files": len(files),
        "bytes_in": sum(f.size_bytes for f in files),
        "documents_out": 0,
        "bytes_out": 0,
    }
    hub = any(f.kind == "hub" for f in files)
    web = any(f.kind == "warc" for f in files)  # documents carry their URL ("where")
    with report.task(
        "read (documents)" if hub else "read (bytes)",
        total=None if hub else read_stats["bytes_in"],
    ) as advance:
        raw = _from_generator(
            lambda: _read_rows(
                files,
                kind=kind,
                split_on=split_on,
                text_field=text_field,
                on_error=on_error,
                line_filter=strip_gutenberg if cfg["gutenberg"] else None,
                read_stats=read_stats,
                advance=advance,
                encoding=encoding,
                max_document_bytes=max_document_bytes,
            ),
            Features(
                {
                    "text": Value("string"),
                    **({"where": Value("string")} if chat or web else {}),
                }
            ),
            work,
            "documents",
        )
    skipped: dict = {}
    for f in files:
        for reason, n in f.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    read_stats["skipped"] = dict(sorted(skipped.items()))
    split = sum(f.documents_split for f in files)
    if split:
        read_stats["documents_split"] = split
        read_stats["pieces"] = sum(f.pieces for f in files)
    records: dict = {}
    for f in files:
        for reason, n in f.records_skipped.items():
            records[reason] = records.get(reason, 0) + n
    if records:
        read_stats["records_skipped"] = dict(sorted(records.items()))
    stats = [StageStats.of(s) for s in stages]

    def nothing_left() -> UserError:
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

    if len(raw) == 0:
        raise nothing_left()

    procs = _procs_for(num_proc, read_stats["bytes_out"], len(raw))
    names = ", ".join(s.name for s in stages)
    with report.task(f"clean: {names} (documents)", total=len(raw)) as advance:
        cleaned = _clean_map(
            raw, stages, keep_text=keep_dropped, procs=procs, work=work, advance=advance
        )

    # In document order: admit at the dedup stages, add up the counts, write the dropped.
    histograms = {"read": LengthHistogram(), "kept": LengthHistogram()}
    kept = np.zeros(len(cleaned), dtype=bool)
    columns = [c for c in cleaned.column_names if keep_dropped or c != "text"]
    dropped_file = open(dropped_path, "w", encoding="utf-8") if keep_dropped else None
    try:
        with report.task("deduplicate and count (documents)", total=len(cleaned)) as advance:
            start = 0
            for batch in cleaned.select_columns(columns).iter(batch_size=BATCH_DOCUMENTS):
                n = len(batch["sizes"])
                for j in range(n):
                    row = {c: batch[c][j] for c in columns}
                    histograms["read"].add(row["sizes"][0])
                    stop, reason, corpus_counts = admit_document(row, stages)
                    count_document(row, stop, reason, corpus_counts, stats)
                    if stop == len(stages):
                        kept[start + j] = True
                        histograms["kept"].add(row["n_bytes"])
                    elif dropped_file is not None:
                        record = {"stage": stages[stop].name, "reason": reason}
                        if chat:
                            record["where"] = row["where"]
                            record["messages"] = json.loads(received_text(row, stop))
                        else:
                            if row.get("where"):
                                record["url"] = row["where"]
                            record["text"] = received_text(row, stop)
                        dropped_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                start += n
                advance(n)
    finally:
        if dropped_file is not None:
            dropped_file.close()
    n_kept = int(kept.sum())
    if n_kept == 0:
        raise nothing_left()
    with report.task("save the cleaned documents"):
        docs = cleaned.select(
            np.flatnonzero(kept), indices_cache_file_name=str(work / "kept-indices.arrow")
        ).select_columns(["text", "n_bytes", *(["where"] if chat else [])])
        docs.save_to_disk(str(documents_dir))
    del raw, cleaned, docs
    summary = (
        f"read {len(files)} {'input(s)' if hub else 'file(s)'}, {read_stats['bytes_in']:,} "
        f"bytes: {read_stats['documents_out']:,} {'conversations' if chat else 'documents'}, "
        f"{n_kept:,} kept ({_drops(stats)})"
        + (f"; skipped input lines: {_fmt_counts(skipped)}" if skipped else "")
        + (
            f"; {split:,} document(s) over {max_document_bytes:,} bytes cut into "
            f"{read_stats['pieces']:,} pieces"
            if split
            else ""
        )
    )
    report.log(f"{summary}; cleaned in {procs} process{'es' if procs > 1 else ''}")
    info = {
        "inputs": [f.as_dict() for f in files],
        "stages": {"read": read_stats, **{st.name: st.as_dict() for st in stats}},
        "length_histogram": {
            "bin_edges_bytes": LENGTH_BINS.tolist(),
            "read": histograms["read"].as_list(),
            "kept": histograms["kept"].as_list(),
        },
        "warnings": [
            f"{f.path}: skipped {_fmt_counts(f.skipped)} (first: {f.first_error})"
            for f in files
            if f.skipped
        ],
        "summary": summary,
        "documents": n_kept,
    }
    return load_from_disk(str(documents_dir)), info


def _block_rows(
    encoded, packer: Packer, advance: Callable, batch_size: int = BATCH_DOCUMENTS
) -> Iterator[dict]:
    """Rows ``{"input_ids"}`` of full blocks of an encoded split (documents in order)."""
    import pyarrow.compute as pc

    for table in encoded.with_format("arrow").iter(batch_size=batch_size):
        flat = pc.list_flatten(table.column("input_ids")).to_numpy()
        for block in packer.add_tokens(flat):
            yield {"input_ids": block}
        advance(table.num_rows)


@contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=false`` for the duration (restored after): set before forking
    worker processes, each with a pickled tokenizer running one thread, so that `tokenizers`
    does not warn about a fork after its thread pool started."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def batch_rows(max_document_bytes: int) -> int:
    """Documents per batch when the longest is ``max_document_bytes`` long:
    :data:`BATCH_DOCUMENTS`, or fewer so that a batch holds about :data:`BATCH_BYTES` of text
    at most (never fewer than 1)."""
    return max(1, min(BATCH_DOCUMENTS, BATCH_BYTES // max(1, int(max_document_bytes))))


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
# Chat data: tokenizer text, encode with labels, pack whole conversations.


def chat_training_text(messages: Sequence[dict[str, str]]) -> str:
    """What a byte-level BPE trained for chat data learns from one conversation: each message
    as ``role\n content\n`` — the text ChatML writes between its marker tokens (which are
    special tokens of the tokenizer, never merged with text)."""
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def _render_reason(message: str) -> str:
    """The manifest's reason for a conversation the chat template could not render."""
    if "special token" in message:
        return "special token in text"
    if "refused" in message:
        return "template refused"
    if "consistently" in message or "cannot be located" in message:
        return "template inconsistent"
    if "starts with an assistant" in message:
        return "assistant first"
    return "render failed"


def encode_chat_batch(
    conversations: Sequence[str], wheres: Sequence[str], tokenizer, *, train_on: str
) -> dict[str, list]:
    """Render and tokenize a batch of conversations with their labels (the encode step).

    Each conversation (its JSON list of messages) is rendered with the tokenizer's chat
    template and its trained character spans found (:func:`llmkit.data.sft.answer_spans`, one
    at a time, so that one bad conversation does not stop the others); the renderings are then
    tokenized in one batched call (:func:`llmkit.data.sft.tokenize_with_labels`).

    Args:
        conversations: N conversations, each a JSON list of ``{"role", "content"}``.
        wheres: their places (``file:line``) for error messages.
        tokenizer: a fast tokenizer with a chat template.
        train_on: ``"assistant"`` (labels on the answers and their end-of-turn token only) or
            ``"all"``.

    Returns:
        Columns of N rows: ``input_ids`` and ``labels`` (lists of ints of equal length; empty
        for a conversation that failed), ``error`` and ``hint`` (None, or the UserError's
        message and hint of a conversation that failed to render), ``located`` (JSON of how
        its answers were found, ``{rule: count}``, :data:`llmkit.data.sft.LOCATE_RULES`).
    """
    from llmkit.data.sft import answer_spans, tokenize_with_labels

    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    errors: list[str | None] = []
    hints: list[str | None] = []
    located: list[str | None] = []
    for conversation, where in zip(conversations, wheres, strict=True):
        counts: dict[str, int] = {}
        try:
            text, found = answer_spans(
                tokenizer, json.loads(conversation), train_on=train_on, where=where, located=counts
            )
        except UserError as err:
            errors.append(err.message)
            hints.append(err.hint)
            located.append(None)
            continue
        located.append(json.dumps(counts))
        texts.append(text)
        spans.append(found)
        errors.append(None)
        hints.append(None)
    ids, labels = tokenize_with_labels(tokenizer, texts, spans)
    encoded = iter(zip(ids, labels, strict=True))
    out_ids: list[list[int]] = []
    out_labels: list[list[int]] = []
    for error in errors:
        row_ids, row_labels = ([], []) if error is not None else next(encoded)
        out_ids.append(row_ids)
        out_labels.append(row_labels)
    return {
        "input_ids": out_ids,
        "labels": out_labels,
        "error": errors,
        "hint": hints,
        "located": located,
    }


def _encode_chat_for_map(batch: dict, tokenizer, train_on: str) -> dict:
    """``datasets.map`` form of :func:`encode_chat_batch` (top level, so that it pickles)."""
    return encode_chat_batch(batch["text"], batch["where"], tokenizer, train_on=train_on)


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


def _sft_rows(
    encoded,
    packer: SFTPacker,
    *,
    on_error: str,
    skipped: dict,
    first: list,
    advance,
    located: dict | None = None,
) -> Iterator[dict]:
    """Rows ``{"input_ids", "labels", "position_ids"}`` of the packed conversations of an
    encoded split, in order. A conversation that failed to render stops the run
    (``on_error="fail"``: the first one in order, so the error does not depend on
    ``num_proc``) or is counted in ``skipped`` by reason (``"skip"``; its message in
    ``first`` when it is the first). How the answers were located is summed into
    ``located``."""

    def rows_of(block: dict) -> Iterator[dict]:
        for i in range(len(block["input_ids"])):
            yield {k: block[k][i] for k in ("input_ids", "labels", "position_ids")}

    for batch in encoded.iter(batch_size=BATCH_DOCUMENTS):
        conversations = []
        for ids, labels, error, hint in zip(
            batch["input_ids"], batch["labels"], batch["error"], batch["hint"], strict=True
        ):
            if error is not None:
                if on_error != "skip":
                    raise UserError(error, hint)
                reason = _render_reason(error)
                skipped[reason] = skipped.get(reason, 0) + 1
                if not first:
                    first.append(error)
                continue
            conversations.append((ids, labels))
        for counts in batch["located"] if located is not None else ():
            for rule, n in json.loads(counts or "{}").items():
                located[rule] = located.get(rule, 0) + n
        yield from rows_of(packer.add(conversations))
        advance(len(batch["error"]))
    yield from rows_of(packer.flush())


def _build_chat(
    split_docs: dict,
    split_bytes: dict,
    tmp: Path,
    report: _Report,
    *,
    tok,
    vocab_size: int,
    tokenizer_path: str | None,
    block_size: int,
    num_proc: int,
    on_error: str,
    cfg: dict,
    warnings: list[str],
    template: str,
    train_on: str,
    overlong: str,
    resolved: str | None = None,
    added_tokens: Sequence[str] = (),
) -> dict:
    """Steps 4–6 for chat data; returns the manifest's ``splits``, ``tokenizer``, ``chat`` and
    ``warnings``.

    4. tokenizer: a byte-level BPE trained on the train conversations
       (:func:`chat_training_text`) holding ChatML's marker tokens, with the ChatML template;
       or the pretrained ``tok``, whose template :func:`prepare` already chose (``resolved``,
       and the marker tokens it had to add, ``added_tokens``). Saved with its template.
    5. encode: :func:`encode_chat_batch`, labels on the answers (``train_on``).
    6. pack: :class:`llmkit.data.pack.SFTPacker` per split, whole conversations per row,
       ``overlong`` ones truncated or dropped.
    """
    from datasets import Features, List, Value

    from llmkit.data.config import WEB_FILTERS
    from llmkit.data.sft import CHATML, end_of_turn_token, ensure_chat_template

    work = tmp / ".cache"
    if tok is None:
        from llmkit.data.tokenizer import train_bpe_tokenizer

        train_docs = split_docs["train"]
        with report.task("train tokenizer (conversations)", total=len(train_docs)) as advance:

            def texts() -> Iterator[list[str]]:
                for batch in train_docs.iter(batch_size=BATCH_DOCUMENTS):
                    yield [chat_training_text(json.loads(c)) for c in batch["text"]]
                    advance(len(batch["text"]))

            tok = train_bpe_tokenizer(
                texts(),
                vocab_size,
                length=len(train_docs),
                extra_special_tokens=CHATML.special_tokens,
            )
        resolved = ensure_chat_template(tok, CHATML.name if template == "auto" else template)
        report.log(
            f"trained a byte-level BPE tokenizer: {len(tok):,} tokens (with "
            f"{', '.join(CHATML.special_tokens)})"
        )
    else:
        report.log(f"tokenizer {tokenizer_path}: {len(tok):,} tokens")
        if added_tokens:
            warnings.append(
                f"the {resolved} template's tokens {', '.join(added_tokens)} were added to the "
                f"vocabulary ({len(tok):,} tokens now): the model's embeddings grow by "
                f"{len(added_tokens)} untrained rows (llmkit train resizes them)"
            )
    tok.save_pretrained(str(tmp))  # with its chat_template: train and chat use the same one
    end_of_turn = end_of_turn_token(tok)
    report.log(
        f"chat template: {resolved}"
        + (" (the tokenizer's own)" if resolved == "tokenizer" else "")
        + f", end of turn {end_of_turn!r}, loss on "
        + ("the assistant's answers" if train_on == "assistant" else "every token")
    )
    web = [name for name in WEB_FILTERS if cfg["filters"][name]["enabled"]]
    if web:
        warnings.append(
            f"{', '.join(web)} (written for web pages) judged whole conversations and may drop "
            "short chats; C4's line removal is not applied to conversations"
        )

    features = Features({k: List(Value("int32")) for k in ("input_ids", "labels", "position_ids")})
    splits: dict[str, dict] = {}
    for name in SPLITS:
        sdocs = split_docs[name]
        with report.task(f"render and tokenize {name} (conversations)", total=len(sdocs)) as adv:
            encoded = _encode_chat_split(
                sdocs,
                tok,
                train_on=train_on,
                num_proc=num_proc,
                n_bytes=split_bytes[name],
                name=name,
                advance=adv,
                cache=work,
            )
        packer = SFTPacker(block_size, pad_token_id=tok.pad_token_id, overlong=overlong)
        skipped: dict[str, int] = {}
        first: list[str] = []
        located: dict[str, int] = {}
        with report.task(f"pack {name} (conversations)", total=len(sdocs)) as adv:
            rows = _from_generator(
                lambda enc=encoded, p=packer, sk=skipped, fi=first, a=adv, lo=located: _sft_rows(
                    enc, p, on_error=on_error, skipped=sk, first=fi, advance=a, located=lo
                ),
                features,
                work,
                f"chat-rows-{name}",
            )
        stats = packer.stats()
        written = stats["conversations"] - stats["dropped"] - stats["no_answer"]
        splits[name] = {
            "documents": len(sdocs),
            "conversations": len(sdocs),
            "bytes": split_bytes[name],
            "tokens": stats["tokens"],
            "blocks": stats["rows"],
            "answer_tokens": stats["answer_tokens"],
            "conversations_written": written,
            "skipped": dict(sorted(skipped.items())),
            "answers_located": dict(sorted(located.items())),
            "packing": stats,
        }
        if skipped:
            warnings.append(
                f"{name}: skipped {_fmt_counts(skipped)} conversation(s) (first: {first[0]})"
            )
        if stats["truncated"] or stats["dropped"]:
            what = "truncated" if overlong == "truncate" else "dropped"
            warnings.append(
                f"{name}: {stats['truncated'] + stats['dropped']:,} conversation(s) longer than "
                f"--block-size {block_size} were {what}"
            )
        if stats["no_answer"]:
            warnings.append(
                f"{name}: {stats['no_answer']:,} conversation(s) left no answer token to train "
                "on and were not written"
            )
        if name == "train" and stats["rows"] == 0:
            raise UserError(
                f"no training conversation left to write ({stats['conversations']:,} packed: "
                f"{stats['dropped']:,} longer than --block-size {block_size}, "
                f"{stats['no_answer']:,} without an answer token"
                + (f"; skipped {_fmt_counts(skipped)}" if skipped else "")
                + ")",
                "raise --block-size"
                + (", use --overlong truncate" if overlong == "drop" else "")
                + ", or check the conversations",
            )
        rows.save_to_disk(str(tmp / name), num_shards=1 if len(rows) == 0 else None)
        report.log(
            f"{name}: {written:,} conversations, {stats['tokens']:,} tokens "
            f"({stats['answer_tokens']:,} trained) -> {stats['rows']:,} rows of {block_size} "
            f"({stats['pad_tokens']:,} padding)"
        )
        del encoded, rows
    for warning in warnings:
        report.log(f"[yellow]warning:[/yellow] {warning}")
    return {
        "splits": splits,
        "tokenizer": {
            "trained": tokenizer_path is None,
            "path": tokenizer_path,
            "type": "byte-level BPE" if tokenizer_path is None else type(tok).__name__,
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id,
            "chat_template": resolved,
            "end_of_turn": end_of_turn,
            "added_tokens": list(added_tokens),
        },
        "chat": {
            "template": resolved,
            "end_of_turn": end_of_turn,
            "train_on": train_on,
            "answers_located": {  # all splits together
                rule: sum(s["answers_located"].get(rule, 0) for s in splits.values())
                for rule in sorted({r for s in splits.values() for r in s["answers_located"]})
            },
            "overlong": overlong,
            "columns": ["input_ids", "labels", "position_ids"],
            "cleaning": (
                "normalize and pii on each message's content; filters and de-duplication on "
                "the conversation as text ('role: content' per message); near-duplicate "
                "removal off unless asked (dedup.near)"
            ),
        },
        "warnings": warnings,
    }


def load_pretrained_tokenizer(name: str, *, trust_remote_code: bool = False):
    """A pretrained tokenizer: a directory (or Hub id, online) as
    :func:`llmkit.data.tokenizer.load_tokenizer`, or a ``.gguf`` model file.

    A ``.gguf`` file's tokenizer is taken from the directory where
    :mod:`llmkit.generation.loading` cached its conversion (:func:`llmkit.data.cache.
    gguf_cache_dir`) when there is one, else read from the GGUF's metadata by transformers
    (``gguf_file=``; about 20 s for SmolLM2's 49k-token vocabulary here).

    ``trust_remote_code``: see :func:`llmkit.data.tokenizer.load_tokenizer` (False: a
    tokenizer that needs its own Python code is refused, never run).

    Raises:
        UserError: nothing loadable at ``name``; a ``.gguf`` without the gguf package; a
            tokenizer that needs its own code without ``trust_remote_code``.
    """
    import importlib.util

    from llmkit.data.cache import gguf_cache_dir
    from llmkit.data.tokenizer import load_tokenizer

    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        cached = gguf_cache_dir(path)
        if cached is not None and (cached / "tokenizer.json").is_file():
            return load_tokenizer(cached, trust_remote_code=trust_remote_code)
        if importlib.util.find_spec("gguf") is None:
            raise UserError(
                f"{name} is a GGUF file and the gguf package is not installed",
                "pip install 'llmkit[gguf]' (or pip install gguf)",
            )
        return load_tokenizer(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    return load_tokenizer(name, trust_remote_code=trust_remote_code)


def _chat_tokenizer(tok, template: str, name: str) -> dict:
    """Give a pretrained tokenizer its chat template (:func:`llmkit.data.sft.
    ensure_chat_template`) before anything is read; returns ``{"resolved", "added_tokens"}``.

    Raises:
        UserError: a slow tokenizer (no character offsets to place the labels); the template
            asked for cannot be had.
    """
    from llmkit.data.sft import ensure_chat_template

    if not getattr(tok, "is_fast", False):
        raise UserError(
            f"the tokenizer at {name} is a slow (Python) tokenizer: chat data needs a fast one",
            "use a tokenizer directory that holds tokenizer.json",
        )
    before = set(tok.get_vocab())
    resolved = ensure_chat_template(tok, template)
    added = sorted(set(tok.get_vocab()) - before)
    return {"resolved": resolved, "added_tokens": added}


def _ignored_options(
    kind: str,
    requested: str,
    *,
    text_field: str | None,
    chat_flags: Sequence[str],
    encoding: str,
    kinds: Sequence[str] = (),
) -> list[str]:
    """One warning line for each option given that does not apply to the data as read
    (``kind``, ``"text"`` or ``"chat"``; ``requested``: the ``--format`` given)."""
    how = "--format chat" if requested == "chat" else "detected: their first records are"
    out = []
    if kind == "chat":
        if text_field is not None:
            out.append(
                f"--text-field {text_field} is ignored: the inputs are read as conversations "
                f"({how} chat records), whose text is in their messages (pass --format text "
                "to read that field as documents)"
            )
        if encoding != DEFAULT_ENCODING:
            out.append(f"--encoding {encoding} is ignored: chat records are read as JSON in UTF-8")
    elif encoding != DEFAULT_ENCODING and not {"text", "jsonl", "csv"} & set(kinds):
        out.append(
            f"--encoding {encoding} is ignored: it applies to text, JSON-lines and CSV files, "
            "and parquet files, Hub datasets and web archives declare their own"
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
    """The fingerprint of what decides the cleaned documents (see :mod:`llmkit.data.cache`)."""
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
        manifest = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or (manifest.get("fingerprint") or {}).get("full") != full:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, str) and (output / f).is_file() for f in files
    ):
        return None
    return manifest


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
    config: str | Path | dict | None = None,
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

    Writes the layout of :mod:`llmkit.data.prepared` at ``output``: ``manifest.json``, the
    tokenizer, and ``train/`` and ``validation/`` datasets whose rows are ``block_size`` int32
    token ids. Everything is built in a hidden directory next to ``output`` and renamed into
    place at the end; on any error nothing at ``output`` changes.

    With ``cache`` (the default), a run whose ``output`` already holds a manifest with the same
    fingerprint (same input bytes, settings and llmkit version; :mod:`llmkit.data.cache`) does
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
        config: a ``prepare.yaml`` (path) or a dict of cleaning settings
            (:mod:`llmkit.data.config`): normalization, Gutenberg stripping, filters,
            deduplication, PII.
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
            :mod:`llmkit.data.prepared`).
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
    from rich.console import Console

    from llmkit import __version__

    started = time.perf_counter()
    console = console if console is not None else Console(stderr=True)
    from llmkit.data.readers import check_max_document_bytes

    chat_flags = {
        "--chat-template": chat_template,
        "--train-on": train_on,
        "--overlong": overlong,
    }
    chat_flags_given = [name for name, value in chat_flags.items() if value is not None]
    text_field_given = text_field is not None
    text_field = "text" if text_field is None else text_field
    chat_template = "auto" if chat_template is None else chat_template
    train_on = "assistant" if train_on is None else train_on
    overlong = "truncate" if overlong is None else overlong
    check_max_document_bytes(max_document_bytes)
    if encoding != "auto":
        from llmkit.data.readers import _codec_name

        _codec_name(encoding)  # an unknown encoding fails before anything is read
    _validate_settings(
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        block_size=block_size,
        val_fraction=val_fraction,
        split_on=split_on,
        text_field=text_field,
        num_proc=num_proc,
        on_error=on_error,
        seed=seed,
        format=format,
        chat_template=chat_template,
        train_on=train_on,
        overlong=overlong,
    )
    if num_proc is None:
        num_proc = default_num_proc()
    from llmkit.data.config import default_config, load_config, merge, validate

    if isinstance(config, dict):
        cfg = merge(default_config(), config)
        cfg = merge(cfg, clean or {})
        validate(cfg)
    else:
        cfg = load_config(config, clean)
    output = Path(os.path.abspath(output))
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    try:
        _check_inputs_outside_output(inputs, output)
    except OSError as err:
        raise _output_error(err, output, None, "cannot read") from None
    files = discover_inputs(inputs, exclude=[output], hub_split=hub_split)
    kind = resolve_format(files, format, text_field)
    early_warnings = _ignored_options(
        kind,
        format,
        text_field=text_field if text_field_given else None,
        chat_flags=chat_flags_given,
        encoding=encoding,
        kinds=[f.kind for f in files],
    )
    chat = None
    if kind == "chat":
        chat = {"template": chat_template, "train_on": train_on, "overlong": overlong}
        if isinstance(config, dict):
            cfg = merge(merge(default_config("chat"), config), clean or {})
            validate(cfg)
        else:
            cfg = load_config(config, clean, kind="chat")
        if tokenizer is None and chat_template == "tokenizer":
            raise UserError(
                "--chat-template tokenizer needs a pretrained tokenizer with its own template",
                "pass --tokenizer PATH (an instruct model's), or use --chat-template chatml",
            )
    report = _Report(console)
    for warning in early_warnings:
        report.log(f"[yellow]warning:[/yellow] {warning}")
    hub = any(f.kind == "hub" for f in files)
    cleaning_settings = dict(
        version=__version__,
        kind=kind,
        split_on=split_on if chat is None else None,
        text_field=text_field if chat is None else None,
        on_error=on_error,
        cfg=cfg,
        keep_dropped=keep_dropped,
        encoding=encoding if chat is None else DEFAULT_ENCODING,
        max_document_bytes=max_document_bytes if chat is None else None,
    )
    later_settings = dict(
        vocab_size=vocab_size if tokenizer is None else None,
        tokenizer=tokenizer_identity(tokenizer),
        block_size=block_size,
        val_fraction=val_fraction,
        seed=seed,
        plot=plot,
        chat=dict(chat) if chat is not None else None,  # the settings, not what is resolved
    )
    hashes: list[str] | None = None
    clean_cache: CleanCache | None = None
    if cache and not hub:
        max_cache_bytes()  # a bad LLMKIT_CACHE_MAX_GB fails before anything is read
        with report.progress:
            hashes = _hash_inputs(files, report)
        fp_clean = _cleaning_fingerprint(files, hashes, **cleaning_settings)
        fp_full = _full_fingerprint(fp_clean, **later_settings)
        done = _up_to_date(output, fp_full)
        if done is not None:
            report.log(
                f"{output} is up to date (same input bytes, settings and llmkit version, "
                f"fingerprint {fp_full[:12]}): nothing to do"
            )
            return done
        root = cache_root()
        problem = cache_problem(root) if root is not None else None
        if problem is not None:
            early_warnings.append(problem)
            report.log(f"[yellow]warning:[/yellow] {problem}")
        elif root is not None:
            clean_cache = CleanCache(root, fp_clean)
    try:
        _check_output(output, overwrite)
    except OSError as err:
        raise _output_error(err, output, None, "cannot read") from None
    tok = None
    if tokenizer is not None:  # fail before reading the corpus
        tok = load_pretrained_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        if chat is not None:
            chat.update(_chat_tokenizer(tok, chat_template, tokenizer))

    created_parents = _missing_parents(output)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output)
        tmp.mkdir()
    except OSError as err:
        _remove_dirs(created_parents)
        raise _output_error(err, output, tmp, "cannot create") from None
    try:
        with _quiet_datasets(), report.progress:
            manifest = _build(
                files,
                tmp,
                report,
                tok=tok,
                vocab_size=vocab_size,
                tokenizer_path=tokenizer,
                block_size=block_size,
                val_fraction=val_fraction,
                seed=seed,
                split_on=split_on,
                text_field=text_field,
                num_proc=num_proc,
                on_error=on_error,
                cfg=cfg,
                keep_dropped=keep_dropped,
                clean_cache=clean_cache,
                cache=cache,
                hashes=hashes,
                hub=hub,
                hub_split=hub_split,
                plot=plot,
                chat=chat,
                encoding=encoding,
                max_document_bytes=max_document_bytes,
            )
        if early_warnings:
            manifest["warnings"] = [*early_warnings, *manifest.get("warnings", [])]
        fingerprints = None
        read_hashes = [entry.get("sha256") for entry in manifest["inputs"]]
        if not hub and (hashes is None or read_hashes == hashes):
            fp_clean = _cleaning_fingerprint(files, read_hashes, **cleaning_settings)
            fingerprints = {
                "cleaning": fp_clean,
                "full": _full_fingerprint(fp_clean, **later_settings),
            }
        manifest = {
            "llmkit_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": fingerprints,
            **manifest,
        }
        # So that datasets.load_from_disk(OUTPUT) gives a DatasetDict (DatasetDict's format).
        (tmp / DATASET_DICT).write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
        if plot:
            from llmkit.data.report import plot_lengths

            plot_lengths(manifest["length_histogram"], tmp / "lengths.png")
        written = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
        manifest["files"] = sorted([*written, MANIFEST])
        manifest = json.loads(json.dumps(manifest))  # what a reader gets back (str keys)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, output)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created_parents)
        if not isinstance(err, (UserError, KeyboardInterrupt)):
            os_err = _os_error_in(err)
            if os_err is not None and _concerns_output(os_err, output, tmp):
                raise _output_error(os_err, output, tmp) from None
        raise
    _print_summary(console, manifest, output, time.perf_counter() - started)
    return manifest


def _cleaned_documents(
    files: list[InputFile],
    tmp: Path,
    report: _Report,
    *,
    clean_cache: CleanCache | None,
    cache: bool,
    hashes: list[str] | None,
    hub: bool,
    keep_dropped: bool,
    **read_and_clean,
) -> tuple[object, dict, dict]:
    """Steps 1-2, or their result from the cache: ``(documents, info, cache_entry)``.

    ``cache_entry`` is the manifest's ``cache``: ``used`` (the cleaned documents came from
    the cache), ``stored`` (they were stored there), ``path``, and ``note`` when neither.
    """
    dropped = tmp / DROPPED
    if clean_cache is not None:
        found = clean_cache.load()
        if found is not None and keep_dropped and not (clean_cache.path / DROPPED).is_file():
            found = None  # an entry damaged by hand: read and clean again
        if found is not None:
            docs, info = found
            if keep_dropped:
                shutil.copyfile(clean_cache.path / DROPPED, dropped)
            for entry, f in zip(info["inputs"], files, strict=True):
                entry["path"] = str(f.path)
            report.log(f"{info['summary']}; reused from the cache {clean_cache.path}")
            return docs, info, {"used": True, "stored": False, "path": str(clean_cache.path)}
    work = tmp / ".cache"
    entry: Path | None = None
    note = None
    if clean_cache is not None:
        try:
            entry = clean_cache.new_entry()
        except OSError as err:
            note = f"cannot write the cache {clean_cache.root}: {err.strerror or err}"
            report.log(f"[yellow]warning:[/yellow] {note}: the cleaned documents are not cached")
    elif hub:
        note = "Hub datasets are not cached"
    elif not cache:
        note = "off (--no-cache)"
    else:
        root = cache_root()
        note = "off (LLMKIT_CACHE=off)" if root is None else (cache_problem(root) or "off")
    try:
        docs, info = _read_and_clean(
            files,
            work=work,
            report=report,
            keep_dropped=keep_dropped,
            dropped_path=dropped if keep_dropped else None,
            documents_dir=(entry / DOCUMENTS) if entry is not None else work / "kept",
            **read_and_clean,
        )
    except BaseException:
        if entry is not None:
            CleanCache.discard([entry])
        raise
    if entry is None:
        return docs, info, {"used": False, "stored": False, "path": None, "note": note}
    read_hashes = [f.sha256 for f in files]
    try:
        if read_hashes != hashes:
            raise OSError(0, "an input changed while it was read")
        if keep_dropped:
            shutil.copyfile(dropped, entry / DROPPED)
        clean_cache.commit(entry, info)
    except OSError as err:
        # The documents were saved in the entry: save them in the work directory instead.
        from datasets import load_from_disk

        docs.save_to_disk(str(work / "kept"))
        docs = load_from_disk(str(work / "kept"))
        CleanCache.discard([entry])
        reason = f"not stored: {err.strerror or err}"
        return docs, info, {"used": False, "stored": False, "path": None, "note": reason}
    docs = clean_cache.load()[0]
    removed, freed = evict(clean_cache.root.parent, max_cache_bytes(), keep=clean_cache.path)
    if removed:
        report.log(
            f"cache over {max_cache_bytes() / 1e9:g} GB ({ENV_MAX_GB}): removed the {removed} "
            f"least recently used entr{'ies' if removed > 1 else 'y'} ({freed / 1e6:,.1f} MB)"
        )
    return docs, info, {"used": False, "stored": True, "path": str(clean_cache.path)}


def _build(
    files: list[InputFile],
    tmp: Path,
    report: _Report,
    *,
    tok,
    vocab_size: int,
    tokenizer_path: str | None,
    block_size: int,
    val_fraction: float,
    seed: int,
    split_on: str,
    text_field: str,
    num_proc: int,
    on_error: str,
    cfg: dict,
    keep_dropped: bool,
    clean_cache: CleanCache | None,
    cache: bool,
    hashes: list[str] | None,
    hub: bool,
    hub_split: str,
    plot: bool,
    chat: dict | None = None,
    encoding: str = DEFAULT_ENCODING,
    max_document_bytes: int | None = DEFAULT_MAX_DOCUMENT_BYTES,
) -> dict:
    """Steps 1–6 into ``tmp``; returns the manifest without version, time and fingerprint.

    ``chat`` (chat data): ``{"template", "train_on", "overlong"}`` as :func:`prepare` takes
    them; steps 4–6 are then :func:`_build_chat`'s.
    """
    from datasets import Features, List, Value

    work = tmp / ".cache"
    kind = "chat" if chat is not None else "text"

    # 1–2. read and clean (or reuse) -> an arrow-backed dataset of documents.
    docs, info, cache_entry = _cleaned_documents(
        files,
        tmp,
        report,
        clean_cache=clean_cache,
        cache=cache,
        hashes=hashes,
        hub=hub,
        keep_dropped=keep_dropped,
        split_on=split_on,
        text_field=text_field,
        on_error=on_error,
        cfg=cfg,
        num_proc=num_proc,
        kind=kind,
        **(
            {"encoding": encoding, "max_document_bytes": max_document_bytes} if chat is None else {}
        ),
    )
    warnings: list[str] = list(info["warnings"])

    # 3. split by document.
    n_bytes = docs.data.column("n_bytes").to_numpy()
    rows = batch_rows(int(n_bytes.max()) if len(n_bytes) else 1)  # per batch from here on
    train_idx, val_idx = split_indices(len(docs), val_fraction, seed)
    split_docs = {
        name: docs.select(idx, indices_cache_file_name=str(work / f"indices-{name}.arrow"))
        for name, idx in (("train", train_idx), ("validation", val_idx))
    }
    split_bytes = {
        "train": int(n_bytes[train_idx].sum()),
        "validation": int(n_bytes[val_idx].sum()),
    }
    unit = "conversation" if chat is not None else "document"
    report.log(
        f"split by {unit} (seed {seed}): {len(train_idx):,} train, {len(val_idx):,} validation"
    )
    if val_fraction > 0 and len(val_idx) == 0:
        warnings.append(f"only one {unit}: the validation split is empty")
    settings = {
        "format": kind,
        "vocab_size": vocab_size if tokenizer_path is None else None,
        "tokenizer": tokenizer_path,
        "block_size": block_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "split_on": split_on if chat is None else None,
        "text_field": text_field if chat is None else None,
        "encoding": encoding if chat is None else None,
        "max_document_bytes": max_document_bytes if chat is None else None,
        "chat_template": chat["template"] if chat is not None else None,
        "train_on": chat["train_on"] if chat is not None else None,
        "overlong": chat["overlong"] if chat is not None else None,
        "num_proc": num_proc,
        "on_error": on_error,
        "keep_dropped": keep_dropped,
        "plot": plot,
        "hub_split": hub_split if hub else None,
        "normalization": cfg["normalize"]["form"],
        "cleaning": cfg,
    }
    common = {
        "inputs": info["inputs"],
        "settings": settings,
        "cache": cache_entry,
        "stages": info["stages"],
        "length_histogram": info["length_histogram"],
    }
    if chat is not None:
        manifest = _build_chat(
            split_docs,
            split_bytes,
            tmp,
            report,
            tok=tok,
            vocab_size=vocab_size,
            tokenizer_path=tokenizer_path,
            block_size=block_size,
            num_proc=num_proc,
            on_error=on_error,
            cfg=cfg,
            warnings=warnings,
            **chat,
        )
        formats: dict[str, int] = {}
        for entry in info["inputs"]:
            for fmt, n in (entry.get("chat_formats") or {}).items():
                formats[fmt] = formats.get(fmt, 0) + n
        manifest["chat"]["record_formats"] = dict(sorted(formats.items()))
        del docs, split_docs  # release the memory-mapped cache files
        shutil.rmtree(work, ignore_errors=True)
        return {**common, **manifest}

    # 4. tokenizer.
    if tok is None:
        from llmkit.data.tokenizer import train_bpe_tokenizer

        train_docs = split_docs["train"]
        with report.task("train tokenizer (documents)", total=len(train_docs)) as advance:

            def texts() -> Iterator[list[str]]:
                for batch in train_docs.iter(batch_size=rows):
                    yield batch["text"]
                    advance(len(batch["text"]))

            tok = train_bpe_tokenizer(texts(), vocab_size, length=len(train_docs))
        report.log(f"trained a byte-level BPE tokenizer: {len(tok):,} tokens")
    else:
        report.log(f"tokenizer {tokenizer_path}: {len(tok):,} tokens")
    tok.save_pretrained(str(tmp))
    eos_token_id = tok.eos_token_id
    appends_eos = tokenizer_appends_eos(tok)
    bos_token_id = tok.bos_token_id
    adds_bos = False
    if bos_token_id is not None:
        probe = _encode_raw(tok, ["a"], True)[0]
        adds_bos = bool(probe) and probe[0] == bos_token_id

    # 5–6. encode and pack each split.
    block_features = Features({"input_ids": List(Value("int32"))})
    splits: dict[str, dict] = {}
    for name in SPLITS:
        sdocs = split_docs[name]
        packer = Packer(block_size)
        with report.task(f"tokenize {name} (documents)", total=len(sdocs)) as advance:
            encoded = _encode_split(
                sdocs,
                tok,
                eos_token_id=eos_token_id,
                append_eos=not appends_eos,
                num_proc=num_proc,
                n_bytes=split_bytes[name],
                name=name,
                advance=advance,
                cache=work,
                batch_size=rows,
            )
        with report.task(f"pack {name} (documents)", total=len(sdocs)) as advance:
            blocks = _from_generator(
                lambda enc=encoded, p=packer, adv=advance: _block_rows(enc, p, adv, rows),
                block_features,
                work,
                f"blocks-{name}",
            )
        splits[name] = {
            "documents": len(sdocs),
            "bytes": split_bytes[name],
            "tokens": packer.tokens_in,
            "blocks": packer.blocks_out,
            "tail_tokens": packer.tail_tokens,
        }
        if name == "train" and packer.blocks_out == 0:
            raise UserError(
                f"the training split has {packer.tokens_in:,} tokens, fewer than one block of "
                f"{block_size}",
                f"use a smaller --block-size (at most {packer.tokens_in}) or give more text",
            )
        if name == "validation" and len(sdocs) and packer.blocks_out == 0:
            warnings.append(
                f"the validation split has {packer.tokens_in:,} tokens, fewer than one block of "
                f"{block_size}: it is empty (use a larger --val-fraction or a smaller "
                "--block-size)"
            )
        # An empty split still gets one (empty) shard, or load_from_disk cannot read it back.
        blocks.save_to_disk(str(tmp / name), num_shards=1 if len(blocks) == 0 else None)
        report.log(
            f"{name}: {packer.tokens_in:,} tokens -> {packer.blocks_out:,} blocks of "
            f"{block_size} (tail {packer.tail_tokens} tokens)"
        )
    for warning in warnings:
        report.log(f"[yellow]warning:[/yellow] {warning}")

    del docs, split_docs, encoded, blocks  # release the memory-mapped cache files
    shutil.rmtree(work, ignore_errors=True)
    return {
        **common,
        "splits": splits,
        "tokenizer": {
            "trained": tokenizer_path is None,
            "path": tokenizer_path,
            "type": "byte-level BPE" if tokenizer_path is None else type(tok).__name__,
            "vocab_size": len(tok),
            "eos_token_id": eos_token_id,
            "bos_token_id": bos_token_id,
            "adds_bos": adds_bos,
            "eos_added_by_tokenizer": appends_eos,
        },
        "warnings": warnings,
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
