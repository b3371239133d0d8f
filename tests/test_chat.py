"""`llmkit chat`: chat template, history, /reset, /exit, stdin from a script, context trimming."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.loading import load_model_and_tokenizer
from llmkit.generation.batching import complete_batch
from llmkit.generation.chat import ChatSession, chat_loop
from llmkit.generation.prompts import encode_chat
from llmkit.generation.settings import GenerationSettings

runner = CliRunner()
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny GPT-2 with a simple chat template on its tokenizer."""
    from llmkit.core.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_model_dir, out)
    tok = load_tokenizer(out)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture
def session(chat_model_dir):
    model, tok, _ = load_model_and_tokenizer(str(chat_model_dir), device="cpu")
    assert tok.chat_template == TEMPLATE
    settings = GenerationSettings(max_new_tokens=4, temperature=0)
    return ChatSession(model, tok, settings, system="Be brief.")


def test_history_goes_into_the_next_prompt(session):
    out, err = io.StringIO(), io.StringIO()
    first = session.reply("Hi", out=out, err=err)
    second = session.reply("And you?", out=out, err=err)
    expected = encode_chat(
        session.tokenizer,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": first.completion.strip()},
            {"role": "user", "content": "And you?"},
        ],
    )
    assert second.prompt_tokens == len(expected)
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert out.getvalue() == first.completion + "\n" + second.completion + "\n"


def test_loop_reset_and_exit(session, chat_model_dir):
    inp = io.StringIO("Hi\nAnd you?\n/reset\nAnd you?\n/exit\nnever answered\n")
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(session, inp, out, err, interactive=False) == 3
    replies = out.getvalue().splitlines()
    fresh = ChatSession(session.model, session.tokenizer, session.settings, system="Be brief.")
    alone = fresh.reply("And you?", out=io.StringIO(), err=err)
    assert replies[2] == alone.completion  # after /reset the history is gone
    assert "history cleared" in err.getvalue()
    assert len(session.history) == 2  # only the exchange after /reset


def test_old_exchanges_dropped_to_fit_the_context(session):
    out, err = io.StringIO(), io.StringIO()
    session.settings.max_new_tokens = 6  # 64 positions: room for a few short exchanges only
    for i in range(8):
        session.reply(f"m{i}", out=out, err=err)
    assert "dropped" in err.getvalue()
    assert session.history[-2]["content"] == "m7"
    assert session.history[0]["content"] != "m0"


def test_cli_chat_from_stdin(chat_model_dir):
    args = ["chat", "-m", str(chat_model_dir), "-t", "0", "--max-new-tokens", "3"]
    res = runner.invoke(app, args, input="Hi\n\n/reset\nHi\n")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]  # same message after /reset, same reply


def test_cli_chat_without_template(tiny_model_dir):
    res = runner.invoke(app, ["chat", "-m", str(tiny_model_dir)], input="Hi\n")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: the model's tokenizer has no chat template")
    assert res.stderr.count("\n") == 1


# --- a model trained on chat data: ChatML template, <|im_end|> ends the turn ----------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANSWER = "Hello there"


def chatml_tokenizer(texts: list[str]):
    """A tiny byte-level BPE whose special tokens are <|endoftext|> (0, the EOS), <|im_start|>
    (1) and <|im_end|> (2), with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, shakespeare):
    """A GPT-2 whose config EOS is <|endoftext|> (0) and whose weights are set by hand so that,
    greedily, the ChatML generation prompt ("<|im_start|>assistant\\n") is followed by
    "Hello", " there", then <|im_end|> (2): the answer of a model fine-tuned on chat data.

    With one layer whose attention and MLP outputs are zero and no position embeddings, the
    logits depend on the last token only: logits = lm_head(ln_f(wte[x])). Each row of lm_head
    on the chain is set to the hidden state of the token before it (a dot product of 128 with
    itself against about ±11 with the others)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    text = shakespeare.read_text(encoding="utf-8")[:20_000]
    tok = chatml_tokenizer([*text.split("\n\n"), *[f"{ANSWER}!\n"] * 50])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (tok.eos_token_id, im_end) == (0, 2)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=128,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        block = model.transformer.h[0]
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        model.lm_head.weight.normal_(0, 0.01)
        last = tok("\n", add_special_tokens=False)["input_ids"]
        first, second = tok(ANSWER, add_special_tokens=False)["input_ids"]
        assert len(last) == 1 and len({last[0], first, second, im_end}) == 4

        def hidden(token: int) -> torch.Tensor:
            return model.transformer(torch.tensor([[token]])).last_hidden_state[0, 0]

        for before, after in ((last[0], first), (first, second), (second, im_end)):
            model.lm_head.weight[after] = hidden(before)
    out = tmp_path_factory.mktemp("chatml") / "chatml-run"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_end_of_turn_token_comes_from_the_template(chatml_dir):
    from llmkit.generation.batching import eos_ids
    from llmkit.templates import end_of_turn_ids

    model, tok, _ = load_model_and_tokenizer(str(chatml_dir), device="cpu")
    assert tok.chat_template == CHATML  # the template saved in the model directory
    assert model.generation_config.eos_token_id == 0
    assert end_of_turn_ids(tok) == [2]
    assert eos_ids(model, tok) == [0, 2]
    tok.chat_template = TEMPLATE  # turns end with a plain newline: no end-of-turn token
    assert end_of_turn_ids(tok) == []
    tok.chat_template = None
    assert eos_ids(model, tok) == [0]


# ChatML whose generation prompt adds a blank line the rendered answer does not repeat (the
# generation prompt is not a prefix of the answer), and a Llama 2-like one with a space before
# its end-of-turn token
CHATML_BLANK_LINE = CHATML.replace("assistant\n{% endif %}", "assistant\n\n{% endif %}")
CHATML_SPACED = CHATML.replace("{{ m['content'] }}<|im_end|>", "{{ m['content'] }} <|im_end|>")


@pytest.mark.parametrize("template", [CHATML, CHATML_BLANK_LINE, CHATML_SPACED])
def test_one_end_of_turn_rule_for_prepare_and_generate(chatml_dir, template):
    """prepare's stop token (``llmkit.data.sft.end_of_turn_token``) and generate's extra EOS id
    (``end_of_turn_ids``) are one rule (``llmkit.templates``), found from the rendered answer
    alone: a generation prompt that is not a prefix of the answer no longer breaks prepare's
    probe, and a space before the marker no longer hides it from generate."""
    from llmkit.data import sft
    from llmkit.templates import end_of_turn_ids, end_of_turn_token

    _, tok, _ = load_model_and_tokenizer(str(chatml_dir), device="cpu")
    tok.chat_template = template
    assert sft.end_of_turn_token is end_of_turn_token
    assert end_of_turn_token(tok) == "<|im_end|>"
    assert end_of_turn_ids(tok) == [2]


def test_generated_im_end_ends_the_turn(chatml_dir):
    from llmkit.generation.generate import run_prompts

    model, tok, _ = load_model_and_tokenizer(str(chatml_dir), device="cpu")
    settings = GenerationSettings(max_new_tokens=10, temperature=0)
    (r,) = run_prompts(model, tok, ["Hi"], settings, chat=True)
    assert r.token_ids == [*tok(ANSWER)["input_ids"], 2]
    assert (r.completion, r.new_tokens, r.finish_reason) == (ANSWER, 3, "eos")
    # The same prompt ids with the end-of-turn token unknown (no template): only the config's
    # EOS (0) ends the row, and it runs past <|im_end|> to max_new_tokens.
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    tok.chat_template = None
    (plain,) = complete_batch(model, tok, ["Hi"], settings, prompt_ids=[ids])
    assert plain.token_ids[:3] == r.token_ids
    assert (plain.new_tokens, plain.finish_reason) == (10, "length")


def test_prompt_is_exactly_the_rendered_template(chatml_dir):
    model, tok, _ = load_model_and_tokenizer(str(chatml_dir), device="cpu")
    seen = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(*args, **kwargs)

    model.generate = spy
    session = ChatSession(
        model, tok, GenerationSettings(max_new_tokens=10, temperature=0), system="Be kind."
    )
    out = io.StringIO()
    session.reply("Hi", out=out, err=io.StringIO())
    session.reply("Thanks", out=out, err=io.StringIO())
    assert out.getvalue() == f"{ANSWER}\n{ANSWER}\n"
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "Thanks"},
    ]
    for ids, convo in zip(seen, (messages[:2], messages), strict=True):
        rendered = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(ids, skip_special_tokens=False) == rendered
        assert ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_cli_chat_and_generate_chat_stop_at_im_end(chatml_dir):
    res = runner.invoke(
        app, ["chat", "-m", str(chatml_dir), "-t", "0", "--max-new-tokens", "20"], input="Hi\n"
    )
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{ANSWER}\n"
    res = runner.invoke(
        app,
        ["generate", "Hi", "--chat", "-m", str(chatml_dir), "-t", "0", "--max-new-tokens", "20"]
        + ["--json"],
    )
    assert res.exit_code == 0, res.stderr
    record = json.loads(res.stdout)
    assert (record["completion"], record["new_tokens"], record["finish_reason"]) == (
        ANSWER,
        3,
        "eos",
    )


def test_cli_chat_from_a_script_stops_with_status_2_on_a_message_too_long(chat_model_dir):
    # Found by a fresh-eyes pass: the error line was printed and the exit status was 0.
    args = ["chat", "-m", str(chat_model_dir), "-t", "0", "--max-new-tokens", "3"]
    res = runner.invoke(app, args, input="Hi\n" + "order " * 600 + "\nHi\n")
    assert res.exit_code == 2, res.stderr
    assert len(res.stdout.splitlines()) == 1  # the reply before the error is kept
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output


def test_generate_chat_streams_the_reply_only(chatml_dir):
    # Found by a fresh-eyes pass: the user's message was echoed with the reply glued to it.
    res = runner.invoke(
        app,
        ["generate", "Hi", "--chat", "-m", str(chatml_dir), "-t", "0", "--max-new-tokens", "20"],
    )
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{ANSWER}\n"
    batched = runner.invoke(
        app,
        ["generate", "Hi", "Hi", "--chat", "-m", str(chatml_dir), "-t", "0"]
        + ["--max-new-tokens", "20", "--batch-size", "2"],
    )
    assert batched.exit_code == 0, batched.stderr
    assert batched.stdout == f"{ANSWER}\n\n{ANSWER}\n"
