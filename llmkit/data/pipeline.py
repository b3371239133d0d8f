"""``llmkit prepare``: raw text files to tokenized, packed training blocks (SPEC §2).

The pipeline, each step a function over documents or batches that could run under another
executor (SPEC §8):

1. read (:mod:`llmkit.data.readers`): files, directories and globs to a stream of documents;
2. clean: a chain of document stages, counted — normalize (:mod:`llmkit.data.clean`), the
   named filters (:mod:`llmkit.data.filters`), exact and near-duplicate removal
   (:mod:`llmkit.data.dedup`), PII redaction (:mod:`llmkit.data.pii`), configured by
   :mod:`llmkit.data.config`; the kept documents go into an arrow-backed ``datasets.Dataset``
   (never a Python list);
3. split: whole documents to train / validation, from ``seed`` (:func:`split_indices`);
4. tokenizer: a byte-level BPE trained on the train documents, or a pretrained one;
5. encode (:func:`encode_batch`): batched, one EOS after every document;
6. pack (:class:`llmkit.data.pack.Packer`): each split concatenated and cut into blocks.

The result is the layout of :mod:`llmkit.data.prepared`, built in a hidden temporary directory
next to the output and renamed into place only when complete.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np

from llmkit.data.clean import StageStats, run_stages
from llmkit.data.pack import Packer
from llmkit.data.prepared import DATASET_DICT, MANIFEST, SPLITS, is_prepared
from llmkit.data.readers import (
    _GLOB_CHARS,
    ON_ERROR,
    SPLIT_MODES,
    InputFile,
    _walk,
    discover_inputs,
    file_kind,
    read_documents,
)
from llmkit.errors import UserError

E = TypeVar("E", bound=BaseException)

#: Documents per batch in the encode and pack steps (memory holds one batch of documents).
BATCH_DOCUMENTS = 1000
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
) -> None:
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
        raise UserError(f"--num-proc {num_proc} must be at least 1")
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


def _document_rows(
    files: Sequence[InputFile],
    *,
    split_on: str,
    text_field: str,
    on_error: str,
    line_filter: Callable | None,
    read_stats: dict,
    stages: list,
    stage_stats: list[StageStats],
    advance: Callable,
    histograms: dict[str, LengthHistogram],
    on_drop: Callable | None,
) -> Iterator[dict]:
    """Rows ``{"text", "n_bytes"}`` of the kept documents of all files, in order."""

    def read_all() -> Iterator[str]:
        for source in files:
            for text in read_documents(
                source,
                split_on=split_on,
                text_field=text_field,
                on_error=on_error,
                line_filter=line_filter,
            ):
                size = len(text.encode("utf-8"))
                read_stats["documents_out"] += 1
                read_stats["bytes_out"] += size
                histograms["read"].add(size)
                advance(size)
                yield text

    for text in run_stages(read_all(), stages, stage_stats, on_drop):
        size = len(text.encode("utf-8"))
        histograms["kept"].add(size)
        yield {"text": text, "n_bytes": size}


def _block_rows(encoded, packer: Packer, advance: Callable) -> Iterator[dict]:
    """Rows ``{"input_ids"}`` of full blocks of an encoded split (documents in order)."""
    import pyarrow.compute as pc

    for table in encoded.with_format("arrow").iter(batch_size=BATCH_DOCUMENTS):
        flat = pc.list_flatten(table.column("input_ids")).to_numpy()
        for block in packer.add_tokens(flat):
            yield {"input_ids": block}
        advance(table.num_rows)


def _encode_split(docs, tokenizer, *, eos_token_id, append_eos, num_proc, name, advance):
    from datasets import Features, List, Value

    features = Features({"input_ids": List(Value("int32"))})
    kwargs = {"tokenizer": tokenizer, "eos_token_id": eos_token_id, "append_eos": append_eos}
    common = dict(
        batched=True,
        batch_size=BATCH_DOCUMENTS,
        remove_columns=docs.column_names,
        features=features,
        new_fingerprint=f"llmkit-encoded-{name}",
    )
    if num_proc is None or num_proc == 1 or len(docs) < 2:

        def encode_and_count(batch: dict) -> dict:
            out = _encode_for_map(batch, **kwargs)
            advance(len(batch["text"]))
            return out

        return docs.map(encode_and_count, **common)
    # Worker processes: each gets a pickled tokenizer. Their tokenizers run one thread each
    # (set before the fork, so that `tokenizers` does not warn about it).
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return docs.map(_encode_for_map, fn_kwargs=kwargs, num_proc=num_proc, **common)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


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
    text_field: str = "text",
    overwrite: bool = False,
    num_proc: int | None = None,
    on_error: str = "fail",
    config: str | Path | dict | None = None,
    clean: dict | None = None,
    keep_dropped: bool = False,
    plot: bool = True,
    console=None,
) -> dict:
    """Clean, split, tokenize and pack raw text into a prepared data directory.

    Writes the layout of :mod:`llmkit.data.prepared` at ``output``: ``manifest.json``, the
    tokenizer, and ``train/`` and ``validation/`` datasets whose rows are ``block_size`` int32
    token ids. Everything is built in a hidden directory next to ``output`` and renamed into
    place at the end; on any error nothing at ``output`` changes.

    Args:
        inputs: files (``.txt``, ``.md``, ``.jsonl``, ``.json``; optionally ``.gz``, ``.bz2``
            or ``.xz``), directories (searched recursively) or glob patterns; a list, or one.
        output: the directory to write.
        vocab_size: vocabulary size, in tokens, of the byte-level BPE trained on the train
            documents (ignored with ``tokenizer``; the manifest then records None).
        tokenizer: path (or Hub id, when online) of a pretrained tokenizer to use instead.
        block_size: tokens per block (row).
        val_fraction: share of the documents held out for validation, in [0, 1).
        seed: seed of the train/validation split.
        split_on: ``"blank-lines"`` (a text file is split on runs of blank lines) or ``"none"``
            (one document per text file).
        text_field: the field (a dotted path for nested ones) of a JSON record, or the column
            of a CSV/TSV/parquet file, that holds the document.
        overwrite: replace ``output`` when it already holds a prepared directory.
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
        num_proc: worker processes for encoding (None: one process; the Rust tokenizer then
            uses every core by itself). The output is the same for any value.
        console: a ``rich.console.Console`` for progress and the summary (default: stderr).

    Returns:
        The manifest (also written to ``output/manifest.json``).

    Raises:
        UserError: bad settings; an input missing, unreadable, binary, not UTF-8, or a
            malformed JSON line (named with file and line); no documents left after cleaning;
            fewer tokens than one training block; ``output`` exists and is not empty without
            ``overwrite`` (or is not a prepared directory).
    """
    from rich.console import Console

    from llmkit import __version__

    started = time.perf_counter()
    console = console if console is not None else Console(stderr=True)
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
    )
    from llmkit.data.config import load_config, merge

    if isinstance(config, dict):
        from llmkit.data.config import default_config, validate

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
        _check_output(output, overwrite)
    except OSError as err:
        raise _output_error(err, output, None, "cannot read") from None
    files = discover_inputs(inputs, exclude=[output])
    tok = None
    if tokenizer is not None:  # fail before reading the corpus
        from llmkit.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)

    created_parents = _missing_parents(output)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output)
        tmp.mkdir()
    except OSError as err:
        _remove_dirs(created_parents)
        raise _output_error(err, output, tmp, "cannot create") from None
    report = _Report(console)
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
            )
        manifest = {
            "llmkit_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
    num_proc: int | None,
    on_error: str,
    cfg: dict,
    keep_dropped: bool,
) -> dict:
    """Steps 1–6 into ``tmp``; returns the manifest without version and time."""
    from datasets import Features, List, Value

    cache = tmp / ".cache"
    warnings: list[str] = []

    # 1–2. read and clean -> an arrow-backed dataset of documents.
    from llmkit.data.boilerplate import strip_gutenberg
    from llmkit.data.config import build_stages

    stages = build_stages(cfg)
    stage_stats = [StageStats(s.name) for s in stages]
    read_stats = {
        "files": len(files),
        "bytes_in": sum(f.size_bytes for f in files),
        "documents_out": 0,
        "bytes_out": 0,
    }
    histograms = {"read": LengthHistogram(), "kept": LengthHistogram()}
    dropped_file = open(tmp / "dropped.jsonl", "w", encoding="utf-8") if keep_dropped else None

    def on_drop(text: str, stage: str, reason: str) -> None:
        if dropped_file is not None:
            record = {"stage": stage, "reason": reason, "text": text}
            dropped_file.write(json.dumps(record, ensure_ascii=False) + "\n")

    total_bytes = read_stats["bytes_in"]
    try:
        with report.task("read and clean (bytes)", total=total_bytes) as advance:
            docs = _from_generator(
                lambda: _document_rows(
                    files,
                    split_on=split_on,
                    text_field=text_field,
                    on_error=on_error,
                    line_filter=strip_gutenberg if cfg["gutenberg"] else None,
                    read_stats=read_stats,
                    stages=stages,
                    stage_stats=stage_stats,
                    advance=advance,
                    histograms=histograms,
                    on_drop=on_drop,
                ),
                Features({"text": Value("string"), "n_bytes": Value("int64")}),
                cache,
                "documents",
            )
    finally:
        if dropped_file is not None:
            dropped_file.close()
    for stage, st in zip(stages, stage_stats, strict=True):
        if hasattr(stage, "extra"):
            st.extra = stage.extra()
    skipped: dict = {}
    for f in files:
        for reason, n in f.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    read_stats["skipped"] = dict(sorted(skipped.items()))
    if read_stats["documents_out"] == 0 or len(docs) == 0:
        raise UserError(
            f"no documents left after cleaning ({read_stats['documents_out']} read; "
            f"{_drops(stage_stats)}"
            + (f"; skipped {_fmt_counts(skipped)}" if skipped else "")
            + ")",
            "give files that hold text (the right --text-field for structured files), or "
            "loosen the filters",
        )
    kept = stage_stats[-1]
    report.log(
        f"read {len(files)} file(s), {read_stats['bytes_in']:,} bytes: "
        f"{read_stats['documents_out']:,} documents, {kept.documents_out:,} kept "
        f"({_drops(stage_stats)})"
        + (f"; skipped input lines: {_fmt_counts(skipped)}" if skipped else "")
    )
    for f in files:
        if f.skipped:
            warnings.append(f"{f.path}: skipped {_fmt_counts(f.skipped)} (first: {f.first_error})")

    # 3. split by document.
    n_bytes = docs.data.column("n_bytes").to_numpy()
    train_idx, val_idx = split_indices(len(docs), val_fraction, seed)
    split_docs = {"train": docs.select(train_idx), "validation": docs.select(val_idx)}
    split_bytes = {
        "train": int(n_bytes[train_idx].sum()),
        "validation": int(n_bytes[val_idx].sum()),
    }
    report.log(
        f"split by document (seed {seed}): {len(train_idx):,} train, {len(val_idx):,} validation"
    )
    if val_fraction > 0 and len(val_idx) == 0:
        warnings.append("only one document: the validation split is empty")

    # 4. tokenizer.
    if tok is None:
        from llmkit.data.tokenizer import train_bpe_tokenizer

        train_docs = split_docs["train"]
        with report.task("train tokenizer (documents)", total=len(train_docs)) as advance:

            def texts() -> Iterator[list[str]]:
                for batch in train_docs.iter(batch_size=BATCH_DOCUMENTS):
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
                name=name,
                advance=advance,
            )
        with report.task(f"pack {name} (documents)", total=len(sdocs)) as advance:
            blocks = _from_generator(
                lambda enc=encoded, p=packer, adv=advance: _block_rows(enc, p, adv),
                block_features,
                cache,
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
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "inputs": [f.as_dict() for f in files],
        "settings": {
            "vocab_size": vocab_size if tokenizer_path is None else None,
            "tokenizer": tokenizer_path,
            "block_size": block_size,
            "val_fraction": val_fraction,
            "seed": seed,
            "split_on": split_on,
            "text_field": text_field,
            "num_proc": num_proc,
            "on_error": on_error,
            "keep_dropped": keep_dropped,
            "normalization": cfg["normalize"]["form"],
            "cleaning": cfg,
        },
        "stages": {"read": read_stats, **{s.name: s.as_dict() for s in stage_stats}},
        "length_histogram": {
            "bin_edges_bytes": LENGTH_BINS.tolist(),
            "read": histograms["read"].as_list(),
            "kept": histograms["kept"].as_list(),
        },
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
    for col in ("split", "documents", "bytes", "tokens", "blocks", "tail tokens"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, sp in manifest["splits"].items():
        splits.add_row(
            name,
            f"{sp['documents']:,}",
            f"{sp['bytes']:,}",
            f"{sp['tokens']:,}",
            f"{sp['blocks']:,}",
            f"{sp['tail_tokens']:,}",
        )
    tk = manifest["tokenizer"]
    train = manifest["splits"]["train"]
    console.print(stages)
    console.print(splits)
    console.print(
        f"tokenizer: {tk['vocab_size']:,} tokens ({'trained' if tk['trained'] else tk['path']}), "
        f"block_size {manifest['settings']['block_size']}, "
        f"{train['tokens'] / max(1, train['bytes']):.3f} tokens per byte (train)",
        highlight=False,
    )
