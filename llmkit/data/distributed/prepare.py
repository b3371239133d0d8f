"""``llmkit prepare --executor local|slurm|ray``: the settings of a run (:class:`llmkit.data.
config.PrepareSettings`) turned into a distributed job (:mod:`llmkit.data.distributed.job`),
run on datatrove's executor, and its output written where ``prepare`` writes it, as
``prepare`` writes it: the in-process run is planned first (:func:`llmkit.data.pipeline._plan`:
its inputs, warnings, fingerprint and up-to-date check, its pretrained tokenizer loaded once),
and the job's output is assembled with the in-process run's manifest functions.

What the distributed path does not support yet is refused before anything runs, in one line
naming the option (:func:`unsupported`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from llmkit.data.config import PrepareSettings
from llmkit.errors import UserError


def chat_options(settings: PrepareSettings) -> dict:
    """The chat rules as ``prepare`` resolves them: ``template`` (default ``auto``),
    ``train_on`` (``assistant``), ``overlong`` (``truncate``)."""
    return {
        "template": settings.chat_template or "auto",
        "train_on": settings.train_on or "assistant",
        "overlong": settings.overlong or "truncate",
    }


def unsupported(inputs: Sequence[str], settings: PrepareSettings) -> str | None:
    """The first option (or kind of input) of this run that ``--executor`` does not support
    yet, as the words of the error; None when the run can be distributed."""
    if settings.trust_remote_code:
        return "--trust-remote-code"
    return None


#: Input shards per task that :func:`shard_bytes` aims at (the tasks of a stage finish
#: closer together with several small shards each than with one large one).
SHARDS_PER_TASK = 4
#: The smallest shard :func:`shard_bytes` cuts (smaller ones cost more in files than they
#: save in balance).
MIN_SHARD_BYTES = 16 << 10


def shard_bytes(inputs: Sequence[str], tasks: int) -> int:
    """Bytes per input shard: the inputs' size over ``SHARDS_PER_TASK`` shards per task,
    between :data:`MIN_SHARD_BYTES` and :data:`~llmkit.data.distributed.shards.
    TARGET_SHARD_BYTES` (a compressed file is always one shard)."""
    from llmkit.data.distributed.shards import TARGET_SHARD_BYTES
    from llmkit.data.readers import discover_inputs

    total = sum(f.size_bytes for f in discover_inputs(list(inputs)))
    return max(MIN_SHARD_BYTES, min(TARGET_SHARD_BYTES, total // (SHARDS_PER_TASK * tasks)))


def job_spec(inputs: Sequence[str], settings: PrepareSettings, kind: str = "text"):
    """The :class:`~llmkit.data.distributed.job.JobSpec` of a run's settings (``tasks``
    tasks per stage, as many dedup partitions, shards of :func:`shard_bytes`; a given
    tokenizer by its absolute path when it is a local one, and the hashes of its files);
    ``kind`` ``"chat"``: conversations, read as UTF-8 JSON and cleaned with the chat defaults
    (:meth:`~llmkit.data.config.PrepareSettings.cleaning_for`), as ``prepare`` does."""
    from llmkit.core.cache import tokenizer_identity
    from llmkit.data.distributed.job import JobSpec
    from llmkit.data.readers import DEFAULT_ENCODING

    tok = settings.tokenizer
    if tok is not None and Path(tok).exists():
        tok = str(Path(tok).resolve())
    chat = kind == "chat"
    return JobSpec(
        target_shard_bytes=shard_bytes(inputs, settings.tasks),
        work_dir=str(settings.work_dir),
        inputs=[str(i) for i in inputs],
        tokenizer=tok,
        tokenizer_files=tokenizer_identity(settings.tokenizer),
        vocab_size=settings.vocab_size,
        block_size=settings.block_size,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
        split_on=settings.split_on,
        text_field=settings.text_field or "text",
        on_error=settings.on_error,
        encoding=DEFAULT_ENCODING if chat else settings.encoding,
        max_document_bytes=settings.max_document_bytes,
        cleaning=settings.cleaning_for(kind).model_dump(),
        keep_dropped=settings.keep_dropped,
        tasks=settings.tasks,
        partitions=settings.tasks,
        format=kind,
        chat=chat_options(settings) if chat else None,
        hub_split=settings.hub_split,
    )


def engine_options(settings: PrepareSettings) -> dict:
    """The options of datatrove's executor for ``settings.executor``: local ``workers``
    (``--num-proc``, else one per task up to the usable cores), Slurm ``partition``, ``time``,
    ``cpus_per_task`` and its logs under the work directory."""
    if settings.executor == "local":
        from llmkit.data.pipeline import default_num_proc

        return {"workers": settings.num_proc or min(settings.tasks, default_num_proc())}
    if settings.executor == "slurm":
        return {
            "partition": settings.slurm_partition,
            "time": settings.slurm_time,
            "cpus_per_task": settings.slurm_cpus,
            "slurm_logs_folder": str(settings.work_dir).rstrip("/") + "/logs/slurm",
        }
    return {}


def check_work_dir(work_dir: str | None, output: str | Path) -> None:
    """Refuse a local work directory that is a file, or that is ``output``, inside it or holds
    it: ``output`` is replaced whole when the job ends, and the job's state (the tasks already
    finished) lives in the work directory. Paths with a scheme (``s3://``...) are not checked
    for that. Then the work directory is created (:func:`~llmkit.data.distributed.job.
    open_work_dir`), so that one that cannot be fails before the output is touched.

    Raises:
        UserError: naming the two paths; the work directory cannot be created (an OS error,
            a scheme fsspec does not know).
    """
    if not work_dir:
        return
    if "://" not in work_dir:
        _check_local_work_dir(work_dir, output)
    from llmkit.data.distributed.job import open_work_dir

    open_work_dir(work_dir)


def _check_local_work_dir(work_dir: str, output: str | Path) -> None:
    work, out = Path(work_dir).resolve(), Path(output).resolve()
    if work.exists() and not work.is_dir():
        raise UserError(
            f"--work-dir {work_dir} is a file", "give a directory (it is created if missing)"
        )
    if work == out or out in work.parents or work in out.parents:
        raise UserError(
            f"--work-dir {work_dir} and --output {output} overlap (the output is replaced "
            "whole when the job ends; the work directory keeps the finished tasks)",
            "give the work directory a path of its own, beside the output",
        )


def _connect_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


@contextmanager
def engine_logs(work_url: str) -> Iterator[str]:
    """Within the block, what datatrove (and anything else) writes to stderr goes to
    ``<work_dir>/logs/console-<time>.log`` instead of the terminal; yields its path.

    datatrove logs with loguru: each task's sink is ``sys.stderr`` as it is when the task
    starts (:func:`datatrove.utils.logging.add_task_logger`, INFO and up, beside the task's
    own DEBUG log file ``logs/<stage>/logs/task_<rank>.log``), and worker processes write to
    file descriptor 2; so both are pointed at the file, and datatrove's default sink is set
    again (:func:`datatrove.utils.logging.setup_default_logger`) on the way in and out. A
    work directory with a scheme (``s3://``...) gets the file when the block ends."""
    import tempfile

    from datatrove.utils.logging import setup_default_logger

    name = f"logs/console-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    local = "://" not in work_url
    if local:
        path = Path(work_url, name)
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="llmkit-logs-"), "console.log")
    try:
        with open(path, "a", encoding="utf-8", buffering=1) as log:
            sys.stderr.flush()
            try:
                saved = os.dup(2)
            except OSError:  # no file descriptor 2: nothing to point elsewhere
                saved = None
            if saved is not None:
                os.dup2(log.fileno(), 2)
            try:
                with redirect_stderr(log):
                    setup_default_logger()
                    try:
                        yield str(path) if local else f"{work_url.rstrip('/')}/{name}"
                    finally:
                        sys.stderr.flush()
            finally:
                if saved is not None:
                    os.dup2(saved, 2)
                    os.close(saved)
                setup_default_logger()
    finally:  # a failed job's log too: it holds the traceback
        if not local:
            from llmkit.data.distributed.job import Work

            Work(work_url).write_bytes(name, path.read_bytes())
            shutil.rmtree(path.parent, ignore_errors=True)


def prepare_distributed(
    inputs: Sequence[str],
    output: str | Path,
    settings: PrepareSettings,
    *,
    overwrite: bool,
    cache: bool = True,
    console=None,
) -> dict | None:
    """Run ``prepare`` on ``settings.executor`` and write ``output`` as :func:`llmkit.data.
    pipeline.prepare` writes it (the same files, manifest and log lines); returns its
    manifest, or None when the job was submitted (Slurm) and is not finished: the same
    command run again once it has finished writes the output (finished tasks are skipped).

    As in one process: with ``cache``, an ``output`` written with the same fingerprint (the
    same input bytes, settings and llmkit version, by this path or the in-process one: the
    bytes are the same) is up to date and nothing runs; a pretrained tokenizer (a directory,
    a ``.gguf`` file, a Hub id) is loaded once, here, and saved in the work directory for
    the tasks. datatrove's own log lines go to files under the work directory
    (:func:`engine_logs`); ``console`` (default: stderr) gets prepare's.

    Raises:
        UserError: an option or input not supported with ``--executor`` yet (naming it);
            ``output`` may not be written (as ``prepare``); datatrove is not installed; a task
            failed (its one line: stage, task, shard); the errors of ``prepare`` (no
            document left, too few tokens for one block...).
    """
    from rich.console import Console

    from llmkit.data import pipeline as pl

    started = time.perf_counter()
    what = unsupported(inputs, settings)
    if what is not None:
        raise UserError(
            f"--executor {settings.executor} does not support {what} yet",
            "run without --executor (in this process), or leave it out",
        )
    console = console if console is not None else Console(stderr=True)
    run = pl._plan(inputs, output, settings, pl._Report(console), cache)
    done = pl._up_to_date_output(run)
    if done is not None:
        return done
    check_work_dir(settings.work_dir, output)
    pl._claim_output(run, overwrite)  # the output may be written; a given tokenizer loaded
    try:
        import datatrove  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"--executor needs datatrove ({err.name} is not installed)",
            "pip install 'llmkit[distributed]'",
        ) from None
    from llmkit.data.distributed.chat import assemble_chat, put_chat_tokenizer
    from llmkit.data.distributed.job import (
        Work,
        assemble,
        completed_tasks,
        plan_job,
        put_tokenizer,
        run_job,
        stage_tasks,
    )

    spec = job_spec(inputs, settings, run.kind)
    try:
        plan_job(spec, _input_hashes(run))
        if run.tok is not None:  # with its chat template, for chat data
            put_tokenizer(Work(spec.work_dir), run.tok)
            if run.kind == "chat":
                put_chat_tokenizer(Work(spec.work_dir), run.chat_tokenizer)
        with engine_logs(str(settings.work_dir)) as log:
            try:
                if settings.executor == "ray":
                    _connect_ray(settings.ray_address)
                run_job(
                    spec, settings.executor, hashes=_input_hashes(run), **engine_options(settings)
                )
            except UserError as err:  # a task's one line; its traceback is in the log
                raise UserError(err.message, f"{err.hint} (datatrove's log: {log})") from None
        if completed_tasks(spec) != stage_tasks(spec):
            return None
        write = assemble_chat if run.kind == "chat" else assemble
        with pl._quiet_datasets():
            manifest = write(spec, output, settings=executor_settings(settings), run=run)
    except (TypeError, KeyError, AttributeError) as err:  # a JSON file of another shape
        raise UserError(
            f"the work directory {settings.work_dir} holds files llmkit did not write "
            f"({type(err).__name__}: {err})",
            "use a new or empty --work-dir, one only you can write",
        ) from None
    pl._print_summary(console, manifest, run.output, time.perf_counter() - started)
    return manifest


def _input_hashes(run) -> dict[str, str] | None:
    """The inputs' SHA-256 as prepare computed them for its fingerprint (path → hash), or
    None when it did not (``--no-cache``, Hub inputs)."""
    if run.hashes is None:
        return None
    return {str(f.path): h for f, h in zip(run.files, run.hashes, strict=True)}


def executor_settings(settings: PrepareSettings) -> dict:
    """What a distributed run adds to the manifest's ``settings`` (beside every setting of
    ``prepare``): ``executor``, ``tasks``, ``work_dir``; and ``num_proc``: the local
    executor's worker processes (None on Slurm and Ray, where it does not apply)."""
    workers = engine_options(settings).get("workers")
    return {
        "num_proc": workers,
        "executor": settings.executor,
        "tasks": settings.tasks,
        "work_dir": settings.work_dir,
    }
