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
    assert _reason(err) == code == _reason(UserError(err.message))  # the message rule agrees
    assert _reason(UserError("worded another way", reason=code)) == code


def test_chat_template_errors_carry_the_code_prepare_counted_them_by():
    """Each kind of template failure carries as ``reason`` the code that prepare's message
    rule (``data/encode.py::_render_reason``) gives it today, so prepare can count by the
    field with its manifests unchanged."""
    import jinja2.exceptions as jx

    from llmkit.data.encode import _render_reason
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
        assert err.reason == _render_reason(err.message), err.message
        codes.append(err.reason)
    assert codes == ["render failed"] * 5 + ["template refused", "render failed"]
