"""The run directory: what a run writes there, making it ready, and what an interrupted run
leaves (the message that says how to continue). Files are written into it through
:mod:`llmkit.core.atomic`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmkit.errors import UserError
from llmkit.runs import RUN_MARKER, is_finished_run
from llmkit.training import checkpoint as ckpt

# What a run writes into its directory; ``--overwrite`` removes these (and only these) at the
# start of the new run, the finished marker first, so the directory never mixes two runs.
_RUN_FILES = (
    RUN_MARKER,
    ckpt.CHECKPOINTS,
    "tensorboard",
    "metrics.jsonl",
    "llmkit_config.yaml",
    "README.md",
    "loss_curve.png",
    "adapter",
    ".final.tmp",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# ".*.tmp-*": temporaries of llmkit.core.atomic (".*.tmp": those of llmkit before it)
_RUN_FILE_PATTERNS = ("model-*.safetensors", "pytorch_model-*.bin", ".*.tmp", ".*.tmp-*")
# What only a run of llmkit train writes: ``--overwrite`` replaces a directory holding one of
# them, never another directory whose README.md or config.json happen to share a name.
_RUN_EVIDENCE = (RUN_MARKER, "llmkit_config.yaml", "metrics.jsonl", ckpt.CHECKPOINTS)


def _os_error(err: OSError, run_dir: Path) -> UserError:
    """A one-line error for a failure to create or write the run directory."""
    reason = err.strerror or type(err).__name__
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        reason = f"a file is in the way ({reason})"
    where = "" if err.filename in (None, str(run_dir)) else f" ({err.filename})"
    return UserError(
        f"cannot create or write the run directory {run_dir}{where}: {reason}",
        "choose another out_dir=... / name=..., or fix the permissions",
    )


def _clear_previous_run(run_dir: Path) -> None:
    """Remove what a previous run wrote (``--overwrite``), the finished marker first.

    Raises:
        UserError: ``run_dir`` is not a run of ``llmkit train``.
    """
    if not any((run_dir / name).exists() for name in _RUN_EVIDENCE):
        found = sorted(p.name for p in run_dir.iterdir())
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(
            f"{run_dir} holds files that llmkit train did not write ({shown}); "
            "--overwrite replaces only a run directory (one with llmkit_config.yaml)",
            "set out_dir=... / name=... to a new or empty directory",
        )
    doomed = [run_dir / name for name in _RUN_FILES]
    for pattern in _RUN_FILE_PATTERNS:
        doomed += sorted(run_dir.glob(pattern))
    keep = previous_run_dir(run_dir) if is_finished_run(run_dir) else None
    if keep is not None:  # a finished run is set aside until the new one finishes
        _remove(keep)
        keep.mkdir()
    for child in doomed:  # RUN_MARKER first
        if keep is not None and (child.exists() or child.is_symlink()):
            os.replace(child, keep / child.name)
        else:
            _remove(child)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def previous_run_dir(run_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the finished run it replaces (``.NAME.previous`` beside
    ``run_dir``) until the new run finishes: an interrupted or failed new run loses nothing
    (move its files back to restore it). Hidden: :func:`llmkit.runs.newest_finished_run`
    never picks it."""
    return run_dir.with_name(f".{run_dir.name}.previous")


def restore_previous_run(run_dir: Path) -> bool:
    """Put back the finished run ``--overwrite`` set aside (:func:`previous_run_dir`) when the
    new run stopped on an error before training started: a mistake found while the model
    loads (a bad ``model.name_or_path``, refused weights...) must not leave ``run_dir`` empty
    and the finished model hidden. What the new run wrote (its run files only) is removed
    first; the finished marker is moved back last. Returns True when restored (False: nothing
    set aside, or the new run has a checkpoint to resume from or has finished)."""
    kept = previous_run_dir(run_dir)
    if not kept.is_dir() or not run_dir.is_dir() or ckpt.list_checkpoints(run_dir):
        return False
    if is_finished_run(run_dir):  # the new run got as far as finishing: it stays
        return False
    doomed = [run_dir / name for name in _RUN_FILES]
    for pattern in _RUN_FILE_PATTERNS:
        doomed += sorted(run_dir.glob(pattern))
    for child in doomed:
        _remove(child)
    children = sorted(kept.iterdir(), key=lambda p: p.name == RUN_MARKER)  # the marker last
    for child in children:
        os.replace(child, run_dir / child.name)
    kept.rmdir()
    return True


def drop_previous_run(run_dir: Path) -> None:
    """The new run has finished: delete the run ``--overwrite`` set aside, if any."""
    _remove(previous_run_dir(run_dir))


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool = False) -> None:
    """Make the run directory ready for a new (or resumed) run.

    The finished marker is removed first: from here until the new run finishes, the directory
    is not a finished run. With ``overwrite`` the previous run's files are removed too.

    Raises:
        UserError: the directory holds files and neither ``overwrite`` nor ``resume`` is set;
            ``overwrite`` on a directory that is not a run of ``llmkit train``; it cannot be
            created or written (a file in the way, no permission).
    """
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(run_dir))
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            if not overwrite:
                what = "a finished run" if is_finished_run(run_dir) else "files"
                raise UserError(
                    f"{run_dir} already holds {what}",
                    "pass --overwrite to replace it, or set name=... / out_dir=... for a new run",
                )
            _clear_previous_run(run_dir)
        elif (run_dir / RUN_MARKER).exists():  # resuming: unfinished until it finishes again
            (run_dir / RUN_MARKER).unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".llmkit-write-test"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise _os_error(err, run_dir) from None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, turned into Ctrl-C by the CLI) during a run; ``str()`` says what
    the run directory holds and how to continue."""


def interrupted_message(run_dir: Path, step: int | None) -> str:
    at = f" at step {step}" if step else ""
    last = ckpt.list_checkpoints(run_dir)
    if last:
        return (
            f"interrupted{at}; {run_dir} is not a finished run, its checkpoint {last[-1]} "
            f"is intact: continue with --resume latest"
        )
    kept = previous_run_dir(run_dir)
    if kept.is_dir():
        return (
            f"interrupted{at}; {run_dir} is not a finished run and holds no checkpoint yet; "
            f"the finished run --overwrite replaced is kept in {kept} (move its files back to "
            "restore it)"
        )
    return f"interrupted{at}; {run_dir} is not a finished run and holds no checkpoint yet"
