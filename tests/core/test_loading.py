"""Loading models: no waiting on an unreachable Hub, the GGUF conversion cache, and transformers'
GGUF misreadings that llmkit corrects (GPT-2's positions, SmolLM's digit split)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "LLMKIT_MODEL")}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        HF_HOME=str(tmp_path / "hf-home"),  # an empty Hub cache
        PYTHONPATH=str(ROOT),
    )
    return env


# --- no network ------------------------------------------------------------------------------


def test_generate_without_model_or_network_answers_at_once(tmp_path):
    """The mission's command with no run, no --model and no Hub: one line, exit 2, no retries
    (huggingface_hub retried for ~50 s before)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "generate", "Once upon a time"],
        cwd=tmp_path,
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: no model could be loaded; tried LLMKIT_MODEL (not set)")
    assert "gpt2 from the Hub (the Hub is not reachable (http://127.0.0.1:" in line
    assert "connection refused" in line and "not in the local Hugging Face cache" in line
    assert proc.stdout == ""
    assert elapsed < 20, elapsed  # generous: the answer takes ~5 s, mostly importing torch


def test_hub_status(monkeypatch):
    from llmkit.core import loading

    monkeypatch.setattr(loading, "_HUB_STATUS", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_status() == (False, "HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    port = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert loading.hub_status() == (False, f"http://127.0.0.1:{port}: connection refused")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}/")
        reachable, why = loading.hub_status()
    assert reachable and why.endswith("is reachable")


def test_cached_hub_model_loads_without_network(tmp_path, monkeypatch, tiny_model_dir):
    """A Hub id already in the local Hub cache loads while the Hub is unreachable."""

    snapshot = tmp_path / "hf-home" / "hub" / "models--someone--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    env = _offline_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "generate", "ROMEO:", "--model", "someone/tiny",
         "--max-new-tokens", "3", "--temperature", "0", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["new_tokens"] == 3
    assert "Retry" not in proc.stderr


# --- GGUF ------------------------------------------------------------------------------------


def _export(model, tok, path: Path) -> Path:
    from llmkit.export.gguf import export_gguf

    return export_gguf("x", path, outtype="f32", loaded=(model, tok, "x")).path


def test_gpt2_gguf_loads_with_its_positions_and_is_cached(tmp_path, monkeypatch, tiny_model_dir):
    """transformers alone fails on a GPT-2 GGUF with other than 1024 positions; llmkit loads it
    (logits equal to the source), caches it, and a cached load reads no GGUF."""
    pytest.importorskip("gguf")
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import gguf_cache_dir, load_model_and_tokenizer

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert src.config.n_positions == 64
    path = _export(src, tok, tmp_path / "tiny-gpt2.gguf")
    ids = torch.tensor([tok("ROMEO: what, ho!")["input_ids"]])
    with torch.no_grad():
        ref = src(ids).logits
    model, tok2, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    assert model.config.n_positions == 64
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    cache = gguf_cache_dir(path)
    assert json.loads((cache / "llmkit_gguf_cache.json").read_text()) == {
        "version": 2,
        "dtype": "float32",
    }

    def no_gguf(*args, **kwargs):
        raise AssertionError("a cached load read the GGUF")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    cached, tok3, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, ref)
    assert tok3("ROMEO: what, ho!")["input_ids"] == ids[0].tolist()
    # a cached copy someone altered to name Python code: blamed on the cache, never run
    cfg = json.loads((cache / "config.json").read_text())
    planted = cache / "modeling_planted.py"
    planted.write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w')\n")
    altered = {**cfg, "auto_map": {"AutoModelForCausalLM": "modeling_planted.Evil"}}
    (cache / "config.json").write_text(json.dumps(altered))
    for trust in (False, True):
        with pytest.raises(UserError, match="cached conversion of .* was altered") as err:
            load_model_and_tokenizer(
                str(path), device="cpu", dtype="float32", trust_remote_code=trust
            )
        assert "modeling_planted.py" in str(err.value) and "llmkit cache clear --gguf" in str(
            err.value
        )
        assert "--trust-remote-code" not in str(err.value)
    assert not (tmp_path / "MARKER").exists()
    (cache / "config.json").write_text(json.dumps(cfg))
    planted.unlink()
    # a copy written before this version (no marker) is converted again
    (cache / "llmkit_gguf_cache.json").unlink()
    with pytest.raises(Exception, match="a cached load read the GGUF"):
        load_model_and_tokenizer(str(path), device="cpu", dtype="float32")


def test_gguf_cache_is_kept_per_dtype(tmp_path, monkeypatch, tiny_model_dir):
    """The cached conversion of a .gguf holds its weights in the dtype of the load that wrote
    it: a float32 load after a bfloat16 one read the rounded copy (logits off by ~1e-2). Each
    dtype now has its own copy: the float32 load gives the source's exact logits, the
    bfloat16 load its bfloat16 ones, and both copies are reused."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import gguf_cache_dir, load_model_and_tokenizer

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = _export(src, tok, tmp_path / "tiny-gpt2.gguf")
    ids = torch.tensor([tok("ROMEO: what, ho!")["input_ids"]])
    with torch.no_grad():
        ref = src(ids).logits
        ref_bf16 = src.to(torch.bfloat16)(ids).logits
    bf16, _, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    # training's check of the data's tokenizer finds the tokenizer in whichever copy exists
    from llmkit.training.model import _model_tokenizer_file

    assert _model_tokenizer_file(str(path)) == gguf_cache_dir(path, "bfloat16") / "tokenizer.json"
    fp32, _, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    assert fp32.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(fp32(ids).logits, ref)  # not the bfloat16 copy's rounded weights
    copies = {d: gguf_cache_dir(path, d) for d in ("float32", "bfloat16")}
    assert copies["float32"] != copies["bfloat16"]
    for d, cache in copies.items():
        assert json.loads((cache / "llmkit_gguf_cache.json").read_text())["dtype"] == d
    # both are reused: a second load of each reads its copy (same values as the first)
    again32, _, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    again16, _, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(again32(ids).logits, ref)
        assert torch.equal(again16(ids).logits, ref_bf16)


def test_deepspeed_prints_nothing_when_generate_converts_a_gguf(tmp_path, tiny_model_dir):
    """With deepspeed installed, the first load of a .gguf (its conversion cached with
    save_pretrained, which makes accelerate import deepspeed) printed "[WARNING]
    [real_accelerator.py...] Setting accelerator to CPU" on stdout, in the middle of
    ``--json``'s output. llmkit sets DS_ACCELERATOR=cpu on a machine without CUDA/MPS."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import resolve_device

    if resolve_device("auto").type != "cpu":
        pytest.skip("deepspeed detects this machine's accelerator without a warning")
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = _export(src, tok, tmp_path / "tiny-gpt2.gguf")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(PYTHONPATH=str(ROOT), LLMKIT_CACHE=str(tmp_path / "cache"))
    plain = subprocess.run(
        [sys.executable, "-c", "import deepspeed"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Setting accelerator to CPU" in plain.stdout + plain.stderr  # what it prints alone
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "generate", "ROMEO:", "--model", str(path),
         "--max-new-tokens", "2", "--temperature", "0", "--json", "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cache" / "gguf").is_dir()  # converted and cached: deepspeed imported
    for stream in (proc.stdout, proc.stderr):
        assert "real_accelerator" not in stream and "Setting accelerator" not in stream
    assert json.loads(proc.stdout)["new_tokens"] >= 1  # stdout is the JSON record alone


def test_a_damaged_cached_gguf_conversion_is_converted_again(
    tmp_path, monkeypatch, tiny_model_dir, capsys
):
    """A cached conversion whose model.safetensors was truncated (a full disk, a killed copy)
    used to fail every later load ("incomplete metadata", exit 2, no hint): it is deleted with
    one warning line, the .gguf converted again (same logits as the source) and cached anew."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import gguf_cache_dir, load_model_and_tokenizer, load_source_tokenizer

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = _export(src, tok, tmp_path / "tiny-gpt2.gguf")
    ids = torch.tensor([tok("ROMEO: what, ho!")["input_ids"]])
    with torch.no_grad():
        ref = src(ids).logits
    load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    weights = gguf_cache_dir(path) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(5)
    capsys.readouterr()
    model, _, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if "cached conversion" in line]
    assert "cannot be read" in warning and "converting the .gguf again" in warning
    assert weights.stat().st_size == size  # cached again, whole
    # the tokenizer alone (prepare --tokenizer, eval) recovers from a damaged cache too
    (gguf_cache_dir(path) / "tokenizer.json").write_text("{not json")
    tok2 = load_source_tokenizer(str(path))
    assert tok2("ROMEO: what, ho!")["input_ids"] == ids[0].tolist()
    assert not (gguf_cache_dir(path) / "tokenizer.json").exists()


def test_training_reads_a_gpt2_gguf_with_its_positions(tmp_path, monkeypatch, tiny_model_dir):
    """Training resolves a .gguf through the same rule as generate (llmkit.core.loading): a
    GPT-2 file of 64 positions loads with n_positions 64 and the source's exact logits (it
    read the file with transformers alone, which keeps 1024 positions and fails); it never
    reads the cached conversion, which holds the dtype of the load that wrote it."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import load_model_and_tokenizer, resolve_source
    from llmkit.training.model import load_pretrained, load_pretrained_config

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = _export(src, tok, tmp_path / "tiny-gpt2.gguf")
    ids = torch.tensor([tok("ROMEO: what, ho!")["input_ids"]])
    config = load_pretrained_config(str(path))
    assert config.n_positions == 64
    model = load_pretrained(str(path), config).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, src(ids).logits)
    load_model_and_tokenizer(str(path), device="cpu", dtype="bfloat16")  # a bfloat16 copy
    assert resolve_source(str(path), dtype=torch.bfloat16).cached
    assert not resolve_source(str(path)).cached  # none in float32
    assert not resolve_source(str(path), use_cache=False, dtype=torch.bfloat16).cached
    again = load_pretrained(str(path), load_pretrained_config(str(path))).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, src(ids).logits)
    with pytest.raises(UserError, match="model.name_or_path .*nothing/x/y does not exist"):
        load_pretrained_config(str(tmp_path / "nothing" / "x" / "y"))


def test_smollm_pre_tokenizer_splits_digits(tmp_path, monkeypatch, shakespeare):
    """A GGUF whose pre-tokenizer is llama.cpp's ``smollm`` (SmolLM2's) splits digits one by one,
    like the tokenizer it was made from; transformers alone merges digit runs."""
    pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.core.tokenizer import train_bpe_tokenizer

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    text = shakespeare.read_text(encoding="utf-8")[:20_000]
    numbers = " ".join(str(n) for n in range(1000, 1400))  # so that digit pairs get merged
    tok = train_bpe_tokenizer(iter([text, numbers] * 3), vocab_size=320)
    sample = "In 1234 there were 1399 ships"
    merged = tok(sample)["input_ids"]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    split = tok(sample)["input_ids"]
    assert len(split) > len(merged)  # the digit split matters for this vocabulary
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    )  # fmt: skip
    path = _export(model, tok, tmp_path / "smol.gguf")
    import gguf

    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"
    for _ in range(2):  # converted, then from the cache
        _, loaded, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
        assert loaded(sample)["input_ids"] == split
    # the tokenizer alone (prepare --tokenizer X.gguf), from the cache and from the file
    from llmkit.core.loading import load_source_tokenizer

    assert load_source_tokenizer(str(path))(sample)["input_ids"] == split
    monkeypatch.setenv("LLMKIT_CACHE", "off")
    assert load_source_tokenizer(str(path))(sample)["input_ids"] == split


# --- CPU threads -----------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class _Crafted:
    """Unpickling it would call ``print`` (never reached: the unpickler refuses it first)."""

    def __reduce__(self):
        return (print, ("the crafted pickle ran",))


@pytest.mark.parametrize(
    ("how", "detail"),
    [("raw", "Unsupported operand 149"), ("torch", "Unsupported global: GLOBAL print")],
)
def test_pickled_weights_are_refused_in_one_line_without_torchs_warning(
    tmp_path, tiny_model_dir, how, detail
):
    """A plain pickle as pytorch_model.bin: torch printed a two-line UserWarning ("Detected
    pickle protocol 4 ...") before the refusal, and the refusal was torch's paragraph cut at
    160 characters ("Weights only load failed. In PyTorch 2.6, we changed ...")."""
    import pickle
    import shutil
    import warnings

    from llmkit.core.loading import load_model_and_tokenizer

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    if how == "raw":
        (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Crafted()}, protocol=4))
    else:
        torch.save({"w": _Crafted()}, model / "pytorch_model.bin")
    with warnings.catch_warnings(record=True) as seen, pytest.raises(UserError) as err:
        warnings.simplefilter("always")
        load_model_and_tokenizer(str(model), device="cpu")
    assert [str(w.message) for w in seen if "pickle" in str(w.message)] == []
    assert err.value.message == (
        f"cannot load {model}: its pickled weights (.bin) are refused: they hold more than "
        f"tensors and numbers ({detail}); nothing of them was run"
    )
    assert "safetensors" in err.value.hint


def test_a_gguf_loaded_in_bfloat16_prints_no_transformers_dtype_notice(
    tmp_path, monkeypatch, tiny_model_dir
):
    """``--dtype bfloat16`` on a .gguf printed transformers' "[transformers] Loading a GGUF
    checkpoint with its weights packed is fastest in float32 ... Pass `dtype=torch.float32`"
    (a Python keyword a CLI user cannot pass). llmkit's load filters that one message out,
    only during its load: transformers alone still logs it, other warnings still show. (A
    handler on transformers' logger sees what would reach stderr: transformers' own handler
    holds the stderr of the moment it was made, which pytest's capture does not see.)"""
    pytest.importorskip("gguf")
    import io
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import load_model_and_tokenizer, resolve_source

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = _export(src, tok, tmp_path / "tiny-gpt2.gguf")
    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever verbosity an earlier test left
    logger.addHandler(handler)
    try:
        source = resolve_source(str(path), use_cache=False, dtype=torch.bfloat16)
        plain = AutoModelForCausalLM.from_pretrained(
            source.where, dtype=torch.bfloat16, **source.kwargs
        )  # transformers alone (with llmkit's GPT-2 corrections): the notice it logs
        assert plain.dtype == torch.bfloat16
        assert "weights packed is fastest in float32" in seen.getvalue()
        seen.truncate(0)
        seen.seek(0)
        model, _, _ = load_model_and_tokenizer(str(path), device="cpu", dtype="bfloat16")
        assert model.dtype == torch.bfloat16
        assert "packed is fastest" not in seen.getvalue()
        assert "dtype=torch.float32" not in seen.getvalue()
        # the filter was scoped to the load: the logger's other warnings, and later ones, show
        assert logger.filters == []
        logger.warning("another GGUF warning")
        assert "another GGUF warning" in seen.getvalue()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
