"""Compute and memory arithmetic: training FLOPs per token, the device's measured peak, MFU, and
the memory estimate of ``llmkit train --dry-run``.

- FLOPs per token of a decoder-only transformer, forward + backward:
  ``6 N + 12 L H Q T`` (N parameters in the matmuls, L layers, H heads, Q head width, T
  sequence length) — PaLM (Chowdhery et al. 2022), appendix B; the same formula as nanoGPT's
  ``model.py: estimate_mfu``.
- MFU = achieved FLOP/s / peak FLOP/s of the devices used. The peak is *measured* at start: the
  best of a few square matmuls in the training dtype on the training device (what this machine
  actually sustains, never a fixed A100 312 TFLOP/s figure), or a tabled value from
  ``train.peak_flops``.
- Activation memory per layer, 16-bit, no recomputation: ``s b h (34 + 5 a s / h)`` bytes —
  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  §4.1, eq. (1) (s sequence, b micro-batch, h hidden, a heads); doubled for float32; with
  activation checkpointing only each layer's input, ``2 s b h`` bytes (16-bit), is kept.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import torch


def flops_per_token(
    n_params: int,
    n_layer: int,
    n_head: int,
    head_dim: int,
    seq_len: int,
    *,
    trainable_fraction: float = 1.0,
) -> float:
    """Training FLOPs (forward + backward) per token: ``6 N + 12 L H Q T`` (PaLM, app. B).

    With frozen weights (LoRA) the backward still needs activation gradients through every
    matmul (2N) but no weight gradients for the frozen ones, so the ``6 N`` term becomes
    ``(4 + 2 f) N`` where f is the trainable fraction.

    Args:
        n_params: parameters in the model's matmuls (embedding tables included, as nanoGPT does
            with tied embeddings; position tables make no difference at these sizes).
        n_layer, n_head, head_dim: L, H, Q.
        seq_len: T, tokens per sequence.
        trainable_fraction: share of N receiving gradients.
    """
    dense = (4 + 2 * trainable_fraction) * n_params
    return dense + 12 * n_layer * n_head * head_dim * seq_len


@lru_cache(maxsize=8)
def measure_peak_flops(
    device: str = "cpu", dtype: str = "float32", size: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of the best of repeated ``size`` x ``size`` matmuls on ``device`` in ``dtype``.

    Each matmul is 2 size^3 FLOPs. Runs for about ``seconds`` after one warm-up; the best
    single repetition is kept (the least disturbed by other load). Cached per process.
    """
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    a = torch.randn(size, size, device=dev).to(dt)
    b = torch.randn(size, size, device=dev).to(dt)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.matmul(a, b)
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * size**3 / best


def model_shape(config: Any) -> tuple[int, int, int]:
    """(n_layer, n_head, head_dim) from a transformers config (generic attribute names)."""
    n_layer = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 1))
    n_head = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 1))
    head_dim = int(getattr(config, "head_dim", 0) or hidden // n_head)
    return n_layer, n_head, head_dim


def estimate_memory(
    *,
    n_params: int,
    n_trainable: int,
    config: Any,
    micro_batch_size: int,
    seq_len: int,
    mixed_precision: str,
    gradient_checkpointing: bool,
) -> dict[str, int]:
    """Bytes per process for training: weights, gradients, optimizer, activations.

    Weights and gradients of trainable parameters are float32 (4 bytes), frozen weights too;
    AdamW keeps two float32 moments (8 bytes per trainable parameter). Activations follow
    Korthikanti et al. 2022 eq. (1) (see the module docstring) plus the logits, their float32
    copy for the loss and its gradient: ``3 x 4 b s V`` bytes.

    Returns:
        ``weights``, ``gradients``, ``optimizer``, ``activations``, ``total`` in bytes.
    """
    n_layer, n_head, _ = model_shape(config)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 1))
    vocab = int(getattr(config, "vocab_size", 0))
    s, b, h, a = seq_len, micro_batch_size, hidden, n_head
    act_bytes = 1 if mixed_precision in ("bf16", "fp16") else 2  # eq. (1) counts 16-bit
    if gradient_checkpointing:
        per_layer = 2 * s * b * h * act_bytes
    else:
        per_layer = int(s * b * h * (34 + 5 * a * s / h) * act_bytes)
    logits = 3 * 4 * b * s * vocab
    out = {
        "weights": 4 * n_params,
        "gradients": 4 * n_trainable,
        "optimizer": 8 * n_trainable,
        "activations": n_layer * per_layer + logits,
    }
    out["total"] = sum(out.values())
    return out
