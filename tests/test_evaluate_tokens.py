"""`llmkit eval --tokens`: per-token probabilities, the chain rule; models side by side."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.loading import load_model_and_tokenizer
from llmkit.evaluation.evaluate import evaluate, token_pieces, token_probabilities

runner = CliRunner()
TEXT = "ROMEO: But soft, what light through yonder window breaks? Café ☃"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    return model, tok


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    """A second random GPT-2 (another seed) with the same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    out = tmp_path_factory.mktemp("model") / "other-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def test_pieces_rebuild_the_text(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    pieces = token_pieces(tiny_tokenizer, ids)
    assert "".join(pieces) == TEXT and len(pieces) == len(ids)
    assert "" in pieces  # ☃ spans several byte tokens: only the last one carries it


def test_probabilities_are_the_softmax_at_each_position(loaded):
    model, tok = loaded
    view = token_probabilities(model, tok, TEXT, top=3)
    ids = [tok.eos_token_id, *tok(TEXT)["input_ids"]]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)  # (N, vocab)
    expected = probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert [t["id"] for t in view["tokens"]] == ids[1:]
    got = torch.tensor([t["prob"] for t in view["tokens"]])
    assert torch.allclose(got, expected, rtol=1e-5)
    first = view["tokens"][0]
    assert first["top"][0]["prob"] == pytest.approx(float(probs[0].max()), rel=1e-5)
    assert [a["prob"] for a in first["top"]] == sorted(
        (a["prob"] for a in first["top"]), reverse=True
    )


def test_chain_rule_total_equals_evaluate(loaded, tiny_model_dir, tmp_path):
    """Σ log P(x_i | x_<i) = log P(text) = -(loss × tokens) of `evaluate` on the same text."""
    model, tok = loaded
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    view = token_probabilities(model, tok, TEXT)
    assert view["logprob"] == pytest.approx(sum(t["logprob"] for t in view["tokens"]), rel=1e-9)
    assert math.prod(t["prob"] for t in view["tokens"]) == pytest.approx(
        math.exp(view["logprob"]), rel=1e-6
    )
    r = evaluate(str(tiny_model_dir), str(path), device="cpu")
    assert view["n_tokens"] == r["tokens"]
    assert view["logprob"] == pytest.approx(-r["loss"] * r["tokens"], rel=1e-5)
    assert view["bits_per_byte"] == pytest.approx(r["bits_per_byte"], rel=1e-5)
    # windows of 8 tokens (text longer than the window): the same windows as evaluate's
    short = token_probabilities(model, tok, TEXT, max_length=8)
    r8 = evaluate(str(tiny_model_dir), str(path), max_length=8, device="cpu")
    assert short["logprob"] == pytest.approx(-r8["loss"] * r8["tokens"], rel=1e-5)
    assert short["logprob"] != pytest.approx(view["logprob"], rel=1e-5)  # less context


def test_cli_tokens_json_and_terminal(tiny_model_dir):
    base = ["eval", "-m", str(tiny_model_dir), "--tokens", "Hello there", "--top", "2"]
    res = runner.invoke(app, [*base, "--json"])
    assert res.exit_code == 0, res.stderr
    view = json.loads(res.stdout)
    assert "".join(t["token"] for t in view["tokens"]) == "Hello there"
    assert len(view["tokens"][0]["top"]) == 2
    shown = runner.invoke(app, base)
    assert shown.exit_code == 0, shown.stderr
    assert f"{view['logprob']:.4f} nats" in shown.stdout and "Hello there" in shown.stdout


def test_cli_models_side_by_side(tiny_model_dir, other_model_dir, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    args = ["eval", "-m", str(tiny_model_dir), "-m", str(other_model_dir), "-d", str(path)]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["model"] for r in rows] == [str(tiny_model_dir), str(other_model_dir)]
    assert rows[0]["tokens"] == rows[1]["tokens"] and rows[0]["loss"] != rows[1]["loss"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.stderr
    for r in rows:
        assert f"{r['loss']:.4f}" in table.stdout
    assert "lowest bits per byte" in table.stdout


def test_cli_nothing_to_score(tiny_model_dir):
    res = runner.invoke(app, ["eval", "-m", str(tiny_model_dir)])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: nothing to score") and res.stderr.count("\n") == 1
