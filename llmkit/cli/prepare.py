"""``llmkit prepare``: raw text to tokenized training blocks (SPEC §2).

Only parses flags and calls :func:`llmkit.data.pipeline.prepare`; heavy libraries are imported
inside the command so that ``llmkit --help`` stays fast.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from llmkit.cli._common import sigterm_as_interrupt, user_errors
from llmkit.data.choices import (
    CHAT_TEMPLATE_CHOICES,
    EXECUTORS,
    FORMATS,
    NORMALIZATION_FORMS,
    ON_ERROR,
    OVERLONG_RULES,
    PII_MODES,
    SPLIT_MODES,
    TRAIN_ON,
)


def _choice(name: str, values: tuple[str, ...], doc: str) -> type[Enum]:
    """A flag's choices as the str Enum Typer wants, from the one definition in
    :mod:`llmkit.data.choices`."""
    enum = Enum(name, {v.replace("-", "_"): v for v in values}, type=str)
    enum.__doc__ = doc
    return enum


SplitOn = _choice("SplitOn", SPLIT_MODES, "How a plain-text file is cut into documents.")
OnError = _choice("OnError", ON_ERROR, "What a bad file, line or record does.")
Pii = _choice("Pii", PII_MODES, "PII redaction.")
Format = _choice("Format", FORMATS, "What the input records are.")
ChatTemplate = _choice("ChatTemplate", CHAT_TEMPLATE_CHOICES, "The chat template of chat data.")
TrainOn = _choice("TrainOn", TRAIN_ON, "Which tokens of chat data are training targets.")
Overlong = _choice("Overlong", OVERLONG_RULES, "A conversation longer than the block size.")
Form = _choice("Form", NORMALIZATION_FORMS, "Unicode normalization form.")
Executor = _choice("Executor", EXECUTORS, "datatrove's executor that runs prepare.")

#: Settings of :class:`llmkit.data.config.PrepareSettings` by the name of the command's
#: parameter that sets them (the others have the same name).
_SETTING_OF = {"data_format": "format", "split": "hub_split"}
#: Parameters of the command that are not settings (where to write, what to print, the cache).
_NOT_SETTINGS = ("inputs", "output", "config", "overwrite", "no_cache", "as_json")
#: Parameters that are run settings (the cleaning flags go through :func:`clean_overrides`).
_RUN_FLAGS = (
    "vocab_size tokenizer block_size val_fraction seed split_on text_field encoding "
    "max_document_bytes on_error data_format chat_template train_on overlong keep_dropped plot "
    "num_proc split trust_remote_code executor tasks work_dir slurm_partition slurm_time "
    "slurm_cpus ray_address"
).split()


def _filter_overrides(filters: list[str], no_filters: list[str], languages: str | None) -> dict:
    """The ``filters`` section the flags set: ``--filter``/``--no-filter`` names (repeated or
    comma-separated; ``web`` is the four web rule sets), ``--languages`` (turns on
    ``language``)."""
    import difflib

    from llmkit.data.choices import FILTER_NAMES, WEB_FILTERS
    from llmkit.errors import UserError

    flt: dict = {}
    for names, enabled, flag in ((filters, True, "--filter"), (no_filters, False, "--no-filter")):
        given = [n.strip() for item in names for n in item.split(",") if n.strip()]
        for name in given:
            if name not in (*FILTER_NAMES, "web"):
                close = difflib.get_close_matches(name, [*FILTER_NAMES, "web"], n=1)
                guess = f"did you mean {close[0]}? " if close else ""
                raise UserError(
                    f"{flag} {name}: no such filter",
                    f"{guess}filters: {', '.join(FILTER_NAMES)}, or web (the four web rule sets)",
                )
            for one in WEB_FILTERS if name == "web" else (name,):
                flt.setdefault(one, {})["enabled"] = enabled
    if languages is not None:
        langs = [code.strip() for code in languages.split(",") if code.strip()]
        if not langs:
            raise UserError("--languages is empty", "give codes such as en,zh")
        flt.setdefault("language", {}).update({"enabled": True, "languages": langs})
    return flt


def _set(out: dict, **entries) -> dict:
    """``out`` with the ``entries`` that were given (not None, not empty)."""
    out.update({k: v for k, v in entries.items() if v is not None and v != {}})
    return out


def clean_overrides(
    *,
    filters: list[str],
    no_filters: list[str],
    languages: str | None,
    pii: str | None,
    normalization: str | None,
    html: bool | None,
    near_dedup: bool | None,
    gutenberg: bool | None,
    minhash: dict,
    pii_region: str | None = None,
) -> dict:
    """The cleaning settings the flags set (those left at None are not set)."""
    regions = None
    if pii_region is not None:
        regions = [r.strip() for r in pii_region.split(",") if r.strip()]
        if not regions:
            from llmkit.errors import UserError

            raise UserError("--pii-region is empty", "give ISO 3166 codes such as US,GB,DE")
    return _set(
        {},
        filters=_filter_overrides(filters, no_filters, languages),
        pii=pii,
        pii_region=regions,
        normalize=_set({}, form=normalization, html=html),
        dedup=_set({k: v for k, v in minhash.items() if v is not None}, near=near_dedup),
        gutenberg=gutenberg,
    )


def _given_flags(ctx: typer.Context, values: dict) -> dict:
    """The settings whose flag was given on the command line (defaults < YAML < flags: a flag
    left at its default does not override the YAML's value), enums as their values."""
    from click.core import ParameterSource

    out = {}
    for name, value in values.items():
        if name in _NOT_SETTINGS or ctx.get_parameter_source(name) in (
            ParameterSource.DEFAULT,
            None,
        ):
            continue
        out[_SETTING_OF.get(name, name)] = value.value if isinstance(value, Enum) else value
    return out


@user_errors
def prepare_command(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(
        ...,
        metavar="INPUT...",
        help="Files (.txt, .md, .jsonl, .json, .csv, .tsv, .parquet, web archives .warc and "
        ".wet; optionally .gz/.bz2/.xz/.zst), directories (searched recursively), glob "
        "patterns, or Hub dataset ids (owner/name[:config], when online).",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Directory to write (datasets, tokenizer, manifest.json)."
    ),
    vocab_size: int = typer.Option(
        1024, "--vocab-size", help="Vocabulary size of the trained byte-level BPE, in tokens."
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="Use this pretrained tokenizer instead of training one: a directory (e.g. a "
        "model's) or a .gguf model file.",
    ),
    block_size: int = typer.Option(128, "--block-size", help="Tokens per training block."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of documents held out for validation, in [0, 1)."
    ),
    seed: int = typer.Option(1337, "--seed", help="Seed of the train/validation split."),
    split_on: SplitOn = typer.Option(
        SplitOn.blank_lines,
        "--split-on",
        help="Cut text files into documents on runs of blank lines, or keep each file whole.",
    ),
    text_field: str | None = typer.Option(
        None,
        "--text-field",
        help="Field of a JSON record (a.b for nested fields) or column of a CSV/TSV/parquet "
        "file that holds the document (default: text).",
    ),
    encoding: str = typer.Option(
        "utf-8",
        "--encoding",
        help="How text, JSON-lines and CSV files are decoded: utf-8 (strict, default), auto "
        "(detected per file by charset-normalizer, recorded in the manifest) or a name such as "
        "cp1252, cp1251, shift_jis, gb18030, big5, euc_kr.",
    ),
    max_document_bytes: int = typer.Option(
        1 << 20,
        "--max-document-bytes",
        help="A document longer than this (UTF-8 bytes) is cut into pieces at paragraph, "
        "line, sentence or word boundaries, which bounds prepare's memory on any input "
        "(default 1 MiB).",
    ),
    on_error: OnError = typer.Option(
        OnError.fail,
        "--on-error",
        help="Binary file, invalid UTF-8, malformed JSON line or CSV row, missing field, damaged "
        "WARC record: stop (fail) or skip it and count it in the manifest (skip).",
    ),
    data_format: Format = typer.Option(
        Format.auto,
        "--format",
        help="text: documents. chat: conversations, JSON records with messages "
        "[{role, content}], ShareGPT conversations [{from, value}], prompt/response or "
        "instruction/input/output. auto: chat when every "
        "JSON input's first record is one (and has no --text-field).",
    ),
    chat_template: ChatTemplate | None = typer.Option(
        None,
        "--chat-template",
        help="Chat data: the template rendering conversations. auto (default): the "
        "tokenizer's own, else ChatML; tokenizer: its own (required); chatml: ChatML (adds "
        "its tokens if missing).",
    ),
    train_on: TrainOn | None = typer.Option(
        None,
        "--train-on",
        help="Chat data: loss on the assistant's answers only (default; labels -100 "
        "elsewhere) or on every token.",
    ),
    overlong: Overlong | None = typer.Option(
        None,
        "--overlong",
        help="Chat data: a conversation longer than --block-size is truncated (default) or "
        "dropped (counted in the manifest either way).",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="prepare.yaml: normalization, filters and thresholds, dedup, PII, and any setting "
        "of these flags by its name (block_size: 256); a flag given wins over the file.",
    ),
    filters: list[str] = typer.Option(
        [],
        "--filter",
        help="Turn on a filter by name (length, language, gopher_quality, gopher_repetition, "
        "c4, fineweb; 'web' = the four web rule sets). Repeat or comma-separate.",
    ),
    no_filters: list[str] = typer.Option([], "--no-filter", help="Turn off a filter by name."),
    languages: str | None = typer.Option(
        None, "--languages", help="Keep only these languages, e.g. en,zh (turns on 'language')."
    ),
    pii: Pii | None = typer.Option(
        None, "--pii", help="Replace e-mails, IPs and phone numbers (redact, default) or keep."
    ),
    pii_region: str | None = typer.Option(
        None,
        "--pii-region",
        help="Regions whose national phone numbers are found, ISO 3166 codes, comma-separated "
        "(default US,GB); international +... numbers are found in any.",
    ),
    normalization: Form | None = typer.Option(
        None, "--normalization", help="Unicode normalization form (default NFC)."
    ),
    html: bool | None = typer.Option(
        None, "--html/--no-html", help="Extract the main text of HTML documents (trafilatura)."
    ),
    near_dedup: bool | None = typer.Option(
        None, "--near-dedup/--no-near-dedup", help="MinHash LSH near-duplicate removal (on)."
    ),
    minhash_ngram: int | None = typer.Option(None, "--minhash-ngram", help="Words per n-gram (5)."),
    minhash_perm: int | None = typer.Option(None, "--minhash-perm", help="Permutations (112)."),
    minhash_bands: int | None = typer.Option(None, "--minhash-bands", help="LSH bands (14)."),
    minhash_rows: int | None = typer.Option(None, "--minhash-rows", help="Rows per band (8)."),
    minhash_threshold: float | None = typer.Option(
        None,
        "--minhash-threshold",
        help="Verify LSH candidates: a near duplicate only at this estimated Jaccard "
        "similarity or more (default: any band collision, as FineWeb).",
    ),
    minhash_normalize: bool | None = typer.Option(
        None,
        "--minhash-normalize/--no-minhash-normalize",
        help="Numbers as 0 and accents removed before MinHash shingling, as datatrove and "
        "FineWeb (off: documents differing only in numbers stay apart).",
    ),
    gutenberg: bool | None = typer.Option(
        None,
        "--strip-gutenberg/--keep-gutenberg",
        help="Remove Project Gutenberg headers and license footers (on).",
    ),
    keep_dropped: bool = typer.Option(
        False, "--keep-dropped", help="Write dropped.jsonl: each dropped document and why."
    ),
    plot: bool = typer.Option(
        True, "--plot/--no-plot", help="Write lengths.png (document lengths before/after)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUTPUT if it already holds prepared data."
    ),
    num_proc: int | None = typer.Option(
        None,
        "--num-proc",
        help="Worker processes for cleaning and tokenizing (default: every usable core; a "
        "small corpus uses fewer). The output does not depend on it.",
    ),
    no_cache: bool = typer.Option(
        False,
        "--no-cache",
        help="Read and clean again: do not reuse the cleaned documents cached in "
        "$LLMKIT_CACHE (default ~/.cache/llmkit), nor skip a run whose OUTPUT is up to date.",
    ),
    split: str = typer.Option(
        "train", "--split", help="Split read from a Hub dataset input (owner/name[:config])."
    ),
    executor: Executor | None = typer.Option(
        None,
        "--executor",
        help="Run on datatrove's executor across processes (local) or machines (slurm, ray), "
        "with the output of one process; default: in this process. Text data only for now.",
    ),
    tasks: int = typer.Option(
        1, "--tasks", help="--executor: tasks of each stage (input shards, dedup partitions)."
    ),
    work_dir: str | None = typer.Option(
        None,
        "--work-dir",
        help="--executor: work directory every task reads and writes (shared by all machines; "
        "any fsspec path, e.g. /shared/job or s3://bucket/job). Run the same command again to "
        "resume: finished tasks are skipped.",
    ),
    slurm_partition: str | None = typer.Option(
        None, "--slurm-partition", help="--executor slurm: partition of the job arrays."
    ),
    slurm_time: str | None = typer.Option(
        None, "--slurm-time", help="--executor slurm: time limit of each task (e.g. 04:00:00)."
    ),
    slurm_cpus: int = typer.Option(1, "--slurm-cpus", help="--executor slurm: CPUs per task."),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="--executor ray: address of a running Ray cluster (default: RAY_ADDRESS, else a "
        "local Ray instance).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Let a --tokenizer that ships Python code of its own (auto_map) run it. Off: such "
        "a tokenizer is refused and its code never runs.",
    ),
) -> None:
    """Clean, deduplicate, tokenize and pack raw text (or conversations) into training blocks.

    INPUT: files, directories (searched recursively) or globs of .txt, .md, .jsonl, .json,
    .csv, .tsv, .parquet, .warc or .wet, each optionally .gz, .bz2, .xz or .zst; or Hub
    dataset ids. A web archive gives one document per page (the main text of HTML responses,
    the plain text of WET records).
    Stages: normalize (NFC, ftfy, control characters, whitespace), filters, exact and MinHash
    deduplication, PII redaction, tokenize, pack. Chat data (--format chat, or detected) is
    cleaned message by message, rendered with a chat template and packed whole, with labels
    -100 off the assistant's answers. A rerun with the same inputs and settings does nothing;
    one that changes only the tokenizer, block size or split reuses the cleaned documents.
    Progress and the summary go to stderr; with --json the manifest goes to stdout.
    """
    values = {k: v for k, v in locals().items() if k in _RUN_FLAGS}  # first: only parameters
    from llmkit.data.config import PrepareSettings
    from llmkit.data.pipeline import prepare

    clean = clean_overrides(
        filters=filters,
        no_filters=no_filters,
        languages=languages,
        pii=pii.value if pii else None,
        normalization=normalization.value if normalization else None,
        html=html,
        near_dedup=near_dedup,
        gutenberg=gutenberg,
        minhash={
            "ngram_size": minhash_ngram,
            "num_perm": minhash_perm,
            "bands": minhash_bands,
            "rows": minhash_rows,
            "threshold": minhash_threshold,
            "normalize": minhash_normalize,
        },
        pii_region=pii_region,
    )
    settings = PrepareSettings.load(config, {**_given_flags(ctx, values), "cleaning": clean})
    with sigterm_as_interrupt():
        if settings.executor is not None:
            manifest = _distributed(inputs, output, settings, overwrite, not no_cache)
            if manifest is None:
                return
        else:
            manifest = prepare(
                inputs, output, overwrite=overwrite, cache=not no_cache, config=settings
            )
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))


def _distributed(
    inputs: list[str], output: Path, settings, overwrite: bool, cache: bool
) -> dict | None:
    """``prepare`` on ``--executor`` (:mod:`llmkit.data.distributed.prepare`), printing what
    ``prepare`` prints; None when the job was submitted and has not finished (Slurm)."""
    from llmkit.data.distributed.prepare import prepare_distributed

    manifest = prepare_distributed(inputs, output, settings, overwrite=overwrite, cache=cache)
    if manifest is None:
        typer.echo(
            f"submitted to {settings.executor}; once the jobs have finished, run the same "
            f"command again to write {output} (finished tasks are skipped)",
            err=True,
        )
    return manifest


def register(app: typer.Typer) -> None:
    """Add the ``prepare`` command to ``app``."""
    app.command("prepare")(prepare_command)
