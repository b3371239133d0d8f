"""The real GGUF (SmolLM2-135M-Instruct Q4_1): convert once, cache as safetensors, load the
cache; the same greedy text from both; its chat template. Slow (20-80 s): `make test-slow`."""

from __future__ import annotations

import pytest
from conftest import MODELS

GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent"),
]


def test_gguf_converted_once_then_loaded_from_cache(tmp_path, monkeypatch):
    from llmkit.core.loading import gguf_cache_dir, load_model_and_tokenizer
    from llmkit.generation.batching import complete
    from llmkit.generation.generate import run_prompts
    from llmkit.generation.settings import GenerationSettings

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    settings = GenerationSettings(max_new_tokens=8, temperature=0)
    model, tok, _ = load_model_and_tokenizer(str(GGUF), device="cpu")
    cache = gguf_cache_dir(GGUF)
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    first = complete(model, tok, "The capital of France is", settings)
    assert first.completion.startswith(" Paris")
    cached, tok2, _ = load_model_and_tokenizer(str(GGUF), device="cpu")
    assert complete(cached, tok2, "The capital of France is", settings).token_ids == first.token_ids
    (reply,) = run_prompts(cached, tok2, ["What is 2+2?"], settings, chat=True, system="Be brief.")
    assert reply.prompt_tokens > 10 and "<|im_start|>" in tok2.chat_template


def test_dtype_auto_on_smollm2_keeps_float32_text(tmp_path, monkeypatch):
    """SmolLM2-135M on a CPU: bfloat16 changes the greedy tokens of some of the calibration
    prompts (3 of 8 on this project's Xeon), so ``--dtype auto`` runs float32 whatever
    bfloat16's speed, and its greedy text equals ``--dtype float32``'s on every benchmark
    prompt (issue 16: "greedy output must stay equal to float32")."""
    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.generation.cpu_path import CALIBRATION_PROMPTS, auto_cpu_path
    from llmkit.generation.generate import run_prompts
    from llmkit.generation.settings import GenerationSettings

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    model, tok, _ = load_model_and_tokenizer(str(GGUF), device="cpu", dtype="float32")
    settings = GenerationSettings(max_new_tokens=32, temperature=0)
    reference = [r.token_ids for r in run_prompts(model, tok, list(CALIBRATION_PROMPTS), settings)]
    chosen, choice = auto_cpu_path(model, tok, "auto")
    by = {m.name: m for m in choice.measurements}
    assert not by["bfloat16"].greedy_equal and by["bfloat16"].differing_prompts >= 1
    assert choice.dtype == "float32" and chosen.dtype == model.dtype
    again = [r.token_ids for r in run_prompts(chosen, tok, list(CALIBRATION_PROMPTS), settings)]
    assert again == reference
