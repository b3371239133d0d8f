"""Atomic output: build under a temporary name beside the target, then rename it into place.

Every file or directory that llmkit writes for a user (a prepared directory, a run's model and
card, a checkpoint, an exported ``.gguf``, a cache entry) is built under a hidden temporary name
in the directory where it will live and renamed into place only when complete, so that a crash,
Ctrl-C or a full disk leaves either the old output or the new one, never half of one
(DEVELOPERS.md: "nothing already written is corrupted"). A rename within one directory is
atomic on POSIX file systems (``rename(2)``).

Names: the temporary of ``DIR/NAME`` is ``DIR/.NAME.tmp-<pid>-<8 hex>``: hidden, unique per
process and call, and naming the process that writes it, so that :func:`remove_stale` can delete
the temporaries of processes that died (killed, power loss) without touching one that another
running process is still writing. A replaced directory is first renamed aside to
``DIR/.NAME.old-<8 hex>``.

- :func:`atomic_output` (a context manager) for one file or directory;
- :func:`atomic_files` for files that land one by one in an existing directory (a run's final
  model files beside its checkpoints and metrics);
- :func:`write_text` for a small text file;
- :func:`replace` and :func:`remove_stale` for a caller whose temporary is shared by several
  processes (a distributed checkpoint) or handed between functions (the prepare cache).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(directory: Path, name: str) -> Path:
    """A fresh temporary name for ``directory / name``: ``directory/.NAME.tmp-<pid>-<hex>``."""
    return Path(directory) / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_stale(directory: Path, name: str) -> list[Path]:
    """Delete the temporaries of ``directory / name`` left by processes that are gone.

    A temporary whose process is alive (this one included), runs under another user or cannot
    be checked is left alone; so is a name without a process id.

    Returns:
        The paths removed.
    """
    removed = []
    prefix = f".{name}.tmp-"
    for tmp in Path(directory).glob(f"{glob.escape(prefix)}*-*"):
        try:
            pid = int(tmp.name[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove(tmp)
            removed.append(tmp)
        except OSError:  # alive under another user, or cannot tell: leave it
            continue
    return removed


def replace(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing what is there.

    A file (or a missing or empty ``target``) is one ``os.replace``. A symbolic link is
    replaced by ``tmp`` itself (the link is removed, what it pointed to is left alone). An
    existing directory
    cannot be renamed over: it is renamed aside to ``.NAME.old-<hex>`` first, ``tmp`` renamed
    into place, then the old one deleted, so that a crash between the two renames leaves both
    whole (and a failed second rename puts the old one back).
    """
    tmp, target = Path(tmp), Path(target)
    link = target.is_symlink()
    if target.is_dir() and not link and not any(target.iterdir()):
        target.rmdir()
    if not link and not target.is_dir():
        os.replace(tmp, target)
        return
    # a directory, or a symbolic link (to anything: a directory cannot be renamed over a link):
    # set aside, then the link itself is removed, never what it points to
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    if link:
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; rename it onto ``target`` when the
    ``with`` block ends normally, delete it when the block raises (then re-raised).

    Temporaries of ``target`` left by dead processes are deleted first (:func:`remove_stale`).

    Args:
        target: the file or directory to produce; its parent must exist.
        directory: create the temporary as an empty directory (else nothing is created: the
            caller writes a file at the yielded path).

    Raises:
        OSError: the temporary cannot be created or renamed (it is deleted).
    """
    target = Path(target)
    remove_stale(target.parent, target.name)
    tmp = temp_path(target.parent, target.name)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_files(directory: str | Path, tag: str) -> Iterator[Path]:
    """Yield a hidden temporary directory inside ``directory`` (``.TAG.tmp-<pid>-<hex>``) to
    fill; when the block ends normally each of its entries is renamed into ``directory``
    (replacing one of the same name) and the temporary removed; when it raises, the temporary
    is deleted and nothing reaches ``directory``.

    Each file arrives atomically; the set does not (a crash during the renames can leave some
    new files beside old ones), so a caller that needs the set whole writes a marker last.

    Raises:
        OSError: the temporary cannot be created, or a rename fails.
    """
    directory = Path(directory)
    remove_stale(directory, tag)
    tmp = temp_path(directory, tag)
    tmp.mkdir()
    try:
        yield tmp
        for entry in sorted(tmp.iterdir()):
            replace(entry, directory / entry.name)
        tmp.rmdir()
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
