"""`llmkit generate`: determinism, token counts, streaming, prompts in, model resolution and the
one-line errors, on a tiny random GPT-2 (nothing downloaded)."""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.loading import load_model_and_tokenizer
from llmkit.errors import UserError
from llmkit.generation.batching import complete
from llmkit.generation.decoding import TextStream, decode_continuation
from llmkit.generation.generate import generate, generate_completions
from llmkit.generation.prompts import encode_prompt
from llmkit.generation.settings import GenerationSettings

runner = CliRunner()


def run_cli(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def error_lines(result) -> list[str]:
    """The lines of stderr that are llmkit's error messages."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """A cwd with no runs/, LLMKIT_MODEL unset, the Hub offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMKIT_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def make_run(root, name, model_dir, status="finished", mtime=None):
    run = root / "runs" / name
    shutil.copytree(model_dir, run)
    marker = run / "llmkit_run.json"
    marker.write_text(json.dumps({"status": status}), encoding="utf-8")
    if mtime is not None:
        os.utime(marker, (mtime, mtime))
    return run


# --- the library function ---------------------------------------------------------------


def test_greedy_is_deterministic(tiny_model_dir):
    a = generate(["ROMEO:", "JULIET:"], model=str(tiny_model_dir), max_new_tokens=12, temperature=0)
    b = generate(["ROMEO:", "JULIET:"], model=str(tiny_model_dir), max_new_tokens=12, temperature=0)
    assert a == b
    assert len(a) == 2 and all(isinstance(t, str) and t for t in a)


def test_same_seed_same_text_other_seed_other_text(tiny_model_dir):
    kw = dict(model=str(tiny_model_dir), max_new_tokens=20, temperature=1.0, top_k=None)
    first = generate("ROMEO:", seed=1, **kw)
    assert generate("ROMEO:", seed=1, **kw) == first
    others = [generate("ROMEO:", seed=s, **kw)[0] for s in (2, 3, 4)]
    assert any(o != first[0] for o in others)


def test_max_new_tokens_counts_new_tokens_only(tiny_model_dir):
    settings = GenerationSettings(max_new_tokens=5, temperature=0)
    (result,) = generate_completions("ROMEO:", model=str(tiny_model_dir), settings=settings)
    # greedy from this prompt does not hit EOS in the first 5 steps (checked below)
    assert result.finish_reason == "length"
    assert result.new_tokens == 5 == len(result.token_ids)
    assert tiny_tokenizer_eos(tiny_model_dir) not in result.token_ids


def tiny_tokenizer_eos(model_dir) -> int:
    from llmkit.core.tokenizer import load_tokenizer

    return load_tokenizer(model_dir).eos_token_id


def test_eos_is_honoured(tiny_model_dir):
    # With a large bias on EOS the greedy choice is EOS: generation stops after one token.
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 100.0
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    result = complete(model, tok, "ROMEO:", GenerationSettings(max_new_tokens=20, temperature=0))
    assert result.finish_reason == "eos"
    assert result.new_tokens == 1
    assert result.completion == ""


def test_empty_prompt_starts_from_eos(tiny_model_dir, tiny_tokenizer):
    assert encode_prompt(tiny_tokenizer, "") == [tiny_tokenizer.eos_token_id]
    out = generate("", model=str(tiny_model_dir), max_new_tokens=3, temperature=0)
    assert isinstance(out[0], str)


def test_greedy_settings_pass_no_sampling_arguments():
    kwargs = GenerationSettings(temperature=0, max_new_tokens=7).generate_kwargs()
    assert kwargs == {"max_new_tokens": 7, "do_sample": False}
    sampled = GenerationSettings(temperature=0.7, top_k=None).generate_kwargs()
    assert sampled["do_sample"] is True and sampled["top_k"] == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"max_new_tokens": 0},
        {"top_p": 0},
        {"top_p": float("nan")},
        {"repetition_penalty": float("nan")},
        {"top_k": -3},
    ],
)
def test_bad_settings_are_user_errors(kw):
    with pytest.raises(UserError):
        GenerationSettings(**kw)


def test_settings_from_flags_is_the_one_place_flags_become_settings(monkeypatch):
    """Flags not given take the command's defaults (chat's are its own); ``--stop`` absent is
    no stop string; a misspelt name is a programming error, not silently ignored. Both CLI
    commands build their settings through it."""
    from llmkit.cli import chat as chat_cli
    from llmkit.cli import generate as generate_cli
    from llmkit.generation.settings import CHAT_DEFAULTS

    chat = GenerationSettings.from_flags(CHAT_DEFAULTS, seed=4, stop=None)
    assert (chat.max_new_tokens, chat.temperature, chat.top_k, chat.top_p) == (256, 0.7, 50, 0.95)
    assert (chat.seed, chat.stop) == (4, [])
    assert GenerationSettings.from_flags(temperature=0) == GenerationSettings(temperature=0)
    with pytest.raises(TypeError, match="max_tokens"):
        GenerationSettings.from_flags(max_tokens=3)
    with pytest.raises(UserError, match="--top-p"):
        GenerationSettings.from_flags(CHAT_DEFAULTS, top_p=2.0)

    built = []
    real = GenerationSettings.from_flags.__func__

    def spy(cls, *args, **kwargs):
        built.append(real(cls, *args, **kwargs))
        raise UserError("stop here")

    monkeypatch.setattr(GenerationSettings, "from_flags", classmethod(spy))
    for command in (["generate", "x", "--top-k", "7"], ["chat", "--top-k", "7"]):
        assert runner.invoke(app, command).exit_code == 2
    assert [s.top_k for s in built] == [7, 7]
    assert [s.max_new_tokens for s in built] == [100, 256]  # each command's own default
    assert generate_cli.DEFAULTS == GenerationSettings() and chat_cli.CHAT_DEFAULTS is CHAT_DEFAULTS


def test_a_temperature_too_small_to_sample_with_decodes_greedily(tiny_model_dir):
    """1e-300 divides the logits to inf (a NaN distribution, a traceback in torch.multinomial
    before): below GREEDY_BELOW llmkit decodes greedily, as the server does."""
    from llmkit.generation.settings import GREEDY_BELOW

    assert GenerationSettings(temperature=GREEDY_BELOW / 10).greedy
    assert not GenerationSettings(temperature=GREEDY_BELOW).greedy
    kw = dict(model=str(tiny_model_dir), max_new_tokens=12, seed=3)
    assert generate("ROMEO:", temperature=1e-300, **kw) == generate("ROMEO:", temperature=0, **kw)


def test_stream_holds_back_split_utf8_characters(tiny_tokenizer):
    text = "café ☃ naïve"
    ids = tiny_tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # the non-ASCII characters span several tokens
    out = io.StringIO()
    seen = []
    stream = TextStream(tiny_tokenizer, out, context_ids=[tiny_tokenizer.eos_token_id])
    stream.put(torch.tensor([[tiny_tokenizer.eos_token_id]]))  # the prompt: skipped
    for i in ids:
        stream.put(torch.tensor([i]))
        seen.append(out.getvalue())
    stream.end()
    assert out.getvalue() == text
    assert all("\ufffd" not in s for s in seen)
    assert decode_continuation(tiny_tokenizer, [tiny_tokenizer.eos_token_id], ids) == text


def test_stream_of_a_long_line_equals_the_decoded_text(tiny_tokenizer):
    """No newline for 200+ tokens, non-ASCII characters throughout: the streamer restarts its
    decoding window every 16 tokens and still writes exactly the decoded text."""
    text = " ".join(["Wherefore art thou, Roméo — naïve ☃ café?"] * 12)
    ids = tiny_tokenizer(text)["input_ids"]
    assert len(ids) > 200 and "\n" not in text
    out = io.StringIO()
    stream = TextStream(tiny_tokenizer, out, context_ids=[tiny_tokenizer.eos_token_id])
    stream.put(torch.tensor([[tiny_tokenizer.eos_token_id]]))
    lengths = []
    for i in ids:
        stream.put(torch.tensor([i]))
        lengths.append(stream.decoder.window_size)
    stream.end()
    assert out.getvalue() == text
    assert max(lengths) < 24  # the window was restarted, not grown to the whole line


def test_streamed_text_is_prompt_then_completion(tiny_model_dir):
    out, err = io.StringIO(), io.StringIO()
    settings = GenerationSettings(max_new_tokens=10, temperature=0)
    (result,) = generate_completions(
        "ROMEO:", model=str(tiny_model_dir), settings=settings, stream=True, out=out, err=err
    )
    assert out.getvalue() == "ROMEO:" + result.completion + "\n"
    assert "10 tokens" in err.getvalue() and "tokens/s" in err.getvalue()
    # speed and memory go to stderr: the peak resident memory of this process, in MiB
    import re
    import resource

    shown = int(re.search(r"peak memory ([\d,]+) MiB", err.getvalue())[1].replace(",", ""))
    assert 100 < shown <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1


# --- the command ------------------------------------------------------------------------


def test_cli_json_one_object_per_prompt(tiny_model_dir):
    res = run_cli(
        "generate",
        "ROMEO:",
        "JULIET:",
        "-m",
        str(tiny_model_dir),
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["ROMEO:", "JULIET:"]
    assert records[0]["new_tokens"] == 5
    assert records[0]["tokens_per_sec"] > 0
    assert set(records[0]) >= {"prompt", "completion", "new_tokens", "tokens_per_sec"}


def test_cli_streams_to_stdout_and_stats_to_stderr(tiny_model_dir):
    args = [
        "generate",
        "ROMEO:",
        "-m",
        str(tiny_model_dir),
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    streamed = run_cli(*args)
    as_json = run_cli(*args, "--json")
    assert streamed.exit_code == 0, streamed.stderr
    completion = json.loads(as_json.stdout)["completion"]
    assert streamed.stdout == "ROMEO:" + completion + "\n"
    assert "tokens/s" in streamed.stderr


def test_cli_prompts_from_stdin_and_file(tiny_model_dir, tmp_path):
    base = ["generate", "-m", str(tiny_model_dir), "--max-new-tokens", "2", "--json"]
    res = run_cli(*base, input="first\n\nsecond\n")
    assert res.exit_code == 0, res.stderr
    assert [json.loads(x)["prompt"] for x in res.stdout.splitlines()] == ["first", "second"]
    f = tmp_path / "prompts.txt"
    f.write_text("a\nb\nc\n", encoding="utf-8")
    res = run_cli(*base, "--prompts-file", str(f))
    assert [json.loads(x)["prompt"] for x in res.stdout.splitlines()] == ["a", "b", "c"]


def test_cli_no_prompt_is_an_error(tiny_model_dir):
    assert_one_line_error(run_cli("generate", "-m", str(tiny_model_dir), input=""), "no prompt")


def test_cli_prompt_too_long(tiny_model_dir):
    res = run_cli("generate", "word " * 40, "-m", str(tiny_model_dir), "--max-new-tokens", "30")
    line = assert_one_line_error(res, "positions")
    assert "--max-new-tokens" in line


def test_cli_model_dir_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    res = run_cli("generate", "hi", "--model", str(tmp_path))
    assert_one_line_error(res, "not a model directory", "config.json")
    assert res.stderr.count("\n") == 1  # nothing else on stderr


def test_cli_bad_temperature(tiny_model_dir):
    res = run_cli("generate", "hi", "-m", str(tiny_model_dir), "--temperature", "-1")
    assert_one_line_error(res, "--temperature")


# --- which model -----------------------------------------------------------------------


def test_no_model_anywhere_says_what_was_tried(clean_env):
    res = run_cli("generate", "hi")
    line = assert_one_line_error(res, "LLMKIT_MODEL", "runs", "gpt2")
    assert "--model" in line and "llmkit train" in line


def test_llmkit_model_env_is_honoured(clean_env, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("LLMKIT_MODEL", str(tiny_model_dir))
    _, _, source = load_model_and_tokenizer(device="cpu")
    assert source == str(tiny_model_dir)
    res = run_cli("generate", "hi", "--max-new-tokens", "2", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["new_tokens"] == 2


def test_newest_finished_run_is_picked(clean_env, tiny_model_dir):
    now = time.time()
    make_run(clean_env, "older", tiny_model_dir, mtime=now - 100)
    make_run(clean_env, "newer", tiny_model_dir, mtime=now - 50)
    make_run(clean_env, "unfinished", tiny_model_dir, status="running", mtime=now)
    _, _, source = load_model_and_tokenizer(device="cpu")
    assert source == os.path.join("runs", "newer")


def test_broken_env_model_is_an_error_not_a_silent_fallback(clean_env, monkeypatch, tiny_model_dir):
    # The user named this model: loading another one instead would hide the mistake.
    monkeypatch.setenv("LLMKIT_MODEL", str(clean_env / "missing"))
    make_run(clean_env, "only", tiny_model_dir)
    with pytest.raises(UserError, match="missing does not exist"):
        load_model_and_tokenizer(device="cpu")


@pytest.mark.parametrize("bad", ["bad", 1.5, [2, "x"]])
def test_a_generation_config_with_a_non_integer_token_id_is_one_line(tiny_model_dir, tmp_path, bad):
    """eos_token_id "bad" in generation_config.json loaded fine and failed at generation with
    a ValueError traceback; now the load refuses it naming the file and the field."""
    import json
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    gen = model / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    gen.write_text(json.dumps({**cfg, "eos_token_id": bad}))
    with pytest.raises(UserError, match=r"generation_config.json has eos_token_id = ") as err:
        generate("hi", model=str(model), max_new_tokens=2, temperature=0)
    assert str(gen) in err.value.hint
