"""MFU is one the hardware can reach: the peak is the best of several matmul shapes in the dtype
the work runs in, an MFU above 100% makes llmkit measure the peak again and else report the MFU
as unknown (never clamped), and the `done:` line's MFU is the run's average, like its tok/s."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.training import flops
from llmkit.training.flops import MfuMeter, format_mfu, matmul_dtype, matmul_shapes

GFLOP = 1e9


def test_peak_is_the_best_rate_over_the_square_and_the_model_shapes(monkeypatch):
    # faked timings, as measured on this project's CPU in float16: the 1024 square is slow,
    # the model's thin matmuls faster, a weight gradient (x.T @ g) fastest; the peak is the
    # fastest
    rates = {
        (1024, 1024, 1024, "nn"): 0.6 * GFLOP,
        (512, 64, 192, "nn"): 2.4 * GFLOP,
        (64, 512, 192, "tn"): 2.75 * GFLOP,
    }
    seen = []

    def fake(m, k, n, dev, dt, seconds, min_reps, layout="nn"):
        seen.append(((m, k, n, layout), dt, min_reps))
        return rates[(m, k, n, layout)]

    monkeypatch.setattr(flops, "_best_rate", fake)
    shapes = ((512, 64, 192), (64, 512, 192, "tn"))
    peak = flops.measure_peak_flops.__wrapped__("cpu", "float16", 1024, 0.3, shapes)
    assert peak == 2.75 * GFLOP
    assert [s for s, _, _ in seen] == list(rates)
    assert {dt for _, dt, _ in seen} == {torch.float16} and {r for _, _, r in seen} == {3}


def test_layouts_compute_the_same_product_rate_formula():
    # each layout really multiplies (m, k) by (k, n): 2 m k n FLOPs in a finite time
    for layout in flops.LAYOUTS:
        rate = flops._best_rate(8, 4, 6, torch.device("cpu"), torch.float32, 0.0, 1, layout)
        assert 0 < rate < float("inf")


def test_matmul_shapes_of_a_gpt2():
    from transformers import GPT2Config

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=300)
    shapes = matmul_shapes(cfg, 8 * 31)
    # QKV forward both ways, its input gradient, its weight gradient x.T @ g
    assert shapes[:4] == (
        (248, 64, 192, "nn"),
        (248, 64, 192, "nt"),
        (248, 192, 64, "nn"),
        (64, 248, 192, "tn"),
    )
    forward = {(m, k, n) for m, k, n, layout in shapes if layout == "nt"}
    assert forward == {(248, 64, 192), (248, 64, 256), (248, 256, 64), (248, 64, 300)}
    # 4 matmuls x 4; the MLP's two are each other's input gradient: 2 repeats dropped
    assert len(shapes) == len(set(shapes)) == 14
    assert matmul_shapes(cfg, 10_000, max_rows=1024)[0][0] == 1024


def test_matmul_dtype_is_the_autocast_dtype():
    assert matmul_dtype("cpu") == "float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype("cpu") == "bfloat16"
    with torch.autocast("cpu", dtype=torch.float16):
        assert matmul_dtype("cpu") == "float16"


def test_mfu_above_100_percent_remeasures_then_is_unknown():
    # 1 FLOP per token, peak 100 GFLOP/s
    assert MfuMeter(1.0, 100 * GFLOP, "m").mfu(50 * GFLOP) == pytest.approx(0.5)
    # above the peak: measured again, and the better peak is kept
    fresh = iter([150 * GFLOP])
    meter = MfuMeter(1.0, 100 * GFLOP, "best float32 matmul on cpu", remeasure=lambda: next(fresh))
    assert meter.mfu(120 * GFLOP) == pytest.approx(0.8)
    assert meter.peak == 150 * GFLOP and meter.source.endswith(", re-measured")
    assert meter.unknown_reason is None
    # still above after two fresh measurements: unknown, with the reason; never 1.2 or 1.0
    calls = []
    meter = MfuMeter(
        1.0,
        100 * GFLOP,
        "best float32 matmul on cpu",
        world=2,
        remeasure=lambda: calls.append(1) or 90 * GFLOP,
    )
    assert meter.mfu(240 * GFLOP) is None  # 120 GFLOP/s per process
    assert len(calls) == 2 and meter.peak == 100 * GFLOP
    assert meter.unknown_reason == (
        "the achieved 120.0 GFLOP/s per process is above the peak 100.0 GFLOP/s (best float32 "
        "matmul on cpu), so that peak is not this device's; set train.peak_flops to its real "
        "peak FLOP/s"
    )
    assert meter.mfu(240 * GFLOP) is None and len(calls) == 2  # no more re-measuring
    assert meter.mfu(100 * GFLOP) == pytest.approx(0.5)  # a rate below the peak is known
    # a fixed train.peak_flops is never re-measured
    fixed = MfuMeter(1.0, 1 * GFLOP, "train.peak_flops")
    assert fixed.mfu(2 * GFLOP) is None and "(train.peak_flops)" in fixed.unknown_reason
    assert format_mfu(None) == "n/a" and format_mfu(0.1234) == "12.3%"


TINY = [
    "model.n_layer=1",
    "model.n_embd=16",
    "model.n_head=2",
    "train.micro_batch_size=4",
    "train.max_steps=6",
    "train.warmup_steps=0",
    "train.log_interval=2",
    "train.trackers=[]",
    "eval.interval=3",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU autocast")
def test_bf16_run_measures_a_bf16_peak_and_reports_the_run_average(
    write_prepared, tmp_path, tiny_tokenizer
):
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)
    run = tmp_path / "r"
    args = ["train", f"data.path={data}", f"out_dir={run}", *TINY, "--no-progress", "--json"]
    result = CliRunner().invoke(app, [*args, "train.mixed_precision=bf16"])
    assert result.exit_code == 0, result.stderr
    err = " ".join(result.stderr.split())
    assert re.search(r"peak [\d.]+ GFLOP/s per process \(best bfloat16 matmul on cpu\)", err)
    final = json.loads(result.stdout)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "mfu" in r]
    assert len(windows) == 3 and all(0 < r["mfu"] <= 1 for r in windows)
    # one peak for the whole run: MFU / (tokens/s) is the same constant (FLOPs per token /
    # peak) for every window and for the run, whose MFU comes from its average tokens/s
    per_token = final["mfu"] / final["tokens_per_sec"]
    for r in windows:
        assert r["mfu"] / r["tokens_per_sec"] == pytest.approx(per_token, rel=1e-9)
    done = re.search(r"done: 6 steps in [\d.]+ s \(([\d,]+) tok/s, MFU ([\d.]+)%\)", err)
    assert int(done[1].replace(",", "")) == round(final["tokens_per_sec"])
    assert float(done[2]) == pytest.approx(100 * final["mfu"], abs=0.051)
    assert f"| mfu | {final['mfu']:.1%} |" in (run / "README.md").read_text()


def test_a_peak_below_the_achieved_rate_prints_unknown_not_above_100(
    write_prepared, tmp_path, tiny_tokenizer
):
    """train.peak_flops far below what the CPU does: MFU n/a with one warning, never > 100%."""
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)
    args = ["train", f"data.path={data}", f"out_dir={tmp_path / 'r'}", *TINY, "--no-progress"]
    result = CliRunner().invoke(app, [*args, "train.peak_flops=1000", "--json"])
    assert result.exit_code == 0, result.stderr
    err = " ".join(result.stderr.split())
    assert err.count("warning: MFU unknown: the achieved") == 1
    assert "above the peak 0.0 GFLOP/s (train.peak_flops)" in err
    assert re.search(r"done: 6 steps in [\d.]+ s \([\d,]+ tok/s, MFU n/a\)", err)
    assert not re.search(r"MFU \d{3,}\.\d%", err)
    assert json.loads(result.stdout)["mfu"] is None
    assert "| mfu | n/a |" in (tmp_path / "r" / "README.md").read_text()
