"""``--dtype auto`` on a CPU (llmkit.generation.cpu_path): the choice from measurements, the
override, the cached decision, and the exactness check measured against real decoding."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from llmkit.generation import cpu_path
from llmkit.generation.cpu_path import PathMeasurement, auto_cpu_path, choose_path


def m(name, speed, equal=True, differ=0):
    return PathMeasurement(name, speed, equal, differ)


# --- the choice ------------------------------------------------------------------------------


def test_a_faster_greedy_equal_candidate_is_chosen():
    name, reason = choose_path([m("float32", 30.0), m("bfloat16", 39.0)])
    assert name == "bfloat16"
    assert "1.30× float32" in reason and "same greedy tokens" in reason


def test_a_candidate_below_the_margin_keeps_float32():
    name, reason = choose_path([m("float32", 30.0), m("bfloat16", 31.5)])  # 1.05×
    assert name == "float32"
    assert "bfloat16 ran 1.05× float32 (needs 1.10×)" in reason
    assert choose_path([m("float32", 30.0), m("bfloat16", 31.5)], margin=1.04)[0] == "bfloat16"


def test_a_candidate_that_changes_greedy_tokens_is_never_chosen_however_fast():
    name, reason = choose_path([m("float32", 30.0), m("bfloat16", None, False, 3)])
    assert name == "float32"
    assert "bfloat16 changed the greedy tokens of 3 of the 8 calibration prompts" in reason
    # even when it was timed and much faster
    assert choose_path([m("float32", 30.0), m("bfloat16", 90.0, False, 1)])[0] == "float32"


def test_the_fastest_of_several_exact_candidates_wins():
    ms = [m("float32", 30.0), m("bfloat16", 36.0), m("float16", 45.0), m("int8", 90.0, False, 2)]
    assert choose_path(ms)[0] == "float16"


def test_choose_path_needs_the_float32_reference():
    with pytest.raises(ValueError, match="float32"):
        choose_path([m("bfloat16", 40.0)])


# --- the automatic path on a loaded model ----------------------------------------------------


@pytest.fixture
def tiny(tiny_model_dir, monkeypatch):
    from llmkit.core.loading import load_model_and_tokenizer

    monkeypatch.setattr(cpu_path, "MIN_PARAMETERS", 0)  # calibrate even a tiny model
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="float32")
    return model, tok


def _fake(measurements, calls):
    def measure(model, tokenizer, candidates):
        calls.append(sorted(candidates))
        assert model.dtype == torch.float32
        assert {n: c.dtype for n, c in candidates.items()} == {"bfloat16": torch.bfloat16}
        return measurements

    return measure


def test_auto_runs_the_measured_choice_and_caches_it(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    calls: list = []
    fast = [m("float32", 30.0), m("bfloat16", 45.0)]
    chosen, choice = auto_cpu_path(model, tok, "auto", measure=_fake(fast, calls))
    assert calls == [["bfloat16"]]
    assert chosen.dtype == torch.bfloat16 and choice.dtype == "bfloat16" and not choice.cached
    err = capsys.readouterr().err
    assert "calibrating --dtype auto" in err and "--dtype auto: bfloat16: 1.50×" in err
    (entry,) = (tmp_path / "cache" / "cpu-path").glob("*.json")
    assert json.loads(entry.read_text())["dtype"] == "bfloat16"

    # the next run reads the decision: no measurement, nothing printed
    model2 = copy.deepcopy(model).float()
    again, choice2 = auto_cpu_path(model2, tok, "auto", measure=_fake([], calls))
    assert calls == [["bfloat16"]]  # not measured again
    assert again.dtype == torch.bfloat16 and choice2.cached and choice2.dtype == "bfloat16"
    assert capsys.readouterr().err == ""


def test_auto_keeps_float32_when_bfloat16_changes_greedy_tokens(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    calls: list = []
    inexact = [m("float32", 30.0), m("bfloat16", None, False, 2)]
    chosen, choice = auto_cpu_path(model, tok, "auto", measure=_fake(inexact, calls))
    assert chosen is model and chosen.dtype == torch.float32
    assert choice.dtype == "float32" and "changed the greedy tokens of 2" in choice.reason


@pytest.mark.parametrize("flag", ["float32", "bfloat16", "fp32"])
def test_an_explicit_dtype_wins_and_measures_nothing(tiny, tmp_path, monkeypatch, flag):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny

    def never(*args, **kwargs):
        raise AssertionError("measured despite an explicit --dtype")

    chosen, choice = auto_cpu_path(model, tok, flag, measure=never)
    assert chosen is model and chosen.dtype == torch.float32 and choice is None
    assert not (tmp_path / "cache" / "cpu-path").exists()


def test_a_small_model_is_not_calibrated(tiny_model_dir, tmp_path, monkeypatch):
    from llmkit.core.loading import load_model_and_tokenizer

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="float32")
    assert sum(p.numel() for p in model.parameters()) < cpu_path.MIN_PARAMETERS

    def never(*args, **kwargs):
        raise AssertionError("a tiny model was calibrated")

    chosen, choice = auto_cpu_path(model, tok, "auto", measure=never)
    assert chosen is model and chosen.dtype == torch.float32 and choice is None


def test_no_calibration_without_memory_for_the_bfloat16_copy(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    copy_bytes = sum(p.numel() * 2 for p in model.parameters())

    def never(*args, **kwargs):
        raise AssertionError("calibrated without memory for the copy")

    monkeypatch.setattr(cpu_path, "available_memory", lambda: 2 * copy_bytes - 2)
    chosen, choice = auto_cpu_path(model, tok, "auto", measure=never)
    assert chosen is model and choice is None
    calls: list = []
    monkeypatch.setattr(cpu_path, "available_memory", lambda: 2 * copy_bytes)
    fast = [m("float32", 30.0), m("bfloat16", 45.0)]
    _, choice = auto_cpu_path(model, tok, "auto", measure=_fake(fast, calls))
    assert calls and choice.dtype == "bfloat16"


def test_a_failed_calibration_falls_back_to_float32(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("no bfloat16 kernel")

    chosen, choice = auto_cpu_path(model, tok, "auto", measure=broken)
    assert chosen is model and chosen.dtype == torch.float32 and choice is None
    assert "calibration failed (no bfloat16 kernel); using float32" in capsys.readouterr().err


def test_the_estimate_scales_the_measured_time_per_token():
    """The exactness check costs CHECK_STEPS_PER_TOKEN decode steps per calibration token; the
    timing a 2-token warm-up and 2 × 32 steps per path, bfloat16's counted 1.25×."""
    check, at_most = cpu_path.estimate_seconds(0.5)
    assert check == pytest.approx(0.5 * 32 * 4.0)  # 64 s
    assert at_most == pytest.approx(64 + 0.5 * (2 + 2 * 32) * (1 + 1.25))  # 138.25 s
    assert cpu_path.estimate_seconds(0.05) == pytest.approx((check / 10, at_most / 10))
    assert cpu_path._duration(138.25) == "2 min" and cpu_path._duration(0.2) == "1 s"
    assert cpu_path._duration(64.4) == "64 s"


def test_the_calibration_says_how_long_it_will_take(tiny, tmp_path, monkeypatch, capsys):
    """The first line gives the estimate from a quick timing of this model on this machine,
    the last the time it took: two lines on stderr, nothing on stdout."""
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    timed: list = []

    def per_token(m, t):
        timed.append(m.dtype)
        return 0.5

    monkeypatch.setattr(cpu_path, "seconds_per_token", per_token)
    calls: list = []
    auto_cpu_path(
        model, tok, "auto", measure=_fake([m("float32", 30.0), m("bfloat16", 45.0)], calls)
    )
    assert timed == [torch.float32] and calls == [["bfloat16"]]
    out, err = capsys.readouterr()
    assert out == ""
    first, last = err.splitlines()
    assert first.startswith("calibrating --dtype auto")
    assert first.endswith("; about 64 s here, up to 2 min if bfloat16 is exact enough to be timed")
    assert last.startswith("--dtype auto: bfloat16: 1.50×") and last.endswith("(calibrated in 1 s)")


def test_seconds_per_token_times_real_decoding(tiny):
    model, tok = tiny
    per_token = cpu_path.seconds_per_token(model, tok)
    assert 0 < per_token < 5


def test_generate_json_stays_clean_while_calibrating(tiny_model_dir, tmp_path, monkeypatch):
    """``generate --json`` on a first run that calibrates (the real measurement, on the tiny
    model): stdout is the JSON record alone; the calibration's lines are on stderr."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_path, "MIN_PARAMETERS", 0)
    args = ["generate", "ROMEO:", "-m", str(tiny_model_dir), "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--temperature", "0", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["new_tokens"] == 2
    assert "calibrating --dtype auto" in result.stderr and "about " in result.stderr
    assert "--dtype auto: " in result.stderr and "calibrated in" in result.stderr
    assert len(list((tmp_path / "cache" / "cpu-path").glob("*.json"))) == 1


# --- the exactness check against real decoding -----------------------------------------------


def _decode(model, tok, prompt, tokens):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def test_measured_greedy_equality_matches_real_decoding(tiny):
    """The teacher-forced check counts exactly the prompts whose batch-1 greedy decoding
    differs from float32's: 0 for an identical copy; for a perturbed copy, the number found by
    decoding each prompt with both (float32 both, so the KV cache rounds alike)."""
    model, tok = tiny
    prompts = cpu_path.CALIBRATION_PROMPTS
    same = copy.deepcopy(model)
    perturbed = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in perturbed.transformer.h[-1].mlp.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = 12
    result = cpu_path.measure_paths(
        model, tok, {"same": same, "perturbed": perturbed}, tokens=tokens, rounds=1
    )
    by = {r.name: r for r in result}
    assert by["same"].greedy_equal and by["same"].differing_prompts == 0
    truth = sum(
        _decode(perturbed, tok, p, tokens) != _decode(model, tok, p, tokens) for p in prompts
    )
    assert 0 < truth  # the perturbation is large enough to matter on some prompt
    assert by["perturbed"].differing_prompts == truth
    assert by["perturbed"].greedy_equal is False and by["perturbed"].tokens_per_s is None
    assert by["float32"].tokens_per_s > 0 and by["same"].tokens_per_s > 0  # timed


def test_auto_generation_equals_float32_on_the_benchmark_prompts(tiny_model_dir):
    """What ``--dtype auto`` generates on a CPU equals ``--dtype float32`` (here the tiny
    model stays float32: below MIN_PARAMETERS)."""
    from llmkit.generation.generate import generate

    prompts = list(cpu_path.CALIBRATION_PROMPTS)
    kw = dict(model=str(tiny_model_dir), max_new_tokens=12, temperature=0, device="cpu")
    assert generate(prompts, dtype="auto", **kw) == generate(prompts, dtype="float32", **kw)


def test_the_cached_decision_is_per_model(tiny):
    """Another checkpoint of the same architecture (one tensor moved) gets another key; the
    same weights the same key."""
    model, _ = tiny
    key = cpu_path.cache_key(model)
    assert cpu_path.cache_key(copy.deepcopy(model)) == key
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.weight.mul_(1.01)
    assert cpu_path.cache_key(other) != key
    assert cpu_path.cache_key(copy.deepcopy(model).to(torch.bfloat16)) != key


def test_the_same_weights_in_another_folder_get_the_same_key(tiny_model_dir, tmp_path):
    """The key ignores where the model was loaded from (the config's ``_name_or_path``): a
    copied or moved model directory reuses the decision; a changed config value does not."""
    import shutil

    from llmkit.core.loading import load_model_and_tokenizer

    copied = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "copy")
    a, _, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", dtype="float32")
    b, _, _ = load_model_and_tokenizer(str(copied), device="cpu", dtype="float32")
    assert a.config._name_or_path != b.config._name_or_path
    assert cpu_path.cache_key(a) == cpu_path.cache_key(b)
    b.config.layer_norm_epsilon = 1e-3  # what the model computes: another key
    assert cpu_path.cache_key(a) != cpu_path.cache_key(b)


def test_a_gguf_is_calibrated_once_read_directly_then_from_its_converted_copy(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """``generate --model x.gguf`` calibrated on its first run (the .gguf read directly) and
    again on its second (read from the converted copy in ``$LLMKIT_CACHE/gguf``): the key held
    the config's ``_name_or_path``, the .gguf's folder then the copy's. One calibration, one
    decision file."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.export.gguf import export_gguf

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_path, "MIN_PARAMETERS", 0)
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gguf = export_gguf("x", tmp_path / "t.gguf", outtype="f32", loaded=(src, tok, "x")).path
    calls: list = []
    fast = [m("float32", 30.0), m("bfloat16", 45.0)]
    first, tok1, _ = load_model_and_tokenizer(str(gguf), device="cpu", dtype="float32")
    assert (tmp_path / "cache" / "gguf").is_dir()  # converted and cached
    _, choice1 = auto_cpu_path(first, tok1, "auto", measure=_fake(fast, calls))
    second, tok2, _ = load_model_and_tokenizer(str(gguf), device="cpu", dtype="float32")
    assert "cache" in Path(second.config._name_or_path).parts  # read from the copy
    _, choice2 = auto_cpu_path(second, tok2, "auto", measure=_fake(fast, calls))
    assert calls == [["bfloat16"]]  # measured once
    assert not choice1.cached and choice2.cached and choice2.dtype == "bfloat16"
    assert len(list((tmp_path / "cache" / "cpu-path").glob("*.json"))) == 1


def test_eval_with_dtype_auto_never_calibrates_and_scores_in_float32(
    tiny_model_dir, tmp_path, monkeypatch
):
    """``llmkit eval --dtype auto`` on a CPU loads float32 and never calibrates (even a model
    that generate would calibrate): its loss is float32's exactly, not bfloat16's."""
    from llmkit.evaluation.evaluate import evaluate

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_path, "MIN_PARAMETERS", 0)

    def never(*args, **kwargs):
        raise AssertionError("eval calibrated")

    monkeypatch.setattr(cpu_path, "auto_cpu_path", never)
    monkeypatch.setattr(cpu_path, "measure_paths", never)
    text = tmp_path / "text.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 3)
    kw = dict(model=str(tiny_model_dir), data=str(text), device="cpu")
    auto = evaluate(dtype="auto", **kw)
    assert auto["loss"] == evaluate(dtype="float32", **kw)["loss"]
    assert auto["loss"] != evaluate(dtype="bfloat16", **kw)["loss"]
    assert not (tmp_path / "cache" / "cpu-path").exists()


def test_serve_calibrates_while_loading_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    """``serve --dtype auto`` on a CPU calibrates in its loading thread (``/health`` is 503
    until ready), saying so with the estimate in its log; the model then serves."""
    import io

    pytest.importorskip("starlette")
    from llmkit.serve.app import ServerState

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_path, "MIN_PARAMETERS", 0)
    log = io.StringIO()
    threads = torch.get_num_threads()  # load() sets torch's threads: restored after
    state = ServerState(str(tiny_model_dir), device="cpu", dtype="auto", threads=1, log=log)
    assert not state.ready.is_set()
    state.load()
    try:
        assert state.error is None and state.ready.is_set()
        lines = log.getvalue().splitlines()
        assert lines[0].startswith("calibrating --dtype auto") and "about " in lines[0]
        assert lines[1].startswith("--dtype auto: ") and "calibrated in" in lines[1]
        assert len(list((tmp_path / "cache" / "cpu-path").glob("*.json"))) == 1
    finally:
        state.worker.shutdown()
        torch.set_num_threads(threads)
