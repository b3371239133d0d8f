"""Chat templates that fail — a Jinja syntax error, what the sandbox blocks, an undefined name,
the template's own raise_exception, a Python error inside it — are one line naming the
template's file and what to do, exit 2, in every command that renders one (generate --chat,
chat, eval --tasks --chat, prepare --format chat). Real tiny tokenizers, the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app

GOOD = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
BROKEN = {
    # name: (template, what the error line says)
    "syntax": (
        "{% for m in messages %}\n<{{ m['role'] }}>{{ m['content'] }}",
        "has a Jinja syntax error at line 2: Unexpected end of template",
    ),
    "sandbox": (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}" + GOOD,
        "was stopped by Jinja's sandbox: access to attribute '__class__' of 'str' object is unsafe",
    ),
    "undefined": ("{{ conversation.title }}" + GOOD, "uses an undefined name: 'conversation'"),
    "refuses": (
        "{{ raise_exception('Conversation roles must alternate') }}",
        "refused the conversation: Conversation roles must alternate",
    ),
    "python": ("{{ messages + 1 }}", "failed to render: TypeError: can only concatenate list"),
}


def with_template(src: Path, dest: Path, template: str, where: str) -> Path:
    """A copy of the model directory ``src`` whose tokenizer's chat template is ``template``,
    kept in ``chat_template.jinja`` or under the ``chat_template`` key of
    ``tokenizer_config.json`` (the older layout)."""
    shutil.copytree(src, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    if where == "chat_template.jinja":
        (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = template
        (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


@pytest.mark.parametrize("kind", list(BROKEN))
@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_generate_chat_and_chat_name_the_template_file(tiny_model_dir, tmp_path, kind, where):
    template, says = BROKEN[kind]
    model = with_template(tiny_model_dir, tmp_path / "m", template, where)
    file = model / where
    base = ["-m", str(model), "-t", "0", "--max-new-tokens", "2"]
    for args, stdin in (
        (["generate", *base, "--chat", "Hi"], None),
        (["generate", *base, "--system", "Be brief.", "Hi"], None),
        (["chat", *base], "Hi\n"),
    ):
        line = one_error_line(CliRunner().invoke(app, args, input=stdin))
        assert line.startswith(f"error: the chat template in {file} {says}"), (args, line)
        assert " — " in line  # with what to do


def test_a_good_template_still_renders(tiny_model_dir, tmp_path):
    model = with_template(tiny_model_dir, tmp_path / "m", GOOD, "chat_template.jinja")
    args = ["generate", "-m", str(model), "-t", "0", "--max-new-tokens", "2", "--chat", "Hi"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    # and without --chat a broken template is never rendered: plain generation works
    broken = with_template(
        tiny_model_dir, tmp_path / "b", BROKEN["syntax"][0], "chat_template.jinja"
    )
    args = ["generate", "-m", str(broken), "-t", "0", "--max-new-tokens", "2", "Hi"]
    assert CliRunner().invoke(app, args).exit_code == 0


@pytest.mark.parametrize("kind", ["syntax", "sandbox", "undefined"])
def test_eval_tasks_chat_names_the_template_file(tiny_model_dir, tmp_path, kind):
    pytest.importorskip("lm_eval")
    template, says = BROKEN[kind]
    model = with_template(tiny_model_dir, tmp_path / "m", template, "chat_template.jinja")
    tasks = Path(__file__).resolve().parents[1] / "examples" / "eval_tasks"
    if not tasks.is_dir():
        pytest.skip(f"{tasks} is absent")
    args = ["eval", "-m", str(model), "--tasks", "llmkit_opposites", "--include-path", str(tasks)]
    line = one_error_line(CliRunner().invoke(app, [*args, "--chat", "--limit", "2"]))
    assert line.startswith(f"error: the chat template in {model / 'chat_template.jinja'} {says}")


@pytest.mark.parametrize("kind", ["syntax", "sandbox", "undefined", "refuses"])
def test_prepare_chat_names_the_template_file(tiny_model_dir, tmp_path, kind):
    template, says = BROKEN[kind]
    tokenizer = with_template(tiny_model_dir, tmp_path / "tok", template, "chat_template.jinja")
    data = tmp_path / "chats.jsonl"
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    args = ["prepare", str(data), "--output", str(tmp_path / "out"), "--format", "chat"]
    args += ["--tokenizer", str(tokenizer), "--no-plot", "--block-size", "32"]
    line = one_error_line(CliRunner().invoke(app, args))
    assert f"the chat template in {tokenizer / 'chat_template.jinja'} {says}" in line, line
    assert not (tmp_path / "out").exists()


def test_the_template_of_a_gguf_is_named_by_its_file(tmp_path):
    """A GGUF loaded in place: transformers names the tokenizer after its directory."""
    from types import SimpleNamespace

    from llmkit.templates import template_source

    (tmp_path / "model.Q4.gguf").write_bytes(b"GGUF")
    tok = SimpleNamespace(chat_template="{{ x }}", name_or_path=str(tmp_path))
    assert template_source(tok) == f"{tmp_path / 'model.Q4.gguf'} (its tokenizer.chat_template)"
    tok.name_or_path = ""
    assert template_source(tok) == "the tokenizer's chat template"
