"""Streaming text as it is generated: what reaches the terminal equals the full decode, with no
U+FFFD, for the three tokenizer families (GPT-2's byte-level BPE, SentencePiece-style
Metaspace, Llama/Mistral-style byte fallback), on text mixing emoji, CJK and characters the
vocabulary lacks — through ``generate``'s streaming path and ``chat``'s (issue 17, item 5).

The tokenizers are built here with the ``tokenizers`` library; the model is a tiny GPT-2 whose
next token follows a script, so the real ``model.generate`` + streamer + stopping-criteria path
runs on exactly the ids under test."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from llmkit.generation.batching import complete
from llmkit.generation.chat import ChatSession, chat_loop
from llmkit.generation.decoding import (
    StopOnStrings,
    StreamDecoder,
    TextStream,
    decode_continuation,
    find_stop,
)
from llmkit.generation.generate import run_prompts
from llmkit.generation.settings import GenerationSettings

CORPUS = [
    "hello world, the cat sat on the mat.",
    "中文 text and more text",
    "naïve café done",
    "Hi there, how are you?",
] * 20
# emoji (4 UTF-8 bytes), CJK in the corpus (中文) and not (字), and characters no corpus line
# holds (😀 🎉 𝄞 ☃): byte pieces, byte-fallback tokens, or <unk>, depending on the tokenizer
TEXT = "Hi 😀😀 naïve 中文字 🎉 𝄞 café ☃ done"
KINDS = ("byte_level", "metaspace", "byte_fallback")


def _fast(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def build_tokenizer(kind: str, out):
    """A tiny tokenizer of the given family, saved to ``out`` and loaded back."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    if kind == "byte_level":  # GPT-2: every byte is a symbol, a character may span tokens
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS, trainer)
        eot = "<|endoftext|>"
        fast = _fast(tok, eos_token=eot, bos_token=eot, pad_token=eot)
    else:  # SentencePiece-style: "▁" for spaces, <unk> (metaspace) or <0x..> bytes otherwise
        special = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=special, show_progress=False)
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        if kind == "metaspace":
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
            tok.train_from_iterator(CORPUS, trainer)
        else:  # Llama 2 / Mistral's tokenizer.json: byte fallback, the decoder strips one space
            norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.normalizer = norm
            tok.train_from_iterator(CORPUS, trainer)
            trained = json.loads(tok.to_str())["model"]
            vocab = dict(trained["vocab"])
            for b in range(256):
                vocab.setdefault(f"<0x{b:02X}>", len(vocab))
            merges = [
                tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]
            ]
            tok = Tokenizer(
                models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
            )
            tok.normalizer = norm
            tok.decoder = decoders.Sequence(
                [
                    decoders.Replace("▁", " "),
                    decoders.ByteFallback(),
                    decoders.Fuse(),
                    decoders.Strip(" ", 1, 0),
                ]
            )
        fast = _fast(tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module", params=KINDS)
def tok(request, tmp_path_factory):
    return build_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def scripted_model(tok, script: list[int]):
    """A tiny GPT-2 whose i-th generated token is ``script[i]`` (then EOS), greedily: one
    forward pass per generated token, each counted from the ``generate`` call's start."""
    from transformers import GPT2Config, GPT2LMHeadModel

    class Scripted(GPT2LMHeadModel):
        def generate(self, *args, **kwargs):
            self.step = 0
            return super().generate(*args, **kwargs)

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            step, self.step = self.step, self.step + 1
            nxt = self.script[step] if step < len(self.script) else self.config.eos_token_id
            out.logits[:, -1, :] = -1e4  # (B, vocab_size)
            out.logits[:, -1, nxt] = 1e4
            return out

    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=8,
        n_layer=1,
        n_head=1,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = Scripted(cfg).eval()
    model.script = list(script)
    return model


def ids_of(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_the_three_tokenizers_are_what_they_claim(tok):
    """The text spans several tokens per character (bytes) or is partly unknown (<unk>)."""
    tokens = tok.convert_ids_to_tokens(ids_of(tok, TEXT))
    if "<0xF0>" in tok.get_vocab():
        assert tokens.count("<0xF0>") == 4  # 😀 😀 🎉 𝄞 as bytes
    elif tok.unk_token_id is not None and "Ġ" not in tok.get_vocab():
        assert "<unk>" in tokens and "▁naïve" in tokens
    else:
        assert "ð" in tokens  # GPT-2's symbol for the byte 0xF0
    assert tok.decode(ids_of(tok, TEXT), skip_special_tokens=True).strip() in (
        TEXT,
        "Hi  naïve 中文   café  done",  # metaspace: the unknown characters are <unk>, skipped
    )


@pytest.mark.parametrize("prompt", ["Hi", "Hi 😀", "中文字"])
def test_generate_streams_exactly_the_full_decode(tok, prompt):
    """``llmkit generate``'s streaming path: the terminal shows the prompt then exactly the
    completion's text; each emoji once, no U+FFFD. A prompt that ends in a character spelled
    in bytes (😀, 字) is decoding context the new bytes must not merge with."""
    script = ids_of(tok, TEXT)
    model = scripted_model(tok, script)
    out, err = io.StringIO(), io.StringIO()
    settings = GenerationSettings(max_new_tokens=len(script) + 2, temperature=0)
    (result,) = run_prompts(model, tok, [prompt], settings, stream=True, out=out, err=err)
    assert result.finish_reason == "eos" and result.token_ids == [*script, tok.eos_token_id]
    full = decode_continuation(tok, ids_of(tok, prompt), script)
    assert result.completion == full
    assert out.getvalue() == prompt + full + "\n"
    assert "\ufffd" not in out.getvalue()
    if "<unk>" not in tok.convert_ids_to_tokens(script):
        assert full.strip() == TEXT  # the characters themselves, each once


def test_chat_streams_exactly_the_reply(tok):
    """``llmkit chat``: the streamed reply is the reply kept in the history, byte for byte."""
    script = ids_of(tok, TEXT)
    model = scripted_model(tok, script)
    session = ChatSession(
        model, tok, GenerationSettings(max_new_tokens=len(script) + 2, temperature=0)
    )
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(session, io.StringIO("hello 😀\n"), out, err, interactive=False) == 1
    reply = session.history[-1]["content"]
    assert out.getvalue().strip() == reply and "\ufffd" not in out.getvalue()
    if "<unk>" not in tok.convert_ids_to_tokens(script):
        assert reply == TEXT


@pytest.mark.parametrize("stop", ["😀", "字", "☃ d", "naïve"])
def test_a_stop_string_across_byte_tokens_ends_stream_and_completion_alike(tok, stop):
    script = ids_of(tok, TEXT)
    model = scripted_model(tok, script)
    out = io.StringIO()
    settings = GenerationSettings(max_new_tokens=len(script) + 2, temperature=0, stop=[stop])
    result = complete(model, tok, "Hi", settings, stream_to=out)
    full = decode_continuation(tok, ids_of(tok, "Hi"), script)
    found = find_stop(full, [stop])
    if found is None:  # the metaspace tokenizer lost the character: no stop, the whole text
        assert result.finish_reason == "eos" and result.completion == full
    else:
        assert (result.finish_reason, result.stop) == ("stop", stop)
        assert result.completion == full[: found[0]]
    assert out.getvalue() == "Hi" + result.completion


def _random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Ids a sampling model might produce: byte tokens (valid runs and invalid ones), pieces."""
    vocab = sorted(tok.get_vocab().values())
    specials = set(tok.all_special_ids)
    pieces = ids_of(tok, TEXT)
    out: list[int] = []
    while len(out) < n:
        choice = rng.random()
        if choice < 0.4:
            out.append(rng.choice(pieces))
        elif choice < 0.7:
            out += pieces[rng.randrange(len(pieces)) :][: rng.randint(1, 6)]
        else:
            out.append(rng.choice([v for v in vocab if v not in specials]))
    return out[:n]


def test_stream_equals_the_full_decode_for_any_ids(tok):
    """Random ids — invalid UTF-8 byte runs included, which the byte-fallback decoder turns
    into U+FFFD as a whole only once the run ends — fed one to three at a time: the pieces
    joined equal the full decode of the ids fed, cut before the first stop string. (A stop
    string ends generation where it appears in the text as it reads then, so the ids fed are
    those up to that step.)"""
    rng = random.Random(0)
    context = ids_of(tok, "Hi 😀")
    for trial in range(60):
        new = _random_ids(tok, rng, rng.randint(1, 60))
        stops = [] if trial % 2 else ["é", "中文", "\ufffd\ufffd"]
        decoder = StreamDecoder(tok, context, stops)
        step, fed, pieces = 1 + trial % 3, 0, []
        while fed < len(new) and not decoder.stopped:
            pieces.append(decoder.push(new[fed : fed + step]))
            fed += step
        pieces.append(decoder.finish())
        full = decode_continuation(tok, context, new[:fed])
        found = find_stop(full, stops)
        expected = full if found is None else full[: found[0]]
        assert "".join(pieces) == expected, (trial, tok.convert_ids_to_tokens(new))
        assert decoder.stopped == (found is not None)


def test_no_piece_is_taken_back_by_a_later_one(tok):
    """Every prefix of the stream is a prefix of the final text: text once written is never
    decoded again into something else (the doubled emoji of byte-fallback streaming)."""
    script = ids_of(tok, TEXT)
    out = io.StringIO()
    stream = TextStream(tok, out, ids_of(tok, "Hi"))
    stream.put(torch.tensor([ids_of(tok, "Hi")]))  # the prompt: not written
    seen = []
    for i in script:
        stream.put(torch.tensor([i]))
        seen.append(out.getvalue())
    stream.end()
    final = out.getvalue()
    assert final == decode_continuation(tok, ids_of(tok, "Hi"), script)
    assert all(final.startswith(s) and "\ufffd" not in s for s in seen)


class CountingDecodes:
    """Wraps a tokenizer; counts the ids its ``decode`` is asked to decode, in total."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_decoding_cost_per_token_is_flat_with_stop_strings(tok):
    """With stop strings the streamer and the stopping criterion decoded the whole text again
    for every token (quadratic: ~n²/2 ids for n tokens); now a window of at most ~16 tokens."""
    script = ids_of(tok, TEXT) * 12
    n = len(script)
    counting = CountingDecodes(tok)
    stream = TextStream(counting, io.StringIO(), ids_of(tok, "Hi"), stop=["never there"])
    stream.prompt_seen = True
    for i in script:
        stream.put(torch.tensor([i]))
    stream.end()
    assert stream.out.getvalue() == decode_continuation(tok, ids_of(tok, "Hi"), script)
    streamed = counting.decoded
    counting.decoded = 0
    prompt = ids_of(tok, "Hi")
    criterion = StopOnStrings(counting, ["never there"], len(prompt), [tok.eos_token_id], [prompt])
    for k in range(1, n + 1):
        assert not criterion(torch.tensor([prompt + script[:k]]))[0]
    for decoded in (streamed, counting.decoded):
        assert decoded < 60 * n < n * n / 2  # the final full decode included


def _cuts_inside_a_character(tok, script: list[int]) -> list[int]:
    """The lengths k at which ``script[:k]`` ends on part of a character: its plain decode
    (nothing dropped) ends in U+FFFD."""
    raw = [tok.decode(script[:k], skip_special_tokens=True) for k in range(1, len(script))]
    return [k for k, text in enumerate(raw, start=1) if text.endswith("\ufffd")]


@pytest.mark.parametrize("ending", ["length", "eos"])
def test_generation_ending_inside_a_character_drops_the_incomplete_bytes(tok, ending):
    """Generation that ends (by length or EOS) after the first bytes of an emoji/CJK character:
    stdout and the completion are the same text, without the U+FFFD those bytes decode to, and
    every complete character before them is kept."""
    script = ids_of(tok, TEXT)
    cuts = _cuts_inside_a_character(tok, script)
    if "<unk>" in tok.convert_ids_to_tokens(script):
        assert cuts == []  # metaspace: unknown characters are <unk>, never bytes
        return
    assert len(cuts) >= 4  # inside 😀, 😀, 字 (byte fallback), 🎉, 𝄞 ...
    full = decode_continuation(tok, ids_of(tok, "Hi"), script)
    for k in cuts:
        model = scripted_model(tok, script[:k])
        out, err = io.StringIO(), io.StringIO()
        limit = k if ending == "length" else k + 2
        settings = GenerationSettings(max_new_tokens=limit, temperature=0)
        (result,) = run_prompts(model, tok, ["Hi"], settings, stream=True, out=out, err=err)
        assert result.finish_reason == ending
        ctx = ids_of(tok, "Hi")[-1:]
        if "<0xF0>" in tok.get_vocab():
            # byte fallback turns a whole run with an incomplete character into U+FFFD: the
            # text is that of the longest shorter script without U+FFFD (TEXT has none)
            j = max(j for j in range(k) if "\ufffd" not in tok.decode(ctx + script[:j]))
        else:  # byte-level: the incomplete bytes read as one U+FFFD after the whole text
            j = k
        raw = tok.decode(ctx + script[:j], skip_special_tokens=True)
        expected = raw.rstrip("\ufffd")[len(tok.decode(ctx)) :]
        assert result.completion == expected, (k, raw)
        assert out.getvalue() == "Hi" + expected + "\n"
        assert full.startswith(expected) and "\ufffd" not in out.getvalue()


@pytest.mark.parametrize("text", ["a\ufffd", "\ufffd", "中\ufffd"])
def test_a_complete_replacement_character_is_kept(tok, text):
    """U+FFFD that the model produced whole (its own token or its complete bytes EF BF BD) is
    text, not an unfinished character: it stays, in the completion and the stream alike."""
    ids = ids_of(tok, text)
    if "<unk>" in tok.convert_ids_to_tokens(ids):
        pytest.skip("metaspace: U+FFFD is not in this vocabulary")
    assert decode_continuation(tok, ids_of(tok, "Hi"), ids).endswith("\ufffd")
    decoder = StreamDecoder(tok, ids_of(tok, "Hi"), [])
    assert (decoder.push(ids) + decoder.finish()).endswith("\ufffd")


def test_a_byte_that_can_never_start_a_character_is_kept(tok):
    """A lone continuation byte (0x80) is invalid, not incomplete: it reads U+FFFD, kept."""
    vocab = tok.get_vocab()
    byte = vocab.get("<0x80>", vocab.get("Ģ"))  # byte fallback / GPT-2's symbol for 0x80
    if byte is None:
        pytest.skip("metaspace: no byte tokens")
    assert decode_continuation(tok, ids_of(tok, "Hi"), ids_of(tok, "a") + [byte]).endswith("\ufffd")
