"""Compute and memory arithmetic: training FLOPs per token, the device's measured peak, MFU, and
the memory estimate of ``llmkit train --dry-run``.

- FLOPs per token of a decoder-only transformer, forward + backward:
  ``6 N + 12 L H Q T`` (N parameters in the matmuls, L layers, H heads, Q head width, T
  sequence length) — PaLM (Chowdhery et al. 2022), appendix B; the same formula as nanoGPT's
  ``model.py: estimate_mfu``.
- MFU = achieved FLOP/s / peak FLOP/s of the devices used. The peak is *measured* at start: the
  best of repeated matmuls — a square and the model's own shapes — in the dtype the work runs
  in (the trainer's autocast dtype) on the training device (what this machine actually
  sustains, never a fixed A100 312 TFLOP/s figure), or a tabled value from
  ``train.peak_flops``. An MFU above 100% is a wrong peak: it is measured again, else
  reported as unknown (:class:`MfuMeter`).
- Activation memory per layer, 16-bit, no recomputation: ``s b h (34 + 5 a s / h)`` bytes —
  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  §4.1, eq. (1) (s sequence, b micro-batch, h hidden, a heads); doubled for float32; with
  activation checkpointing only each layer's input, ``2 s b h`` bytes (16-bit), is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


#: How the operands of a measured matmul are laid out, as autograd uses them: ``nn`` both
#: contiguous, ``nt`` the second transposed (``x @ w.T``: nn.Linear's forward, the input
#: gradient of GPT-2's Conv1D), ``tn`` the first transposed (``x.T @ g``: a weight gradient).
LAYOUTS = ("nn", "nt", "tn")


def _best_rate(
    m: int,
    k: int,
    n: int,
    dev: torch.device,
    dt: torch.dtype,
    seconds: float,
    min_reps: int,
    layout: str = "nn",
) -> float:
    """FLOP/s of the fastest of repeated ``(m, k) @ (k, n)`` matmuls (2 m k n FLOPs each) with
    operands laid out as ``layout`` (:data:`LAYOUTS`)."""
    a = torch.randn(*((k, m) if layout == "tn" else (m, k)), device=dev).to(dt)
    b = torch.randn(*((n, k) if layout == "nt" else (k, n)), device=dev).to(dt)
    if layout == "tn":
        a = a.t()
    if layout == "nt":
        b = b.t()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.matmul(a, b)  # warm-up: kernel selection, caches
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * m * k * n / best


@lru_cache(maxsize=8)
def measure_peak_flops(
    device: str = "cpu",
    dtype: str = "float32",
    size: int = 1024,
    seconds: float = 0.3,
    shapes: tuple[tuple, ...] = (),
) -> float:
    """The device's peak FLOP/s in ``dtype``: the best rate of several matmul measurements.

    Measured on a ``size`` x ``size`` square and on each ``(m, k, n)`` or ``(m, k, n,
    layout)`` of ``shapes`` (the model's own matmuls, forward and backward, with the operand
    layouts autograd uses: :func:`matmul_shapes`), each repeated for its share of ``seconds``
    after a warm-up (at least 3 times); the fastest repetition of the fastest shape is kept,
    the one least disturbed by other load. One square alone is not enough: on a CPU the rate
    depends on the shape and layout (float16 without AVX512-FP16 is emulated: on this
    project's 2-core CPU 0.6-0.9 GFLOP/s on a 1024 square, 2.4 on the model's thin matmuls and
    2.75 on a weight gradient ``x.T @ g``), and a peak below what the model reaches prints an
    MFU above 100%. Cached per process.

    Returns:
        FLOP/s (each matmul counts 2 m k n FLOPs).
    """
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    todo = [(size, size, size, "nn"), *(tuple(s) if len(s) == 4 else (*s, "nn") for s in shapes)]
    share = seconds / len(todo)
    return max(_best_rate(m, k, n, dev, dt, share, 3, layout) for m, k, n, layout in todo)


def matmul_shapes(config: Any, rows: int, max_rows: int = 1024) -> tuple[tuple, ...]:
    """The ``(m, k, n, layout)`` of a transformer's big matmuls for ``rows`` tokens per
    forward pass (micro-batch x sequence, capped at ``max_rows`` to keep the benchmark short):
    the QKV projection ``(rows, h, 3h)``, the MLP's ``(rows, h, I)`` and ``(rows, I, h)`` and
    the output layer ``(rows, h, V)`` (h hidden size, I MLP width, default 4h, V vocabulary) —
    each forward ``(m, k, n)`` as ``x @ w`` and ``x @ w.T``, its input gradient ``(m, n, k)``
    and its weight gradient ``(k, m, n)`` as ``x.T @ g`` (:data:`LAYOUTS`)."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    if not hidden:
        return ()
    inner = int(
        getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * hidden
    )
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    m = max(1, min(rows, max_rows))
    forward = [(m, hidden, 3 * hidden), (m, hidden, inner), (m, inner, hidden)]
    if vocab:
        forward.append((m, hidden, vocab))
    out = []
    for rows_, k, n in forward:
        out += [(rows_, k, n, "nn"), (rows_, k, n, "nt"), (rows_, n, k, "nn"), (k, rows_, n, "tn")]
    return tuple(dict.fromkeys(out))


def matmul_dtype(device: Any) -> str:
    """The dtype a matmul of float32 tensors on ``device`` gives in the current context:
    ``float32``, or the autocast dtype (``bfloat16`` / ``float16``) inside an autocast block
    — call it inside the trainer's autocast context to learn the dtype the work runs in."""
    a = torch.ones(2, 2, device=device)
    return str(torch.mm(a, a).dtype).removeprefix("torch.")


class MfuMeter:
    """Model FLOPs utilisation against a peak that must be reachable.

    ``mfu(tokens_per_sec)`` = tokens/s x FLOPs per token / (peak x processes). An MFU above
    1 means the peak is wrong (measured during a moment of load, or in a shape slower than the
    model's), never that the hardware beat its peak: the peak is measured again (up to
    ``remeasures`` times, keeping the best) and, when the achieved rate is still above it,
    the MFU is reported as unknown (None) with :attr:`unknown_reason` — never clamped.

    Args:
        flops_per_token: training FLOPs per token (:func:`flops_per_token`).
        peak: peak FLOP/s of one process's device.
        source: how the peak was found (printed with it).
        world: processes.
        remeasure: returns a fresh peak measurement (None: a fixed ``train.peak_flops``).
        remeasures: most re-measurements in a run.
    """

    def __init__(
        self,
        flops_per_token: float,
        peak: float,
        source: str,
        world: int = 1,
        remeasure: Callable[[], float] | None = None,
        remeasures: int = 2,
    ):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.source = source
        self.world = world
        self.remeasure = remeasure
        self.remeasures_left = remeasures if remeasure is not None else 0
        self.unknown_reason: str | None = None

    def mfu(self, tokens_per_sec: float) -> float | None:
        """MFU of a rate of ``tokens_per_sec`` over all processes, or None (see the class)."""
        achieved = tokens_per_sec * self.flops_per_token / self.world  # per process
        while achieved > self.peak and self.remeasures_left > 0:
            self.remeasures_left -= 1
            fresh = self.remeasure()
            if fresh > self.peak:
                self.peak = fresh
                self.source = f"{self.source.removesuffix(', re-measured')}, re-measured"
        if achieved > self.peak:
            where = self.source if self.remeasure is not None else "train.peak_flops"
            self.unknown_reason = (
                f"the achieved {achieved / 1e9:.1f} GFLOP/s per process is above the peak "
                f"{self.peak / 1e9:.1f} GFLOP/s ({where}), so that peak is not this "
                "device's; set train.peak_flops to its real peak FLOP/s"
            )
            return None
        return achieved / self.peak


def format_mfu(mfu: float | None) -> str:
    """``12.3%``, or ``n/a`` for an unknown MFU."""
    return "n/a" if mfu is None else f"{mfu:.1%}"


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
