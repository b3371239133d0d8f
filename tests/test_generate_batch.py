"""Batched generation (left padding), EOS lists, max_new_tokens, stop strings, sampling options,
JSON Lines prompts and chat templates, on a tiny random GPT-2 (nothing downloaded)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.loading import load_model_and_tokenizer
from llmkit.errors import UserError
from llmkit.generation.batching import complete, complete_batch, eos_ids
from llmkit.generation.decoding import find_stop
from llmkit.generation.generate import run_prompts
from llmkit.generation.prompts import encode_chat
from llmkit.generation.settings import GenerationSettings

runner = CliRunner()
GREEDY = dict(temperature=0)
SAMPLED = dict(temperature=1.0, top_k=None, seed=0)  # varied text from the random model


def a_stop_string(text: str, avoid: str = "") -> str:
    """Two letters from the middle of ``text`` (not at its start, not in ``avoid``)."""
    return next(
        text[i : i + 2]
        for i in range(3, len(text) - 2)
        if text[i : i + 2].isalpha()
        and text.find(text[i : i + 2]) >= 1
        and text[i : i + 2] not in avoid
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def loaded(tiny_model_dir):
    """The tiny model and tokenizer, fresh for each test (tests change generation_config)."""
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    return model, tok


def ids_alone(model, tok, ids, settings):
    (r,) = complete_batch(model, tok, ["x"], settings, prompt_ids=[ids])
    return r.token_ids


def one_line_error(res, *needles):
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


# --- batching -----------------------------------------------------------------------------


def test_batched_greedy_equals_each_prompt_alone(loaded):
    model, tok = loaded
    settings = GenerationSettings(max_new_tokens=12, **GREEDY)
    prompts = [[5, 6, 7, 8, 9], [5, 6]]
    alone = [ids_alone(model, tok, p, settings) for p in prompts]
    batch = complete_batch(model, tok, ["a", "b"], settings, prompt_ids=prompts)
    assert [r.token_ids for r in batch] == alone
    assert [r.prompt_tokens for r in batch] == [5, 2]
    assert all(len(t) == 12 for t in alone)  # no EOS hit: the whole 12 tokens compared
    # Without position ids from the mask, a right-shifted short prompt would change its output.
    assert alone[0] != alone[1]


def test_batch_size_does_not_change_greedy_text(loaded):
    model, tok = loaded
    prompts = ["ROMEO:", "JULIET: O", "", "Good morrow, cousin"]
    settings = GenerationSettings(max_new_tokens=8, **GREEDY)
    one = run_prompts(model, tok, prompts, settings, batch_size=1)
    three = run_prompts(model, tok, prompts, settings, batch_size=3)
    assert [r.completion for r in one] == [r.completion for r in three]
    assert [r.prompt for r in three] == prompts


def test_max_new_tokens_ignores_config_max_length(loaded):
    model, tok = loaded
    model.generation_config.max_length = 10  # where transformers 5 keeps a model's max_length
    prompt = [11, 12, 13, 14, 15, 16, 17]
    (r,) = complete_batch(
        model, tok, ["p"], GenerationSettings(max_new_tokens=5, **GREEDY), prompt_ids=[prompt]
    )
    assert r.new_tokens == 5 and r.finish_reason == "length"
    assert r.prompt_tokens == 7


# --- end of sequence ----------------------------------------------------------------------


def test_eos_only_in_generation_config_stops_that_row_only(loaded):
    model, tok = loaded
    settings = GenerationSettings(max_new_tokens=12, **GREEDY)
    prompts = [[5, 6, 7, 8, 9], [5, 6]]
    first, second = (
        r.token_ids for r in complete_batch(model, tok, ["a", "b"], settings, prompt_ids=prompts)
    )
    # an id the first row produces (at step j) and the second row never does
    j, new_eos = next(
        (j, t) for j, t in enumerate(first) if t not in second and t != tok.eos_token_id
    )
    model.generation_config.eos_token_id = [tok.eos_token_id, new_eos]
    assert tok.eos_token_id != new_eos  # the tokenizer does not know it
    assert eos_ids(model, tok) == [tok.eos_token_id, new_eos]
    a, b = complete_batch(model, tok, ["a", "b"], settings, prompt_ids=prompts)
    assert a.token_ids == first[: j + 1] and a.finish_reason == "eos"
    assert b.token_ids == second and b.finish_reason == "length"


def test_tokenizer_eos_counts_even_when_generation_config_lists_others(loaded):
    model, tok = loaded
    model.generation_config.eos_token_id = [3]
    assert eos_ids(model, tok) == [3, tok.eos_token_id]


# --- stop strings -------------------------------------------------------------------------


def test_find_stop_earliest_then_longest():
    assert find_stop("abc\n\nd", ["\n", "\n\n", "c"]) == (2, "c")
    assert find_stop("ab\n\nd", ["\n", "\n\n"]) == (2, "\n\n")
    assert find_stop("abc", ["x"]) is None


def test_stop_string_ends_text_before_it(loaded):
    model, tok = loaded
    free = complete(model, tok, "ROMEO:", GenerationSettings(max_new_tokens=30, **SAMPLED))
    text = free.completion
    stop = a_stop_string(text)
    out = io.StringIO()
    settings = GenerationSettings(max_new_tokens=30, stop=[stop], **SAMPLED)
    r = complete(model, tok, "ROMEO:", settings, stream_to=out)
    assert r.completion == text[: text.find(stop)]
    assert r.finish_reason == "stop" and r.stop == stop
    assert r.new_tokens < 30 and r.token_ids == free.token_ids[: r.new_tokens]
    assert stop in tok.decode(r.token_ids) and stop not in tok.decode(r.token_ids[:-1])
    assert out.getvalue() == "ROMEO:" + r.completion  # the stream held the stop string back


def test_stop_string_in_batch_stops_only_its_row(loaded):
    model, tok = loaded
    # greedy, so the text does not depend on how many rows are still sampling
    settings = GenerationSettings(max_new_tokens=20, **GREEDY)
    prompts = ["Good morrow, cousin", "JULIET:"]
    a, b = run_prompts(model, tok, prompts, settings, batch_size=2)
    stop = a_stop_string(a.completion, avoid=b.completion)
    settings.stop = [stop]
    a2, b2 = run_prompts(model, tok, prompts, settings, batch_size=2)
    assert a2.completion == a.completion[: a.completion.find(stop)] and a2.finish_reason == "stop"
    assert b2.completion == b.completion and b2.token_ids == b.token_ids


# --- sampling options -------------------------------------------------------------------------


def test_repetition_penalty_matches_a_hand_loop(loaded):
    """CTRL's rule: a seen token's logit is divided by p when positive, multiplied when not."""
    model, tok = loaded
    p, prompt = 3.0, [5, 6, 7, 8, 9]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([seq])).logits[0, -1]  # (vocab_size,)
            seen = torch.tensor(sorted(set(seq)))
            s = logits[seen]
            logits[seen] = torch.where(s > 0, s / p, s * p)
            seq.append(int(logits.argmax()))
    settings = GenerationSettings(max_new_tokens=8, repetition_penalty=p, **GREEDY)
    assert ids_alone(model, tok, prompt, settings) == seq[len(prompt) :]
    assert ids_alone(model, tok, prompt, GenerationSettings(max_new_tokens=8, **GREEDY)) != seq[5:]


def test_num_return_sequences_gives_n_per_prompt_in_order(loaded):
    model, tok = loaded
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, num_return_sequences=3, seed=0)
    results = run_prompts(model, tok, ["ROMEO:", "JULIET:"], settings, batch_size=2)
    assert [(r.prompt, r.index) for r in results] == [
        (p, i) for p in ("ROMEO:", "JULIET:") for i in range(3)
    ]
    assert len({r.completion for r in results[:3]}) > 1  # sampled, not copies
    again = run_prompts(model, tok, ["ROMEO:", "JULIET:"], settings, batch_size=2)
    assert [r.completion for r in again] == [r.completion for r in results]  # same seed


def two_token_model(model, tok, a: int, b: int):
    """Make the model's next-token distribution P(a) = 3/4, P(b) = 1/4 (logits ln 3 and 0, the
    rest -1e4) at every position, through a hook on its output layer."""
    bias = torch.full((len(tok),), -1e4)
    bias[a], bias[b] = math.log(3.0), 0.0
    model.lm_head.register_forward_hook(lambda _m, _i, out: out * 0 + bias)


def share_of_a(model, tok, a: int, n: int = 400, **kw) -> float:
    """Share of ``n`` one-token samples that are ``a`` (seed 0: the same each run)."""
    settings = GenerationSettings(max_new_tokens=1, num_return_sequences=n, seed=0, **kw)
    results = complete_batch(model, tok, ["x"], settings, prompt_ids=[[5, 6]])
    return sum(r.token_ids == [a] for r in results) / n


@pytest.mark.parametrize(
    "kw,expected",
    [
        # temperature T: P(a) = 3^(1/T) / (3^(1/T) + 1)
        ({"temperature": 1.0, "top_k": None}, 0.75),
        ({"temperature": 0.5, "top_k": None}, 0.9),
        ({"temperature": 2.0, "top_k": None}, 3**0.5 / (3**0.5 + 1)),  # 0.634
        # top-k 1 keeps a only; top-p 0.7 keeps the smallest set with mass >= 0.7: {a}
        ({"temperature": 1.0, "top_k": 1}, 1.0),
        ({"temperature": 1.0, "top_k": None, "top_p": 0.7}, 1.0),
        # top-p 0.8 needs both tokens (0.75 < 0.8): the distribution is unchanged
        ({"temperature": 1.0, "top_k": None, "top_p": 0.8}, 0.75),
    ],
)
def test_temperature_top_k_top_p_shape_the_distribution(loaded, kw, expected):
    model, tok = loaded
    a, b = 40, 41
    two_token_model(model, tok, a, b)
    got = share_of_a(model, tok, a, **kw)
    # 400 draws: standard error at most 0.025; the bound is 3 of them (and exact for 1.0)
    assert got == pytest.approx(expected, abs=0.075)
    tokens = {
        t
        for r in complete_batch(
            model,
            tok,
            ["x"],
            GenerationSettings(max_new_tokens=1, num_return_sequences=50, seed=1, **kw),
            prompt_ids=[[5, 6]],
        )
        for t in r.token_ids
    }
    assert tokens <= {a, b}


def test_dtype_override(tiny_model_dir):
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    (r,) = run_prompts(model, tok, ["ROMEO:"], GenerationSettings(max_new_tokens=4, **GREEDY))
    assert r.new_tokens == 4
    res = runner.invoke(
        app,
        ["generate", "ROMEO:", "-m", str(tiny_model_dir), "--dtype", "bf16", "--device", "cpu"]
        + ["-t", "0", "--max-new-tokens", "4", "--json"],
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["completion"] == r.completion
    bad = runner.invoke(app, ["generate", "x", "-m", str(tiny_model_dir), "--dtype", "int3"])
    one_line_error(bad, "unknown dtype")


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"repetition_penalty": 0}, "--repetition-penalty"),
        ({"num_return_sequences": 2, "temperature": 0}, "--temperature 0"),
        ({"num_return_sequences": 0}, "--num-return-sequences"),
        ({"stop": [""]}, "--stop"),
    ],
)
def test_bad_sampling_options(kw, needle):
    with pytest.raises(UserError, match=needle):
        GenerationSettings(**kw)


# --- chat template ------------------------------------------------------------------------


def test_chat_template_applied(loaded):
    model, tok = loaded
    tok.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = tok("<system>Be brief.\n<user>Hi\n<assistant>", add_special_tokens=False)
    assert encode_chat(tok, messages) == expected["input_ids"]
    (r,) = run_prompts(
        model, tok, ["Hi"], GenerationSettings(max_new_tokens=3, **GREEDY), system="Be brief."
    )
    assert r.prompt == "Hi" and r.prompt_tokens == len(expected["input_ids"])


def test_chat_without_template_is_a_user_error(loaded):
    model, tok = loaded
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        run_prompts(model, tok, ["Hi"], GenerationSettings(max_new_tokens=3), chat=True)


# --- the command ----------------------------------------------------------------------------


def test_cli_batch_json_records(tiny_model_dir, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "ROMEO:"}\n\n{"prompt": "JULIET:", "id": 2}\n', encoding="utf-8")
    base = ["generate", "-m", str(tiny_model_dir), "--max-new-tokens", "6", "-t", "0", "--json"]
    res = runner.invoke(app, [*base, "--prompts-file", str(f), "--batch-size", "2"])
    assert res.exit_code == 0, res.stderr
    records = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["ROMEO:", "JULIET:"]
    first = records[0]
    assert first["finish_reason"] in ("eos", "length") and first["new_tokens"] <= 6
    assert first["prompt_tokens"] > 0 and first["tokens_per_sec"] > 0
    alone = runner.invoke(app, [*base, "ROMEO:"])
    assert json.loads(alone.stdout)["completion"] == first["completion"]


def test_cli_stop_repeatable(tiny_model_dir):
    base = ["generate", "ROMEO:", "-m", str(tiny_model_dir), "--max-new-tokens", "30", "-t", "1"]
    base += ["--top-k", "0", "--seed", "0", "--json"]
    free = json.loads(runner.invoke(app, base).stdout)["completion"]
    first = a_stop_string(free)
    later = a_stop_string(free[free.find(first) + 2 :], avoid=free[: free.find(first) + 2])
    res = runner.invoke(app, [*base, "--stop", later, "--stop", first])
    r = json.loads(res.stdout)
    assert r["completion"] == free[: free.find(first)]
    assert r["finish_reason"] == "stop" and r["stop"] == first


def test_cli_empty_prompts_file(tiny_model_dir, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n", encoding="utf-8")
    res = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "--prompts-file", str(f)])
    one_line_error(res, "empty.txt holds no prompt")


def test_cli_bad_jsonl_names_the_line(tiny_model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n', encoding="utf-8")
    res = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "--prompts-file", str(f)])
    one_line_error(res, "line 2", '"prompt"')


def test_cli_chat_without_template(tiny_model_dir):
    res = runner.invoke(app, ["generate", "Hi", "-m", str(tiny_model_dir), "--system", "Be kind"])
    one_line_error(res, "no chat template")


def test_cli_prompt_longer_than_context_in_a_batch(tiny_model_dir):
    res = runner.invoke(
        app,
        [
            "generate",
            "hi",
            "word " * 70,
            "-m",
            str(tiny_model_dir),
            "-b",
            "2",
            "--max-new-tokens",
            "9",
        ],
    )
    one_line_error(res, "prompt 2", "positions")
    assert res.stdout == ""  # checked before anything is generated
