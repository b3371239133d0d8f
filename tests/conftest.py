"""Shared fixtures: real corpora from ../shared/data (skipped when absent), a tiny BPE tokenizer
and a tiny random GPT-2 saved in tmp_path. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The shared corpora and models: ../shared next to the project, or $LLMKIT_SHARED.
SHARED = Path(
    os.environ.get("LLMKIT_SHARED") or Path(__file__).resolve().parents[1].parent / "shared"
)
DATA = SHARED / "data"
MODELS = SHARED / "models"


@pytest.fixture(scope="module", autouse=True)
def _llmkit_cache_in_tmp(tmp_path_factory):
    """Caches (cleaned documents, GGUF conversions) go to a temporary directory per test
    module, never to the user's ~/.cache/llmkit, and no module sees another's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMKIT_CACHE", str(tmp_path_factory.mktemp("llmkit-cache")))
        yield


@pytest.fixture(autouse=True)
def _machine_not_busy(monkeypatch):
    """llmkit picks fewer torch threads, with a warning line, when the load average is above
    the free cores (llmkit.runtime); tests see an idle machine whatever else runs, so their
    stderr does not depend on the load (tests/test_runtime.py sets the load it needs)."""
    import llmkit.runtime

    monkeypatch.setattr(llmkit.runtime, "load_average", lambda: None)


def pytest_report_header(config) -> str:
    if DATA.is_dir():
        return f"llmkit shared corpora: {DATA}"
    return (
        f"llmkit shared corpora: {DATA} is ABSENT - tests on real text will be skipped; "
        "set LLMKIT_SHARED=/path/to/shared"
    )


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test saying which file is missing."""
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"{p} is absent (the shared corpora live in ../shared/data)")
    return p


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def shakespeare_slice(tmp_path_factory, shakespeare) -> Path:
    """The first 60 kB of tiny Shakespeare as its own file (blank-line separated speeches)."""
    out = tmp_path_factory.mktemp("corpus") / "shakespeare_60k.txt"
    out.write_text(shakespeare.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(shakespeare):
    """A byte-level BPE with 300 tokens trained on the first 60 kB of tiny Shakespeare."""
    from llmkit.core.tokenizer import train_bpe_tokenizer

    text = shakespeare.read_text(encoding="utf-8")[:60_000]
    return train_bpe_tokenizer(iter(text.split("\n\n")), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer GPT-2 (n_embd 32, 64 positions) saved with the tiny tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tiny_tokenizer.eos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    out = tmp_path_factory.mktemp("model") / "tiny-gpt2"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out
