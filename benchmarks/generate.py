"""Generation speed: llmkit's generate path against bare ``model.generate``, same model, same
settings, same run (SPEC §7: ratio ≥ 0.95), and the time from process start to the first token
against the import-and-load floor.

    python benchmarks/generate.py                 # tiny random GPT-2 (4 × 128), built here
    python benchmarks/generate.py --gguf          # SmolLM2-135M-Instruct Q4_1 (../shared/models)

Both paths decode greedily ``--max-new-tokens`` tokens for the same prompts, batch sizes 1 and 8
(left padding). llmkit's path is :func:`llmkit.generation.generate.run_prompts` (encode, check
the context, pad, generate, cut each row at its end, decode); bare is ``tokenizer(...)`` +
``model.generate`` + ``batch_decode``. Tokens/s counts new tokens up to each row's first EOS
for both; each is the best of ``--repeats`` runs, alternated so that load on the machine hits
both alike.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "ROMEO: But soft, what light",
    "def fibonacci(n):",
    "In 1492, Columbus",
    "The best way to learn is",
    "Water boils at",
    "My favourite colour is",
]


def tiny_model(out: Path) -> Path:
    """A random GPT-2 (4 layers × 128, 256 positions) with a 1024-token BPE, saved in ``out``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.data.tokenizer import train_bpe_tokenizer

    text = (
        SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
        if SHAKESPEARE.exists()
        else " ".join(PROMPTS) * 200
    )
    tok = train_bpe_tokenizer(iter(text.split("\n\n")), vocab_size=1024)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def bare(model, tok, prompts, max_new_tokens, eos):
    """tokenizer + model.generate + batch_decode; returns (new tokens up to EOS, seconds)."""
    import torch

    start = time.perf_counter()
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    tok.batch_decode(new, skip_special_tokens=True)
    seconds = time.perf_counter() - start
    tokens = sum(next((i + 1 for i, t in enumerate(r) if t in eos), len(r)) for r in new)
    return tokens, seconds


def ours(model, tok, prompts, max_new_tokens, batch_size):
    from llmkit.generation.generate import GenerationSettings, run_prompts

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0)
    start = time.perf_counter()
    results = run_prompts(model, tok, prompts, settings, batch_size=batch_size)
    return sum(r.new_tokens for r in results), time.perf_counter() - start


def wall(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", action="store_true", help=f"use {GGUF.name}")
    parser.add_argument("--model", help="any model llmkit loads (overrides --gguf)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-startup", action="store_true", help="skip the first-token timing")
    args = parser.parse_args()

    import torch

    from llmkit.generation.generate import eos_ids
    from llmkit.generation.loading import load_model_and_tokenizer

    tmp = tempfile.TemporaryDirectory()
    if args.model:
        name = args.model
    elif args.gguf:
        if not GGUF.exists():
            sys.exit(f"{GGUF} is absent")
        name = str(GGUF)
    else:
        name = str(tiny_model(Path(tmp.name) / "tiny-gpt2"))
    start = time.perf_counter()
    model, tok, _ = load_model_and_tokenizer(name, device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - start
    eos = set(eos_ids(model, tok))
    print(f"model {name} ({args.dtype}, {torch.get_num_threads()} threads), load {load_s:.1f} s")
    print(f"greedy, {args.max_new_tokens} new tokens per prompt, best of {args.repeats}\n")
    print(f"{'batch':>5} {'bare tok/s':>11} {'llmkit tok/s':>13} {'ratio':>6}  target ≥ 0.95")
    for batch in (1, 8):
        prompts = PROMPTS[:batch] if batch > 1 else PROMPTS[:1]
        ours(model, tok, prompts, 4, batch)  # warm-up
        best_bare = best_ours = 0.0
        for _ in range(args.repeats):
            n, s = bare(model, tok, prompts, args.max_new_tokens, eos)
            best_bare = max(best_bare, n / s)
            n, s = ours(model, tok, prompts, args.max_new_tokens, batch)
            best_ours = max(best_ours, n / s)
        ratio = best_ours / best_bare
        flag = "ok" if ratio >= 0.95 else "LOW"
        print(f"{batch:>5} {best_bare:11.1f} {best_ours:13.1f} {ratio:6.3f}  {flag}")

    if args.no_startup:
        return
    env = {**os.environ, "LLMKIT_MODEL": name}
    floor_code = (
        "from llmkit.generation.loading import load_model_and_tokenizer;"
        f"load_model_and_tokenizer({name!r}, device='cpu', dtype={args.dtype!r})"
    )
    floor = wall([sys.executable, "-c", floor_code], env)
    cli = [sys.executable, "-m", "llmkit", "generate", "Hello", "--max-new-tokens", "1"]
    first = wall([*cli, "-t", "0", "--dtype", args.dtype, "--device", "cpu"], env)
    print(
        f"\nprocess start → first token: {first:.2f} s; import + load floor {floor:.2f} s "
        f"(overhead {first - floor:+.2f} s)"
    )


if __name__ == "__main__":
    main()
