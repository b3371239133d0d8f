"""Fine-tuning from a .gguf file: LoRA (and full fine-tuning) of the de-quantized model, the
merged export a plain ``AutoModelForCausalLM.from_pretrained`` loads and generates with.

A tiny Llama GGUF is written here with the ``gguf`` package (float32 tensors under llama.cpp's
tensor names); the real SmolLM2-135M GGUF runs in the slow test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODELS

from llmkit.training.loop import train

GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
V, H, L, HEADS, FF, CTX = 64, 32, 2, 2, 64, 64


def write_tiny_llama_gguf(path: Path) -> Path:
    """A random 2-layer Llama (hidden 32, vocabulary 64) with a small BPE tokenizer, as GGUF."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(H // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(0)  # all float32
    letters = "abcdefghijklmnopqrstuvwxyz" + "Ġ" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + ".,:;!?"
    tokens = ["<|endoftext|>", *letters[: V - 2], "ab"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (V - 1))
    w.add_token_scores([0.0] * V)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(0)
    w.add_bos_token_id(0)

    def tensor(name: str, *shape: int, ones: bool = False) -> None:
        value = np.ones(shape) if ones else rng.standard_normal(shape) * 0.02
        w.add_tensor(name, value.astype(np.float32))

    tensor("token_embd.weight", V, H)
    tensor("output_norm.weight", H, ones=True)
    tensor("output.weight", V, H)
    for i in range(L):
        for name, shape in (
            ("attn_q", (H, H)),
            ("attn_k", (H, H)),
            ("attn_v", (H, H)),
            ("attn_output", (H, H)),
            ("ffn_gate", (FF, H)),
            ("ffn_up", (FF, H)),
            ("ffn_down", (H, FF)),
        ):
            tensor(f"blk.{i}.{name}.weight", *shape)
        tensor(f"blk.{i}.attn_norm.weight", H, ones=True)
        tensor(f"blk.{i}.ffn_norm.weight", H, ones=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _prepared_for(gguf_path: Path, root: Path, block: int, n_train: int, n_val: int) -> Path:
    """Prepared blocks of random ids, tokenized "with" the GGUF's own tokenizer."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("validation", n_val)):
        ids = rng.integers(1, len(tok), size=(n, block), dtype=np.int32)
        Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(root / name))
    tok.save_pretrained(root)
    (root / "manifest.json").write_text(json.dumps({"settings": {"block_size": block}}))
    return root


def _check_merged_export(run: Path, base_source: str, adapted: set[str]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.training.model import load_pretrained, load_pretrained_config

    base = load_pretrained(base_source, load_pretrained_config(base_source)).state_dict()
    merged = load_file(run / "model.safetensors")
    assert not any("lora" in k for k in merged)
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed and all(any(a in k for a in adapted) for k in changed), changed
    model = AutoModelForCausalLM.from_pretrained(run)
    tok = AutoTokenizer.from_pretrained(run)
    ids = tok("ab", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_lora_from_a_gguf_file_exports_a_plain_merged_model(tmp_path):
    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    data = _prepared_for(gguf_path, tmp_path / "data", 16, 16, 2)
    run = tmp_path / "lora"
    common = [
        f"data.path={data}",
        f"model.name_or_path={gguf_path}",
        "train.micro_batch_size=4",
        "train.max_steps=2",
        "train.warmup_steps=0",
        "train.learning_rate=1e-2",
        "train.min_lr=0",
        "train.trackers=[]",
        "train.peak_flops=1e11",
        "eval.interval=2",
    ]
    final = train(
        None,
        [*common, f"out_dir={run}", "lora.r=2", "lora.target_modules=[q_proj,v_proj]"],
        progress=False,
    )
    # 2 layers x (q, v): A (2 x 32) + B (32 x 2)
    assert final["trainable_parameters"] == 2 * 2 * (2 * 32 + 32 * 2)
    _check_merged_export(run, str(gguf_path), {"q_proj", "v_proj"})
    # full fine-tuning from the GGUF writes a plain model too
    full = tmp_path / "full"
    train(None, [*common, f"out_dir={full}"], progress=False)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(full).config.vocab_size == V


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent")
def test_smollm2_lora_recipe_runs_and_exports(tmp_path, shakespeare):
    """recipes/smollm2-lora.yaml on the real SmolLM2-135M GGUF, shortened to 2 steps of one
    block of 128 tokens (several minutes on a busy 2-core CPU)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    repo = Path(__file__).resolve().parents[2]
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    ids = tok(shakespeare.read_text(encoding="utf-8")[:20_000]).input_ids
    blocks = [ids[i : i + 128] for i in range(0, len(ids) - 128, 128)]
    data = tmp_path / "data"
    Dataset.from_dict({"input_ids": blocks[:-2]}).save_to_disk(str(data / "train"))
    Dataset.from_dict({"input_ids": blocks[-2:]}).save_to_disk(str(data / "validation"))
    tok.save_pretrained(data)
    (data / "manifest.json").write_text(json.dumps({"settings": {"block_size": 128}}))
    run = tmp_path / "run"
    final = train(
        repo / "recipes" / "smollm2-lora.yaml",
        [
            f"data.path={data}",
            f"out_dir={run}",
            f"model.name_or_path={GGUF}",
            "train.micro_batch_size=1",
            "train.gradient_accumulation_steps=1",
            "train.max_steps=2",
            "train.warmup_steps=0",
            "train.save_interval=0",
            "train.trackers=[]",
            "eval.interval=2",
        ],
        progress=False,
    )
    assert final["steps"] == 2 and final["val_loss"] < 6.0  # a real model: far below ln(49152)
    _check_merged_export(run, str(GGUF), {"q_proj", "k_proj", "v_proj", "o_proj"})
