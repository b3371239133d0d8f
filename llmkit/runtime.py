"""CPU threads for training, generation and evaluation on a machine that other work shares.

torch starts one intra-op thread per physical core. On a machine whose cores are already busy
(a load average at or above the core count) those threads wait for each other at every
parallel region, and a small model trains or generates several times slower than with one
thread (measured on this project's demo: 12,000 tokens/s alone, under 500 tokens/s with
torch's default threads while other work ran; 1 thread kept most of the speed).

:func:`choose_threads` decides, at the start of ``train``, ``generate``, ``chat`` and ``eval``:

1. ``--threads N`` wins (with a warning line when N is more than the usable cores);
2. then a user-set ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (torch already read it; torchrun
   sets ``OMP_NUM_THREADS=1`` for its workers) — llmkit changes nothing;
3. otherwise the free cores: ``cores - load``, where ``cores`` is the CPUs this process may run
   on (``os.sched_getaffinity``) and ``load`` the 1-minute load average (``os.getloadavg``).
   When fewer cores are free than torch would use, llmkit uses ``max(1, round(free))`` threads
   and says so in one warning line when the work starts (:func:`announce_threads`, after the
   model loads): a mistake found before that is still one error line and nothing else.

Nothing here imports torch except :func:`apply_threads`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import TextIO

from llmkit.errors import UserError

#: Environment variables that set the thread count of torch's CPU kernels.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


#: ``--threads`` above this many times the usable cores is refused: each thread is an OS
#: thread with its own stack (``--threads 100000`` ended in a segmentation fault while
#: libraries loaded); more threads than cores only wait on each other.
MAX_THREADS_PER_CORE = 4


def check_threads(threads: int | None) -> None:
    """Refuse a ``--threads`` value below 1 or above :data:`MAX_THREADS_PER_CORE` times the
    usable cores (no torch needed); between the cores and that bound a warning says why it
    is slow (:func:`choose_threads`).

    Raises:
        UserError: ``threads`` < 1, or far more than the cores.
    """
    if threads is not None and threads < 1:
        raise UserError(
            f"--threads {threads} must be at least 1",
            f"e.g. --threads 1 on a busy machine, up to {usable_cores()} here",
        )
    most = MAX_THREADS_PER_CORE * usable_cores()
    if threads is not None and threads > most:
        raise UserError(
            f"--threads {threads} is more than {most} ({MAX_THREADS_PER_CORE} per core of the "
            f"{usable_cores()} this process may run on)",
            f"use at most {usable_cores()} here: more threads than cores wait on each other",
        )


def choose_threads(
    requested: int | None,
    default: int,
    *,
    environ: Mapping[str, str] | None = None,
    cores: Callable[[], int] | None = None,
    load: Callable[[], float | None] | None = None,
) -> tuple[int | None, str | None]:
    """The number of torch threads to set, and the warning to print (see the module docstring).

    Args:
        requested: ``--threads`` (None: not given).
        default: the threads torch would use (``torch.get_num_threads()``).
        environ: the environment (default ``os.environ``).
        cores, load: :func:`usable_cores` and :func:`load_average` (replaceable in tests).

    Returns:
        ``(threads, message)``: ``threads`` None leaves torch as it is; ``message`` is a
        one-line warning (without ``warning:``) or None.
    """
    if requested is not None:
        n = (cores or usable_cores)()
        if requested <= n:
            return requested, None
        return requested, (
            f"--threads {requested} is more than the {n} cores this process may run on: the "
            "threads will wait on each other and run several times slower than with "
            f"--threads {n} or fewer"
        )
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in THREAD_ENV):
        return None, None
    n, busy = (cores or usable_cores)(), (load or load_average)()
    if busy is None:
        return None, None
    free = n - busy
    chosen = max(1, round(free))
    if chosen >= default:
        return None, None
    message = (
        f"this machine is busy (load average {busy:.1f} on {n} cores): using {chosen} "
        f"thread{'s' if chosen > 1 else ''} instead of torch's {default}, which would wait on "
        "each other and run several times slower; choose with --threads N or OMP_NUM_THREADS=N"
    )
    return chosen, message


_pending: list[str] = []  # the warning of apply_threads, until announce_threads prints it


def apply_threads(requested: int | None) -> int:
    """Set torch's CPU threads as :func:`choose_threads` decides and return the threads torch
    now uses. Its warning is kept for :func:`announce_threads`, which the commands call when
    the real work starts (after the model loads), so that a mistake found before still ends
    in one error line only."""
    import torch

    threads, message = choose_threads(requested, torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
    _pending[:] = [message] if message else []
    return torch.get_num_threads()


def announce_threads(err: TextIO | None = None) -> None:
    """Print the pending warning of :func:`apply_threads` (once) on ``err`` (default stderr);
    nothing when there is none (in particular when llmkit is used as a library)."""
    if not _pending:
        return
    out = err or sys.stderr
    out.write(f"warning: {_pending.pop()}\n")
    out.flush()
