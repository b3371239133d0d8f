"""Every allowed value of ``llmkit prepare``'s choice settings, defined once.

This module imports nothing, so the CLI (:mod:`llmkit.cli.prepare`) builds its flag choices from
it without slowing ``llmkit --help``; the settings model (:mod:`llmkit.data.config`) validates
against the same tuples, and the modules that act on a setting (readers, packing, chat
rendering) import them from here.
"""

#: How a plain-text file is cut into documents (:func:`llmkit.data.readers.read_documents`).
SPLIT_MODES = ("blank-lines", "none")
#: What a binary file, invalid UTF-8 or a malformed record does: stop, or skip and count it.
ON_ERROR = ("fail", "skip")
#: What the records of the inputs are: ``auto`` (detected,
#: :func:`llmkit.data.readers.resolve_format`), ``text`` (documents) or ``chat``.
FORMATS = ("auto", "text", "chat")
#: The chat template of chat data: ``auto`` (the tokenizer's own, else ChatML), ``tokenizer``
#: (its own, :data:`llmkit.data.sft.OWN_TEMPLATE`) or one of
#: :data:`llmkit.data.sft.CHAT_TEMPLATES` (a test holds the two in step).
CHAT_TEMPLATE_CHOICES = ("auto", "tokenizer", "chatml")
#: Which tokens of chat data are targets (:func:`llmkit.data.sft.render_with_labels`).
TRAIN_ON = ("assistant", "all")
#: What :class:`llmkit.data.pack.SFTPacker` does with a conversation over the block size.
OVERLONG_RULES = ("truncate", "drop")
#: Unicode normalization forms (UAX #15) of the normalize step.
NORMALIZATION_FORMS = ("NFC", "NFKC")
#: PII redaction: replace e-mails, IPs and phone numbers, or keep them.
PII_MODES = ("redact", "keep")
#: Rule sets turned on by the filter name ``web``.
WEB_FILTERS = ("gopher_quality", "gopher_repetition", "c4", "fineweb")
#: Filter names, in the order they run (:data:`llmkit.data.filters.FILTERS`, held in step
#: by a test).
FILTER_NAMES = ("length", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb")
#: Engines that run ``prepare`` across processes or machines (datatrove's executors;
#: :mod:`llmkit.data.distributed`); without one, prepare runs in this process.
EXECUTORS = ("local", "slurm", "ray")
