"""The one document type every cleaning step of ``llmkit prepare`` reads and yields.

After datatrove's ``Document`` (``src/datatrove/data.py``): one small dataclass, the text, an
id, and everything else in ``metadata``. A conversation (chat data) carries its list of
messages in :attr:`Document.messages`, and :attr:`Document.text` is then its plain-text form
(:func:`llmkit.data.sft.conversation_text`), what filters and de-duplication judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

Message = dict[str, str]


def utf8_len(text: str) -> int:
    """Length of ``text`` in UTF-8 bytes."""
    return len(text.encode("utf-8"))


@dataclass(eq=False)
class Document:
    """A document, or a conversation.

    Attributes:
        text: the document's text; for a conversation its ``role: content`` text.
        id: its position in the corpus as read (0-based), so that what is written per worker
            (dropped documents) can be put back in corpus order.
        metadata: everything else: ``where`` (a web page's URL, a conversation's
            ``file:line``), and the keys that de-duplication signature steps leave for the
            resolve steps.
        messages: a conversation's messages ``[{"role", "content"}, ...]``; None for a
            document.
    """

    text: str
    id: int = 0
    metadata: dict = field(default_factory=dict)
    messages: list[Message] | None = None
    _n_bytes: int | None = field(default=None, repr=False)

    @classmethod
    def conversation(
        cls, messages: Sequence[Message], id: int = 0, metadata: dict | None = None
    ) -> Document:
        """A conversation of ``messages`` (its :attr:`text` derived from them)."""
        from llmkit.data.sft import conversation_text

        messages = [dict(m) for m in messages]
        return cls(conversation_text(messages), id, dict(metadata or {}), messages)

    @property
    def is_conversation(self) -> bool:
        """True for a conversation (it has :attr:`messages`)."""
        return self.messages is not None

    def stored(self) -> str:
        """What is stored for this document: its text, or a conversation's JSON list of
        messages (:func:`llmkit.data.readers.conversation_json`)."""
        if self.messages is None:
            return self.text
        from llmkit.data.readers import conversation_json

        return conversation_json(self.messages)

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of :meth:`stored` (kept until the text or the messages change)."""
        if self._n_bytes is None:
            self._n_bytes = utf8_len(self.stored())
        return self._n_bytes

    def set_text(self, text: str) -> None:
        """Replace a document's text."""
        if text is not self.text:
            self.text = text
            self._n_bytes = None

    def set_messages(self, messages: list[Message]) -> None:
        """Replace a conversation's messages (and so its text)."""
        from llmkit.data.sft import conversation_text

        self.messages = messages
        self.text = conversation_text(messages)
        self._n_bytes = None
