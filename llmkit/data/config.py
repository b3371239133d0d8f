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
An unknown key is an error naming the closest valid one; a value of the wrong type is an error.

Chat data (``llmkit prepare --format chat``) goes through the same stages, adapted by
:func:`build_stages` (``kind="chat"``): the stages that rewrite text (normalize, PII) run on
each message's content (:class:`ContentStage`); the filters and both de-duplications judge the
conversation as one text, :func:`llmkit.data.sft.conversation_text` (``role: content`` per
message; :class:`ConversationTextStage`, :class:`ConversationCorpusStage`). Two defaults differ
for chat (:func:`default_config`): near-duplicate removal is off — instruction sets hold the
same answer to paraphrased questions on purpose (the support example set has three phrasings
per answer), and the FineWeb MinHash settings, tuned on web pages, merge such short
conversations (2 of its 81 at the defaults) — and exact de-duplication stays on. The web rule
sets stay off as for text; named explicitly they judge the whole conversation and only drop it
(C4's line removal cannot be mapped back onto the messages and is not applied).
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from llmkit.data.clean import CorpusStage, DocumentStage, Outcome
from llmkit.errors import UserError

#: Rule sets turned on by the name ``web``.
WEB_FILTERS = ("gopher_quality", "gopher_repetition", "c4", "fineweb")
DEFAULT_ENABLED = ("length",)
#: Kinds of data, each with its defaults (:func:`default_config`) and stages (:func:`build_stages`).
KINDS = ("text", "chat")
#: Settings whose default differs for chat data (see the module docstring).
CHAT_DEFAULTS = {"dedup": {"near": False}}


def _filter_defaults() -> dict:
    from llmkit.data.filters import FILTERS

    out = {}
    for name, cls in FILTERS.items():
        entry = {"enabled": name in DEFAULT_ENABLED}
        inst = cls()
        for f in fields(cls):
            entry[f.name] = copy.deepcopy(getattr(inst, f.name))
        out[name] = entry
    return out


def _default_pii_regions() -> tuple[str, ...]:
    from llmkit.data.pii import DEFAULT_REGIONS

    return DEFAULT_REGIONS


def default_config(kind: str = "text") -> dict:
    """Every cleaning setting with its default value, for ``kind`` ``"text"`` or ``"chat"``
    (:data:`CHAT_DEFAULTS`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}: {kind!r}")
    cfg = {
        "normalize": {"form": "NFC", "fix_mojibake": True, "whitespace": True, "html": False},
        "gutenberg": True,
        "filters": _filter_defaults(),
        "dedup": {
            "exact": True,
            "near": True,
            "ngram_size": 5,
            "num_perm": 112,
            "bands": 14,
            "rows": 8,
            "threshold": None,
            "seed": 1,
            "normalize": False,
        },
        "pii": "redact",
        "pii_region": list(_default_pii_regions()),
    }
    return merge(cfg, CHAT_DEFAULTS) if kind == "chat" else cfg


#: Keys whose default is None and the types they accept.
_NULLABLE = {
    "max_chars": int,
    "min_words": int,
    "max_words": int,
    "threshold": float,
    "bands": int,
    "rows": int,
}


def _check_type(where: str, key: str, default, value):
    if value is None and (default is None or key in _NULLABLE):
        return None
    expected = _NULLABLE.get(key) if default is None else type(default)
    if expected is None:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(
            f"{where}{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}",
            "fix the value in the prepare config",
        )
    return value


def merge(base: dict, override: dict, where: str = "") -> dict:
    """``base`` updated by ``override``, recursively; unknown keys and wrong types are errors."""
    if not isinstance(override, dict):
        raise UserError(f"{where or 'prepare config'}: expected a mapping, got {override!r}")
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            close = difflib.get_close_matches(str(key), list(base), n=1)
            hint = f"did you mean {where}{close[0]}?" if close else f"valid: {', '.join(base)}"
            raise UserError(f"unknown prepare setting {where}{key}", hint)
        if (
            isinstance(base[key], dict)
            and key not in ("max_top_ngram_chars_ratio",)
            and not (key.startswith("max_duplicate_ngram"))
        ):
            out[key] = merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = _check_type(where, key, base[key], value)
    return out


def load_config(path: str | Path | None, overrides: dict | None = None, kind: str = "text") -> dict:
    """Defaults (of ``kind``, :func:`default_config`), then the YAML file at ``path`` (if any),
    then ``overrides`` (from flags)."""
    cfg = default_config(kind)
    if path is not None:
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as err:
            raise UserError(f"cannot read {p}: {err.strerror}", "check the --config path") from err
        except yaml.YAMLError as err:
            raise UserError(f"{p} is not valid YAML: {err}".replace("\n", " ")) from err
        cfg = merge(cfg, data)
    if overrides:
        cfg = merge(cfg, overrides)
    validate(cfg)
    return cfg


#: Upper bounds of the MinHash settings (larger values only exhaust memory).
MAX_NGRAM_SIZE = 4096
MAX_NUM_PERM = 4096


def validate(cfg: dict) -> None:
    """Values that are of the right type but out of range."""
    form = cfg["normalize"]["form"]
    if form not in ("NFC", "NFKC"):
        raise UserError(f"normalize.form {form!r} is not NFC or NFKC")
    if cfg["pii"] not in ("redact", "keep"):
        raise UserError(f"pii {cfg['pii']!r} is not redact or keep")
    if cfg["pii"] == "redact":
        from llmkit.data.pii import check_regions

        try:
            check_regions([str(r) for r in cfg["pii_region"]])
        except ValueError as err:
            raise UserError(
                f"pii_region: {err}", "give ISO 3166 region codes such as US,GB,DE"
            ) from None
    d = cfg["dedup"]
    if d["near"]:
        if not 1 <= d["ngram_size"] <= MAX_NGRAM_SIZE:
            raise UserError(
                f"dedup.ngram_size {d['ngram_size']} is outside [1, {MAX_NGRAM_SIZE}]",
                "give the words per n-gram, e.g. 5",
            )
        if not 1 <= d["num_perm"] <= MAX_NUM_PERM:
            raise UserError(
                f"dedup.num_perm {d['num_perm']} is outside [1, {MAX_NUM_PERM}]",
                "give the MinHash permutations, e.g. 112",
            )
        for key in ("bands", "rows"):
            if d[key] is not None and d[key] < 1:
                raise UserError(f"dedup.{key} {d[key]} must be at least 1")
        if (d["bands"] is None) != (d["rows"] is None):
            raise UserError("dedup.bands and dedup.rows go together", "give both, or neither")
        if d["bands"] is not None and d["bands"] * d["rows"] > d["num_perm"]:
            raise UserError(
                f"dedup.bands x rows = {d['bands'] * d['rows']} exceeds num_perm {d['num_perm']}",
                "raise --minhash-perm or lower bands/rows",
            )
        if d["bands"] is None and d["threshold"] is None:
            raise UserError("without dedup.bands and rows, give dedup.threshold")
        if d["threshold"] is not None and not 0 < d["threshold"] <= 1:
            raise UserError(f"dedup.threshold {d['threshold']} is outside (0, 1]")
    lang = cfg["filters"]["language"]
    if lang["enabled"] and not lang["languages"]:
        raise UserError("filters.language.languages is empty", "list the languages to keep")


def build_stages(cfg: dict, kind: str = "text") -> list:
    """The document stages of ``cfg``, in order: normalize, filters, dedup, PII.

    For ``kind="chat"`` each stage is adapted to conversations carried as their JSON list of
    messages (:func:`llmkit.data.readers.conversation_json`): normalize and PII by
    :class:`ContentStage`, the filters by :class:`ConversationTextStage`, the de-duplications
    by :class:`ConversationCorpusStage`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}: {kind!r}")
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
    if kind == "chat":
        stages = [chat_stage(stage) for stage in stages]
    return stages


# ---------------------------------------------------------------------------------------------
# The stages on conversations.

#: Stages that rewrite a text: on chat data they run on every message's content.
CONTENT_STAGES = ("normalize", "pii")


def _messages(text: str) -> list[dict[str, str]]:
    return json.loads(text)


def _conversation_text(text: str) -> str:
    from llmkit.data.sft import conversation_text

    return conversation_text(_messages(text))


class _Wrapping:
    """A stage that runs another (``inner``) on a conversation: same name, counts and
    settings as the inner stage."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.count_template = dict(getattr(inner, "count_template", {}))

    def settings(self) -> dict:
        """The inner stage's settings (what the manifest records)."""
        return self.inner.settings() if hasattr(self.inner, "settings") else {}


class ContentStage(_Wrapping, DocumentStage):
    """A text-rewriting document stage (normalize, PII) run on each message's content.

    The conversation is kept with every content rewritten, or dropped when the stage drops one
    message (``"empty"`` becomes ``"empty message"``: a turn with nothing left in it breaks the
    conversation; any other reason ``"<reason> (a message)"``). Counts: grouped counts
    (``replaced/email``) add up over the messages; a plain count (``documents_changed``) counts
    the conversation once.
    """

    stateless = True

    def apply(self, text: str) -> Outcome:
        from llmkit.data.readers import conversation_json

        messages = _messages(text)
        out: list[dict[str, str]] = []
        counts: dict[str, int] = {}
        changed = False
        for message in messages:
            content, reason, c = self.inner.apply(message["content"])
            if content is None:
                why = "empty message" if reason == "empty" else f"{reason} (a message)"
                return None, why, None
            for key, n in (c or {}).items():
                counts[key] = counts.get(key, 0) + n if "/" in key else max(counts.get(key, 0), n)
            changed = changed or content != message["content"]
            out.append({"role": message["role"], "content": content})
        return (conversation_json(out) if changed else text), None, counts or None


class ConversationTextStage(_Wrapping, DocumentStage):
    """A filter judging a conversation by its :func:`~llmkit.data.sft.conversation_text`.

    Only the filter's verdict is used: the conversation is kept unchanged or dropped with the
    filter's reason. A filter that would rewrite the text (C4's line removal) does not rewrite
    the conversation. The filter's own counts are kept only for a conversation it passed
    unchanged (e.g. ``rules_skipped``), never counts of a rewriting that did not happen.
    """

    stateless = True

    def apply(self, text: str) -> Outcome:
        plain = _conversation_text(text)
        out, reason, counts = self.inner.apply(plain)
        if out is None:
            return None, reason, None
        return text, None, (counts if out == plain else None)


class ConversationCorpusStage(_Wrapping, CorpusStage):
    """A de-duplication keyed on the conversation's :func:`~llmkit.data.sft.conversation_text`
    (roles included: the same words said by another role are another conversation)."""

    stateless = False

    def key(self, text: str) -> Any:
        return self.inner.key(_conversation_text(text))

    def key_feature(self) -> Any:
        return self.inner.key_feature()

    def admit(self, key: Any) -> tuple[str | None, dict[str, int] | None]:
        return self.inner.admit(key)


def chat_stage(stage):
    """``stage`` adapted to conversations (see :func:`build_stages`)."""
    if not stage.stateless:
        return ConversationCorpusStage(stage)
    if stage.name in CONTENT_STAGES:
        return ContentStage(stage)
    return ConversationTextStage(stage)
