"""Generation speed: llmkit's generate path against bare ``model.generate``, same model, same
settings, same run (SPEC §7: ratio ≥ 0.95), the time from process start to the first token
against the import-and-load floor, and what would make CPU generation faster.

    python benchmarks/generate.py                  # tiny random GPT-2 (4 × 128), built here
    python benchmarks/generate.py --gguf           # SmolLM2-135M-Instruct Q4_1 (../shared/models)
    python benchmarks/generate.py --gguf --variants  # + float32/bfloat16, static cache, compile

With ``--gguf`` (or a ``--model`` ending in .gguf) it also times a cached ``.gguf`` load against
``from_pretrained`` of the same model as safetensors, and it always prints the batch-1 bound
that memory bandwidth puts on decoding (weights read once per token). Where llama-cpp-python is
installed it also runs llama.cpp on the same ``.gguf`` file for comparison.

Both paths decode greedily ``--max-new-tokens`` tokens for the same prompts, batch sizes 1 and 8
(left padding). llmkit's path is :func:`llmkit.generation.generate.run_prompts` (encode, check
the context, pad, generate, cut each row at its end, decode), once as ``--json`` uses it and
once streaming each token to a sink as the terminal output does (batch 1); bare is
``tokenizer(...)`` + ``model.generate`` + ``batch_decode``. Tokens/s counts new tokens up to each
row's first EOS for both. The paths run in alternate order round after round, and the ratio
reported is the median of the per-round ratios (each round's paths ran back to back, under the
same load) next to the ratio of the best runs. On a machine shared with other jobs the figures
move by tens of percent from run to run: compare ratios, not absolute speeds.

``--threads N`` sets torch's intra-op threads for every path. Without it the paths run with the
thread count llmkit's commands choose for the machine's load (:func:`llmkit.runtime.
apply_threads`). ``--dtype auto`` (default) loads the model as ``llmkit generate`` does on a
CPU, its calibration included (:mod:`llmkit.generation.cpu_path`: float32 unless bfloat16 is
greedy-equal and faster here). A separate table compares that automatic path (its dtype, its
threads) with bare float32 ``model.generate`` at torch's default threads (a thread per core),
batch 1 and 8, and gives the batch-1 bound of memory bandwidth / bytes of weights for float32
and for the automatic path's dtype (issue 16's target: ≥ 1.5× bare float32 at batch 1).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmkit.generation.cpu_path import CALIBRATION_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PROMPTS = list(CALIBRATION_PROMPTS)  # the prompts --dtype auto calibrates on


def tiny_model(out: Path) -> Path:
    """A random GPT-2 (4 layers × 128, 256 positions) with a 1024-token BPE, saved in ``out``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.core.tokenizer import train_bpe_tokenizer

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


def new_tokens(rows: list[list[int]], eos: set[int]) -> int:
    """New tokens up to and including each row's first EOS."""
    return sum(next((i + 1 for i, t in enumerate(r) if t in eos), len(r)) for r in rows)


def bare(model, tok, prompts, max_new_tokens, eos, **generate_kwargs):
    """tokenizer + model.generate + batch_decode; returns (new tokens up to EOS, seconds)."""
    import torch

    start = time.perf_counter()
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            **generate_kwargs,
        )
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    tok.batch_decode(new, skip_special_tokens=True)
    return new_tokens(new, eos), time.perf_counter() - start


def ours(model, tok, prompts, max_new_tokens, batch_size, stream=False):
    """llmkit's run_prompts: as --json (no streaming) or streaming to a sink."""
    from llmkit.generation.generate import run_prompts
    from llmkit.generation.settings import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0)
    sink = io.StringIO()
    start = time.perf_counter()
    results = run_prompts(
        model, tok, prompts, settings, batch_size=batch_size, stream=stream, out=sink, err=sink
    )
    return sum(r.new_tokens for r in results), time.perf_counter() - start


def paired_rounds(paths: dict, rounds: int) -> dict[str, list[float]]:
    """Tokens/s of each path, ``rounds`` times, the order rotated every round."""
    names = list(paths)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            n, s = paths[name]()
            speeds[name].append(n / s)
    return speeds


def compare(model, tok, eos, max_new_tokens: int, rounds: int) -> None:
    print(f"greedy, {max_new_tokens} new tokens per prompt, {rounds} alternating rounds\n")
    header = (
        f"{'batch':>5} {'path':<16} {'best tok/s':>10} {'median':>8} "
        f"{'ratio (median of rounds)':>25} {'ratio (best)':>13}"
    )
    print(header)
    for batch in (1, 8):
        prompts = PROMPTS[:batch]
        paths = {
            "bare generate": lambda p=prompts: bare(model, tok, p, max_new_tokens, eos),
            "llmkit (--json)": lambda p=prompts, b=batch: ours(model, tok, p, max_new_tokens, b),
        }
        if batch == 1:
            paths["llmkit streamed"] = lambda p=prompts: ours(
                model, tok, p, max_new_tokens, 1, stream=True
            )
        for fn in paths.values():  # warm-up: first calls allocate and fill caches
            fn()
        speeds = paired_rounds(paths, rounds)
        base = speeds["bare generate"]
        for name, values in speeds.items():
            ratios = [v / b for v, b in zip(values, base, strict=True)]
            median_ratio = statistics.median(ratios)
            best_ratio = max(values) / max(base)
            flag = "" if name == "bare generate" else ("  ok" if median_ratio >= 0.95 else "  LOW")
            ratio_cells = (
                f"{'':>25} {'':>13}"
                if name == "bare generate"
                else f"{median_ratio:25.3f} {best_ratio:13.3f}{flag}"
            )
            print(
                f"{batch:>5} {name:<16} {max(values):10.1f} {statistics.median(values):8.1f} "
                + ratio_cells
            )
    print("\ntarget: llmkit ≥ 0.95 of bare generate (SPEC §7)")


def variants(name: str, max_new_tokens: int, rounds: int) -> None:
    """Bare ``model.generate`` at batch 1 in the settings that could make CPU generation faster:
    float32 vs bfloat16 weights, the default dynamic KV cache vs a static one, and a static
    cache with ``torch.compile`` (transformers' CompileConfig; on a CPU it must be asked for)."""
    from transformers import CompileConfig

    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.generation.batching import eos_ids

    loaded = {}
    for dtype in ("float32", "bfloat16"):
        model, tok, _ = load_model_and_tokenizer(name, device="cpu", dtype=dtype)
        loaded[dtype] = (model, tok, set(eos_ids(model, tok)))
    prompts = PROMPTS[:1]
    compile_cfg = CompileConfig(fullgraph=False, mode="default")
    compile_cfg._compile_all_devices = True  # transformers compiles on CUDA/XPU/TPU only
    settings = {
        "float32, dynamic cache": ("float32", {}),
        "bfloat16, dynamic cache": ("bfloat16", {}),
        "float32, static cache": ("float32", {"cache_implementation": "static"}),
        "float32, static + compile": (
            "float32",
            {"cache_implementation": "static", "compile_config": compile_cfg},
        ),
    }
    paths = {}
    for label, (dtype, kwargs) in settings.items():
        model, tok, eos = loaded[dtype]
        paths[label] = lambda m=model, t=tok, e=eos, k=kwargs: bare(
            m, t, prompts, max_new_tokens, e, **k
        )
    print(f"\nbare model.generate, batch 1, {max_new_tokens} new tokens, {rounds} rounds")
    for label, fn in paths.items():  # warm-up; compile happens here
        start = time.perf_counter()
        fn()
        print(f"  warm-up {label}: {time.perf_counter() - start:.1f} s", flush=True)
    speeds = paired_rounds(paths, rounds)
    base = speeds["float32, dynamic cache"]
    print(f"{'setting':<28} {'best tok/s':>10} {'median':>8} {'× float32 (median of rounds)':>29}")
    for label, values in speeds.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(f"{label:<28} {max(values):10.1f} {statistics.median(values):8.1f} {ratio:29.2f}")


def auto_vs_bare(
    auto_model,
    fp32_model,
    tok,
    eos,
    choice: str,
    default_threads: int,
    auto_threads: int,
    max_new_tokens: int,
    rounds: int,
) -> None:
    """One table: llmkit's automatic CPU path (``--dtype auto``: the dtype its calibration
    chose, :mod:`llmkit.generation.cpu_path`, and the thread count llmkit chose for the
    machine's load) against bare ``model.generate`` in float32 with torch's default threads,
    batch 1 and 8, alternating rounds; then the batch-1 bound that memory bandwidth puts on
    float32 weights and on the automatic path's. Target (issue 16): ≥ 1.5× at batch 1."""
    import torch

    bandwidth = measure_bandwidth()
    rows = []
    base1 = None
    for batch in (1, 8):
        prompts = PROMPTS[:batch]

        def run_bare(p=prompts):
            torch.set_num_threads(default_threads)
            return bare(fp32_model, tok, p, max_new_tokens, eos)

        def run_auto(p=prompts, b=batch):
            torch.set_num_threads(auto_threads)
            return ours(auto_model, tok, p, max_new_tokens, b)

        paths = {"bare": run_bare, "auto": run_auto}
        for fn in paths.values():
            fn()
        speeds = paired_rounds(paths, rounds)
        ratio = statistics.median(
            a / b for a, b in zip(speeds["auto"], speeds["bare"], strict=True)
        )
        bare_med = statistics.median(speeds["bare"])
        if batch == 1:
            base1 = bare_med
        rows.append(("bare float32 model.generate", default_threads, "float32", batch,
                     f"{bare_med:.1f}", "1.00"))  # fmt: skip
        rows.append(("llmkit automatic path", auto_threads, str(auto_model.dtype)[6:], batch,
                     f"{statistics.median(speeds['auto']):.1f}", f"{ratio:.2f}"))  # fmt: skip
    for label, model in (("bound: bandwidth / fp32 weights", fp32_model),
                         ("bound: bandwidth / auto weights", auto_model)):  # fmt: skip
        if label.endswith("auto weights") and model is fp32_model:
            continue
        bound = bandwidth / weight_bytes(model)
        rows.append((label, "-", str(model.dtype)[6:], 1, f"{bound:.1f}", f"{bound / base1:.2f}"))
    print(
        f"\nautomatic CPU path (--dtype auto: {choice}) vs bare float32 generate; "
        f"{max_new_tokens} new tokens, median of {rounds} alternating rounds; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; memory bandwidth (numpy copy) "
        f"{bandwidth / 1e9:.1f} GB/s"
    )
    print(f"{'path':<33} {'threads':>7} {'dtype':>9} {'batch':>5} {'tok/s':>7} {'× bare':>7}")
    for label, threads, dtype, batch, speed, ratio in rows:
        print(f"{label:<33} {threads!s:>7} {dtype:>9} {batch:>5} {speed:>7} {ratio:>7}")
    print("ratios of batch 8 are to bare batch 8; bounds are batch 1, to bare batch 1")
    torch.set_num_threads(auto_threads)


def llama_cpp_compare(model, tok, name: str, max_new_tokens: int, rounds: int) -> None:
    """llmkit (float32, its thread choice) against llama.cpp (llama-cpp-python, when installed)
    on the same ``.gguf`` file, same thread count, batch 1, greedy, ``max_new_tokens`` tokens
    forced (no early EOS on either side), alternating rounds."""
    import torch

    try:
        from llama_cpp import Llama
    except ImportError:
        print("\nllama.cpp: llama-cpp-python is not installed, comparison skipped")
        return
    threads = torch.get_num_threads()
    llm = Llama(model_path=name, n_ctx=256, n_threads=threads, verbose=False)
    enc = tok(PROMPTS[0], return_tensors="pt")

    def ours_fp32() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return max_new_tokens / (time.perf_counter() - start)

    def llama_cpp() -> float:
        start = time.perf_counter()
        llm.reset()
        out = llm.create_completion(PROMPTS[0], max_tokens=max_new_tokens, temperature=0, top_k=1)
        return out["usage"]["completion_tokens"] / (time.perf_counter() - start)

    paths = {"llmkit": ours_fp32, "llama.cpp": llama_cpp}
    for fn in paths.values():
        fn()
    speeds: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for label in list(paths)[:: 1 if r % 2 == 0 else -1]:
            speeds[label].append(paths[label]())
    ratio = statistics.median(
        a / b for a, b in zip(speeds["llmkit"], speeds["llama.cpp"], strict=True)
    )
    print(
        f"\nllama.cpp on {Path(name).name} ({threads} threads): "
        f"{statistics.median(speeds['llama.cpp']):.1f} tok/s; llmkit float32 "
        f"{statistics.median(speeds['llmkit']):.1f} tok/s: {ratio:.2f}× (median of {rounds})"
    )


def load_compare(name: str, rounds: int) -> None:
    """A cached ``.gguf`` load through llmkit (model + tokenizer) against ``from_pretrained`` of
    the same model as a safetensors directory (the converted copy itself) + ``AutoTokenizer``,
    float32 on the CPU, alternating in one process (the files stay in the page cache for both).
    Target (issue 16): ≤ 2×."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.core.loading import gguf_cache_dir, load_model_and_tokenizer

    path = Path(name)
    if path.suffix != ".gguf":
        return
    load_model_and_tokenizer(name, device="cpu", dtype="float32")  # converts once if needed
    cache = gguf_cache_dir(path)
    if cache is None:
        print("\ncached GGUF load: LLMKIT_CACHE=off, nothing to compare")
        return

    def llmkit_load() -> None:
        load_model_and_tokenizer(name, device="cpu", dtype="float32")

    def safetensors_load() -> None:
        AutoModelForCausalLM.from_pretrained(cache, dtype="float32")
        AutoTokenizer.from_pretrained(cache)

    paths = {"llmkit cached .gguf": llmkit_load, "from_pretrained dir": safetensors_load}
    times: dict[str, list[float]] = {k: [] for k in paths}
    import gc

    for r in range(max(rounds, 6)):
        for label in list(paths)[:: 1 if r % 2 == 0 else -1]:
            gc.collect()  # the previous round's model is not freed on this round's clock
            start = time.perf_counter()
            paths[label]()
            times[label].append(time.perf_counter() - start)
    a, b = times["llmkit cached .gguf"], times["from_pretrained dir"]
    ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
    print(
        f"\nload, model + tokenizer, float32: llmkit cached .gguf {statistics.median(a):.2f} s, "
        f"from_pretrained of the safetensors copy {statistics.median(b):.2f} s: "
        f"{ratio:.2f}× (median of {len(a)} alternating rounds; target ≤ 2×)"
    )


def measure_bandwidth() -> float:
    """Memory bandwidth in bytes/s: a numpy copy of 256 MiB (read + write counted), best of 3."""
    import numpy as np

    a = np.ones(64 * 1024 * 1024, dtype=np.float32)  # 256 MiB
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best


def weight_bytes(model) -> int:
    """Bytes of the model's weights, tied weights counted once: what batch-1 decoding reads
    per new token."""
    seen, weights = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weights += p.numel() * p.element_size()
    return weights


def wall(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def startup(name: str, dtype: str, rounds: int, threads: int | None) -> None:
    """Process start → first token of ``llmkit generate`` against the floor: a process that
    only imports llmkit's loader and loads the same model. Alternating, median of rounds."""
    env = {**os.environ, "LLMKIT_MODEL": name}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    floor_code = (
        "from llmkit.core.loading import load_model_and_tokenizer;"
        f"load_model_and_tokenizer({name!r}, device='cpu', dtype={dtype!r})"
    )
    floor_cmd = [sys.executable, "-c", floor_code]
    cli = [sys.executable, "-m", "llmkit", "generate", "Hello", "--max-new-tokens", "1"]
    cli += ["-t", "0", "--dtype", dtype, "--device", "cpu"]
    import_cmd = [sys.executable, "-c", "import torch, transformers"]
    times: dict[str, list[float]] = {"import": [], "floor": [], "first": []}
    for r in range(rounds):
        steps = [("import", import_cmd), ("floor", floor_cmd), ("first", cli)]
        for key, cmd in steps if r % 2 == 0 else steps[::-1]:
            times[key].append(wall(cmd, env))
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["first"] - med["floor"]
    print(
        f"\nprocess start → first token (llmkit generate, 1 new token): {med['first']:.2f} s; "
        f"import + load floor {med['floor']:.2f} s (overhead {overhead:+.2f} s); "
        f"import torch + transformers alone {med['import']:.2f} s (median of {rounds})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", action="store_true", help=f"use {GGUF.name}")
    parser.add_argument("--model", help="any model llmkit loads (overrides --gguf)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", "--repeats", type=int, default=3, dest="rounds")
    parser.add_argument(
        "--dtype", default="auto", help="llmkit's path (auto: as generate chooses on a CPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-startup", action="store_true", help="skip the first-token timing")
    parser.add_argument(
        "--no-compare", action="store_true", help="skip llmkit vs bare at the same dtype (SPEC §7)"
    )
    parser.add_argument(
        "--no-load", action="store_true", help="skip the cached .gguf vs safetensors load timing"
    )
    parser.add_argument(
        "--variants", action="store_true", help="also bfloat16, static cache, torch.compile"
    )
    args = parser.parse_args()

    import torch

    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.generation.batching import eos_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    from llmkit.core.loading import quiet_deepspeed

    quiet_deepspeed()  # as llmkit's commands: no DeepSpeed line when saving the tiny model
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        name = args.model
    elif args.gguf:
        if not GGUF.exists():
            sys.exit(f"{GGUF} is absent")
        name = str(GGUF)
    else:
        name = str(tiny_model(Path(tmp.name) / "tiny-gpt2"))
    default_threads = torch.get_num_threads()
    if not args.threads:
        from llmkit.runtime import apply_threads

        apply_threads(None)  # what `llmkit generate` does before loading
    start = time.perf_counter()
    model, tok, _ = load_model_and_tokenizer(name, device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - start
    fp32_model, choice = model, f"--dtype {args.dtype}"
    if args.dtype == "auto":  # what generate/chat/serve do after loading on a CPU
        from llmkit.generation.cpu_path import auto_cpu_path

        model, decided = auto_cpu_path(model, tok, "auto")
        choice = decided.reason if decided is not None else "float32 (not calibrated)"
    if model.dtype != torch.float32:  # bare float32 needs its own copy
        fp32_model, _, _ = load_model_and_tokenizer(name, device="cpu", dtype="float32")
    auto_threads = torch.get_num_threads()  # llmkit's choice for the load (--threads: that)
    eos = set(eos_ids(model, tok))
    print(
        f"model {name} ({str(model.dtype)[6:]}, {torch.get_num_threads()} threads), "
        f"load {load_s:.1f} s"
    )
    if not args.no_compare:
        compare(model, tok, eos, args.max_new_tokens, args.rounds)
    auto_vs_bare(
        model,
        fp32_model,
        tok,
        eos,
        choice,
        default_threads,
        auto_threads,
        args.max_new_tokens,
        args.rounds,
    )
    if name.endswith(".gguf"):
        llama_cpp_compare(model, tok, name, args.max_new_tokens, args.rounds)
    if not args.no_load:
        load_compare(name, args.rounds)
    if args.variants:
        del model
        variants(name, args.max_new_tokens, args.rounds)
    if not args.no_startup:
        startup(name, args.dtype, args.rounds, args.threads)


if __name__ == "__main__":
    main()
