"""`llmkit chat`: chat template, history, /reset, /exit, stdin from a script, context trimming."""

from __future__ import annotations

import io
import shutil

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.generation.chat import ChatSession, chat_loop
from llmkit.generation.generate import GenerationSettings, encode_chat
from llmkit.generation.loading import load_model_and_tokenizer

runner = CliRunner()
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny GPT-2 with a simple chat template on its tokenizer."""
    from llmkit.data.tokenizer import load_tokenizer

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
