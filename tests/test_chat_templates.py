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
    # renders nothing (or nothing but what the sandbox hides): no prompt to continue
    "empty": ("{# nothing #}", "renders the conversation as empty text"),
    "attr": ("{{ (messages|attr('__class__')) }}", "renders the conversation as empty text"),
    "private": ("{{ self._TemplateReference__context }}", "renders the conversation as empty text"),
    # 27 characters asking for 1 GB: refused before anything is built
    "bomb": (
        "{{ 'a' * 1000000000 }}",
        "was stopped: str * 1000000000 would make 1,000,000,000 characters, over the limit of "
        "4,000,000",
    ),
}

#: Templates that ask for gigabytes, each through another operator, method or filter; every one
#: is refused before it builds anything (``char_limit``: 4,000,000 characters for a short chat).
BOMBS = {
    "str*": "{{ 'a' * 1000000000 }}",
    "*str": "{{ 1000000000 * 'a' }}",
    "list*": "{{ ['a'] * 1000000000 }}",
    "join filter": "{% set s = 'a' * 1000000 %}{{ ([s] * 1000) | join('') }}",
    "join method": "{% set s = 'a' * 1000000 %}{{ ''.join([s] * 1000) }}",
    "center filter": "{{ 'a' | center(1000000000) }}",
    "center method": "{{ 'a'.center(1000000000) }}",
    "ljust": "{{ 'a'.ljust(1000000000) }}",
    "zfill": "{{ 'a'.zfill(1000000000) }}",
    "expandtabs": "{{ 'a\tb'.expandtabs(1000000000) }}",
    "percent": "{{ '%1000000000d' % 1 }}",
    "format method": "{{ '{:1000000000}'.format(1) }}",
    "format filter": "{{ '%1000000000s' | format('a') }}",
    "star width": "{{ '%*d' % (1000000000, 1) }}",
    "nested width": "{{ '{:{}}'.format('a', 1000000000) }}",
    "precision": "{{ '%.1000000000f' % 1.5 }}",
    "tilde doubling": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "plus doubling": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
    "replace": "{% set s = 'a' * 1000000 %}{{ s.replace('', s) }}",
    "indent": "{{ 'a' | indent(1000000000) }}",
    "lipsum": "{{ lipsum(1000000000) }}",
    "power": "{{ 10 ** 1000000000 }}",
    "tojson indent": "{{ messages | tojson(indent=1000000000) }}",
    "output": "{% set s = 'a' * 3000000 %}{% for i in range(100) %}{{ s }}{% endfor %}",
    # a literal written in nested loops inside a {% set %} block / a macro
    "set block": "{% set s %}{% for a in 'x' * 3000000 %}{% for b in 'yz' %}"
    + "x" * 1000
    + "{% endfor %}{% endfor %}{% endset %}{{ s | length }}",
    "macro": "{% macro m() %}{% for a in 'x' * 3000000 %}"
    + "ab" * 1000
    + "{% endfor %}{% endmacro %}{{ m() }}",
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


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_template_cannot_build_gigabytes(tokenizer, name):
    import time

    from llmkit.errors import UserError
    from llmkit.templates import render_chat

    tokenizer.chat_template = BOMBS[name]
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        render_chat(tokenizer, [{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert time.perf_counter() - start < 5
    assert "over the limit of 4,000,000" in err.value.message, err.value.message
    assert "\n" not in err.value.message


def test_nested_ranges_are_capped_per_render(tokenizer):
    """Jinja caps one range() at 100,000 items; nested they would run 10^10 times."""
    from llmkit.errors import UserError
    from llmkit.templates import render_chat

    tokenizer.chat_template = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    )
    with pytest.raises(UserError) as err:
        render_chat(tokenizer, [{"role": "user", "content": "hello"}], add_generation_prompt=True)
    # the outer range (100,000) and 10 inner ones: the 11th range passes the budget
    assert "range() calls would make 1,100,000 items" in err.value.message
    assert "over the limit of 1,000,000" in err.value.message
    tokenizer.chat_template = "{% for i in range(100000) %}{% endfor %}" * 10 + "x"
    assert render_chat(tokenizer, [{"role": "user", "content": "hello"}]) == "x"


def test_the_limit_grows_with_the_conversation(tokenizer):
    """A long conversation may render to more than the floor: 4x its own size is allowed."""
    from llmkit.templates import MIN_CHAR_LIMIT, char_limit, render_chat

    long = "word " * 1_000_000  # 5,000,000 characters, over the floor
    tokenizer.chat_template = GOOD
    messages = [{"role": "user", "content": long}]
    assert char_limit(messages) > 4 * len(long) > MIN_CHAR_LIMIT
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    assert text == f"<user>{long}\n<assistant>"


def _smollm2_template() -> str | None:
    gguf_file = Path("/work/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not gguf_file.is_file():
        return None
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(gguf_file).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


IDENTICAL = {
    "good": GOOD,
    "llama3-like": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim)"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    # trim_blocks / lstrip_blocks, loop controls, namespace, tojson options, ~, %, *, join
    # numbers in format strings and arguments that are not widths: not refused
    "numbers": "{{ '%s 12345678901234567 %d {x}' % ('a', 1700000000123) }}"
    "{{ '{} 99999999999999 {:>5}'.format(17000000001234, 'b') }}",
    "features": (
        "{% set ns = namespace(n=0) %}\n"
        "  {% for m in messages %}\n"
        "    {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
        "{{ '%s:%d' % (m['role'], loop.index) }} {{ m | tojson(indent=2, sort_keys=True) }}\n"
        "{{ '-' * 3 ~ m['content'] | center(20) ~ [m['role'], 'x'] | join('/') }}\n"
        "    {% set ns.n = ns.n + 1 %}{% if ns.n > 5 %}{% break %}{% endif %}\n"
        "  {% endfor %}\n"
        "{{ '{}-{}'.format(ns.n, messages | length) }}{{ 2 ** 10 }}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    ),
}


@pytest.mark.parametrize("name", [*IDENTICAL, "chatml", "smollm2"])
def test_the_bounded_sandbox_renders_what_transformers_renders(tokenizer, monkeypatch, name):
    """The same text as transformers' own ImmutableSandboxedEnvironment, byte for byte."""
    import jinja2.sandbox
    from transformers.utils import chat_template_utils as ctu

    from llmkit.data.sft import CHATML
    from llmkit.templates import render_chat

    template = {"chatml": CHATML.template, "smollm2": _smollm2_template()}.get(name)
    template = template or IDENTICAL.get(name)
    if template is None:
        pytest.skip("/work/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf is absent")
    tokenizer.chat_template = template
    messages = [
        {"role": "system", "content": "Be brief. 100% sure {x}"},
        {"role": "user", "content": "  Hi there\n"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Again"},
    ]
    ours = [render_chat(tokenizer, messages, add_generation_prompt=g) for g in (False, True)]
    assert ctu.ImmutableSandboxedEnvironment is not jinja2.sandbox.ImmutableSandboxedEnvironment
    monkeypatch.setattr(
        ctu, "ImmutableSandboxedEnvironment", jinja2.sandbox.ImmutableSandboxedEnvironment
    )
    ctu._compile_jinja_template.cache_clear()
    try:
        stock = [
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=g)
            for g in (False, True)
        ]
    finally:
        ctu._compile_jinja_template.cache_clear()
    assert ours == stock
    assert ours[1] != ours[0] or name == "numbers"  # no generation prompt in that one


def test_the_bomb_in_the_real_cli_under_a_3_gb_memory_limit(tiny_model_dir, tmp_path):
    """The reported case: `printf 'hello\\n' | llmkit chat --model DIR` with a 27-character
    template reached 22.6 GB. Under RLIMIT_AS = 3 GiB it ends with one line, exit 2, fast."""
    import os
    import resource
    import subprocess
    import sys
    import time

    model = with_template(tiny_model_dir, tmp_path / "m", BOMBS["str*"], "chat_template.jinja")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "chat", "--model", str(model)],
        input="hello\n",
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    took = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(model / "chat_template.jinja") in errors[0]
    assert "over the limit of 4,000,000" in errors[0]
    assert took < 60, took
