"""The checks of ``llmkit eval``'s arguments that need no torch, so that the CLI runs them
before importing it (a mistake is one line within a fraction of a second, not after 5 s)."""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import UserError

#: Splits of a prepared directory (:data:`llmkit.core.prepared.SPLITS`).
SPLITS = ("train", "validation")


def check_windows(max_length: int, stride: int, window: str | None = None) -> None:
    """Refuse sliding windows that cannot work.

    Args:
        max_length: tokens per window.
        stride: new tokens scored per window.
        window: how to name the window length when ``--max-length`` was not given (e.g.
            "the model's 1024 positions"); None: it was given, ``--max-length N``.

    Raises:
        UserError: ``max_length < 2``, or ``stride`` outside 1..max_length (each case with its
            own hint).
    """
    if max_length < 2:
        raise UserError(f"--max-length {max_length} is too small", "use at least 2 tokens")
    if stride < 1:
        raise UserError(
            f"--stride {stride} must be at least 1",
            "it is the tokens each window moves on; leave it out for windows that do not "
            "overlap, or give fewer than the window length for more context per token",
        )
    if stride > max_length:
        length = window or f"--max-length {max_length}"
        raise UserError(
            f"--stride {stride} is more than the window length, {length}",
            f"a stride above the window length would skip tokens: use at most {max_length}",
        )


def check_eval_args(
    data: str | Path | None,
    *,
    split: str = "validation",
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    top: int = 0,
) -> None:
    """Everything about ``llmkit eval``'s flags that needs neither torch nor the model.

    Raises:
        UserError: ``batch_size`` < 1, ``top`` < 0, an unknown ``split``, bad windows
            (:func:`check_windows`), ``data`` that does not exist.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    if top < 0:
        raise UserError(f"--top {top} is negative", "use 0 for none, or e.g. 5")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    if max_length is not None:
        check_windows(max_length, max_length if stride is None else stride)
    elif stride is not None and stride < 1:
        check_windows(2, stride)  # below 1: refused whatever the window length
    if data is not None and not Path(data).exists():
        raise UserError(
            f"{data} does not exist",
            "give a text file, a directory of .txt or a prepared directory",
        )
