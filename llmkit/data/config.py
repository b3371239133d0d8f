"""Settings of the cleaning stages of ``llmkit prepare``, from defaults, ``--config prepare.yaml``
and flags (in that order of precedence).

A ``prepare.yaml``::

    normalize: {form: NFC, fix_mojibake: true, whitespace: true, html: false}
    gutenberg: true            # strip Project Gutenberg headers and license footers
    filters:                   # each by name: enabled, and any threshold of its class
      length: {min_chars: 200}
      language: {enabled: true, languages: [en, zh]}
      gopher_quality: {enabled: true, min_words: 30}
      gopher_repetition: {enabled: true}
      c4: {enabled: false}
      fineweb: {enabled: true}
    dedup: {exact: true, near: true, ngram_size: 5, num_perm: 112, bands: 14, rows: 8,
            threshold: null,   # or e.g. 0.8: verify LSH candidates by estimated Jaccard
            normalize: false}  # true: numbers as 0, no accents before shingling (FineWeb)
    pii: redact                # or keep
    pii_region: [US, GB]       # where national phone numbers are read (+... found anywhere)

The thresholds and their sources are documented on the filter classes
(:mod:`llmkit.data.filters`). Only ``length`` is on by default: the other rule sets were written
for web pages and drop most of a play or a collection of short stories (tinyshakespeare's
speeches are mostly under Gopher's 50 words); ``--filter web`` turns on the four web rule sets.
The settings are typed pydantic models, as the training recipe's (:mod:`llmkit.training.config`):
:class:`CleaningSettings` (the sections above) inside :class:`PrepareSettings` (every setting of
a run: the flags of ``llmkit prepare``, whose top-level keys such as ``block_size`` or
``vocab_size`` a ``prepare.yaml`` may also set). Every allowed value is defined once
(:mod:`llmkit.data.choices`, the filter classes' fields), validated once on construction; an
unknown key is an error naming the closest valid one; a value of the wrong type is an error
naming the key and the type. Precedence: defaults < YAML < flags (:meth:`PrepareSettings.load`).
An error names a value as the user gave it: a YAML file's key and the file
(``block_size in prepare.yaml: 1 is too small``), or the flag (``--block-size 1 is too
small``); each setting's source reaches the validators in pydantic's validation context.

Chat data (``llmkit prepare --format chat``) goes through the same steps (:func:`build_steps`;
a :class:`llmkit.data.document.Document` carries a conversation's messages): the steps that
rewrite text (normalize, PII) run on each message's content; the filters and both
de-duplications judge the conversation as one text, :func:`llmkit.data.sft.conversation_text`
(``role: content`` per message; :class:`llmkit.data.steps.base.DocumentStep`). Two defaults
differ for chat (:func:`default_config`): near-duplicate removal is off — instruction sets hold
the same answer to paraphrased questions on purpose (the support example set has three
phrasings per answer), and the FineWeb MinHash settings, tuned on web pages, merge such short
conversations (2 of its 81 at the defaults) — and exact de-duplication stays on. The web rule
sets stay off as for text; named explicitly they judge the whole conversation and only drop it
(C4's line removal cannot be mapped back onto the messages and is not applied).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from llmkit.data.choices import (
    CHAT_TEMPLATE_CHOICES,
    EXECUTORS,
    FILTER_NAMES,
    FORMATS,
    NORMALIZATION_FORMS,
    ON_ERROR,
    OVERLONG_RULES,
    PII_MODES,
    SPLIT_MODES,
    TRAIN_ON,
    WEB_FILTERS,  # noqa: F401 (re-exported: the names that "web" turns on)
)
from llmkit.data.readers import DEFAULT_ENCODING, DEFAULT_MAX_DOCUMENT_BYTES
from llmkit.errors import UserError

DEFAULT_ENABLED = ("length",)
#: Kinds of data, each with its defaults (:func:`default_config`) and stages (:func:`build_stages`).
KINDS = ("text", "chat")
#: Settings whose default differs for chat data (see the module docstring).
CHAT_DEFAULTS = {"dedup": {"near": False}}
#: Upper bounds of the MinHash settings (larger values only exhaust memory).
MAX_NGRAM_SIZE = 4096
MAX_NUM_PERM = 4096
#: The smallest byte-level BPE vocabulary: 256 byte symbols and <|endoftext|>.
MIN_VOCAB_SIZE = 257
#: Upper bounds of --vocab-size and --block-size (larger values are mistakes that would only
#: fail deep inside the tokenizer trainer or ``datasets``).
MAX_VOCAB_SIZE = 2**24
MAX_BLOCK_SIZE = 2**20

#: The most tasks per ``--executor`` stage: one job array of 10,000 tasks already outgrows
#: Slurm's default ``MaxArraySize`` (1001) tenfold; a planning mistake, not a corpus, asks for more.
MAX_TASKS = 10_000
#: ``--slurm-partition``: one partition name or a comma-separated list (sbatch ``--partition``
#: takes a list). slurm.conf does not restrict the characters of ``PartitionName``; llmkit
#: takes letters, digits, ``.``, ``_`` and ``-`` only, on purpose: the value is written into
#: the ``#SBATCH`` header of the launch script, where a newline or a space would add a shell
#: command or another sbatch option.
SLURM_PARTITION = re.compile(r"[A-Za-z0-9._-]+(?:,[A-Za-z0-9._-]+)*")
#: ``--slurm-time``: the formats of sbatch ``--time`` (https://slurm.schedmd.com/sbatch.html):
#: ``minutes``, ``minutes:seconds``, ``hours:minutes:seconds``, ``days-hours``,
#: ``days-hours:minutes``, ``days-hours:minutes:seconds`` (0: no limit).
SLURM_TIME = re.compile(r"[0-9]+-[0-9]+(?::[0-9]+){0,2}|[0-9]+(?::[0-9]+){0,2}")


class _Section(BaseModel):
    """A settings section: unknown keys rejected, values of another type rejected (strict: no
    ``"5"`` for 5; an int is taken for a float)."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


# ---------------------------------------------------------------------------------------------
# Where a value came from, so that an error names what the user wrote: the flag for a value
# given on the command line (``--block-size 1``), the key and the file for one read from a
# YAML file (``block_size in prepare.yaml: 1``), the key for one given in Python as a dict.
# :meth:`PrepareSettings.load` passes each setting's source to the validators in pydantic's
# validation context, ``{dotted key: source}``.

#: The source of a setting given on the command line (or as a keyword of
#: :func:`llmkit.data.pipeline.prepare`, which mirrors the flags one to one).
COMMAND_LINE = "command line"

#: Flags whose name is not ``--`` and the setting's name with dashes.
_FLAG_OF = {
    "hub_split": "--split",
    "normalize.form": "--normalization",
    "normalize.html": "--html",
    "gutenberg": "--strip-gutenberg",
    "pii": "--pii",
    "pii_region": "--pii-region",
    "filters.language.languages": "--languages",
    "dedup.near": "--near-dedup",
    "dedup.ngram_size": "--minhash-ngram",
    "dedup.num_perm": "--minhash-perm",
    "dedup.bands": "--minhash-bands",
    "dedup.rows": "--minhash-rows",
    "dedup.threshold": "--minhash-threshold",
    "dedup.normalize": "--minhash-normalize",
}


def _source(info: ValidationInfo | dict | None, key: str) -> str | None:
    """Where ``key`` (dotted) was set: :data:`COMMAND_LINE`, a YAML file's path, or None (in
    Python, or the default). ``info``: the validation info whose context holds the sources,
    or those sources (``{dotted key: source}``). A key inside a value that was set whole (a
    threshold table) has the source of that value."""
    if isinstance(info, dict):
        sources = info
    else:
        sources = (info.context if info is not None else None) or {}
    if key in sources:
        return sources[key]
    for given, source in sources.items():
        if key.startswith(given + "."):
            return source
    return None


def setting_name(key: str, source: str | None) -> str:
    """How an error names setting ``key`` from ``source``: its flag (``--block-size``), the
    key in its file (``block_size in prepare.yaml``), or the key."""
    if source == COMMAND_LINE:
        return _FLAG_OF.get(key) or "--" + key.replace("_", "-")
    return f"{key} in {source}" if source else key


def _name(info: ValidationInfo | None, key: str, *like: str) -> str:
    """The flag of ``key`` when it came from the command line, else the key (no file: for a
    message naming several settings, followed by :func:`_in_file`). A ``key`` left at its
    default is named as the settings ``like`` that were given: as a flag when one came from
    the command line (``--tasks applies to --executor only``)."""
    sources = [_source(info, key)] if _source(info, key) else [_source(info, k) for k in like]
    return setting_name(key, COMMAND_LINE if COMMAND_LINE in sources else None)


def _in_file(info: ValidationInfo | None, *keys: str) -> str:
    """`` (in FILE)`` when one of ``keys`` was read from a YAML file, else ``""``."""
    files = [s for s in (_source(info, k) for k in keys) if s and s != COMMAND_LINE]
    return f" (in {files[0]})" if files else ""


def _subject(info: ValidationInfo | dict | None, key: str, value: Any) -> str:
    """The subject of a one-line error about one value: ``--block-size 1`` (command line),
    ``block_size in prepare.yaml: 1`` (YAML file), ``block_size 1`` (Python)."""
    source = _source(info, key)
    name = setting_name(key, source)
    return f"{name}: {value}" if source and source != COMMAND_LINE else f"{name} {value}"


def _one_of(subject: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{subject} is not one of: {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------
# Cleaning: normalize, filters, dedup, PII.


class NormalizeSettings(_Section):
    """The normalize step (:class:`llmkit.data.clean.Normalize`)."""

    form: str = Field("NFC", description="Unicode normalization form, NFC or NFKC (UAX #15).")
    fix_mojibake: bool = Field(True, description="Repair mojibake with ftfy.")
    whitespace: bool = Field(True, description="Line ends, trailing spaces, blank-line runs.")
    html: bool = Field(False, description="Keep only the main text of HTML (trafilatura).")

    @field_validator("form")
    @classmethod
    def _known_form(cls, form: str, info: ValidationInfo) -> str:
        if form not in NORMALIZATION_FORMS:
            raise UserError(f"{_subject(info, 'normalize.form', repr(form))} is not NFC or NFKC")
        return form


def _filter_model(name: str, cls: type) -> type[BaseModel]:
    """The settings model of one filter: ``enabled`` and the fields of its class (thresholds
    and their defaults are defined once, on the filter class, :mod:`llmkit.data.filters`)."""
    hints = get_type_hints(cls)
    spec: dict[str, Any] = {"enabled": (bool, name in DEFAULT_ENABLED)}
    for f in fields(cls):
        if f.default_factory is not MISSING:
            spec[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            spec[f.name] = (hints[f.name], f.default)
    model = create_model(f"{cls.__name__}Settings", __base__=_Section, **spec)
    model.__doc__ = f"The {name} filter (:class:`llmkit.data.filters.{cls.__name__}`)."
    return model


def _filters_model() -> type[BaseModel]:
    from llmkit.data.filters import FILTERS

    spec = {
        name: (model, Field(default_factory=model))
        for name, model in ((n, _filter_model(n, c)) for n, c in FILTERS.items())
    }
    return create_model("FiltersSettings", __base__=_Section, **spec)


#: Every filter's settings, by name, in the order they run.
FiltersSettings = _filters_model()


class DedupSettings(_Section):
    """Exact and MinHash near-duplicate removal (:mod:`llmkit.data.dedup`)."""

    exact: bool = Field(True, description="Drop exact duplicates (whitespace-collapsed).")
    near: bool = Field(True, description="MinHash LSH near-duplicate removal.")
    ngram_size: int = Field(5, description="Words per shingle.")
    num_perm: int = Field(112, description="MinHash permutations.")
    bands: int | None = Field(14, description="LSH bands.")
    rows: int | None = Field(8, description="Rows per band.")
    threshold: float | None = Field(
        None, description="Verify candidates: near duplicate at this estimated Jaccard or more."
    )
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    normalize: bool = Field(False, description="Numbers as 0, no accents before shingling.")

    @model_validator(mode="after")
    def _in_range(self, info: ValidationInfo) -> DedupSettings:
        if not self.near:
            return self
        if not 1 <= self.ngram_size <= MAX_NGRAM_SIZE:
            raise UserError(
                f"{_subject(info, 'dedup.ngram_size', self.ngram_size)} is outside "
                f"[1, {MAX_NGRAM_SIZE}]",
                "give the words per n-gram, e.g. 5",
            )
        if not 1 <= self.num_perm <= MAX_NUM_PERM:
            raise UserError(
                f"{_subject(info, 'dedup.num_perm', self.num_perm)} is outside [1, {MAX_NUM_PERM}]",
                "give the MinHash permutations, e.g. 112",
            )
        for key in ("bands", "rows"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                subject = _subject(info, f"dedup.{key}", getattr(self, key))
                raise UserError(f"{subject} must be at least 1")
        keys = ("dedup.bands", "dedup.rows", "dedup.num_perm", "dedup.threshold")
        bands, rows, perm, threshold = (_name(info, k, *keys) for k in keys)
        where = _in_file(info, *keys)
        if (self.bands is None) != (self.rows is None):
            raise UserError(f"{bands} and {rows} go together{where}", "give both, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise UserError(
                f"{bands} x {rows} = {self.bands * self.rows} exceeds {perm} "
                f"{self.num_perm}{where}",
                f"raise {perm} or lower {bands} or {rows}",
            )
        if self.bands is None and self.threshold is None:
            raise UserError(f"without {bands} and {rows}, give {threshold}{where}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise UserError(
                f"{_subject(info, 'dedup.threshold', self.threshold)} is outside (0, 1]"
            )
        return self


def _default_regions() -> list:
    from llmkit.data.pii import DEFAULT_REGIONS

    return list(DEFAULT_REGIONS)


class CleaningSettings(_Section):
    """Every cleaning setting (the sections of a ``prepare.yaml``, module docstring)."""

    normalize: NormalizeSettings = Field(default_factory=NormalizeSettings)
    gutenberg: bool = Field(True, description="Strip Project Gutenberg headers and footers.")
    filters: FiltersSettings = Field(default_factory=FiltersSettings)  # type: ignore[valid-type]
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    pii: str = Field("redact", description="redact (e-mails, IPs, phone numbers) or keep.")
    pii_region: list = Field(
        default_factory=_default_regions,
        description="ISO 3166 regions whose national phone numbers are found.",
    )

    @field_validator("pii")
    @classmethod
    def _known_pii(cls, pii: str, info: ValidationInfo) -> str:
        if pii not in PII_MODES:
            raise UserError(f"{_subject(info, 'pii', repr(pii))} is not redact or keep")
        return pii

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> CleaningSettings:
        if self.pii == "redact":
            from llmkit.data.pii import check_regions

            try:
                check_regions([str(r) for r in self.pii_region])
            except ValueError as err:
                raise UserError(
                    f"{setting_name('pii_region', _source(info, 'pii_region'))}: {err}",
                    "give ISO 3166 region codes such as US,GB,DE",
                ) from None
        lang = self.filters.language
        if lang.enabled and not lang.languages:
            key = "filters.language.languages"
            raise UserError(
                f"{setting_name(key, _source(info, key))} is empty", "list the languages to keep"
            )
        return self

    @classmethod
    def build(
        cls, layers: list[dict], kind: str = "text", sources: list[str | None] | None = None
    ) -> CleaningSettings:
        """The defaults of ``kind`` (:data:`CHAT_DEFAULTS` for chat), updated by each of
        ``layers`` in turn (YAML, then flags); validated once, at the end. ``sources``: where
        each layer came from (a YAML file's path, :data:`COMMAND_LINE`, None: Python), for
        the errors' wording; default None for every layer."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}: {kind!r}")
        sources = list(sources) if sources is not None else [None] * len(layers)
        merged: dict = cls().model_dump()
        origins: dict[str, str | None] = {}
        for layer, source in [(CHAT_DEFAULTS, None)] * (kind == "chat") + list(
            zip(layers, sources, strict=True)
        ):
            merged = _merge(cls, merged, layer, source=source)
            origins.update(dict.fromkeys(_leaf_keys(layer), source))
        return _validated(cls, merged, origins)


# ---------------------------------------------------------------------------------------------
# A whole run.


class PrepareSettings(_Section):
    """Every setting of ``llmkit prepare`` (its flags; see :func:`llmkit.data.pipeline.prepare`
    for each one's meaning). The cleaning settings are in :attr:`cleaning`, built for text
    data; :meth:`cleaning_for` rebuilds them with the chat defaults once the data is known to
    be conversations. Fields are validated in this order, so the first mistake is reported."""

    max_document_bytes: int | None = Field(
        DEFAULT_MAX_DOCUMENT_BYTES, description="Cut longer documents (UTF-8 bytes); None: never."
    )
    encoding: str = Field(DEFAULT_ENCODING, description="utf-8, auto or a codec name.")
    format: str = Field("auto", description="auto, text or chat.")
    chat_template: str | None = Field(None, description="auto (None), tokenizer or chatml.")
    train_on: str | None = Field(None, description="assistant (None) or all.")
    overlong: str | None = Field(None, description="truncate (None) or drop.")
    on_error: str = Field("fail", description="fail or skip.")
    vocab_size: int = Field(1024, description="Tokens of the trained byte-level BPE.")
    tokenizer: str | None = Field(None, description="A pretrained tokenizer instead.")
    block_size: int = Field(128, description="Tokens per training block.")
    val_fraction: float = Field(0.1, description="Share of documents held out, in [0, 1).")
    split_on: str = Field("blank-lines", description="blank-lines or none.")
    text_field: str | None = Field(None, description="Field holding the text (None: text).")
    num_proc: int | None = Field(None, description="Worker processes (None: every core).")
    seed: int = Field(1337, description="Seed of the train/validation split.")
    keep_dropped: bool = Field(False, description="Write dropped.jsonl.")
    plot: bool = Field(True, description="Write lengths.png.")
    hub_split: str = Field("train", description="Split read from Hub dataset inputs.")
    trust_remote_code: bool = Field(False, description="Let a tokenizer run its own code.")
    executor: str | None = Field(
        None, description="local, slurm or ray: datatrove's executor (None: this process)."
    )
    tasks: int = Field(1, description="Tasks of each --executor stage (shards, partitions).")
    work_dir: str | None = Field(
        None, description="--executor: the shared work directory (any fsspec path)."
    )
    slurm_partition: str | None = Field(None, description="--executor slurm: the partition.")
    slurm_time: str | None = Field(None, description="--executor slurm: time limit per task.")
    slurm_cpus: int = Field(1, description="--executor slurm: CPUs per task.")
    ray_address: str | None = Field(None, description="--executor ray: the cluster's address.")
    cleaning: CleaningSettings = Field(default_factory=CleaningSettings)

    _cleaning_layers: list = PrivateAttr(default_factory=list)
    _cleaning_sources: list = PrivateAttr(default_factory=list)
    _origins: dict = PrivateAttr(default_factory=dict)

    @field_validator("max_document_bytes")
    @classmethod
    def _max_document_bytes(cls, value: int | None, info: ValidationInfo) -> int | None:
        from llmkit.data.readers import check_max_document_bytes

        check_max_document_bytes(value, _subject(info, "max_document_bytes", "").rstrip())
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str, info: ValidationInfo) -> str:
        if value != "auto":
            from llmkit.data.readers import _codec_name

            # an unknown encoding fails before anything is read
            _codec_name(value, _subject(info, "encoding", "").rstrip())
        return value

    @field_validator(
        "format", "chat_template", "train_on", "overlong", "on_error", "split_on", "executor"
    )
    @classmethod
    def _a_choice(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            subject = _subject(info, info.field_name, repr(value))
            _one_of(subject, value, _CHOICES[info.field_name])
        return value

    @field_validator("slurm_partition", "slurm_time")
    @classmethod
    def _slurm_value(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A Slurm option's value, written into the launch script's ``#SBATCH`` lines: a
        partition name (list) or a time limit in one of sbatch's formats
        (:data:`SLURM_PARTITION`, :data:`SLURM_TIME`)."""
        if value is None:
            return value
        subject = _subject(info, info.field_name, repr(value))
        if info.field_name == "slurm_partition" and not SLURM_PARTITION.fullmatch(value):
            raise UserError(
                f"{subject} is not a Slurm partition name",
                "letters, digits, '.', '_' and '-'; several separated by commas (cpu,gpu); "
                "sinfo lists them",
            )
        if info.field_name == "slurm_time" and not SLURM_TIME.fullmatch(value):
            raise UserError(
                f"{subject} is not a Slurm time limit",
                "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (sbatch --time), "
                "e.g. 04:00:00",
            )
        return value

    @model_validator(mode="after")
    def _in_range(self, info: ValidationInfo) -> PrepareSettings:
        def subject(key: str) -> str:
            return _subject(info, key, getattr(self, key))

        if self.tokenizer is None and self.vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"{subject('vocab_size')} is too small",
                f"a byte-level BPE needs 256 byte symbols plus <|endoftext|>: use at least "
                f"{MIN_VOCAB_SIZE}",
            )
        if self.tokenizer is None and self.vocab_size > MAX_VOCAB_SIZE:
            raise UserError(
                f"{subject('vocab_size')} is too large",
                f"use at most {MAX_VOCAB_SIZE:,} (2**24); 1024-65536 is usual",
            )
        if self.block_size < 2:
            raise UserError(
                f"{subject('block_size')} is too small",
                "a block needs at least 2 tokens (one input and its next-token target)",
            )
        if self.block_size > MAX_BLOCK_SIZE:
            raise UserError(
                f"{subject('block_size')} is too large",
                f"use at most {MAX_BLOCK_SIZE:,} (2**20) tokens per block",
            )
        if not 0 <= self.val_fraction < 1:
            raise UserError(
                f"{subject('val_fraction')} is outside [0, 1)",
                "give the share of documents held out for validation, e.g. 0.1",
            )
        if self.text_field is not None and not self.text_field:
            name = setting_name("text_field", _source(info, "text_field"))
            raise UserError(f"{name} is empty", "name the JSON field holding the text")
        if self.num_proc is not None:
            _check_num_proc(subject("num_proc"), self.num_proc)
        if self.seed < 0:
            raise UserError(f"{subject('seed')} is negative", "give a seed of 0 or more")
        return self

    @model_validator(mode="after")
    def _distributed(self, info: ValidationInfo) -> PrepareSettings:
        if self.tasks < 1 or self.slurm_cpus < 1:
            key = "tasks" if self.tasks < 1 else "slurm_cpus"
            raise UserError(
                f"{setting_name(key, _source(info, key))} must be at least 1",
                f"give {_name(info, key)} 1 or more",
            )
        if self.tasks > MAX_TASKS:
            raise UserError(
                f"{_subject(info, 'tasks', f'{self.tasks:,}')} is more than {MAX_TASKS:,}",
                "one task per shard or partition: a few per core of the cluster is enough",
            )
        given = [
            (key, engine)
            for key, engine, value in (
                ("tasks", None, self.tasks != 1),
                ("work_dir", None, self.work_dir),
                ("slurm_partition", "slurm", self.slurm_partition),
                ("slurm_time", "slurm", self.slurm_time),
                ("slurm_cpus", "slurm", self.slurm_cpus != 1),
                ("ray_address", "ray", self.ray_address),
            )
            if value
        ]
        for key, engine in given:  # an engine's option set for another was silently ignored
            if self.executor is None or (engine is not None and engine != self.executor):
                where = f"--executor {engine}" if engine else "--executor"
                now = f", not --executor {self.executor}" if self.executor else ""
                raise UserError(
                    f"{setting_name(key, _source(info, key))} applies to {where} only{now}",
                    f"leave it out, or add --executor {engine or 'local|slurm|ray'}",
                )
        if self.executor is not None and not self.work_dir:
            raise UserError(
                f"{_subject(info, 'executor', self.executor)} needs "
                f"{_name(info, 'work_dir', 'executor')}",
                "give a directory every task can read and write (any fsspec path)",
            )
        if self.executor == "slurm" and not (self.slurm_partition and self.slurm_time):
            missing = "slurm_partition" if not self.slurm_partition else "slurm_time"
            raise UserError(
                f"{_subject(info, 'executor', self.executor)} needs "
                f"{_name(info, missing, 'executor')}",
                "e.g. --slurm-partition cpu --slurm-time 04:00:00",
            )
        return self

    @classmethod
    def load(
        cls, config: str | Path | dict | None = None, flags: dict | None = None
    ) -> PrepareSettings:
        """Defaults < ``config`` (a ``prepare.yaml`` path, or its content as a dict) <
        ``flags`` (the settings given on the command line; a ``cleaning`` entry there holds
        the cleaning settings the flags set, :func:`llmkit.cli.prepare.clean_overrides`).

        Raises:
            UserError: an unreadable or invalid YAML file; an unknown key (naming the closest
                valid one); a value of the wrong type or out of range.
        """
        file = str(config) if isinstance(config, (str, Path)) else None
        data = _read_yaml(config) if file is not None else dict(config or {})
        if not isinstance(data, dict):
            where = file or "prepare config"
            raise UserError(f"{where}: expected a mapping of settings, got {data!r}")
        flags = dict(flags or {})
        sources = [file, COMMAND_LINE]  # errors name a file's key, or a flag (module docstring)
        run_layers = []
        clean_layers = []
        origins: dict[str, str | None] = {}
        for layer, source in zip((data, flags), sources, strict=True):
            clean = layer.pop("cleaning", None) or {}
            if not isinstance(clean, dict):
                raise UserError(f"cleaning{_in(source)}: expected a mapping, got {clean!r}")
            clean.update({k: layer.pop(k) for k in list(layer) if k in _CLEANING_KEYS})
            for key in layer:
                if key not in cls.model_fields or key == "cleaning":
                    valid = [*_CLEANING_KEYS, *(k for k in cls.model_fields if k != "cleaning")]
                    close = difflib.get_close_matches(str(key), valid, n=1)
                    hint = f"did you mean {close[0]}?" if close else f"valid: {', '.join(valid)}"
                    raise UserError(f"unknown prepare setting {key}{_in(source)}", hint)
            run_layers.append(layer)
            clean_layers.append(clean)
            origins.update(dict.fromkeys(layer, source))
        cleaning = CleaningSettings.build(clean_layers, sources=sources)
        merged = {k: v for layer in run_layers for k, v in layer.items()}
        settings = _validated(cls, {**merged, "cleaning": cleaning}, origins)
        settings._cleaning_layers = clean_layers
        settings._cleaning_sources = sources
        settings._origins = origins
        return settings

    def name_of(self, key: str, value: Any = None) -> str:
        """How a message names the run setting ``key`` (and ``value``, if given), as the user
        wrote it: ``--text-field body`` (command line), ``text_field in prepare.yaml: body``
        (a YAML file), ``text_field body`` (Python)."""
        if value is None:
            return setting_name(key, _source(self._origins, key))
        return _subject(self._origins, key, value)

    def cleaning_for(self, kind: str) -> CleaningSettings:
        """The cleaning settings for ``kind`` of data (chat: :data:`CHAT_DEFAULTS` first)."""
        if kind == "text":
            return self.cleaning
        sources = self._cleaning_sources or None
        return CleaningSettings.build(self._cleaning_layers, kind, sources)


_CHOICES = {
    "format": FORMATS,
    "chat_template": CHAT_TEMPLATE_CHOICES,
    "train_on": TRAIN_ON,
    "overlong": OVERLONG_RULES,
    "on_error": ON_ERROR,
    "split_on": SPLIT_MODES,
    "executor": EXECUTORS,
}
_CLEANING_KEYS = tuple(CleaningSettings.model_fields)
assert tuple(FiltersSettings.model_fields) == FILTER_NAMES


# ---------------------------------------------------------------------------------------------
# Layers and errors.


def _section_of(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    ann = model.model_fields[key].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _check_num_proc(subject: str, num_proc: int) -> None:
    """Refuse fewer than 1 worker process, or more than :data:`llmkit.runtime.
    MAX_THREADS_PER_CORE` per usable core (processes beyond the cores only wait, and a large
    corpus starts one per 2 MiB up to ``num_proc``: ``--num-proc 100000`` asked for
    hundreds)."""
    from llmkit.data.pipeline import default_num_proc
    from llmkit.runtime import MAX_THREADS_PER_CORE, usable_cores

    hint = (
        f"give 1 to {default_num_proc()} worker processes, or leave it out to use every "
        f"usable core ({default_num_proc()} here)"
    )
    if num_proc < 1:
        raise UserError(f"{subject} must be at least 1", hint)
    most = MAX_THREADS_PER_CORE * usable_cores()
    if num_proc > most:
        raise UserError(
            f"{subject} is more than {most} ({MAX_THREADS_PER_CORE} per core of the "
            f"{usable_cores()} this process may run on)",
            hint,
        )


def _in(source: str | None) -> str:
    """`` in FILE`` for a setting read from a YAML file, else ``""``."""
    return f" in {source}" if source and source != COMMAND_LINE else ""


def _merge(
    model: type[BaseModel], base: dict, override: Any, where: str = "", source: str | None = None
) -> dict:
    """``base`` (a dump of ``model``) updated by ``override``, section by section; a value that
    is not a section replaces the base's (a threshold table such as
    ``max_top_ngram_chars_ratio`` is replaced whole). Unknown keys are errors (naming the
    YAML file ``source``, if any)."""
    if not isinstance(override, dict):
        raise UserError(
            f"{where.rstrip('.') or 'prepare config'}{_in(source)}: expected a mapping, "
            f"got {override!r}"
        )
    out = dict(base)
    for key, value in override.items():
        if key not in model.model_fields:
            valid = list(model.model_fields)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {where}{close[0]}?" if close else f"valid: {', '.join(valid)}"
            raise UserError(f"unknown prepare setting {where}{key}{_in(source)}", hint)
        section = _section_of(model, key)
        if section is not None:
            out[key] = _merge(section, base[key], value, f"{where}{key}.", source)
        else:
            out[key] = value
    return out


def _leaf_keys(layer: Any, prefix: str = "") -> list[str]:
    """The dotted keys a settings layer sets (``{"dedup": {"bands": 20}}`` -> ``dedup.bands``);
    a mapping value counts as its keys (a threshold table: each entry)."""
    if not isinstance(layer, dict):
        return [prefix.rstrip(".")] if prefix else []
    keys = []
    for key, value in layer.items():
        keys += (
            _leaf_keys(value, f"{prefix}{key}.")
            if isinstance(value, dict) and value
            else [f"{prefix}{key}"]
        )
    return keys


_TYPE_NAMES = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "list",
    "dict_type": "dict",
    "int_from_float": "int",
}


def _validated(model: type[BaseModel], data: dict, origins: dict[str, str | None] | None = None):
    """``model`` built from ``data``; a type error as one :class:`UserError` naming the key
    (and the YAML file it was read from, by ``origins``: dotted key -> source, which the
    validators also read, :func:`_subject`)."""
    try:
        return model.model_validate(data, context=origins or {})
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        source = _source(origins or {}, loc)
        name = setting_name(loc, source) if source != COMMAND_LINE else loc
        fix = "fix the value in that file" if _in(source) else "fix the value in the prepare config"
        got = first.get("input")
        expected = _TYPE_NAMES.get(first["type"])
        if expected is None:
            raise UserError(f"{name}: {first['msg']}", fix) from None
        raise UserError(
            f"{name}: expected {expected}, got {type(got).__name__} {got!r}", fix
        ) from None


def _read_yaml(path: str | Path) -> dict:
    from llmkit.core.yamlfile import read_yaml

    return read_yaml(path) or {}


# ---------------------------------------------------------------------------------------------
# The dict form (what the manifest records and the stages are built from).


def default_config(kind: str = "text") -> dict:
    """Every cleaning setting with its default value, for ``kind`` ``"text"`` or ``"chat"``
    (:data:`CHAT_DEFAULTS`), as a dict."""
    return CleaningSettings.build([], kind).model_dump()


def merge(base: dict, override: dict, where: str = "") -> dict:
    """``base`` (cleaning settings as a dict) updated by ``override``, recursively; unknown keys
    and wrong types are errors."""
    return _validated(
        CleaningSettings, _merge(CleaningSettings, base, override, where)
    ).model_dump()


def load_config(path: str | Path | None, overrides: dict | None = None, kind: str = "text") -> dict:
    """The cleaning settings as a dict: defaults (of ``kind``, :func:`default_config`), then
    the YAML file at ``path`` (if any; its cleaning sections), then ``overrides`` (from flags)."""
    layers = [_read_yaml(path)] if path is not None else []
    sources = [str(path)] * len(layers)
    if overrides:
        layers.append(overrides)
        sources.append(COMMAND_LINE)
    return CleaningSettings.build(layers, kind, sources).model_dump()


def validate(cfg: dict) -> None:
    """Raise :class:`UserError` for cleaning settings (a dict) that are out of range."""
    _validated(CleaningSettings, cfg)


def build_stages(cfg: dict) -> list:
    """The cleaning rules of ``cfg``, in order: normalize, filters, dedup, PII (for the plain
    loop, :func:`llmkit.data.clean.run_stages`; the pipeline runs them as steps,
    :func:`build_steps`)."""
    from llmkit.data.clean import ExactDedup, Normalize
    from llmkit.data.dedup import MinHashDedup
    from llmkit.data.filters import FILTERS
    from llmkit.data.pii import RedactPII

    stages: list = [Normalize(**cfg["normalize"])]
    for name, cls in FILTERS.items():
        entry = dict(cfg["filters"][name])
        if entry.pop("enabled"):
            stages.append(cls(**entry))
    d = cfg["dedup"]
    if d["exact"]:
        stages.append(ExactDedup())
    if d["near"]:
        stages.append(
            MinHashDedup(
                ngram_size=d["ngram_size"],
                num_perm=d["num_perm"],
                bands=d["bands"],
                rows=d["rows"],
                threshold=d["threshold"],
                seed=d["seed"],
                normalize=d["normalize"],
            )
        )
    if cfg["pii"] == "redact":
        stages.append(RedactPII(regions=[str(r) for r in cfg["pii_region"]]))
    return stages


def build_steps(cfg: CleaningSettings | dict, dropped_writer=None) -> list:
    """The cleaning steps of ``cfg`` (:mod:`llmkit.data.steps`), in order: normalize, the
    filters turned on, the de-duplication signatures, then their global resolve steps, PII.

    The same steps clean documents and conversations (:class:`llmkit.data.document.Document`
    carries either; :class:`llmkit.data.steps.base.DocumentStep` runs a formatter on each
    message and a filter on the conversation's text). ``dropped_writer`` (a
    :class:`llmkit.data.steps.base.DroppedWriter`) receives every dropped document.
    """
    from llmkit.data.steps.dedup import dedup_steps

    if isinstance(cfg, CleaningSettings):
        cfg = cfg.model_dump()
    stages = build_stages(cfg)
    steps: list = []
    resolves: list = []
    for i, stage in enumerate(stages):
        if stage.stateless:
            steps.append(stage)
            continue
        # consecutive de-duplications: every signature, then every resolve (one barrier)
        signature, resolve = dedup_steps(stage)
        steps.append(signature)
        resolves.append(resolve)
        if i + 1 == len(stages) or stages[i + 1].stateless:
            steps += resolves
            resolves = []
    for step in steps:
        step.dropped_writer = dropped_writer
    return steps
