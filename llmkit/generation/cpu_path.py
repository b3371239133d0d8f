"""``--dtype auto`` on a CPU: float32 unless a measurement on this machine, with this model,
shows that bfloat16 is both faster and gives the same greedy tokens (issue 16, item 3).

Whether bfloat16 pays on a CPU depends on the CPU (Intel with AMX or AVX512-BF16 multiplies
bfloat16 natively; others convert it, as on this project's Xeon without either, and an AMD
without AMX was 1.26× slower) and on the model (a small model's step is mostly Python, not
matrix products). Whether it is exact enough depends on the model: on SmolLM2-135M bfloat16
changed the greedy text of 3 of 8 prompts. So nothing is assumed: the first ``generate``,
``chat`` or ``serve`` of a model on a machine *calibrates* (:func:`measure_paths`): it runs
float32's greedy continuations of :data:`CALIBRATION_PROMPTS` through bfloat16 (is its most
likely token float32's at every position?) and, when it is, times batch-1 greedy decoding in
both dtypes, alternating.
:func:`choose_path` then keeps float32 unless bfloat16 was greedy-equal on every calibration
prompt *and* at least :data:`MARGIN` × as fast. The result is cached in
``$LLMKIT_CACHE/cpu-path/<key>.json``, the key naming the CPU (model name and its bfloat16/AMX
flags), the torch and transformers versions and the model (its config, size and a checksum
of its weights), so later runs decide at once.

The stated difference: bfloat16 is chosen only when it matched float32 on the calibration
prompts (teacher-forced: decoding with a KV cache rounds a little differently in bfloat16);
on other prompts its greedy text may still differ. ``--dtype float32`` is always
exact; ``--dtype bfloat16`` (or any explicit ``--dtype``) skips all of this.

Not candidates, measured on this project's 2-core Xeon (AVX512, no AMX, no AVX512-BF16) with
SmolLM2-135M at batch 1, 64 new tokens (``benchmarks/generate.py --variants``): a static KV
cache 0.89× float32's default dynamic cache; a static cache with ``torch.compile`` 1.20×
after a 35.7 s compile, which pays only after some 6,000 generated tokens. Models under
:data:`MIN_PARAMETERS` parameters are never calibrated (they stay float32): their steps are
Python overhead (a 4-layer GPT-2 of 128 wide ran 0.58× in bfloat16).

The calibration's prompts follow ``benchmarks/generate.py``; nothing is taken from another
project.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

#: Prompts of the calibration (story, fact, code, dialogue, history, advice, science, taste):
#: ``benchmarks/generate.py`` times generation on the same prompts.
CALIBRATION_PROMPTS = (
    "Once upon a time",
    "The capital of France is",
    "ROMEO: But soft, what light",
    "def fibonacci(n):",
    "In 1492, Columbus",
    "The best way to learn is",
    "Water boils at",
    "My favourite colour is",
)
#: New tokens per calibration prompt (greedy, EOS ignored so every path does the same work).
CALIBRATION_TOKENS = 32
#: A candidate must be at least this many times as fast as float32 to replace it: below, the
#: difference is within the run-to-run noise of a shared machine.
MARGIN = 1.10
#: Models smaller than this are not calibrated (float32): see the module docstring.
MIN_PARAMETERS = 20_000_000
#: Bump when what is measured or how it is decided changes: older cached decisions are ignored.
CALIBRATION_VERSION = 1
#: The candidates besides float32 (the reference every other is compared with).
CANDIDATES = ("bfloat16",)
#: Tokens of the quick float32 decode (after a one-token warm-up) whose time per token sizes the
#: calibration's announced duration (:func:`estimate_seconds`).
PROBE_TOKENS = 4
#: The exactness check (float32's greedy continuations of the 8 prompts, batched, and one
#: teacher-forced forward per path) in batch-1 decode steps per calibration token, as timed by
#: :func:`seconds_per_token` just before: measured 4.0 and 6.0 with SmolLM2-135M on this
#: project's 2-core Xeon (whole :func:`measure_paths` runs of 49.5 s and 132 s, bfloat16 not
#: greedy-equal so not timed; 2 threads, load average 5-7 from other work, so noisy).
CHECK_STEPS_PER_TOKEN = 4.0
#: A candidate's decode step against float32's, for the estimate of the timing phase: bfloat16
#: ran 0.82-1.02× float32's speed on this project's CPUs, so its step is counted 1.25×.
CANDIDATE_STEP_COST = 1.25


@dataclass
class PathMeasurement:
    """One candidate path measured on the loaded model."""

    name: str
    """``float32`` or ``bfloat16`` (the dtype the model runs in)."""
    tokens_per_s: float | None
    """New tokens per second of greedy decoding at batch 1 (None: not timed, because it was
    not greedy-equal and so cannot be chosen)."""
    greedy_equal: bool
    """Its greedy tokens equal float32's on every calibration prompt."""
    differing_prompts: int = 0
    """Calibration prompts whose greedy tokens differ from float32's."""


@dataclass
class CpuChoice:
    """What ``--dtype auto`` runs on this CPU, and why (one line for stderr and the docs)."""

    dtype: str
    reason: str
    measurements: list[PathMeasurement]
    cached: bool = False


def choose_path(measurements: list[PathMeasurement], margin: float = MARGIN) -> tuple[str, str]:
    """The path to run: the fastest candidate that is greedy-equal to float32 and at least
    ``margin`` × float32's tokens/s; float32 when none is.

    Args:
        measurements: float32's (required: the reference) and the candidates'.
        margin: the speed-up a candidate needs over float32.

    Returns:
        ``(name, reason)``: the chosen path and a one-line reason with the measured figures.

    Raises:
        ValueError: no ``float32`` measurement.
    """
    by_name = {m.name: m for m in measurements}
    if "float32" not in by_name:
        raise ValueError("choose_path needs the float32 measurement (the reference)")
    base = by_name["float32"].tokens_per_s
    best, best_speed, notes = "float32", 1.0, []
    for m in measurements:
        if m.name == "float32":
            continue
        speed = m.tokens_per_s / base if base and m.tokens_per_s else 0.0
        if not m.greedy_equal:
            notes.append(
                f"{m.name} changed the greedy tokens of {m.differing_prompts} of the "
                f"{len(CALIBRATION_PROMPTS)} calibration prompts ({CALIBRATION_TOKENS} tokens each)"
            )
        elif speed < margin:
            notes.append(f"{m.name} ran {speed:.2f}× float32 (needs {margin:.2f}×)")
        elif speed > best_speed:
            best, best_speed = m.name, speed
    if best != "float32":
        return best, (
            f"{best}: {best_speed:.2f}× float32's tokens/s and the same greedy tokens on the "
            "calibration prompts"
        )
    return "float32", "float32: " + ("; ".join(notes) if notes else "no other candidate")


def cpu_description() -> dict[str, Any]:
    """The CPU as the cache key sees it: its model name and whether it has the instructions
    that make bfloat16 fast (``amx_bf16``, ``avx512_bf16``) or AVX512 at all (from
    ``/proc/cpuinfo``; ``platform.processor()`` where there is none), and torch's own
    capability string (``torch.backends.cpu.get_cpu_capability()``)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return {"name": name, "flags": sorted(f for f in wanted if f in flags), "torch": capability}


#: Config fields left out of :func:`model_fingerprint`: where and how the model was loaded,
#: not what it computes. Every field whose name starts with ``_`` (``_name_or_path`` — the
#: ``.gguf``'s folder on its first load, the converted copy's folder afterwards —,
#: ``_commit_hash``, ``_model_name_or_path``...), the transformers version that wrote it
#: (part of :func:`cache_key` on its own), and the load dtype (``model.dtype`` is hashed).
FINGERPRINT_SKIPPED_FIELDS = frozenset({"transformers_version", "dtype", "torch_dtype"})


def _computation_config(config: Any) -> dict[str, Any]:
    """``config`` as a dict without the fields of :data:`FINGERPRINT_SKIPPED_FIELDS` and those
    starting with ``_``: what determines the computation (architecture, sizes, token ids...)."""
    data = json.loads(config.to_json_string(use_diff=False))
    return {
        k: v
        for k, v in data.items()
        if not k.startswith("_") and k not in FINGERPRINT_SKIPPED_FIELDS
    }


def model_fingerprint(model: Any) -> str:
    """A short hash of what the loaded model computes: its class, its config without the
    fields that name where or how it was loaded (:func:`_computation_config`: the same weights
    in another folder, after ``LLMKIT_CACHE`` moved, or a ``.gguf`` read directly and then from
    its converted copy get one fingerprint), its parameter count and dtype, and for every
    parameter tensor the float64 sum of an evenly strided sample of at most 4,096 of its
    values — a few milliseconds, no copy of the weights, and different for another checkpoint
    of the same architecture (a fine-tune that moved any tensor)."""
    params = list(model.parameters())
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    h.update(json.dumps(_computation_config(model.config), sort_keys=True).encode("utf-8"))
    h.update(f"{sum(p.numel() for p in params)} {model.dtype}".encode())
    with torch.no_grad():
        for p in params:
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)]
            h.update(repr(float(sample.double().sum())).encode())
    return h.hexdigest()[:16]


def cache_key(model: Any) -> str:
    """The name of the cached decision: CPU, versions and the model (see the module
    docstring). Not the thread count, which follows the machine's load from run to run: the
    exactness verdict does not depend on it, and the speed ratio of two dtypes little."""
    import transformers

    key = {
        "version": CALIBRATION_VERSION,
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": model_fingerprint(model),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _greedy(model: Any, tokenizer: Any, prompt: str, tokens: int) -> float:
    """Seconds to greedy-decode ``tokens`` new tokens of ``prompt`` at batch 1 (EOS not
    stopping, so every path does the same work)."""
    ids = _encode(tokenizer, [prompt])[0]
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=_pad(tokenizer),
        )
    return time.perf_counter() - start


def _pad(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _encode(tokenizer: Any, prompts: tuple[str, ...] | list[str]) -> list[torch.Tensor]:
    """Each prompt's ids, (1, T) (a prompt that encodes to nothing: the pad/EOS token)."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out.append(ids if ids.shape[1] else torch.tensor([[_pad(tokenizer)]]))
    return out


def greedy_paths(
    model: Any, tokenizer: Any, prompts: tuple[str, ...], tokens: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float32's greedy continuations of ``prompts``, batched: ``(ids, mask, width)``, ids and
    mask (B, width + tokens) left-padded, ``width`` the longest prompt."""
    from llmkit.generation.batching import left_pad

    rows = [ids[0].tolist() for ids in _encode(tokenizer, prompts)]
    ids, mask = left_pad(rows, _pad(tokenizer))
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=_pad(tokenizer),
        )  # (B, width + tokens)
    full_mask = torch.cat([mask, torch.ones(len(rows), tokens, dtype=mask.dtype)], dim=1)
    return out, full_mask, ids.shape[1]


def top1(model: Any, ids: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """The model's most likely next token at each continuation position of ``ids`` (B, T):
    (B, T - width), teacher-forced (one forward over the whole sequence)."""
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    return logits[:, width - 1 : -1].float().argmax(-1)


def measure_paths(
    model: Any,
    tokenizer: Any,
    candidates: dict[str, Any],
    *,
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS,
    tokens: int = CALIBRATION_TOKENS,
    rounds: int = 2,
) -> list[PathMeasurement]:
    """Measure float32 (``model``) and each candidate model on this machine.

    Exactness: float32's greedy continuations of ``prompts`` (``tokens`` new tokens each) are
    fed to every path at once (teacher forcing), and a path is greedy-equal when its most
    likely next token equals float32's at every position of every continuation: it would then
    have decoded the same tokens. This is one forward pass per path, so more text is checked
    than decoding would afford. Speed: batch-1 greedy decoding of ``tokens`` new tokens of the
    first prompt, ``rounds`` times per path, the order alternating, after a warm-up; only for
    float32 and the greedy-equal candidates (the others cannot be chosen).

    Args:
        model: the float32 model (the reference).
        candidates: name → the same model in another dtype.
        prompts, tokens: the calibration (defaults: :data:`CALIBRATION_PROMPTS`,
            :data:`CALIBRATION_TOKENS`).

    Returns:
        float32's measurement, then each candidate's (``tokens_per_s`` None when not timed).
    """
    ids, mask, width = greedy_paths(model, tokenizer, prompts, tokens)
    reference = top1(model, ids, mask, width)  # (B, tokens)
    result = {"float32": PathMeasurement("float32", None, True, 0)}
    for name, candidate in candidates.items():
        differ = int((top1(candidate, ids, mask, width) != reference).any(dim=1).sum())
        result[name] = PathMeasurement(name, None, differ == 0, differ)
    timed = [n for n, m in result.items() if m.greedy_equal]
    if len(timed) > 1:
        paths = {"float32": model, **candidates}
        seconds = {n: 0.0 for n in timed}
        for n in timed:
            _greedy(paths[n], tokenizer, prompts[0], 2)  # warm-up
        for r in range(rounds):
            for n in timed if r % 2 == 0 else timed[::-1]:
                seconds[n] += _greedy(paths[n], tokenizer, prompts[0], tokens)
        for n in timed:
            result[n].tokens_per_s = tokens * rounds / seconds[n] if seconds[n] > 0 else 0.0
    return list(result.values())


def seconds_per_token(model: Any, tokenizer: Any) -> float:
    """Seconds per new token of float32 greedy decoding at batch 1 right now: one warm-up
    token, then :data:`PROBE_TOKENS` timed (prefill included, so a little over a decode step)."""
    _greedy(model, tokenizer, CALIBRATION_PROMPTS[0], 1)  # warm-up
    return _greedy(model, tokenizer, CALIBRATION_PROMPTS[0], PROBE_TOKENS) / PROBE_TOKENS


def estimate_seconds(
    per_token: float,
    *,
    candidates: int = len(CANDIDATES),
    tokens: int = CALIBRATION_TOKENS,
    rounds: int = 2,
) -> tuple[float, float]:
    """How long :func:`measure_paths` will take: ``(check, at_most)`` seconds.

    ``check`` is the exactness check, which always runs: ``tokens`` ×
    :data:`CHECK_STEPS_PER_TOKEN` decode steps. ``at_most`` adds the timing, which runs only
    when a candidate is greedy-equal: per path a 2-token warm-up and ``rounds`` × ``tokens``
    steps, a candidate's step counted :data:`CANDIDATE_STEP_COST` × float32's. Both scale
    ``per_token`` (:func:`seconds_per_token`), so they are as good as the machine's load is
    steady: an estimate, not a bound."""
    check = per_token * tokens * CHECK_STEPS_PER_TOKEN
    timing = per_token * (2 + rounds * tokens) * (1 + CANDIDATE_STEP_COST * candidates)
    return check, check + timing


def _duration(seconds: float) -> str:
    """``12 s``, ``3 min``: a rounded duration for a message."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``),
    or None where it cannot be read: the calibration holds a bfloat16 copy of the model
    beside the float32 one, and is skipped (float32) when that copy would take more than half
    of it."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cache_file(key: str) -> Path | None:
    from llmkit.core.cache import cache_root

    root = cache_root()
    return None if root is None else root / "cpu-path" / f"{key}.json"


def _read_cached(path: Path | None) -> CpuChoice | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CpuChoice(
            data["dtype"],
            data["reason"],
            [PathMeasurement(**m) for m in data["measurements"]],
            cached=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(path: Path | None, choice: CpuChoice) -> None:
    if path is None:
        return
    from llmkit.core.atomic import write_text

    record = {
        "dtype": choice.dtype,
        "reason": choice.reason,
        "measurements": [asdict(m) for m in choice.measurements],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(record, indent=1) + "\n")
    except OSError:  # a cache is an optimisation: the next run measures again
        pass


def auto_cpu_path(
    model: Any,
    tokenizer: Any,
    dtype: str,
    *,
    err: TextIO | None = None,
    measure: Callable[..., list[PathMeasurement]] = measure_paths,
) -> tuple[Any, CpuChoice | None]:
    """Apply ``--dtype auto`` on a CPU to a loaded model (see the module docstring).

    Args:
        model: the loaded model (float32 when ``dtype`` is ``auto`` on a CPU).
        tokenizer: its tokenizer (the calibration encodes its prompts).
        dtype: the ``--dtype`` the user gave: anything but ``auto`` returns ``model`` as it is.
        err: where the calibration says what it does (default stderr): one line before it
            runs, with its estimated duration (:func:`estimate_seconds` from a quick timing,
            :func:`seconds_per_token`), one with the choice and the time it took; nothing
            when the decision is cached or not needed. Never stdout.
        measure: :func:`measure_paths` (replaceable in tests).

    Returns:
        ``(model, choice)``: the model to generate with (converted to the chosen dtype) and the
        decision; ``choice`` is None when nothing was decided (another ``--dtype``, not a CPU,
        not float32, a model under :data:`MIN_PARAMETERS` parameters, a context too short for
        the calibration, no memory for a bfloat16 copy, or a calibration that failed).
    """
    if dtype.lower() != "auto" or model.device.type != "cpu" or model.dtype != torch.float32:
        return model, None
    if sum(p.numel() for p in model.parameters()) < MIN_PARAMETERS:
        return model, None
    copy_bytes = sum(p.numel() * 2 for p in model.parameters())  # the bfloat16 copy
    free = available_memory()
    if free is not None and copy_bytes > free // 2:
        return model, None  # no room for a second copy beside the float32 model: float32
    from llmkit.core.loading import model_max_positions

    positions = model_max_positions(model)
    longest = max(len(ids[0]) for ids in _encode(tokenizer, CALIBRATION_PROMPTS))
    if positions is not None and positions < longest + CALIBRATION_TOKENS:
        return model, None  # too short a context for the calibration: float32
    path = _cache_file(cache_key(model))
    choice = _read_cached(path)
    if choice is None:
        out = err or sys.stderr
        start = time.perf_counter()
        try:
            check, at_most = estimate_seconds(seconds_per_token(model, tokenizer))
            estimate = (
                f"; about {_duration(check)} here, up to {_duration(at_most)} if "
                f"{' or '.join(CANDIDATES)} is exact enough to be timed"
            )
        except Exception:  # the calibration below says what fails
            estimate = ""
        out.write(
            "calibrating --dtype auto for this model on this CPU (once; cached): float32 "
            f"against {', '.join(CANDIDATES)}, {len(CALIBRATION_PROMPTS)} prompts{estimate}\n"
        )
        out.flush()
        candidates = {name: copy.deepcopy(model).to(getattr(torch, name)) for name in CANDIDATES}
        try:
            measurements = measure(model, tokenizer, candidates)
        except Exception as exc:  # an optimisation only: never fail generation over it
            out.write(f"warning: --dtype auto: the calibration failed ({exc}); using float32\n")
            return model, None
        name, reason = choose_path(measurements)
        choice = CpuChoice(name, reason, measurements)
        _write_cached(path, choice)
        took = _duration(time.perf_counter() - start)
        out.write(f"--dtype auto: {reason} (calibrated in {took})\n")
        out.flush()
        chosen = model if name == "float32" else candidates[name]
        del candidates
        return chosen.eval(), choice
    if choice.dtype != "float32":
        model = model.to(getattr(torch, choice.dtype))
    return model.eval(), choice
