"""`llmkit export --format gguf`: a tiny GPT-2 (tied) and a tiny Llama (grouped-query attention,
untied, padded vocabulary, ChatML) trained here for a few steps on tiny Shakespeare with a BPE
trained here, written as GGUF and read back — the metadata and tensors with ``gguf.GGUFReader``,
the model and tokenizer with transformers (``gguf_file=``) — plus the refusals, the Ollama
Modelfile, a LoRA run, and (slow) the shared SmolLM2 and llama.cpp itself."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODELS

gguf = pytest.importorskip("gguf")

from llmkit.export.gguf import export_gguf  # noqa: E402

SMOLLM = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
#: emoji (4-byte UTF-8), CJK, tabs, runs of spaces, contractions, digits, a newline pair
TRICKY = "We'll see 🙂🚀 東京と大阪\t\ttabs,   spaces  and it's 12345 don't\n\nEnd."
T = gguf.GGMLQuantizationType


def _train(model, ids: torch.Tensor, steps: int = 25, block: int = 32) -> None:
    """A few AdamW steps so the logits have clear winners (top-1 comparisons mean something)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (4,), generator=gen)
        x = torch.stack([ids[s : s + block] for s in starts])
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _save_run(model, tok, root: Path, name: str) -> Path:
    """A directory laid out like a run of `llmkit train` (recipe name in llmkit_config.yaml)."""
    run = root / name
    model.save_pretrained(run)
    tok.save_pretrained(run)
    (run / "llmkit_config.yaml").write_text(f"name: {name}-recipe\n", encoding="utf-8")
    (run / "llmkit_run.json").write_text(json.dumps({"status": "finished"}), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def corpus(shakespeare) -> str:
    return shakespeare.read_text(encoding="utf-8")[:60_000]


@pytest.fixture(scope="module")
def chat_tokenizer(corpus):
    """A 300-token byte-level BPE with ChatML's two special tokens and ChatML as template."""
    from llmkit.core.tokenizer import train_bpe_tokenizer
    from llmkit.data.sft import ensure_chat_template

    tok = train_bpe_tokenizer(
        iter(corpus.split("\n\n")),
        vocab_size=300,
        extra_special_tokens=("<|im_start|>", "<|im_end|>"),
    )
    assert ensure_chat_template(tok) == "chatml"
    return tok


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer, chat_tokenizer, corpus) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=0, eos_token_id=0,
        )
    )  # fmt: skip
    _train(gpt2, torch.tensor(tiny_tokenizer(corpus[:20_000])["input_ids"]))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(chat_tokenizer) + 4,  # 4 rows no token uses: [PAD302].. in GGUF
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rope_theta=50_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0,
        )
    )  # fmt: skip
    _train(llama, torch.tensor(chat_tokenizer(corpus[:20_000])["input_ids"]))
    return {
        "gpt2": _save_run(gpt2, tiny_tokenizer, root, "tiny-gpt2"),
        "llama": _save_run(llama, chat_tokenizer, root, "tiny-llama"),
    }


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for arch, run in runs.items():
        for outtype in ("f32", "f16", "bf16", "q8_0"):
            files[arch, outtype] = export_gguf(
                str(run), out / f"{arch}-{outtype}.gguf", outtype=outtype
            ).path
    return files


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {
        t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type)
        for t in reader.tensors
    }
    return fields, tensors


def _reload(path: Path):
    """transformers' own GGUF reader. Its GPT-2 mapping puts ``context_length`` into ``n_ctx``
    and keeps ``n_positions`` at 1024, so the file's context length is passed as n_positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fields, _ = _fields(path)
    extra = {}
    if fields["general.architecture"] == "gpt2":
        extra["n_positions"] = fields["gpt2.context_length"]
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def _source(run: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(run).eval(), AutoTokenizer.from_pretrained(run)


# --- metadata and tensors --------------------------------------------------------------------


def test_gpt2_metadata_and_tensors(runs, exported):
    model, tok = _source(runs["gpt2"])
    spec = json.loads(tok.backend_tokenizer.to_str())
    for outtype, matrix in (("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0)):
        fields, tensors = _fields(exported["gpt2", outtype])
        assert fields["general.architecture"] == "gpt2"
        assert fields["general.name"] == "tiny-gpt2-recipe"
        assert fields["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype]
        assert fields["gpt2.context_length"] == 64  # n_positions: transformers 5 has no n_ctx
        assert fields["gpt2.embedding_length"] == 32
        assert fields["gpt2.feed_forward_length"] == 128
        assert fields["gpt2.block_count"] == 2
        assert fields["gpt2.attention.head_count"] == 2
        assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
        assert fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp refuses "gpt2"
        assert fields["tokenizer.ggml.tokens"] == [
            tok.convert_ids_to_tokens(i) for i in range(len(tok))
        ]
        assert fields["tokenizer.ggml.token_type"] == [3] + [1] * (len(tok) - 1)  # 0 = EOS
        assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
        assert fields["tokenizer.ggml.bos_token_id"] == 0
        assert fields["tokenizer.ggml.eos_token_id"] == 0
        assert fields["tokenizer.ggml.padding_token_id"] == 0
        assert fields["tokenizer.ggml.add_bos_token"] is False
        assert fields["tokenizer.ggml.add_eos_token"] is False
        assert "tokenizer.chat_template" not in fields
        m = matrix
        expected = {
            "token_embd.weight": ((len(tok), 32), m),
            "position_embd.weight": ((64, 32), T.F32),  # llama.cpp keeps it F32
            "output_norm.weight": ((32,), T.F32),
            "output_norm.bias": ((32,), T.F32),
        }
        for b in range(2):
            for norm in ("attn_norm", "ffn_norm"):
                expected |= {f"blk.{b}.{norm}.{s}": ((32,), T.F32) for s in ("weight", "bias")}
            # (out, in): the Conv1D weights transposed
            for t, shape in (("attn_qkv", (96, 32)), ("attn_output", (32, 32)),
                             ("ffn_up", (128, 32)), ("ffn_down", (32, 128))):  # fmt: skip
                expected[f"blk.{b}.{t}.weight"] = (shape, m)
                expected[f"blk.{b}.{t}.bias"] = ((shape[0],), T.F32)
        assert tensors == expected  # no output.weight: tied to token_embd
    # the transpose, checked on the values: GGUF attn_qkv row r = HF c_attn column r
    reader = gguf.GGUFReader(exported["gpt2", "f32"])
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    hf = model.transformer.h[0].attn.c_attn.weight.detach().numpy()  # (in 32, out 96)
    np.testing.assert_array_equal(np.asarray(qkv.data).reshape(96, 32), hf.T)


def test_llama_gqa_metadata_and_tensors(runs, exported):
    model, tok = _source(runs["llama"])
    n_vocab = len(tok) + 4
    for outtype, matrix in (("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0)):
        fields, tensors = _fields(exported["llama", outtype])
        assert fields["general.architecture"] == "llama"
        assert fields["general.name"] == "tiny-llama-recipe"
        assert fields["llama.context_length"] == 128
        assert fields["llama.embedding_length"] == 64
        assert fields["llama.feed_forward_length"] == 128
        assert fields["llama.block_count"] == 2
        assert fields["llama.attention.head_count"] == 4
        assert fields["llama.attention.head_count_kv"] == 2
        assert fields["llama.rope.dimension_count"] == 16
        assert fields["llama.rope.freq_base"] == pytest.approx(50_000.0)
        assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
        assert fields["llama.vocab_size"] == n_vocab
        assert fields["tokenizer.ggml.pre"] == "gpt-2"
        tokens = fields["tokenizer.ggml.tokens"]
        assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert tokens[len(tok) :] == [f"[PAD{i}]" for i in range(len(tok), n_vocab)]
        types = fields["tokenizer.ggml.token_type"]
        assert types[:3] == [3, 3, 3] and set(types[3 : len(tok)]) == {1}
        assert types[len(tok) :] == [5] * 4  # UNUSED
        assert fields["tokenizer.chat_template"] == tok.chat_template
        assert "<|im_start|>" in fields["tokenizer.chat_template"]
        m = matrix
        expected = {
            "token_embd.weight": ((n_vocab, 64), m),
            "output.weight": ((n_vocab, 64), m),  # untied: its own tensor
            "output_norm.weight": ((64,), T.F32),
        }
        for b in range(2):
            expected |= {
                f"blk.{b}.attn_norm.weight": ((64,), T.F32),
                f"blk.{b}.ffn_norm.weight": ((64,), T.F32),
                f"blk.{b}.attn_q.weight": ((64, 64), m),
                f"blk.{b}.attn_k.weight": ((32, 64), m),  # 2 KV heads x 16
                f"blk.{b}.attn_v.weight": ((32, 64), m),
                f"blk.{b}.attn_output.weight": ((64, 64), m),
                f"blk.{b}.ffn_gate.weight": ((128, 64), m),
                f"blk.{b}.ffn_up.weight": ((128, 64), m),
                f"blk.{b}.ffn_down.weight": ((64, 128), m),
            }
        assert tensors == expected
    # the Q/K row permutation on the values: within each head, rows (a0..a7, b0..b7) are
    # interleaved as (a0, b0, a1, b1, ...); K uses the 2 KV heads, not the 4 query heads
    reader = gguf.GGUFReader(exported["llama", "f32"])
    attn = model.model.layers[0].self_attn
    for name, hf, heads in (("attn_q", attn.q_proj, 4), ("attn_k", attn.k_proj, 2)):
        got = next(t for t in reader.tensors if t.name == f"blk.0.{name}.weight")
        got = np.asarray(got.data).reshape(heads * 16, 64)
        w = hf.weight.detach().numpy()
        for h in range(heads):
            for j in range(8):
                np.testing.assert_array_equal(got[h * 16 + 2 * j], w[h * 16 + j])
                np.testing.assert_array_equal(got[h * 16 + 2 * j + 1], w[h * 16 + 8 + j])


# --- read back by transformers ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reloaded_logits_and_token_ids(arch, runs, exported, corpus):
    model, tok = _source(runs[arch])
    ids = tok(corpus[30_000:30_400])["input_ids"][:60]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        back, back_tok = _reload(exported[arch, outtype])
        assert back.config.tie_word_embeddings is (arch == "gpt2")
        with torch.no_grad():
            got = back(torch.tensor([ids])).logits[0][:, : ref.shape[-1]]
        delta = (got - ref).abs().max().item()
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        if outtype == "f32":
            assert torch.equal(got, ref), f"{arch} f32 max |Δ| {delta}"
        elif outtype == "f16":
            assert delta <= 1e-2, f"{arch} f16 max |Δ| {delta}"
        else:
            assert top1 >= 0.9, f"{arch} {outtype} top-1 agreement {top1}"
        for text in (TRICKY, corpus[:300], "<|im_start|>user\nhi<|im_end|>\n"):
            assert back_tok(text)["input_ids"] == tok(text)["input_ids"], (arch, text)


# --- Ollama Modelfile ------------------------------------------------------------------------


def test_modelfile(exported):
    llama = exported["llama", "f16"]
    text = llama.with_name("llama-f16.Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./llama-f16.gguf" in lines
    assert "PARAMETER num_ctx 128" in lines
    assert 'PARAMETER stop "<|endoftext|>"' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    base = exported["gpt2", "q8_0"].with_name("gpt2-q8_0.Modelfile").read_text(encoding="utf-8")
    assert "FROM ./gpt2-q8_0.gguf" in base and "PARAMETER num_ctx 64" in base
    assert 'TEMPLATE """{{ .Prompt }}"""' in base and "<|im_end|>" not in base


# --- the command, refusals -------------------------------------------------------------------


def _cli(*args: str):
    from typer.testing import CliRunner

    from llmkit.cli import app

    return CliRunner().invoke(app, ["export", *args])


def test_cli_writes_and_refuses_existing_output(runs, tmp_path):
    out = tmp_path / "m.gguf"
    res = _cli("--model", str(runs["gpt2"]), "--format", "gguf", "--output", str(out))
    assert res.exit_code == 0, res.output
    assert out.is_file() and (tmp_path / "m.Modelfile").is_file()
    before = out.read_bytes()
    res = _cli("--model", str(runs["gpt2"]), "--output", str(out), "--outtype", "f32")
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {out} already exists — pass --overwrite to replace it"
    ]
    assert out.read_bytes() == before
    res = _cli("--model", str(runs["gpt2"]), "-o", str(out), "--outtype", "f32", "--overwrite")
    assert res.exit_code == 0 and out.read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_refuses_unknown_architecture_and_rope_scaling(tmp_path, tiny_tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64)
    )  # fmt: skip
    rope = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=2,
                    rope_scaling={"rope_type": "linear", "factor": 2.0})
    )  # fmt: skip
    for name, model, message in (
        ("neox", neox, "error: cannot export to GGUF: model type 'gpt_neox' is not supported"),
        ("rope", rope, "error: cannot export to GGUF: rope scaling (linear) is not supported"),
    ):
        run = _save_run(model, tiny_tokenizer, tmp_path, name)
        out = tmp_path / f"{name}.gguf"
        res = _cli("--model", str(run), "--output", str(out))
        assert res.exit_code == 2
        (line,) = res.output.strip().splitlines()
        assert line.startswith(message), line
        assert not out.exists() and not (tmp_path / f"{name}.Modelfile").exists()


def test_lora_run_is_merged(runs, tmp_path):
    """A run saved with lora.merge: false holds only the adapter: it is merged on export."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(runs["llama"])
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    run = tmp_path / "lora-run"
    peft.save_pretrained(run)
    assert not (run / "config.json").exists()
    ids = torch.tensor([[5, 60, 61, 200, 7, 9]])
    with torch.no_grad():
        ref = peft.merge_and_unload()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(runs["llama"])(ids).logits
    assert (ref - plain).abs().max() > 1e-2  # the adapter changes the outputs
    path = export_gguf(str(run), tmp_path / "lora.gguf", outtype="f32").path
    back, _ = _reload(path)
    with torch.no_grad():
        got = back(ids).logits[..., : ref.shape[-1]]
    assert (got - ref).abs().max().item() < 1e-5


# --- the real SmolLM2 (slow) -----------------------------------------------------------------


def _perplexity(model, ids: list[int]) -> float:
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    return math.exp(loss.item())


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM.exists(), reason=f"{SMOLLM} is absent")
def test_smollm2_gguf_export_f16_keeps_perplexity(tmp_path, shakespeare):
    from llmkit.core.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(str(SMOLLM), device="cpu", dtype="float32")
    ids = tok(shakespeare.read_text(encoding="utf-8")[:2000])["input_ids"][:256]
    source = _perplexity(model, ids)
    res = export_gguf(str(SMOLLM), tmp_path / "smol.gguf", outtype="f16", loaded=(model, tok, "x"))
    fields, _ = _fields(res.path)
    assert fields["llama.context_length"] == 8192 and fields["llama.attention.head_count_kv"] == 3
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.pre"] == "smollm"  # as in the source file: digits one by one
    # llmkit's loader (transformers' reader would split digits like GPT-2: see test_loading.py)
    back, back_tok, _ = load_model_and_tokenizer(str(res.path), device="cpu", dtype="float32")
    assert back_tok(TRICKY)["input_ids"] == tok(TRICKY)["input_ids"]
    again = _perplexity(back, ids)
    assert abs(again - source) / source < 1e-3, (source, again)
    modelfile = res.modelfile.read_text(encoding="utf-8")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile


# --- llama.cpp itself (slow, optional) -------------------------------------------------------

_LLAMA_CPP_PROBE = """
import json, math, sys
import numpy as np
from llama_cpp import Llama
path, text, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ids = json.loads(sys.argv[4])
llm = Llama(model_path=path, n_ctx=64, verbose=False, logits_all=True)
out = {"tokens": llm.tokenize(text.encode(), add_bos=False, special=True)}
llm.reset()
llm.eval(ids)
logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
top = logits.max(-1, keepdims=True)
logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
out["nll"] = float(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))
llm.reset()
llm.eval(prompt)
greedy = []
for _ in range(32):
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    greedy.append(nxt)
    llm.eval([nxt])
out["greedy"] = greedy
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
def test_llama_cpp_reads_the_export(exported, runs, corpus):
    """llama.cpp itself, through llama-cpp-python (optional: an sdist that compiles for many
    minutes; this test skips when it is not installed), on the f16 exports: the same token ids
    as transformers, the same 32 greedy tokens as transformers on the same file, perplexity
    within 0.5 % of the source model's. In a subprocess, so that a crash (an illegal
    instruction on an old CPU) becomes a skip with the reason."""
    import subprocess
    import sys

    for arch in ("gpt2", "llama"):
        model, tok = _source(runs[arch])
        back, _ = _reload(exported[arch, "f16"])
        ids = tok(corpus[30_000:30_400])["input_ids"][:60]
        prompt = ids[:8]
        with torch.no_grad():
            source_nll = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
            seq = list(prompt)  # 32 argmax steps, no stop at EOS (the probe does not stop)
            for _ in range(32):
                seq.append(int(back(torch.tensor([seq])).logits[0, -1].argmax()))
            greedy = seq[len(prompt) :]
        proc = subprocess.run(
            [sys.executable, "-c", _LLAMA_CPP_PROBE, str(exported[arch, "f16"]), TRICKY,
             json.dumps(prompt), json.dumps(ids)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode < 0:
            pytest.skip(f"llama.cpp crashed with signal {-proc.returncode} on this CPU")
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout)
        assert got["tokens"] == tok(TRICKY)["input_ids"], arch
        assert got["greedy"] == greedy, arch
        ppl, source_ppl = math.exp(got["nll"]), math.exp(source_nll)
        assert abs(ppl - source_ppl) / source_ppl < 5e-3, (arch, ppl, source_ppl)


def test_add_bos_flag_is_measured(tiny_tokenizer):
    """A tokenizer whose post-processor puts BOS first (Llama-style) is written with
    add_bos_token true; llmkit's trained BPE (adds nothing) with false."""
    import copy

    from tokenizers import processors

    from llmkit.export.gguf import vocab_for_gguf

    assert (
        vocab_for_gguf(tiny_tokenizer, 300).add_bos,
        vocab_for_gguf(tiny_tokenizer, 300).add_eos,
    ) == (False, False)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    assert tok("a b")["input_ids"][0] == 0
    vocab = vocab_for_gguf(tok, 300)
    assert (vocab.add_bos, vocab.add_eos) == (True, False)
