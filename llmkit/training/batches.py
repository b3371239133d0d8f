"""Which training blocks each step reads: a pure function of (seed, epoch, step).

Each epoch visits the N training blocks in the order of ``torch.randperm(N)`` drawn from a
generator seeded with ``seed + epoch``; the blocks that do not fill a last whole step are dropped
for that epoch (a different set each epoch). Step s (0-based) of a run whose steps take G blocks
(G = micro_batch_size x gradient_accumulation_steps x processes) is step ``s % (N // G)`` of
epoch ``s // (N // G)``. Because the position in the data *is* the step index, resuming at
step s reads exactly the blocks an uninterrupted run would: none twice, none skipped, across
epoch boundaries too.

Within a step, the G positions are dealt out as micro-batch i of process r taking positions
``[(i * W + r) * b, (i * W + r + 1) * b)`` (W processes, b = micro_batch_size), so a step's blocks
are the same whether run as 1 process x 2b or 2 processes x b.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def epoch_order(n_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """(n_samples,) int64: the permutation of block indices that epoch ``epoch`` visits."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n_samples, generator=g)


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """Whole steps of ``global_batch`` blocks in one pass over ``n_samples`` blocks."""
    return n_samples // global_batch


def step_samples(step: int, n_samples: int, global_batch: int, seed: int) -> torch.Tensor:
    """(global_batch,) int64: the blocks that 0-based step ``step`` reads, over all processes."""
    per_epoch = steps_per_epoch(n_samples, global_batch)
    if per_epoch == 0:
        raise ValueError(f"{n_samples} blocks do not fill one step of {global_batch}")
    epoch, k = divmod(step, per_epoch)
    return epoch_order(n_samples, seed, epoch)[k * global_batch : (k + 1) * global_batch]


def micro_batch_samples(
    samples: torch.Tensor, micro: int, rank: int, world: int, micro_batch_size: int
) -> torch.Tensor:
    """(micro_batch_size,) the blocks of micro-batch ``micro`` on process ``rank`` in a step."""
    start = (micro * world + rank) * micro_batch_size
    return samples[start : start + micro_batch_size]
