"""Token ids to text as they are generated: the continuation's text, stop strings, streaming.

Three rules, used by every path that turns generated ids into text (``generate``, ``chat``,
``serve``), so a streamed reply and the returned completion are the same string:

- **Decode with context.** The text of new ids is decoded together with the prompt's last
  token and that token's text removed (:func:`decode_continuation`): a SentencePiece decoder
  drops the leading space of a string's first token ("is" + "▁Paris" → " Paris"). When the
  prompt ends in byte-fallback tokens (Llama/Mistral's ``<0xF0>`` pieces of a character the
  vocabulary lacks) the context reaches back to the token before them
  (:func:`decoding_context`): a lone ``<0x80>`` would make the decoder turn the bytes that
  follow it into U+FFFD too.
- **Emit only text that can no longer change** (:class:`StreamDecoder`). Decoding the ids so
  far gives text whose end may still change when the next id arrives: a trailing U+FFFD is the
  first bytes of a character split across tokens (byte-level BPE, GPT-2 style), and the text of
  a run of byte-fallback tokens is not settled until a token that is not a byte ends the run —
  tokenizers' ``ByteFallback`` decoder turns the *whole* run into U+FFFD, one per byte, when
  any byte of it is invalid (``<0x41><0xF0><0x41>`` decodes to three U+FFFD, not "A�A"). Both
  are held back. A streamer that prints the text of each step and counts characters prints a
  character twice when the text before it shrinks like that (the bug of
  huggingface/tokenizers #1141 and exo-explore/exo PR #1691): emoji came out doubled and
  U+FFFD reached the terminal. Here the pieces emitted, joined, always equal the full decode of
  the ids (:meth:`StreamDecoder.finish` checks the end against it).
- **A text never ends in half a character.** When generation ends (length, EOS or a stop
  string) on an incomplete UTF-8 sequence — the first one to three bytes of a character whose
  remaining bytes were never generated (byte-level BPE pieces or ``<0xF0>`` byte-fallback
  tokens) — those trailing bytes are dropped from the text (:func:`drop_incomplete_tail`), so
  the completion and the streamed text end without the U+FFFD they would decode to. Only that
  incomplete tail is dropped: a complete character is never cut, and a U+FFFD the model
  produced as a whole (a ``�`` token, the bytes EF BF BD, or bytes that can never form a
  character) is kept.
- **Stop strings** end a text just before the first one it holds (:func:`find_stop`: the
  earliest, the longest at equal position); while streaming, an ending that may be the start
  of a stop string is held back until the next text settles it.

Decoding costs the same per token however long the text: :class:`StreamDecoder` decodes a
window that restarts from the last token once it is 16 tokens long and settled, and searches
stop strings in the text not yet emitted only. (It used to re-decode the whole continuation per
token whenever stop strings were given.)

Why not tokenizers' own ``tokenizers.decoders.DecodeStream`` (``step(tokenizer, id)``, 0.21+):
it works on a Rust ``tokenizers.Tokenizer`` only (not a slow transformers tokenizer), it emits
the text of an open byte-fallback run, which can still turn into U+FFFD, and on such a run it
raises ``Invalid prefix encountered while decoding stream`` (tokenizers 0.23.3) — which a
sampled small model produces readily.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, TextIO

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

# Decoding options shared by the streamer and the final text, so both give the same string.
# No clean-up of spaces: text already written to the terminal cannot be taken back.
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}

_REPLACEMENT = "\ufffd"
#: A byte-fallback token's name: ``<0x00>`` ... ``<0xFF>`` (SentencePiece's ``byte_fallback``,
#: tokenizers' ``ByteFallback`` decoder, which reads exactly this six-character form).
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_level_symbols() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, symbol → byte: printable Latin-1 bytes (``!``..``~``,
    ``¡``..``¬``, ``®``..``ÿ``) stand for themselves, every other byte for chr(256 + n), n
    counting those bytes in order (the table of openai/gpt-2 ``encoder.py``
    ``bytes_to_unicode``, which tokenizers' ``ByteLevel`` decoder uses; written out here)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_symbols()

#: New tokens a :class:`StreamDecoder` window holds before it restarts from its last token.
WINDOW = 16


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, **_DECODE)


def is_byte_token(tokenizer: Any, token_id: int) -> bool:
    """True when ``token_id`` is a byte-fallback token (``<0xF0>``): one byte of a character
    the vocabulary lacks, whose text depends on the bytes around it."""
    try:
        token = tokenizer.convert_ids_to_tokens(int(token_id))
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return False
    return isinstance(token, str) and len(token) == 6 and _BYTE_TOKEN.fullmatch(token) is not None


def decoding_context(tokenizer: Any, ids: list[int]) -> list[int]:
    """The last tokens of ``ids`` to decode new ids after: the last token, reaching back over
    a run of byte-fallback tokens to the token before them (at most 16 tokens; [] for no ids).

    A prompt that ends with a character spelled in bytes (``😀`` as ``<0xF0><0x9F><0x98>
    <0x80>``) would otherwise give a context of ``<0x80>`` alone, and the decoder would turn
    the new bytes after it into U+FFFD along with it."""
    k = 1
    while k < min(len(ids), 16) and is_byte_token(tokenizer, ids[-k]):
        k += 1
    return list(ids[-k:])


def _is_byte_level(tokenizer: Any) -> bool:
    """True for a GPT-2-style byte-level BPE tokenizer (every token a string of byte symbols):
    a slow tokenizer with a ``byte_decoder``, or a fast one whose decoder is (or holds)
    tokenizers' ``ByteLevel``."""
    if isinstance(getattr(tokenizer, "byte_decoder", None), dict):
        return True
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return False
    try:
        state = decoder.__getstate__()
    except Exception:  # noqa: BLE001 - a decoder that cannot say what it is: not byte-level
        return False
    return b'"ByteLevel"' in state if isinstance(state, bytes) else False


def _token_bytes(tokenizer: Any, token_id: int, byte_level: bool) -> bytes | None:
    """The UTF-8 bytes a token stands for, when it stands for bytes (a byte-fallback token, or
    any token of a byte-level tokenizer); None otherwise (a token that is text)."""
    if is_byte_token(tokenizer, token_id):
        return bytes([int(tokenizer.convert_ids_to_tokens(int(token_id))[3:5], 16)])
    if not byte_level:
        return None
    token = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(token, str) or not token or any(c not in _BYTE_LEVEL for c in token):
        return None
    return bytes(_BYTE_LEVEL[c] for c in token)


def _incomplete_tail(tokenizer: Any, ids: list[int]) -> tuple[int, int]:
    """``(pending, drop)``: how many trailing bytes of ``ids`` are an incomplete UTF-8 sequence
    (0 to 3: the start of a character whose other bytes are missing), and, when those bytes
    are all byte-fallback tokens, how many trailing ids hold them (special tokens after them,
    which decode to nothing, included); else ``drop`` is 0."""
    byte_level = _is_byte_level(tokenizer)
    skipped = set(getattr(tokenizer, "all_special_ids", None) or [])  # decode to nothing
    tail = b""
    fallback_ids: list[int] = []  # ids from the end to each trailing byte-fallback byte
    only_fallback = True
    for back, token_id in enumerate(reversed(ids), start=1):
        if len(tail) >= 4:
            break
        if token_id in skipped:
            continue
        piece = _token_bytes(tokenizer, token_id, byte_level)
        if piece is None:
            break
        if only_fallback and is_byte_token(tokenizer, token_id):
            fallback_ids.append(back)
        else:
            only_fallback = False
        tail = piece + tail
    if not tail:
        return 0, 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(tail, final=False)
    pending = len(decoder.getstate()[0])  # bytes held for a character not yet whole
    drop = fallback_ids[pending - 1] if 0 < pending <= len(fallback_ids) else 0
    return pending, drop


def drop_incomplete_tail(
    tokenizer: Any, context_ids: list[int], new_ids: list[int], text: str
) -> str:
    """``text`` (the decode of ``new_ids`` after ``context_ids``) less the text of trailing
    bytes that are an incomplete UTF-8 sequence: the first one to three bytes of a character
    whose remaining bytes were never generated (``F0 9F`` of 😀 when generation stopped there).
    They would read as U+FFFD; a stream holds them back and drops them at the end, so the
    returned completion drops them too.

    Nothing else changes: a complete character is never cut, and a U+FFFD that is a token of
    its own, the complete bytes EF BF BD, or bytes that can never start a character (``80``, an
    interrupted ``F0 41``) are kept. Byte-fallback bytes are dropped as tokens and the rest
    decoded again (tokenizers' ``ByteFallback`` turns a whole run with an invalid byte into
    U+FFFD, so ``<0x41><0xF0>`` reads ``A`` without its last token); a byte-level tokenizer's
    pending bytes read as one trailing U+FFFD (the "maximal subpart" rule of Unicode's
    chapter 3, U+FFFD substitution, which Python's and Rust's lossy decoders both follow), which
    is removed.
    """
    if not text.endswith(_REPLACEMENT) or not new_ids:
        return text
    pending, drop = _incomplete_tail(tokenizer, list(new_ids))
    if not pending:
        return text
    if drop:
        return _decode_after(tokenizer, context_ids, list(new_ids)[:-drop])
    return text[:-1]


def decode_continuation(tokenizer: Any, context_ids: list[int], new_ids: list[int]) -> str:
    """The text of ``new_ids`` as it reads after ``context_ids``, less an incomplete UTF-8
    sequence at its end (:func:`drop_incomplete_tail`): the text generation ended with.

    Decoding the new ids together with the last context token(s) (:func:`decoding_context`)
    keeps a leading space that a SentencePiece decoder drops at the start of a string
    ("is" + "▁Paris" → " Paris").

    Args:
        context_ids: token ids that precede (the prompt's; its last tokens are enough).
        new_ids: the generated ids.
    """
    text = _decode_after(tokenizer, context_ids, new_ids)
    return drop_incomplete_tail(tokenizer, context_ids, new_ids, text)


def _decode_after(tokenizer: Any, context_ids: list[int], new_ids: list[int]) -> str:
    """The text of ``new_ids`` after ``context_ids`` as decoded, incomplete tail included."""
    ctx = decoding_context(tokenizer, list(context_ids))
    prefix = _decode(tokenizer, ctx)
    full = _decode(tokenizer, ctx + list(new_ids))
    if full.startswith(prefix):
        return full[len(prefix) :]
    return _decode(tokenizer, list(new_ids))


def find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in ``text``: ``(index, stop)``, or None. At equal index the
    longest stop string wins."""
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(stop) > len(best[1]))):
            best = (i, stop)
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class StreamDecoder:
    """Generated ids in, text out: only text that can no longer change, cut before the first
    stop string. The pieces returned by :meth:`push` and :meth:`finish`, joined, equal
    :func:`decode_continuation` of all the ids, cut at the first stop string (the module
    docstring says what is held back and why).

    Args:
        tokenizer: decodes ids.
        context_ids: the prompt's ids (its last tokens are the decoding context).
        stops: stop strings.

    Attributes:
        stopped: a stop string was found; nothing more is emitted.
        stop: the stop string found.
    """

    def __init__(self, tokenizer: Any, context_ids: list[int], stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = list(stops or [])
        self.stopped = False
        self.stop: str | None = None
        self._start = decoding_context(tokenizer, list(context_ids))  # of the whole continuation
        self._ids: list[int] = []  # every new id
        self._emitted: list[str] = []  # the pieces returned so far
        self._held = ""  # settled text kept back: it may be the start of a stop string
        self._finished = False
        self._restart(self._start)

    def _restart(self, context: list[int]) -> None:
        """Start a new decoding window after ``context`` (whose text is already accounted)."""
        self._window = list(context)  # the context, then the new ids since
        self._new = 0  # new ids in the window
        self._prefix = _decode(self.tokenizer, self._window)  # the context's text
        self._taken = 0  # characters of the window's continuation already settled

    @property
    def window_size(self) -> int:
        """New ids in the current decoding window (at most :data:`WINDOW` once text settles)."""
        return self._new

    def _continuation(self, drop: int = 0) -> str:
        """The text of the window's new ids (less the last ``drop``) after its context, by
        :func:`decode_continuation`'s rule."""
        ids = self._window[: len(self._window) - drop]
        text = _decode(self.tokenizer, ids)
        if text.startswith(self._prefix):
            return text[len(self._prefix) :]
        start = len(self._window) - self._new
        return _decode(self.tokenizer, ids[start:])

    def _settled(self, text: str) -> int:
        """How many leading characters of the window's continuation ``text`` can no longer
        change: up to a trailing U+FFFD, and before the text of an open run of byte-fallback
        tokens at the end."""
        n = len(text.rstrip(_REPLACEMENT))
        run = 0
        while run < self._new and is_byte_token(self.tokenizer, self._window[-1 - run]):
            run += 1
        if run:
            n = min(n, len(self._continuation(drop=run)))
        return n

    def _final(self, text: str) -> str:
        """The window's continuation ``text`` as it would end if generation ended now: less an
        incomplete UTF-8 sequence at its end (:func:`drop_incomplete_tail`'s rule)."""
        if not text.endswith(_REPLACEMENT):
            return text
        pending, drop = _incomplete_tail(self.tokenizer, self._window[-self._new :])
        if not pending:
            return text
        return self._continuation(drop=drop) if drop else text[:-1]

    def push(self, ids: list[int]) -> str:
        """Take the next generated ids; return the text they settle ("" for none)."""
        if self.stopped or not ids:
            return ""
        ids = [int(i) for i in ids]
        self._ids += ids
        self._window += ids
        self._new += len(ids)
        text = self._continuation()
        settled = self._settled(text)
        fresh = text[self._taken : settled]
        self._taken = max(self._taken, settled)
        tail = self._final(text)[self._taken :]  # may still change
        open_end = len(text) > self._taken  # text not settled yet: no restart here
        ready = self._held + fresh
        # a stop string is looked for in the text as it would end now, unsettled tail included
        # (less an incomplete character, as :func:`drop_incomplete_tail` drops it): generation
        # ends here when one is found, so that text is final
        found = find_stop(ready + tail, self.stops) if self.stops else None
        if found is not None:
            self.stopped, self.stop, self._held = True, found[1], ""
            return self._emit((ready + tail)[: found[0]])
        keep = _held_back(ready, self.stops) if self.stops else 0
        self._held = ready[len(ready) - keep :] if keep else ""
        out = self._emit(ready[: len(ready) - keep])
        if not open_end and self._new >= WINDOW:
            self._maybe_restart()
        return out

    def _maybe_restart(self) -> None:
        """Restart the window from its last token, so the cost per token stays flat — unless
        that token cannot serve as context: a byte-fallback token (the bytes after it would
        join its run) or one that decodes to nothing (a skipped special token or ``<unk>``: the
        next token would decode as a string's first, its leading space dropped)."""
        last = self._window[-1:]
        if is_byte_token(self.tokenizer, last[0]) or not _decode(self.tokenizer, last):
            return
        self._restart(last)

    def finish(self) -> str:
        """The text not emitted yet (up to a stop string): generation has ended."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        full = decode_continuation(self.tokenizer, self._start, self._ids)
        emitted = "".join(self._emitted)
        if full.startswith(emitted):
            rest = full[len(emitted) :]
        else:  # a decoder whose text of a window differs from the whole's: the window's end
            rest = self._held + self._continuation()[self._taken :]
        found = find_stop(rest, self.stops) if self.stops else None
        if found is not None:
            self.stopped, self.stop = True, found[1]
            rest = rest[: found[0]]
        self._held = ""
        return self._emit(rest)

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text


class TextStream(BaseStreamer):
    """A ``model.generate`` streamer that writes the continuation to ``out`` as tokens arrive,
    through a :class:`StreamDecoder` (only text that can no longer change; nothing from a stop
    string on).

    The first ``put`` (the prompt, shape (1, T)) is skipped: the caller writes the prompt (set
    ``prompt_seen`` to feed generated ids only).

    Args:
        tokenizer: decodes ids.
        out: a text file (``sys.stdout``); flushed after each write.
        context_ids: the prompt's ids (its last tokens are kept as decoding context).
        stop: stop strings (see :class:`~llmkit.generation.settings.GenerationSettings`).
    """

    def __init__(
        self, tokenizer: Any, out: TextIO, context_ids: list[int], stop: list[str] | None = None
    ):
        self.tokenizer = tokenizer
        self.out = out
        self.context = list(context_ids)
        self.stops = list(stop or [])
        self.decoder = StreamDecoder(tokenizer, self.context, self.stops)
        self.prompt_seen = False

    @property
    def stopped(self) -> bool:
        """A stop string was found: nothing more is written."""
        return self.decoder.stopped

    def put(self, value: torch.Tensor) -> None:
        """Receive token ids: (1, T) for the prompt, then (1,) per generated token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self._write(self.decoder.push(value.reshape(-1).tolist()))

    def end(self) -> None:
        """Write whatever was held back (up to a stop string); ready for another prompt."""
        self._write(self.decoder.finish())
        self.decoder = StreamDecoder(self.tokenizer, self.context, self.stops)
        self.prompt_seen = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


class StopOnStrings(StoppingCriteria):
    """Ends each row of a batch as soon as its new text contains one of ``stops``.

    ``model.generate`` calls it after every step with ``input_ids`` of shape (B, T0 + t): the
    ``prompt_width`` prompt columns (left-padded), then t new tokens. Each row's new ids go
    through its own :class:`StreamDecoder` (its prompt as context), so a step costs the same
    however long the text; a row ends at the step where a stop string appears in its text.
    A done row stays done and ``generate`` pads it from then on.

    Args:
        prompt_ids: each row's prompt ids (B of them: a prompt repeated for each of its
            ``num_return_sequences``).
    """

    def __init__(
        self,
        tokenizer: Any,
        stops: list[str],
        prompt_width: int,
        eos: list[int],
        prompt_ids: list[list[int]],
    ):
        self.tokenizer = tokenizer
        self.stops = stops
        self.width = prompt_width
        self.eos = set(eos)
        self.decoders = [StreamDecoder(tokenizer, ids, stops) for ids in prompt_ids]
        self.seen = [0] * len(prompt_ids)  # new ids of each row already decoded
        self.done: torch.Tensor | None = None  # (B,) bool

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        B = input_ids.shape[0]
        if self.done is None:
            self.done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.width :]  # (B, t)
        for row in range(B):
            if self.done[row]:
                continue
            ids = new[row, self.seen[row] :].tolist()
            self.seen[row] += len(ids)
            end = next((i for i, t in enumerate(ids) if t in self.eos), None)
            decoder = self.decoders[row]
            decoder.push(ids if end is None else ids[:end])
            if end is not None or decoder.stopped:
                self.done[row] = True  # EOS: generate ends the row itself
        return self.done.clone()


def finish_row(
    tokenizer: Any, prompt_ids: list[int], row: list[int], eos: set[int], stops: list[str]
) -> tuple[list[int], str, str, str | None]:
    """Cut one generated row at its end: ``(kept ids, text, finish_reason, stop string)``.

    The row ends at its first EOS (kept, and counted as a new token); a stop string inside the
    text before it ends it earlier, at the token that completed the stop string, and the text is
    cut just before the stop string. Whatever ``generate`` padded after the end is dropped.
    """
    end = next((i for i, t in enumerate(row) if t in eos), None)
    body = row if end is None else row[:end]
    if stops:
        text = decode_continuation(tokenizer, prompt_ids, body)
        found = find_stop(text, stops)
        if found is not None:
            # the fewest tokens whose text already holds a stop string (containment only grows)
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if find_stop(decode_continuation(tokenizer, prompt_ids, body[:mid]), stops):
                    hi = mid
                else:
                    lo = mid + 1
            return body[:lo], text[: found[0]], "stop", found[1]
    if end is None:
        return row, decode_continuation(tokenizer, prompt_ids, row), "length", None
    kept = row[: end + 1]
    return kept, decode_continuation(tokenizer, prompt_ids, body), "eos", None
