"""One metric logger for a training run: the progress bar and messages (stderr), the metrics
file (``metrics.jsonl``) and the experiment trackers (TensorBoard and others, via accelerate).

The loop calls :meth:`MetricLogger.log` once per record and :meth:`MetricLogger.print` for a
message, on every process: off the main process the logger writes nothing, so the loop needs
no rank test. In the manner of torchtune's ``training/metric_logging.py`` (one interface,
several destinations).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit.core.atomic import write_text
from llmkit.training.flops import format_mfu


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file (``[]`` when it does not exist)."""
    from llmkit.training.report import read_metrics

    return read_metrics(path)


class MetricLogger:
    """Messages, the progress bar, ``metrics.jsonl`` and trackers; silent off the main process.

    Made first (plan warnings go through it), then given its destinations by :meth:`open`
    (setup) and its bar by :meth:`bar` (fit).

    Args:
        console: a ``rich.console.Console`` on stderr.
        main: this is the main process (rank 0); False: nothing is ever written or printed.
        progress: show the live bar during :meth:`bar` (off a terminal: a plain line now and
            then instead).
    """

    def __init__(self, console, *, main: bool, progress: bool = True):
        self.console = console
        self.main = main
        self.progress = progress
        self.accelerator = None
        self.total_steps = 0
        self.text_every = 1
        self._file = None
        self._bar = None
        self._task = None

    def open(self, metrics_path: Path, *, resume_step: int | None = None, accelerator=None):
        """Send records to ``metrics_path`` and, with ``accelerator``, to the trackers it was
        given (``accelerator.log``).

        Args:
            resume_step: a run resumed at this step: records after it are dropped from the
                file (those steps run again) and new ones appended; None: a new file.
        """
        self.accelerator = accelerator
        if not self.main:
            return
        if resume_step is not None:
            kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= resume_step]
            write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = metrics_path.open("a" if resume_step is not None else "w", encoding="utf-8")

    @contextmanager
    def bar(self, total_steps: int, start_step: int, text_every: int) -> Iterator[None]:
        """The live progress bar from ``start_step`` to ``total_steps`` for a ``with`` block;
        off a terminal, :meth:`advance` prints a plain line every ``text_every`` steps."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.total_steps, self.text_every = total_steps, text_every
        self._bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f} | lr {task.fields[lr]:.2e} | "
                "{task.fields[tps]:,.0f} tok/s | MFU {task.fields[mfu]}"
            ),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (self.progress and self.main),
            transient=False,
        )
        with self._bar:
            self._task = self._bar.add_task(
                "train",
                total=total_steps,
                completed=start_step,
                loss=float("nan"),
                lr=0.0,
                tps=0.0,
                mfu=format_mfu(0.0),
            )
            try:
                yield
            finally:
                self._bar = None

    def print(self, message: str) -> None:
        """A line on stderr (above the bar while it runs)."""
        if self.main:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        """``warning: message`` on stderr."""
        self.print(f"[yellow]warning:[/] {message}")

    def log(self, record: dict[str, Any]) -> None:
        """One record (``step`` and metrics) to ``metrics.jsonl`` and to the trackers."""
        if not self.main:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.accelerator is not None:
            metrics = {k: v for k, v in record.items() if k != "step"}
            self.accelerator.log(metrics, step=record["step"])

    def advance(self, step: int, **fields: Any) -> None:
        """Move the bar to ``step``; with ``fields`` (``loss``, ``lr``, ``tps``, ``mfu`` text)
        also show them, and off a terminal print them as a plain line every ``text_every``
        steps (a CI log or a pipe gets no live bar)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **fields)
        if not fields or not (self.main and self.progress) or self.console.is_terminal:
            return
        if step % self.text_every == 0:
            self.print(
                f"step {step}/{self.total_steps} | loss {fields['loss']:.4f} | "
                f"lr {fields['lr']:.2e} | {fields['tps']:,.0f} tok/s | MFU {fields['mfu']}"
            )

    def close(self) -> None:
        """Close the metrics file (records written so far stay)."""
        if self._file is not None:
            self._file.close()
            self._file = None
