"""The model's one owner: a thread that takes jobs from a bounded queue and runs them in batches.

Each HTTP request becomes a :class:`Job` of one or more :class:`Row`\\ s (``n`` choices, or
several prompts of ``/v1/completions``). The worker takes the oldest job, waits for more — while
requests are still being prepared (parsed, tokenized) or new ones keep arriving within
``batch_wait`` seconds of each other, at most ``10 × batch_wait`` in all — and adds every queued
job with the same
:meth:`~llmkit.serve.schemas.Sampling.batch_key` while the rows fit in ``max_batch_size``;
jobs it skips keep their place. The batch runs as one left-padded ``model.generate`` call
through llmkit's own :func:`~llmkit.generation.batching.left_pad` and ``eos_ids`` — the same
inputs ``llmkit generate --batch-size`` builds, so a greedy row gives the tokens it gives
alone (SPEC §4).

One stopping criterion (:class:`_Rows`) is called by ``generate`` after every step. It finishes
each row on its own: at an EOS id (``stop``), a stop string (``stop``; text streamed by llmkit's
:class:`~llmkit.generation.decoding.TextStream`, which holds back what may be the start of one),
the row's own ``max_tokens`` (``length``), or its job's cancel flag (the client left). ``generate``
ends when every row is finished, so a batch whose clients all left stops after the step in
progress. Text reaches the request's asyncio queue through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from llmkit.core.loading import silence_padding_warning
from llmkit.generation.batching import eos_ids, left_pad
from llmkit.generation.decoding import TextStream
from llmkit.generation.settings import GenerationSettings
from llmkit.serve.schemas import ApiError, Sampling

_ids = itertools.count()


@dataclass
class Row:
    """One choice being generated."""

    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    index: int = 0
    """The choice's index in the response."""
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    """``stop``, ``length`` or ``cancelled`` once finished."""
    stream: Any = None  # llmkit's TextStream for this row


class _Sink:
    """A file-like ``out`` for :class:`TextStream` that forwards each written piece."""

    def __init__(self, row: Row, job: Job):
        self.row, self.job = row, job

    def write(self, text: str) -> None:
        if text:
            self.row.text.append(text)
            self.job.emit(("delta", self.row.index, text))

    def flush(self) -> None:
        pass


@dataclass
class Job:
    """One request: its rows, settings, where its events go, and its cancel flag.

    Events put on ``events`` (an ``asyncio.Queue`` of ``loop``): ``("delta", index, text)``,
    ``("finish", index, reason)``, ``("done",)`` once all rows are finished, or
    ``("error", ApiError)``.
    """

    rows: list[Row]
    sampling: Sampling
    loop: Any = None
    events: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    def emit(self, event: tuple) -> None:
        if self.loop is not None and self.events is not None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                self.cancelled.set()

    def cancel(self) -> None:
        """Finish the job's rows at the next step (the client left)."""
        self.cancelled.set()


class QueueFull(ApiError):
    def __init__(self, size: int, retry_after: int):
        super().__init__(
            503,
            f"the server is busy: {size} requests are already waiting",
            code="queue_full",
            type="server_error",
            headers={"Retry-After": str(retry_after)},
        )


class BatchWorker:
    """Owns the model; runs queued jobs in batches on its own thread.

    Args:
        model, tokenizer: loaded by the caller (``model.eval()``).
        max_batch_size: most rows per ``generate`` call.
        max_queue: most jobs waiting (not yet running); one more is refused with 503.
        batch_wait: the gap between arrivals that ends a batch's gathering: the worker waits
            for more jobs while one arrived less than ``batch_wait`` ago or requests are still
            being prepared (:meth:`expect`), at most ``10 × batch_wait`` after the first.
        tokenizer_lock: held while the tokenizer is used (it is shared with the request
            handlers, and a Rust tokenizer refuses concurrent mutable use).
        log: where one line per finished request goes (None: nowhere).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait: float = 0.01,
        tokenizer_lock: threading.Lock | None = None,
        log: Any = sys.stderr,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.lock = tokenizer_lock or threading.Lock()
        self.log = log
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._arriving = 0  # requests received and being prepared, not yet submitted
        self.batches = 0
        """``generate`` calls run so far."""
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="llmkit-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Cancel the waiting jobs and stop the thread after the batch in progress."""
        with self._cond:
            self._stop = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.emit(("error", ApiError(503, "the server is shutting down", type="server_error")))

    def expect(self) -> None:
        """A request arrived and is being prepared: a batch being gathered waits for it."""
        with self._cond:
            self._arriving += 1

    def unexpect(self) -> None:
        """The request announced by :meth:`expect` was submitted or refused."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            QueueFull: ``max_queue`` jobs are already waiting.
        """
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), retry_after=self._retry_after())
            self._queue.append(job)
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Cancel ``job`` (its client left) and, when it is still waiting, free its place in
        the queue at once rather than when the worker reaches it."""
        job.cancel()
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running or done: its rows stop at the next step
        self._write(f"[serve] request {job.id}: cancelled before it started (the client left)\n")

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _retry_after(self) -> int:
        """Seconds a refused client should wait: about one batch's time, at least 1."""
        per_batch = self.busy_seconds / self.batches if self.batches else 1.0
        return max(1, round(per_batch))

    # --- the thread -------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            first = self._queue.popleft()
        key = first.sampling.batch_key()
        batch, rows = [first], len(first.rows)
        if key is None:
            return batch
        start = time.monotonic()
        last_arrival, hard = start, start + 10 * self.batch_wait
        while rows < self.max_batch_size:
            with self._cond:
                for job in list(self._queue):
                    if (
                        job.sampling.batch_key() == key
                        and rows + len(job.rows) <= self.max_batch_size
                    ):
                        self._queue.remove(job)
                        batch.append(job)
                        rows += len(job.rows)
                        last_arrival = time.monotonic()
                now = time.monotonic()
                quiet = now - last_arrival >= self.batch_wait and not self._arriving
                if rows >= self.max_batch_size or now >= hard or quiet or self._stop:
                    break
                until = hard if self._arriving else min(hard, last_arrival + self.batch_wait)
                self._cond.wait(max(until - now, 0.0005))
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            for job in [j for j in batch if j.cancelled.is_set()]:
                batch.remove(job)
                self._write(
                    f"[serve] request {job.id}: cancelled before it started (the client left)\n"
                )
            if not batch:
                continue
            start = time.perf_counter()
            try:
                self._generate(batch)
            except Exception as err:  # a fault: tell each waiting client, keep serving
                error = ApiError(500, f"generation failed: {err}", type="server_error")
                for job in batch:
                    job.emit(("error", error))
                self._write(f"[serve] generation failed: {err!r}\n")
            finally:
                self.batches += 1
                self.busy_seconds += time.perf_counter() - start

    def _generate(self, batch: list[Job]) -> None:
        rows = [(job, row) for job in batch for row in job.rows]
        now = time.monotonic()
        for job in batch:
            job.started = now
        s = batch[0].sampling
        settings = GenerationSettings.from_flags(
            max_new_tokens=max(r.max_tokens for _, r in rows),
            temperature=s.temperature,
            top_k=s.top_k,  # 0: no limit
            top_p=s.top_p,
        )
        input_ids, attention_mask = left_pad([r.prompt_ids for _, r in rows], self.pad)  # (B, T0)
        device = self.model.device
        width = input_ids.shape[1]
        with self.lock:
            for job, row in rows:
                row.stream = TextStream(self.tokenizer, _Sink(row, job), row.prompt_ids, row.stop)
                row.stream.prompt_seen = True  # generate's first put (the prompt) is not text
        criterion = _Rows(self, rows, width)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        silence_padding_warning(self.model)
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                pad_token_id=self.pad,
                eos_token_id=self.eos or None,
                stopping_criteria=StoppingCriteriaList([criterion]),
                **settings.generate_kwargs(),
            )
        for job, row in rows:  # every row is finished by now; a safety net for the impossible
            if row.finish_reason is None:
                criterion.finish(job, row, "length")
        for job in batch:
            self._log_job(job, len(rows))  # before "done": a client's next look at the log sees it
            job.emit(("done",))

    def _log_job(self, job: Job, batch_rows: int) -> None:
        tokens = sum(len(r.token_ids) for r in job.rows)
        reasons = "/".join(sorted({r.finish_reason or "?" for r in job.rows}))
        waited = (job.started or job.enqueued) - job.enqueued
        took = time.monotonic() - (job.started or job.enqueued)
        self._write(
            f"[serve] request {job.id} (batch {self.batches}, {batch_rows} rows): "
            f"{sum(len(r.prompt_ids) for r in job.rows)} prompt + "
            f"{tokens} completion tokens, finish {reasons}, queued {waited:.2f} s, "
            f"generated in {took:.2f} s\n"
        )

    def _write(self, line: str) -> None:
        if self.log is not None:
            try:
                self.log.write(line)
                self.log.flush()
            except (OSError, ValueError):
                pass


class _Rows(StoppingCriteria):
    """``generate``'s stopping criterion: streams each row's new token and finishes rows one by
    one (EOS, stop string, own ``max_tokens``, cancelled). Returns a (B,) bool tensor."""

    def __init__(self, worker: BatchWorker, rows: list[tuple[Job, Row]], width: int):
        self.worker = worker
        self.rows = rows
        self.width = width
        self.eos = set(worker.eos)
        self.done: Any = None

    def finish(self, job: Job, row: Row, reason: str) -> None:
        if reason != "cancelled" and row.stream is not None and not row.stream.stopped:
            row.stream.end()  # what was held back (a possible stop-string start) is text after all
        row.finish_reason = reason
        if reason != "cancelled":
            job.emit(("finish", row.index, reason))

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()  # (B,)
        with self.worker.lock:
            for b, (job, row) in enumerate(self.rows):
                if self.done[b]:
                    continue
                if job.cancelled.is_set():
                    self.finish(job, row, "cancelled")
                    self.done[b] = True
                    continue
                token = int(last[b])
                row.token_ids.append(token)
                if token in self.eos:
                    self.finish(job, row, "stop")
                    self.done[b] = True
                    continue
                row.stream.put(torch.tensor([token]))
                if row.stream.stopped:
                    self.finish(job, row, "stop")
                    self.done[b] = True
                elif len(row.token_ids) >= row.max_tokens:
                    self.finish(job, row, "length")
                    self.done[b] = True
        return self.done.clone()
