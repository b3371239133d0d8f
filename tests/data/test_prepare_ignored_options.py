"""Options `llmkit prepare` used to ignore silently now say so: --text-field on chat data and
the chat flags (--chat-template, --train-on, --overlong) on text data are one warning line each
(also in the manifest's warnings); --num-proc 0 has a hint. (An unusable LLMKIT_CACHE:
tests/cli/test_cache_cmd.py.)"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import shared_file
from rich.console import Console
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.pipeline import prepare
from llmkit.errors import UserError

CONVERSATIONS = Path(__file__).resolve().parents[2] / "examples" / "support" / "conversations.jsonl"


def _run(inputs, output, **kwargs):
    log = io.StringIO()
    kwargs = {"plot": False, "vocab_size": 400, "num_proc": 1, **kwargs}
    m = prepare(inputs, output, console=Console(file=log, width=400), **kwargs)
    return m, log.getvalue()


def test_text_field_on_chat_data_is_a_warning(tmp_path):
    m, log = _run([CONVERSATIONS], tmp_path / "a", block_size=256, text_field="body")
    warning = "--text-field body is ignored: the inputs are read as conversations (detected"
    assert warning in log
    assert any(w.startswith(warning) for w in m["warnings"])
    assert m["settings"]["format"] == "chat"
    m, log = _run([CONVERSATIONS], tmp_path / "b", block_size=256, text_field="body", format="chat")
    assert (
        "--text-field body is ignored: the inputs are read as conversations (--format chat" in log
    )
    # Not given: no warning.
    m, log = _run([CONVERSATIONS], tmp_path / "c", block_size=256)
    assert "ignored" not in log and not any("ignored" in w for w in m["warnings"])


def test_chat_flags_on_text_data_are_a_warning(tmp_path):
    corpus = shared_file("tinystories/tinystories.txt")
    m, log = _run([corpus], tmp_path / "a", block_size=64, chat_template="chatml", overlong="drop")
    warning = (
        "--chat-template, --overlong ignored: the inputs are read as documents, and these "
        "apply to chat data only"
    )
    assert warning in log and any(w.startswith(warning) for w in m["warnings"])
    m, log = _run([corpus], tmp_path / "b", block_size=64, train_on="all", format="text")
    assert "--train-on ignored: the inputs are read as documents (--format text)" in log
    m, log = _run([corpus], tmp_path / "c", block_size=64)
    assert "ignored" not in log


def test_chat_flag_warning_from_the_cli(tmp_path):
    corpus = shared_file("tinystories/tinystories.txt")
    result = CliRunner().invoke(
        app,
        ["prepare", str(corpus), "-o", str(tmp_path / "o"), "--no-plot", "--train-on", "all"],
    )
    assert result.exit_code == 0, result.output
    assert "warning: --train-on ignored" in result.output


def test_num_proc_zero_has_a_hint(tmp_path):
    with pytest.raises(UserError) as err:
        prepare([shared_file("tinystories/tinystories.txt")], tmp_path / "o", num_proc=0)
    assert err.value.message == "--num-proc 0 must be at least 1"
    assert "leave it out to use every usable core" in err.value.hint
    result = CliRunner().invoke(
        app, ["prepare", "x.txt", "-o", str(tmp_path / "o"), "--num-proc", "0"]
    )
    assert result.exit_code == 2
    assert "--num-proc 0 must be at least 1 — give 1 to" in result.output


def test_encoding_on_inputs_that_declare_their_own_is_a_warning(tmp_path):
    warc = shared_file("warc/example.warc.gz")
    m, log = _run([warc], tmp_path / "a", block_size=8, val_fraction=0.0, encoding="cp1252")
    assert "--encoding cp1252 is ignored: it applies to text, JSON-lines and CSV files" in log
    text = tmp_path / "cafe.txt"
    text.write_bytes("Un café, déjà servi à l'été.\n\nUne deuxième phrase, là.\n".encode("cp1252"))
    m, log = _run([text], tmp_path / "b", block_size=8, encoding="cp1252")
    assert "ignored" not in log and m["inputs"][0]["encoding"] == "cp1252"
