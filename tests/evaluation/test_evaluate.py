"""`llmkit eval`: the window planner, the aggregation (total nats / total tokens), bits per byte,
prepared blocks against a hand computation, batch-size independence and the one-line errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import UserError
from llmkit.evaluation.evaluate import evaluate, plan_windows, score_blocks, score_windows

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare):
    """6 kB of tiny Shakespeare with a few non-ASCII characters (multi-byte UTF-8)."""
    text = shakespeare.read_text(encoding="utf-8")[:6000] + "\nCafé — naïve ☃ fin.\n"
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, shakespeare, tiny_tokenizer):
    """A prepared directory built by hand: blocks of 16 tokens, tokenizer and manifest."""
    from datasets import Dataset

    text = shakespeare.read_text(encoding="utf-8")[:8000]
    ids = tiny_tokenizer(text)["input_ids"]
    blocks = [ids[i : i + 16] for i in range(0, len(ids) - 15, 16)]
    out = tmp_path_factory.mktemp("prepared") / "data"
    Dataset.from_dict({"input_ids": blocks[:-20]}).save_to_disk(str(out / "train"))
    Dataset.from_dict({"input_ids": blocks[-20:]}).save_to_disk(str(out / "validation"))
    tiny_tokenizer.save_pretrained(out)
    (out / "manifest.json").write_text(json.dumps({"settings": {"block_size": 16}}))
    return out


# --- the planner and the aggregation ----------------------------------------------------


def test_plan_windows_scores_every_token_once_example():
    windows = plan_windows(10, 4, 2)
    scored = [t for b, e, k in windows for t in range(e - k, e)]
    assert sorted(scored) == list(range(1, 10))
    assert windows == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 200])
@pytest.mark.parametrize("max_length,stride", [(2, 1), (2, 2), (4, 4), (8, 3), (16, 16), (16, 1)])
def test_plan_windows_properties(n, max_length, stride):
    windows = plan_windows(n, max_length, stride)
    scored = [t for b, e, k in windows for t in range(e - k, e)]
    assert scored == list(range(1, n))  # each token after the first exactly once, in order
    for begin, end, k in windows:
        assert 0 <= begin < end <= n
        assert end - begin <= max_length
        assert 1 <= k <= end - begin - 1  # at least one token of context in the window


def test_plan_windows_rejects_stride_over_window():
    with pytest.raises(UserError):
        plan_windows(10, 4, 5)
    with pytest.raises(UserError):
        plan_windows(10, 1, 1)


class PositionLossModel:
    """Fake LM over token ids 0..V-1 where the id is the position in the text: the loss of
    predicting the token at position i is exactly i nats (p = e^-i, the rest of the mass on
    one other token), whatever the window. It peeks at the next input to know the target."""

    def __init__(self, vocab: int = 16):
        self.vocab = vocab

    def __call__(self, input_ids, attention_mask=None, **_):
        B, T = input_ids.shape
        logits = torch.full((B, T, self.vocab), -1e4, dtype=torch.float64)
        for b in range(B):
            for t in range(T - 1):
                i = int(input_ids[b, t + 1])
                logits[b, t, i] = -float(i)
                logits[b, t, (i + 1) % self.vocab] = math.log1p(-math.exp(-i)) if i else -1e4
        return SimpleNamespace(logits=logits)


def test_fake_position_loss_mean_is_five():
    # 10 tokens, window 4, stride 2: positions 1..9 scored once each, mean (1+...+9)/9 = 5.
    sums = score_windows(
        PositionLossModel(),
        [list(range(10))],
        torch.ones(16),
        max_length=4,
        stride=2,
        batch_size=3,
        device="cpu",
    )
    assert sums.tokens == 9
    assert sums.nats / sums.tokens == pytest.approx(5.0, abs=1e-9)
    # The HF guide's mean of window means would be mean(2, 4.5, 6.5, 8.5) = 5.375.


class NextIdLossModel:
    """Causal fake for blocks of consecutive ids: the token after id i is i+1, predicted with
    loss exactly i+1 nats (p = e^-(i+1), the rest on one other token). Unlike
    :class:`PositionLossModel` it reads no later input, so it works on the T-1 inputs that
    block scoring feeds (``llmkit.core.scoring.split_batch``)."""

    def __init__(self, vocab: int = 16):
        self.vocab = vocab

    def __call__(self, input_ids, **_):
        B, T = input_ids.shape
        logits = torch.full((B, T, self.vocab), -1e4, dtype=torch.float64)
        for b in range(B):
            for t in range(T):
                i = int(input_ids[b, t]) + 1
                logits[b, t, i] = -float(i)
                logits[b, t, (i + 1) % self.vocab] = math.log1p(-math.exp(-i))
        return SimpleNamespace(logits=logits)


def test_fake_blocks_score_t_minus_one_targets():
    blocks = torch.arange(12).view(3, 4)  # (N, T) = (3, 4): targets 1..3, 5..7, 9..11
    sums = score_blocks(NextIdLossModel(), blocks, torch.ones(16), batch_size=2, device="cpu")
    assert sums.tokens == 9
    assert sums.nats == pytest.approx(sum([1, 2, 3, 5, 6, 7, 9, 10, 11]), abs=1e-9)
    assert sums.bytes == 9


# --- the real (tiny) model ------------------------------------------------------------------


def test_batch_size_does_not_change_the_result(tiny_model_dir, text_file):
    one = evaluate(str(tiny_model_dir), str(text_file), batch_size=1, stride=40, device="cpu")
    four = evaluate(str(tiny_model_dir), str(text_file), batch_size=4, stride=40, device="cpu")
    assert one["tokens"] == four["tokens"]
    assert four["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)


def test_bits_per_byte_of_text(tiny_model_dir, text_file):
    text = text_file.read_text(encoding="utf-8")
    r = evaluate(str(tiny_model_dir), str(text_file), device="cpu")
    assert r["bytes"] == len(text.encode("utf-8"))
    total_nats = r["loss"] * r["tokens"]
    assert r["bits_per_byte"] == pytest.approx(total_nats / (math.log(2) * r["bytes"]), rel=1e-12)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


def test_short_text_equals_one_forward_pass(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    text = "ROMEO: But soft, what light through yonder window breaks?"
    path = tmp_path / "short.txt"
    path.write_text(text, encoding="utf-8")
    ids = [tiny_tokenizer.eos_token_id, *tiny_tokenizer(text)["input_ids"]]
    assert len(ids) <= 64
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]  # (T-1, vocab)
    nats = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    r = evaluate(str(tiny_model_dir), str(path), device="cpu")
    assert r["tokens"] == len(ids) - 1
    assert r["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-6)
    # Windows of 8 with stride 3 see less context but still score each token once.
    r2 = evaluate(str(tiny_model_dir), str(path), max_length=8, stride=3, device="cpu")
    assert r2["tokens"] == r["tokens"] and r2["bytes"] == len(text.encode())


def test_prepared_split_matches_hand_computation(tiny_model_dir, prepared_dir, tiny_tokenizer):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from llmkit.core.tokenizer import token_byte_lengths

    blocks = torch.tensor(load_from_disk(str(prepared_dir / "validation"))["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]  # (N, T-1, vocab)
    targets = blocks[:, 1:]
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
    n_bytes = int(torch.as_tensor(token_byte_lengths(tiny_tokenizer))[targets].sum())

    r = evaluate(str(tiny_model_dir), str(prepared_dir), batch_size=3, device="cpu")
    assert r["tokens"] == 20 * 15
    assert r["loss"] == pytest.approx(nats / (20 * 15), rel=1e-6)
    assert r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)


def test_directory_of_text_files_scores_each_file(tiny_model_dir, tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Second one, a bit longer.\n", encoding="utf-8")
    r = evaluate(str(tiny_model_dir), str(tmp_path), device="cpu")
    assert r["bytes"] == len("First document.\n") + len("Second one, a bit longer.\n")


# --- the command ----------------------------------------------------------------------------


def test_cli_json_and_table(tiny_model_dir, prepared_dir):
    res = run_cli("eval", "-m", str(tiny_model_dir), "-d", str(prepared_dir), "--json")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert set(r) == {"model", "data", "loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    assert r["tokens"] == 300
    table = run_cli("eval", "-m", str(tiny_model_dir), "-d", str(prepared_dir))
    assert table.exit_code == 0, table.stderr
    assert "bits per byte" in table.stdout and f"{r['loss']:.4f}" in table.stdout


def test_cli_train_split(tiny_model_dir, prepared_dir):
    res = run_cli(
        "eval", "-m", str(tiny_model_dir), "-d", str(prepared_dir), "--split", "train", "--json"
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] % 15 == 0


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing", "does not exist"),
        ("invalid_utf8", "not valid UTF-8"),
        ("empty", "empty"),
        ("binary", "binary"),
        ("no_txt", "no .txt file"),
    ],
)
def test_cli_bad_data(tiny_model_dir, tmp_path, case, needle):
    path = tmp_path / "data.txt"
    if case == "invalid_utf8":
        path.write_bytes(b"ok then \xff\xfe broken")
    elif case == "empty":
        path.write_text("", encoding="utf-8")
    elif case == "binary":
        path.write_bytes(b"abc\x00\x01\x02")
    elif case == "no_txt":
        path = tmp_path / "dir"
        path.mkdir()
        (path / "x.bin").write_bytes(b"1")
    res = run_cli("eval", "-m", str(tiny_model_dir), "-d", str(path))
    assert_one_line_error(res, needle)


def test_cli_stride_over_max_length(tiny_model_dir, text_file):
    res = run_cli(
        "eval",
        "-m",
        str(tiny_model_dir),
        "-d",
        str(text_file),
        "--max-length",
        "16",
        "--stride",
        "17",
    )
    assert_one_line_error(res, "--stride 17")


def test_cli_stride_over_the_models_positions_names_them(tiny_model_dir, text_file):
    """Without --max-length the window is the model's positions: the line says so (it named
    a --max-length the user never gave)."""
    res = run_cli("eval", "-m", str(tiny_model_dir), "-d", str(text_file), "--stride", "100")
    assert_one_line_error(
        res,
        "--stride 100 is more than the window length, the model's 64 positions (no --max-length "
        "given) — a stride above the window length would skip tokens: use at most 64",
    )


@pytest.mark.parametrize("max_length", [None, 8])
def test_stride_zero_hint_is_about_the_stride(max_length):
    """Was "--stride 0 must be between 1 and --max-length 2" without --max-length."""
    from llmkit.evaluation.checks import check_eval_args

    with pytest.raises(UserError) as err:
        check_eval_args(None, max_length=max_length, stride=0)
    assert err.value.message == "--stride 0 must be at least 1"
    assert "--max-length" not in str(err.value)


def test_cli_max_length_over_positions(tiny_model_dir, text_file):
    res = run_cli("eval", "-m", str(tiny_model_dir), "-d", str(text_file), "--max-length", "65")
    assert_one_line_error(res, "64 positions")


def test_cli_model_not_a_model(tmp_path, text_file):
    res = run_cli("eval", "-m", str(tmp_path), "-d", str(text_file))
    assert_one_line_error(res, "not a model directory")


def test_cli_empty_split(tiny_model_dir, prepared_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    shutil.rmtree(data / "validation")  # load_prepared then gives an empty validation split
    res = run_cli("eval", "-m", str(tiny_model_dir), "-d", str(data))
    assert_one_line_error(res, "no blocks", "--split train")


def test_data_of_another_tokenizer_is_refused_like_train(
    write_prepared, tmp_path, tiny_tokenizer, tiny_model_dir, shakespeare
):
    """eval used to score it with a warning and exit 0 while train refused the same pair: both
    refuse it now, with the same check (llmkit.core.prepared.check_same_vocabulary)."""
    from llmkit.core.tokenizer import train_bpe_tokenizer

    text = shakespeare.read_text(encoding="utf-8")[60_000:120_000]
    other = train_bpe_tokenizer(iter(text.split("\n\n")), vocab_size=280)
    assert len(other) < len(tiny_tokenizer)  # fits into the model's embeddings: no size error
    data = write_prepared(tmp_path / "data", other, 16, 8, 2)
    evaluated = run_cli("eval", "-m", str(tiny_model_dir), "-d", str(data), "--json")
    line = assert_one_line_error(evaluated, "vocabulary mismatch", "tokens differ")
    assert evaluated.stdout == ""
    trained = run_cli(
        "train",
        f"data.path={data}",
        f"model.name_or_path={tiny_model_dir}",
        f"out_dir={tmp_path / 'r'}",
    )
    assert trained.exit_code == 2
    assert line.split(" (")[0] == trained.stderr.strip().split(" (")[0]
    assert line.endswith(
        "— prepare the data with --tokenizer pointing at the model (or its tokenizer)"
    )
    # the model's own tokenizer still passes
    ok = run_cli(
        "eval",
        "-m",
        str(tiny_model_dir),
        "-d",
        str(write_prepared(tmp_path / "same", tiny_tokenizer, 16, 8, 2)),
        "--json",
    )
    assert ok.exit_code == 0, ok.stderr
