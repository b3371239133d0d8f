"""Text that is not UTF-8 on the command line or standard input (generate, chat, eval --tokens)
is one line, exit 2: Python turns such bytes into lone surrogates, which the tokenizers refused
with a TypeError traceback ("TextEncodeInput must be Union[...]")."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from llmkit.cli import app

runner = CliRunner()
NOT_UTF8 = b"Hi \xff\xfe there\n"


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny GPT-2 with a one-line chat template on its tokenizer."""
    from llmkit.core.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_model_dir, out)
    tok = load_tokenizer(out)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(out)
    return out


def one_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("args", [["-f", "-"], []])
def test_generate_from_standard_input_that_is_not_utf8(tiny_model_dir, args):
    result = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), *args], input=NOT_UTF8)
    assert one_line(result).startswith("error: standard input is not UTF-8 text (byte 3) — ")


def test_generate_prompt_argument_that_is_not_utf8(tiny_model_dir):
    prompt = b"Hi \xff".decode("utf-8", "surrogateescape")  # what Python makes of argv
    result = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "ok", prompt])
    assert one_line(result).startswith(
        "error: prompt 2 is not UTF-8 text (character 4 is an undecodable byte) — "
    )


def test_chat_line_that_is_not_utf8_after_a_good_one(chat_model_dir):
    args = ["chat", "-m", str(chat_model_dir), "-t", "0", "--max-new-tokens", "2"]
    result = runner.invoke(app, args, input=b"Hello\n" + NOT_UTF8)
    assert one_line(result).startswith("error: a line of standard input is not UTF-8 text")
    assert len(result.stdout.splitlines()) == 1  # the first message was answered


def test_eval_tokens_empty_or_not_utf8():
    result = runner.invoke(app, ["eval", "-m", "x", "--tokens", ""])
    assert one_line(result).startswith("error: --tokens is empty — ")  # was "nothing to score"
    text = b"a\xff".decode("utf-8", "surrogateescape")
    result = runner.invoke(app, ["eval", "-m", "x", "--tokens", text])
    assert one_line(result).startswith("error: --tokens is not UTF-8 text")
