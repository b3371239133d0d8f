"""prepare's tokenizer of a ``.gguf`` is the model's own: the same ids as
``load_model_and_tokenizer`` gives, with a cold cache (no converted copy yet) too.

The SmolLM2 GGUF stores a pre-tokenizer name that transformers maps without SmolLM's
one-digit-at-a-time split; ``llmkit.core.loading`` corrects it (``_fix_gguf_tokenizer``), and
prepare once read the GGUF its own way. SmolLM2's vocabulary has no merges of digits, so a
number after one space comes out the same either way ("In 2024 there were 12345 cats." did not
show the bug); a run of spaces before a number does not: without the split "In  2024" gave
``In, Ġ, Ġ, 2...`` where the model has ``In, ĠĠ, 2...``, and indented numbers in code differ
the same way. Slow (a GGUF's tokenizer takes ~20 s to read)."""

from __future__ import annotations

import pytest
from conftest import MODELS

GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent"),
]

TEXT = "In 2024 there were 12345 cats. In  2024 there were   12345 cats.\nx = [\n    42,\n]"


def test_prepare_tokenizer_of_a_gguf_matches_the_models_with_a_cold_cache(tmp_path, monkeypatch):
    from llmkit.core.cache import gguf_cache_dir
    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.data.encode import load_pretrained_tokenizer

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    cache = gguf_cache_dir(GGUF)
    assert cache is None or not (cache / "tokenizer.json").exists()  # cold
    prepared = load_pretrained_tokenizer(str(GGUF))
    _, model_tok, _ = load_model_and_tokenizer(str(GGUF), device="cpu")
    ids = prepared(TEXT)["input_ids"]
    assert ids == model_tok(TEXT)["input_ids"]
    pieces = prepared.convert_ids_to_tokens(ids)
    assert "2024" not in pieces and "12345" not in pieces  # one token per digit
    # a run of spaces before a number is one token, as SmolLM2's own tokenizer.json makes it
    assert pieces[pieces.index("ĠĠ") + 1] == "2"
