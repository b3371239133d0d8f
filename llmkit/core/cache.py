"""The cache of ``llmkit prepare``: fingerprints of a run and its cleaned documents on disk.

Two fingerprints are taken of a run (SHA-256 of a canonical JSON of what they cover):

- the *cleaning* fingerprint covers what decides the cleaned documents: the llmkit version,
  the inputs (path, type and SHA-256 of the bytes of every file), the reading settings (the
  format the records were read in, ``text`` or ``chat``, and for text ``split_on`` and
  ``text_field``; ``on_error``), every cleaning setting (normalization, Gutenberg rule,
  filters and their thresholds, deduplication, PII) and ``keep_dropped``. A chat run and a text
  run on the same file therefore never share an entry (the entries hold documents in one case,
  conversations with their ``file:line`` in the other);
- the *full* fingerprint adds what comes after cleaning: vocabulary size or the pretrained
  tokenizer (its path and the SHA-256 of its files), ``block_size``, ``val_fraction``, ``seed``
  and ``plot``, and for chat data the chat settings (``chat_template``, ``train_on``,
  ``overlong``).

Inputs are identified by content (SHA-256), not by size and modification time: a file that is
only touched or copied does not invalidate the cache, an edit that keeps the size and the
second does. The price is one read of every input per run (hashing runs at several hundred
MB/s, cleaning at a few MB/s per core). ``num_proc`` is in neither fingerprint: the output does
not depend on it.

The cleaned documents (an arrow ``datasets.Dataset`` with ``text`` and ``n_bytes``) and the
counts of the read and clean stages are kept under ``$LLMKIT_CACHE/prepare/<cleaning
fingerprint>/`` (``$LLMKIT_CACHE`` defaults to ``~/.cache/llmkit``, the root that
:mod:`llmkit.core.loading` uses for converted GGUF models; ``LLMKIT_CACHE=off`` turns the
cache off). A rerun that changes only the tokenizer, block size, split or seed reuses them and
skips reading and cleaning. A run whose output directory already holds a manifest with the same
full fingerprint does nothing at all. An entry is written to a temporary directory and
renamed, so a crash leaves no half entry. Hub datasets are never cached: their content
cannot be fingerprinted without downloading it.

The prepare cache is bounded: after each entry is stored, the least recently used entries
(by the time of their last use, kept as the modification time of the entry's directory) are
removed until the entries together hold at most ``$LLMKIT_CACHE_MAX_GB`` gigabytes (10**9
bytes; default :data:`DEFAULT_MAX_GB`; ``0``, ``off`` or ``none``: no bound). The entry just
stored is never removed, even when it alone is larger. ``llmkit cache info`` lists the
entries and ``llmkit cache clear [--older-than DAYS]`` removes them (:func:`cache_entries`,
:func:`remove_entries`), like ``pip cache info`` / ``pip cache purge``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llmkit.core import atomic
from llmkit.errors import UserError

#: The environment variable naming the cache root (shared with llmkit.core.loading).
ENV_CACHE = "LLMKIT_CACHE"
#: Bump when the layout of a cache entry changes: older entries are then ignored.
CACHE_FORMAT = 1
#: The file of a cache entry holding the counts of the read and clean stages.
INFO = "cleaned.json"
#: The saved dataset of the cleaned documents inside a cache entry.
DOCUMENTS = "documents"
#: The dropped documents (``--keep-dropped``), in the output and in a cache entry.
DROPPED = "dropped.jsonl"
#: The environment variable bounding the prepare cache, in gigabytes (10**9 bytes).
ENV_MAX_GB = "LLMKIT_CACHE_MAX_GB"
#: The default bound of the prepare cache, in gigabytes: the cleaned documents of a few
#: corpora of several GB each (an entry holds about the corpus's size in text), small next to
#: the free space of a machine that prepares them. pip bounds nothing and huggingface_hub
#: neither; a bound that is on by default keeps a cache that nobody looks at from filling a
#: disk, one corpus version after another.
DEFAULT_MAX_GB = 20.0


def cache_root() -> Path | None:
    """``$LLMKIT_CACHE``, else ``~/.cache/llmkit``; None when ``LLMKIT_CACHE`` is ``off`` (or
    ``0``, ``none``, ``false``). The one rule for every cache of llmkit (prepare, GGUF
    conversions); here, in a module without torch, so that prepare and the CLI can use it."""
    value = os.environ.get(ENV_CACHE, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "llmkit"


def cache_problem(root: Path) -> str | None:
    """Why ``root`` cannot hold the cache (one line naming ``$LLMKIT_CACHE``), or None when it
    can: a file where the directory should be, a directory (or the parent that would hold it)
    that this user cannot write."""
    target = root
    while not target.exists() and target.parent != target:
        target = target.parent
    why = None
    if target.exists() and not target.is_dir():
        why = f"{target} is a file, not a directory"
    elif not os.access(target, os.W_OK | os.X_OK):
        why = f"{target} is not writable"
    if why is None:
        return None
    source = f"{ENV_CACHE}={os.environ[ENV_CACHE]}" if os.environ.get(ENV_CACHE) else str(root)
    return (
        f"cannot use the cache {source}: {why}, so the cleaned documents are not cached "
        f"(set {ENV_CACHE} to a writable directory, or {ENV_CACHE}=off)"
    )


def max_cache_bytes() -> int | None:
    """The bound of the prepare cache in bytes, from ``$LLMKIT_CACHE_MAX_GB`` (default
    :data:`DEFAULT_MAX_GB`); None when unbounded (``0``, ``off``, ``none``).

    Raises:
        UserError: the value is not a number, or is negative.
    """
    value = os.environ.get(ENV_MAX_GB, "").strip()
    if not value:
        return int(DEFAULT_MAX_GB * 1e9)
    if value.lower() in ("off", "none", "0"):
        return None
    try:
        gb = float(value)
    except ValueError:
        gb = -1.0
    if not gb >= 0:
        raise UserError(
            f"{ENV_MAX_GB}={value} is not a size in gigabytes",
            f"give a number such as 20 or 0.5, or off for no bound (default {DEFAULT_MAX_GB:g})",
        )
    return None if gb == 0 else int(gb * 1e9)


@dataclass
class CacheEntry:
    """One entry of the prepare cache, as ``llmkit cache info`` shows it."""

    path: Path
    size_bytes: int  # every file under it
    last_used: float  # seconds since the epoch: the last time it was stored or reused
    complete: bool  # False: a temporary entry of a run that died (or is running), or damaged


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def cache_entries(root: Path) -> list[CacheEntry]:
    """The entries under ``root/prepare``, least recently used first (an incomplete entry
    counts as used when it was last modified)."""
    base = root / "prepare"
    if not base.is_dir():
        return []
    out = []
    for child in base.iterdir():
        if not child.is_dir() or child.is_symlink():
            continue
        complete = (child / INFO).is_file() and not child.name.startswith(".")
        try:
            last = child.stat().st_mtime
        except OSError:
            continue
        out.append(CacheEntry(child, _tree_size(child), last, complete))
    return sorted(out, key=lambda e: (e.last_used, e.path.name))


def remove_entries(entries: Iterable[CacheEntry]) -> tuple[int, int]:
    """Remove ``entries``; returns ``(entries removed, bytes freed)``."""
    n = freed = 0
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
        if not entry.path.exists():
            n += 1
            freed += entry.size_bytes
    return n, freed


def evict(root: Path, max_bytes: int | None, keep: Path | None = None) -> tuple[int, int]:
    """Remove the least recently used complete entries under ``root/prepare`` until all the
    entries hold at most ``max_bytes``; ``keep`` (the entry just stored) and incomplete
    entries (maybe being written by a running prepare) are never removed. Returns ``(entries
    removed, bytes freed)``; nothing when ``max_bytes`` is None."""
    if max_bytes is None:
        return 0, 0
    entries = cache_entries(root)
    total = sum(e.size_bytes for e in entries)
    victims = []
    for entry in entries:
        if total <= max_bytes:
            break
        if not entry.complete or (keep is not None and entry.path == keep):
            continue
        victims.append(entry)
        total -= entry.size_bytes
    return remove_entries(victims)


def fingerprint(obj) -> str:
    """SHA-256 (hex) of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path, advance: Callable[[int], None] | None = None) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks; ``advance(n)`` per chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return digest.hexdigest()


def tokenizer_identity(tokenizer: str | None) -> dict | None:
    """What identifies a pretrained tokenizer for the full fingerprint: its path and the
    SHA-256 of its files (a directory's top-level files, or the file), or its Hub id."""
    if tokenizer is None:
        return None
    path = Path(tokenizer)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return {"path": str(path.resolve()), "files": {p.name: file_sha256(p) for p in files}}
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": file_sha256(path)}
    return {"id": tokenizer}


def gguf_cache_dir(path: Path, dtype: str = "float32") -> Path | None:
    """Where :mod:`llmkit.core.loading` caches the conversion of a ``.gguf`` model loaded in
    ``dtype`` (a ``save_pretrained`` directory with its tokenizer):
    ``<root>/gguf/<stem>-<size>-<mtime>-<dtype>``, named by size and modification time so that
    a changed file is converted again, and by the dtype the weights were de-quantized to (the
    copy holds them in that dtype: a float32 load must never read the rounded copy a bfloat16
    load wrote). ``dtype`` is a torch dtype's name (``float32``, ``bfloat16``, ``float16``;
    ``torch.float32`` is accepted). None when the cache is off."""
    root = cache_root()
    if root is None:
        return None
    st = path.stat()
    name = str(dtype).removeprefix("torch.")
    return root / "gguf" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}-{name}"


class CleanCache:
    """One entry of the cleaned-documents cache: ``root/prepare/<key>/``.

    Layout: ``cleaned.json`` (the counts of the read and clean stages, :data:`INFO`) and
    ``documents/`` (``Dataset.save_to_disk``); ``dropped.jsonl`` when the run kept the dropped
    documents.
    """

    def __init__(self, root: Path, key: str):
        self.root = root / "prepare"
        self.key = key
        self.path = self.root / key

    def load(self) -> tuple[object, dict] | None:
        """``(documents, info)`` of the entry, or None when there is no complete entry."""
        info_file = self.path / INFO
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if info.get("format") != CACHE_FORMAT or info.get("key") != self.key:
            return None
        from datasets import load_from_disk

        try:
            documents = load_from_disk(str(self.path / DOCUMENTS))
        except (OSError, ValueError, FileNotFoundError):
            return None
        try:  # the last use, for least-recently-used eviction (no file inside changes)
            now = time.time()
            os.utime(self.path, (now, now))
        except OSError:
            pass
        return documents, info

    def new_entry(self) -> Path:
        """A fresh temporary directory next to the entry (:func:`llmkit.core.atomic.temp_path`),
        to fill and :meth:`commit`; those of dead processes for the same key are deleted."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale(self.root, self.key)
        tmp = atomic.temp_path(self.root, self.key)
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, info: dict) -> None:
        """Write ``info`` into ``tmp`` and rename it to the entry (a concurrent run that got
        there first wins; ``tmp`` is then removed). Not :func:`llmkit.core.atomic.replace`:
        a complete entry is kept, not replaced, as the same key means the same content; an
        entry that does not load (damaged) is replaced."""
        info = {"format": CACHE_FORMAT, "key": self.key, **info}
        (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, self.path)
        except OSError:
            if self.load() is not None:  # another run stored the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            # a damaged entry (a file truncated or replaced by hand): replace it
            shutil.rmtree(self.path, ignore_errors=True)
            os.rename(tmp, self.path)

    @staticmethod
    def discard(paths: Iterable[Path]) -> None:
        """Remove temporary entries (on failure)."""
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
