"""Training throughput: ``llmkit.train`` against a bare PyTorch loop, same model, batch, dtype.

    python benchmarks/train.py [--steps 60] [--dtype fp32|bf16|both]

Shape: nanoGPT's CPU quick-run (4 layers, 4 heads, 128 wide, 64 positions, batch 12), GPT-2
from transformers with SDPA and the fused tanh-GELU (as llmkit builds it), fused AdamW. The
llmkit run reads 65-token blocks (64 inputs -> 64 targets, llmkit's T-1 convention), the bare
loop the same (12, 65) blocks. Both are timed after 10 warm-up steps; MFU uses PaLM's
``6N + 12 L H Q T`` FLOPs per token (appendix B; nanoGPT ``estimate_mfu``) against the matmul
rate measured here in the same dtype (llmkit.training.flops.measure_peak_flops), never a
tabled A100 figure. Prints a table and the ratio llmkit / bare (target >= 0.95, SPEC §7).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block": 64, "batch": 12, "vocab": 1024}


def _prepared(root: Path, n_blocks: int) -> Path:
    from datasets import Dataset

    from llmkit.data.tokenizer import train_bpe_tokenizer

    shakespeare = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
    text = (
        shakespeare.read_text(encoding="utf-8")
        if shakespeare.exists()
        else "to be or not to be\n\n" * 5000
    )
    tok = train_bpe_tokenizer(iter(text.split("\n\n")), vocab_size=SHAPE["vocab"])
    rng = np.random.default_rng(0)
    for name, n in (("train", n_blocks), ("validation", 12)):
        ids = rng.integers(0, len(tok), size=(n, SHAPE["block"] + 1), dtype=np.int32)
        Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(root / name))
    tok.save_pretrained(root)
    settings = {"settings": {"block_size": SHAPE["block"] + 1}}
    (root / "manifest.json").write_text(json.dumps(settings))
    return root


def _overrides(data: Path, run: Path, steps: int, precision: str) -> list[str]:
    return [
        f"data.path={data}",
        f"out_dir={run}",
        "model.type=gpt2",
        f"model.n_layer={SHAPE['n_layer']}",
        f"model.n_head={SHAPE['n_head']}",
        f"model.n_embd={SHAPE['n_embd']}",
        f"train.micro_batch_size={SHAPE['batch']}",
        f"train.max_steps={steps}",
        "train.warmup_steps=5",
        f"train.log_interval={steps}",
        "train.save_interval=0",
        "train.trackers=[]",
        f"eval.interval={10 * steps}",
        f"train.mixed_precision={precision}",
    ]


def bare_loop(data: Path, steps: int, warmup: int, precision: str) -> float:
    """Tokens/s of a plain PyTorch loop over the model llmkit builds, same batch and dtype."""
    from datasets import load_from_disk

    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.training.config import load_recipe
    from llmkit.training.model import build_config, build_model

    recipe = load_recipe(None, _overrides(data, data / "unused", steps, precision))
    tok = load_tokenizer(data)
    torch.manual_seed(0)
    model = build_model(
        build_config(
            recipe.model,
            vocab_size=len(tok),
            block_size=SHAPE["block"] + 1,
            eos_token_id=tok.eos_token_id,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    blocks = torch.tensor(load_from_disk(str(data / "train"))["input_ids"], dtype=torch.long)
    b = SHAPE["batch"]
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )
    model.train()
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x = blocks[(i * b) % (len(blocks) - b) :][:b]  # (B, T+1)
        with ctx:
            logits = model(input_ids=x[:, :-1]).logits  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * b * SHAPE["block"] / (time.perf_counter() - t0)


def llmkit_loop(data: Path, steps: int, warmup: int, precision: str) -> float:
    """Tokens/s of ``llmkit.train`` over the timed steps (warm-up steps excluded)."""
    from llmkit.training.loop import train

    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        train(
            None,
            _overrides(data, Path(tmp) / "run", warmup + steps, precision),
            progress=False,
            on_step=lambda s, r: times.__setitem__(s, time.perf_counter()),
        )
    return steps * SHAPE["batch"] * SHAPE["block"] / (times[warmup + steps] - times[warmup])


def main() -> None:
    from llmkit.training.flops import flops_per_token, measure_peak_flops

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    args = parser.parse_args()
    if args.dtype == "both":  # accelerate's state is per process: one process per dtype
        import subprocess
        import sys

        for dtype in ("fp32", "bf16"):
            subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--dtype", dtype], check=True
            )
        return
    precisions = ["no" if args.dtype == "fp32" else "bf16"]
    n_params = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepared(Path(tmp) / "data", 2000)
        for precision in precisions:
            dtype = "bfloat16" if precision == "bf16" else "float32"
            peak = measure_peak_flops("cpu", dtype, 1024, 1.0)
            bare = bare_loop(data, args.steps, 10, precision)
            ours = llmkit_loop(data, args.steps, 10, precision)
            if n_params is None:
                from transformers import GPT2Config, GPT2LMHeadModel

                n_params = sum(
                    p.numel()
                    for p in GPT2LMHeadModel(
                        GPT2Config(
                            vocab_size=SHAPE["vocab"],
                            n_positions=SHAPE["block"] + 1,
                            n_embd=SHAPE["n_embd"],
                            n_layer=SHAPE["n_layer"],
                            n_head=SHAPE["n_head"],
                        )
                    ).parameters()
                )
            fpt = flops_per_token(
                n_params,
                SHAPE["n_layer"],
                SHAPE["n_head"],
                SHAPE["n_embd"] // SHAPE["n_head"],
                SHAPE["block"],
            )
            for name, tps in (("bare PyTorch loop", bare), ("llmkit train", ours)):
                rows.append(
                    (
                        precision,
                        name,
                        tps,
                        1e3 * SHAPE["batch"] * SHAPE["block"] / tps,
                        tps * fpt / peak,
                        peak,
                    )
                )
            rows.append((precision, "ratio llmkit / bare", ours / bare, None, None, None))
    print(f"threads {torch.get_num_threads()} | shape {SHAPE} | {n_params / 1e6:.2f}M params")
    print(
        f"{'dtype':6} {'loop':22} {'tokens/s':>10} {'ms/iter':>8} {'MFU':>6} {'peak GFLOP/s':>12}"
    )
    for precision, name, tps, ms, mfu, peak in rows:
        if ms is None:
            print(f"{precision:6} {name:22} {tps:10.3f}")
        else:
            print(f"{precision:6} {name:22} {tps:10,.0f} {ms:8.1f} {mfu:6.1%} {peak / 1e9:12.1f}")


if __name__ == "__main__":
    main()
