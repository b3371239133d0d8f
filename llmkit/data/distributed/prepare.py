"""``llmkit prepare --executor local|slurm|ray``: the settings of a run (:class:`llmkit.data.
config.PrepareSettings`) turned into a distributed job (:mod:`llmkit.data.distributed.job`),
run on datatrove's executor, and its output written where ``prepare`` writes it.

What the distributed path does not support yet is refused before anything runs, in one line
naming the option (:func:`unsupported`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llmkit.data.config import PrepareSettings
from llmkit.errors import UserError


def data_kind(inputs: Sequence[str], settings: PrepareSettings) -> str:
    """``"text"`` or ``"chat"``, as ``prepare`` decides it
    (:func:`llmkit.data.readers.resolve_format`).

    Raises:
        UserError: as :func:`~llmkit.data.readers.resolve_format` (chat records mixed with
            documents, ``--format chat`` for a file that cannot hold them).
    """
    from llmkit.data.readers import discover_inputs, resolve_format

    files = discover_inputs(list(inputs), hub_split=settings.hub_split)
    return resolve_format(files, settings.format, settings.text_field or "text")


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
    tok = settings.tokenizer
    for what, given in (
        ("--keep-dropped", settings.keep_dropped),
        ("--trust-remote-code", settings.trust_remote_code),
        (f"--tokenizer {tok} (a .gguf file)", tok is not None and tok.endswith(".gguf")),
        (
            f"--tokenizer {tok} (not a local directory)",
            tok is not None and not tok.endswith(".gguf") and not Path(tok).is_dir(),
        ),
    ):
        if given:
            return what
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
    tasks per stage, as many dedup partitions, shards of :func:`shard_bytes`); ``kind``
    ``"chat"``: conversations, read as UTF-8 JSON and cleaned with the chat defaults
    (:meth:`~llmkit.data.config.PrepareSettings.cleaning_for`), as ``prepare`` does."""
    from llmkit.data.distributed.job import JobSpec
    from llmkit.data.readers import DEFAULT_ENCODING

    chat = kind == "chat"
    return JobSpec(
        target_shard_bytes=shard_bytes(inputs, settings.tasks),
        work_dir=str(settings.work_dir),
        inputs=[str(i) for i in inputs],
        tokenizer=None if settings.tokenizer is None else str(Path(settings.tokenizer).resolve()),
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
    finished) lives in the work directory. Paths with a scheme (``s3://``...) are not checked.

    Raises:
        UserError: naming the two paths.
    """
    if not work_dir or "://" in work_dir:
        return
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


def prepare_distributed(
    inputs: Sequence[str], output: str | Path, settings: PrepareSettings, *, overwrite: bool
) -> dict | None:
    """Run ``prepare`` on ``settings.executor`` and write ``output``; returns its manifest, or
    None when the job was submitted (Slurm) and is not finished: the same command run again
    once it has finished writes the output (finished tasks are skipped).

    Raises:
        UserError: an option or input not supported with ``--executor`` yet (naming it);
            ``output`` may not be written (as ``prepare``); datatrove is not installed; a task
            failed (its one line: stage, task, shard).
    """
    from llmkit.data.outdir import _check_output

    what = unsupported(inputs, settings)
    if what is not None:
        raise UserError(
            f"--executor {settings.executor} does not support {what} yet",
            "run without --executor (in this process), or leave it out",
        )
    _check_output(Path(output), overwrite)
    check_work_dir(settings.work_dir, output)
    try:
        import datatrove  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"--executor needs datatrove ({err.name} is not installed)",
            "pip install 'llmkit[distributed]'",
        ) from None
    from llmkit.data.distributed.chat import assemble_chat
    from llmkit.data.distributed.job import assemble, completed_tasks, run_job, stage_tasks
    from llmkit.data.readers import looks_like_hub_id

    kind = data_kind(inputs, settings)
    if kind == "chat":
        _check_chat(settings)
    spec = job_spec(inputs, settings, kind)
    if settings.executor == "ray":
        _connect_ray(settings.ray_address)
    try:
        run_job(spec, settings.executor, **engine_options(settings))
        if completed_tasks(spec) != stage_tasks(spec):
            return None
        write = assemble_chat if kind == "chat" else assemble
        hub = any(not Path(i).exists() and looks_like_hub_id(str(i)) for i in inputs)
        return write(spec, output, settings=manifest_settings(settings, kind, hub))
    except (TypeError, KeyError, AttributeError) as err:  # a JSON file of another shape
        raise UserError(
            f"the work directory {settings.work_dir} holds files llmkit did not write "
            f"({type(err).__name__}: {err})",
            "use a new or empty --work-dir, one only you can write",
        ) from None


def _check_chat(settings: PrepareSettings) -> None:
    """What ``prepare`` refuses about chat settings before reading: ``--chat-template
    tokenizer`` without a tokenizer; a given tokenizer that cannot carry the template (a slow
    one; :func:`llmkit.data.encode._chat_tokenizer`), so no task fails on it later.

    Raises:
        UserError: as ``prepare``.
    """
    chat = chat_options(settings)
    if settings.tokenizer is None:
        if chat["template"] == "tokenizer":
            raise UserError(
                "--chat-template tokenizer needs a pretrained tokenizer with its own template",
                "pass --tokenizer PATH (an instruct model's), or use --chat-template chatml",
            )
        return
    if Path(settings.tokenizer).is_dir():
        from llmkit.data.encode import _chat_tokenizer, load_pretrained_tokenizer

        tok = load_pretrained_tokenizer(settings.tokenizer, trust_remote_code=False)
        _chat_tokenizer(tok, chat["template"], settings.tokenizer)


def manifest_settings(settings: PrepareSettings, kind: str = "text", hub: bool = False) -> dict:
    """The manifest's ``settings`` of a distributed run (as ``prepare`` writes them, with the
    executor's; ``hub``: an input is a Hub dataset)."""
    if kind == "chat":
        chat = chat_options(settings)
        return {
            "format": "chat",
            "vocab_size": settings.vocab_size if settings.tokenizer is None else None,
            "tokenizer": settings.tokenizer,
            "block_size": settings.block_size,
            "val_fraction": settings.val_fraction,
            "seed": settings.seed,
            "split_on": None,  # text-only settings, as prepare records them for chat data
            "text_field": None,
            "encoding": None,
            "max_document_bytes": None,
            "chat_template": chat["template"],
            "train_on": chat["train_on"],
            "overlong": chat["overlong"],
            "num_proc": settings.num_proc,
            "on_error": settings.on_error,
            "keep_dropped": False,
            "plot": False,
            "hub_split": settings.hub_split if hub else None,
            "normalization": settings.cleaning_for(kind).normalize.form,
            "cleaning": settings.cleaning_for(kind).model_dump(),
            "executor": settings.executor,
            "tasks": settings.tasks,
            "work_dir": settings.work_dir,
        }
    return {
        "format": "text",
        "vocab_size": settings.vocab_size if settings.tokenizer is None else None,
        "tokenizer": settings.tokenizer,
        "block_size": settings.block_size,
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
        "split_on": settings.split_on,
        "text_field": settings.text_field or "text",
        "encoding": settings.encoding,
        "max_document_bytes": settings.max_document_bytes,
        "on_error": settings.on_error,
        "keep_dropped": False,
        "plot": False,
        "normalization": settings.cleaning.normalize.form,
        "cleaning": settings.cleaning.model_dump(),
        "executor": settings.executor,
        "tasks": settings.tasks,
        "work_dir": settings.work_dir,
    }
