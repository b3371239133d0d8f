"""Loss, perplexity and bits per byte from summed negative log-likelihoods.

Every metric here is a ratio of sums — total nats over total scored tokens, total nats over
total bytes — never a mean of per-batch means, so batch size and padding cannot change it.

- ``loss``: nats per target token, ``Σ -ln p(x_i | x_<i) / N_tokens``.
- ``perplexity``: ``exp(loss)``.
- ``bits_per_byte``: ``Σ -ln p / (ln 2 × Σ bytes)``, the UTF-8 bytes of the scored target tokens
  (``llmkit.core.tokenizer.token_byte_lengths``); it compares models whose tokenizers differ
  (Gao et al. 2020, "The Pile", §3.1 uses bits per UTF-8 byte for this reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmkit.core.prepared import IGNORE_INDEX


@dataclass
class NLLSums:
    """Running sums: ``nats``, ``tokens`` (scored targets), ``bytes`` (their UTF-8 bytes)."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def add(self, other: NLLSums) -> None:
        self.nats += other.nats
        self.tokens += other.tokens
        self.bytes += other.bytes

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}loss`` (nats/token), ``{prefix}ppl``, ``{prefix}bpb`` (bits/UTF-8 byte)."""
        loss = self.nats / self.tokens if self.tokens else float("nan")
        ppl = math.exp(loss) if self.tokens and loss < 700 else float("inf")
        bpb = self.nats / (math.log(2) * self.bytes) if self.bytes else float("nan")
        return {f"{prefix}loss": loss, f"{prefix}ppl": ppl, f"{prefix}bpb": bpb}


def shift_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets for causal LM: ``labels[:, t] = input_ids[:, t+1]``, last = -100.

    Args:
        input_ids: (B, T) token ids.

    Returns:
        (B, T) targets aligned with the logits at each position.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood in nats, 0 where the target is -100.

    Args:
        logits: (B, T, vocab_size), any float dtype (computed in float32).
        targets: (B, T) next-token ids aligned with ``logits``, -100 where not scored.

    Returns:
        (B, T) float32 nats.
    """
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)


def nll_sums(logits: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> NLLSums:
    """Summed nats, scored tokens and their bytes for one batch.

    Args:
        logits: (B, T, vocab_size).
        targets: (B, T) next-token ids, -100 where not scored.
        token_bytes: (vocab_size,) UTF-8 bytes per token id, on the same device.
    """
    mask = targets != IGNORE_INDEX
    nll = token_nll(logits, targets)
    safe = targets.clamp(min=0)
    return NLLSums(
        nats=float(nll[mask].sum()),
        tokens=int(mask.sum()),
        bytes=int(token_bytes[safe][mask].sum()),
    )
