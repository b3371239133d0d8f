"""UserError (one line, SPEC §6; its reason code) and optional dependencies, missing or broken."""

from __future__ import annotations

import sys

import pytest

from llmkit.errors import UserError, require


def test_require_names_a_missing_module():
    with pytest.raises(UserError) as info:
        require("no_such_module_llmkit", "--x needs no_such_module_llmkit", "pip install it")
    assert str(info.value) == (
        "--x needs no_such_module_llmkit, which is not installed — pip install it"
    )


def test_require_reports_an_installed_but_broken_module(tmp_path, monkeypatch):
    # Like trafilatura installed without lxml_html_clean: the package is there, its import fails.
    (tmp_path / "broken_llmkit_dep.py").write_text(
        "raise ImportError('lxml.html.clean module is now a separate project')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as info:
        require("broken_llmkit_dep", "--html needs broken_llmkit_dep", "pip install fix")
    assert "cannot be imported (lxml.html.clean module is now a separate project)" in str(
        info.value
    )
    assert "broken_llmkit_dep" not in sys.modules


def test_require_reports_a_missing_dependency_of_an_installed_module(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_llmkit.py").write_text("import no_such_dependency_llmkit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"cannot be imported \(No module named"):
        require("needs_missing_llmkit", "--y needs needs_missing_llmkit", "pip install fix")


def test_html_with_a_broken_trafilatura_is_one_line(monkeypatch):
    from llmkit.data.clean import Normalize

    monkeypatch.setitem(sys.modules, "trafilatura", None)  # import raises ImportError
    with pytest.raises(UserError, match=r"^--html needs the trafilatura package, which") as info:
        Normalize(html=True)
    assert info.value.hint == "pip install 'llmkit[html]'"


def test_a_user_error_carries_its_reason_code_through_pickling():
    """Workers (prepare --num-proc) send errors back pickled: hint and reason must survive."""
    import pickle

    err = pickle.loads(pickle.dumps(UserError("bad line", "fix it", reason="malformed json")))
    assert (err.message, err.hint, err.reason) == ("bad line", "fix it", "malformed json")
    assert str(err) == "bad line — fix it"
    assert UserError("x").reason is None


@pytest.mark.parametrize(
    ("record", "line", "code"),
    [
        ([1], None, "not an object"),
        ({"body": "x"}, None, "missing field"),
        ({"text": 3}, None, "field not a string"),
        (None, '{"text": ', "malformed json"),
    ],
)
def test_skipped_text_records_are_counted_by_the_errors_code(tmp_path, record, line, code):
    """The manifest's skip reason comes from the error's reason field: the same code the
    message rule gave (manifests unchanged), and a reworded message keeps it."""
    from llmkit.data.readers import _reason, parse_jsonl_line, record_text

    with pytest.raises(UserError) as caught:
        if line is None:
            record_text(record, where="f.jsonl:1", text_field="text")
        else:
            parse_jsonl_line(line, path=tmp_path / "f.jsonl", lineno=1, text_field="text")
    err = caught.value
    assert err.reason == code
    assert _reason(err) == code == _former_text_rule(err.message)  # what manifests had
    assert _reason(UserError("worded another way", reason=code)) == code


def test_chat_template_errors_carry_the_code_prepare_counted_them_by():
    """Each kind of template failure carries as ``reason`` the code that prepare's message
    rule (``data/encode.py::_render_reason``, now :func:`_former_render_rule`) gave it, so
    prepare counts by the field with its manifests unchanged."""
    import jinja2.exceptions as jx

    from llmkit.templates import TemplateTooLarge, _EmptyPrompt, template_error

    class Tok:
        chat_template = "{{ x }}"
        name_or_path = ""

    failures = [
        TemplateTooLarge("the output", 10**9, 10**6),
        _EmptyPrompt(),
        jx.TemplateSyntaxError("unexpected '}'", 3),
        jx.SecurityError("access to attribute '__class__' is unsafe"),
        jx.UndefinedError("'foo' is undefined"),
        jx.TemplateError("Conversation roles must alternate user/assistant"),
        RuntimeError("boom"),
    ]
    codes = []
    for failure in failures:
        err = template_error(Tok(), failure, where="chat.jsonl:3")
        assert err.reason == _former_render_rule(err.message), err.message
        codes.append(err.reason)
    assert codes == ["render failed"] * 5 + ["template refused", "render failed"]


# ---------------------------------------------------------------------------------------------
# Reason codes carried at the raise sites. Until they were, prepare recovered a skipped record's
# code by searching its message; those rules, frozen here, are what today's manifests hold, so
# every code carried must be the one its message gave (manifests unchanged), and a reworded
# message must keep its count.


def _former_text_rule(msg: str) -> str:
    """``llmkit/data/readers.py::_reason`` before the codes (a text record)."""
    for needle, reason in (
        ("malformed JSON", "malformed json"),
        ("no field", "missing field"),
        ("not a string", "field not a string"),
        ("expected a JSON object", "not an object"),
    ):
        if needle in msg:
            return reason
    return "bad record"


def _former_chat_rule(msg: str) -> str:
    """``llmkit/data/readers.py::_chat_reason`` before the codes (a chat record as read)."""
    for needle, reason in (
        ("expected a JSON object", "not an object"),
        ("not a chat record", "not a chat record"),
        ("no field", "missing field"),
        ("no assistant message", "no assistant message"),
        ("role", "bad role"),
        ("does not start with a user message", "bad turn order"),
        ("system message after", "bad turn order"),
        ("is empty", "empty text"),
    ):
        if needle in msg:
            return reason
    return "bad chat record"


def _former_render_rule(msg: str) -> str:
    """``llmkit/data/encode.py::_render_reason`` before the codes (a conversation the chat
    template could not render or place)."""
    if "special token" in msg:
        return "special token in text"
    if "refused" in msg:
        return "template refused"
    if "consistently" in msg or "cannot be located" in msg:
        return "template inconsistent"
    if "starts with an assistant" in msg:
        return "assistant first"
    return "render failed"


_USER = {"role": "user", "content": "Hi"}
_ANSWER = {"role": "assistant", "content": "Hello"}

#: One bad record per raise site of llmkit.data.sft's record reading, with its code.
BAD_CHAT_RECORDS = [
    ([1], "not an object"),
    ({"id": 3}, "not a chat record"),
    ({"prompt": "Hi"}, "missing field"),
    ({"instruction": "Say hi", "input": "x"}, "missing field"),
    ({"prompt": 3, "response": "x"}, "bad chat record"),
    ({"prompt": "  ", "response": "x"}, "empty text"),
    ({"messages": {"role": "user"}}, "bad chat record"),
    ({"messages": []}, "empty text"),
    ({"messages": ["Hi"]}, "bad chat record"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "bad role"),
    ({"messages": [{"content": "Hi"}]}, "bad role"),
    ({"messages": [{"role": "user"}]}, "bad chat record"),
    ({"messages": [{"role": "user", "content": " "}]}, "empty text"),
    ({"messages": [_USER, {"role": "system", "content": "x"}, _ANSWER]}, "bad turn order"),
    ({"messages": [_ANSWER, _USER]}, "bad turn order"),
    ({"messages": [_USER]}, "no assistant message"),
    ({"conversations": "Hi"}, "bad chat record"),
    ({"conversations": ["Hi"]}, "bad chat record"),
    ({"conversations": [{"from": "bot", "value": "Hi"}]}, "bad role"),
    ({"conversations": [{"value": "Hi"}]}, "bad role"),
    ({"conversations": [{"from": "human"}]}, "bad chat record"),
]


@pytest.mark.parametrize(("record", "code"), BAD_CHAT_RECORDS)
def test_chat_record_errors_carry_the_code_their_message_gave(record, code):
    from llmkit.data.readers import _chat_reason
    from llmkit.data.sft import conversation_from_record

    with pytest.raises(UserError) as caught:
        conversation_from_record(record, where="chat.jsonl:3")
    err = caught.value
    assert err.reason == code == _former_chat_rule(err.message), err.message
    assert _chat_reason(err) == code


def _chatml_tokenizer():
    from llmkit.core.tokenizer import train_bpe_tokenizer
    from llmkit.data.sft import CHAT_TEMPLATES, ensure_chat_template

    texts = ["Hi there", "Hello, how can I help?", "Where is my order?"] * 20
    tok = train_bpe_tokenizer(
        iter(texts), vocab_size=300, extra_special_tokens=CHAT_TEMPLATES["chatml"].special_tokens
    )
    ensure_chat_template(tok, "chatml")
    return tok


# A template that writes "..." for an assistant answer that a later turn follows: the final
# answer of a conversation ending on a user turn cannot be located.
_DOTS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    ("messages", "template", "code"),
    [
        ([{"role": "user", "content": "a <|im_end|> b"}, _ANSWER], None, "special token in text"),
        ([_ANSWER, _USER, _ANSWER], None, "assistant first"),
        ([_USER, _ANSWER, _USER], _DOTS, "template inconsistent"),
        ([_USER, _ANSWER], _DOTS.replace("not loop.last", "true"), "template inconsistent"),
        (
            [_USER, _ANSWER],
            _DOTS.replace("assistant\n{% endif %}", "ASSISTANT\n{% endif %}"),
            "template inconsistent",
        ),
    ],
    ids=[
        "special-token",
        "assistant-first",
        "cannot-be-located",
        "drops-the-answer",
        "prompt-differs",
    ],
)
def test_conversation_encode_errors_carry_the_code_their_message_gave(messages, template, code):
    """The errors of the chat encode step (:func:`llmkit.data.sft.answer_spans`)."""
    from llmkit.data.sft import answer_spans

    tok = _chatml_tokenizer()
    if template is not None:
        tok.chat_template = template
    with pytest.raises(UserError) as caught:
        answer_spans(tok, messages, train_on="assistant", where="chat.jsonl:3")
    err = caught.value
    assert err.reason == code == _former_render_rule(err.message), err.message
    assert err.reason == code


def test_rewording_a_message_keeps_the_manifests_counts(tmp_path, monkeypatch):
    """Every error of llmkit.data.sft reworded to the same text: prepare still counts each
    skipped conversation under its own code, in the reading step and the encode step."""
    import json

    from typer.testing import CliRunner

    import llmkit.data.sft as sft
    from llmkit.cli import app

    def reworded(message, hint=None, *, reason=None):
        return UserError("something is wrong with this record", hint, reason=reason)

    monkeypatch.setattr(sft, "UserError", reworded)
    good = [
        {"messages": [{"role": "user", "content": f"Where is order {n}?"}, _ANSWER]}
        for n in range(8)
    ]
    records = [
        *good[:4],
        {"messages": [{"role": "bot", "content": "Hi"}, _ANSWER]},
        {"messages": [_USER]},
        {"messages": [_USER, {"role": "system", "content": "x"}, _ANSWER]},
        {"id": 3},
        {"messages": [{"role": "user", "content": "a <|im_end|> b"}, _ANSWER]},
        *good[4:],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    args = ["prepare", str(path), "-o", str(tmp_path / "out"), "--no-plot", "--json"]
    args += ["--vocab-size", "300", "--block-size", "64", "--on-error", "skip", "--num-proc", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["inputs"][0]["skipped"] == {
        "bad role": 1,
        "no assistant message": 1,
        "bad turn order": 1,
        "not a chat record": 1,
    }
    skipped = [s["skipped"] for s in manifest["splits"].values() if s["skipped"]]
    assert skipped == [{"special token in text": 1}]


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_a_broken_yaml_file_is_one_line_with_its_place_and_a_hint(tmp_path, command):
    """prepare printed PyYAML's whole multi-part message squashed into one line, with no hint;
    train named the place but gave no hint. Both now say the same, through one reader."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n", encoding="utf-8")
    args = ["prepare", str(tmp_path / "x.txt"), "--output", str(tmp_path / "o"), "--config"]
    result = CliRunner().invoke(
        app, [*(args if command == "prepare" else ["train", "--config"]), str(bad)]
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: cannot parse {bad} line 2, column 1: expected ','")
    assert " — fix the file at that place" in line


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ('{"text": "abc}', False, "Unterminated string starting at column 10"),
        ('{"text": "a\x01"}', False, "Invalid control character at column 12"),
        ('{"text": 1,}', False, "Expecting property name enclosed in double quotes at column 12"),
        ('{"a": 1}\n{"b"', True, "Extra data at line 2, column 1"),
        ("", True, "Expecting value at line 1, column 1"),
    ],
)
def test_json_error_text_names_the_position_once(text, line, expected):
    """json's own msg ends with "at" for some errors ("Unterminated string starting at"): the
    position follows one "at" (was "starting at at column 10")."""
    import json

    from llmkit.errors import json_error_text

    with pytest.raises(ValueError) as info:
        json.loads(text)
    assert json_error_text(info.value, line=line) == expected
    assert " at at " not in json_error_text(info.value, line=line)


def test_json_error_text_of_another_value_error_is_its_first_line():
    from llmkit.errors import json_error_text

    err = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert json_error_text(err) == str(err)
