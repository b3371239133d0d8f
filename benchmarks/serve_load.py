"""``llmkit serve`` under load: N concurrent streaming clients (1, 8, 16) against a serial
baseline measured in the same run (SPEC §9; target: 8 concurrent clients ≥ 3× the serial
throughput).

    python benchmarks/serve_load.py              # SmolLM2-135M-Instruct (../shared/models)
    python benchmarks/serve_load.py --model DIR  # any model llmkit loads
    python benchmarks/serve_load.py --tiny       # a random GPT-2 built here (no shared files)

The server is started here on 127.0.0.1 (a free port) and stopped by its pid; nothing else is
ever a target. Each client sends ``--requests-per-client`` streamed greedy chat requests back
to back (support questions from ``examples/support``, ``max_tokens`` ``--max-tokens``); a level
is N such clients started together. Reported per level: completion tokens per second of wall
time (all clients together), time to first token (request sent → first content delta) p50 and
p95, and the ratio to the serial baseline.

The serial baseline is the same server with one client sending ``--serial-requests`` requests one
after another: what the server gives when requests never overlap (each a batch of one). Greedy
decoding gives the same answers at every level, so the token counts compare. The run is
``--rounds`` rounds of serial then each level; "× serial" is the median over the rounds of each
level's tokens/s over its own round's serial tokens/s, so that a shared machine's load, which
moves within seconds, weighs on both sides of each ratio alike.

Bounded: at most 16 clients × ``--requests-per-client`` requests of ``--max-tokens`` tokens per
level, and ``--time-limit`` seconds for the whole run (the server is stopped when it is spent).
On a machine shared with other jobs compare the ratios, not the absolute speeds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORT = ROOT / "examples" / "support" / "conversations.jsonl"
HOST = "127.0.0.1"
SYSTEM = "You are Pip, the customer support assistant of Pebblewick. Answer briefly and politely."


def questions() -> list[str]:
    """The first user message of each support conversation (16 different ones)."""
    found = []
    for line in SUPPORT.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        if user not in found:
            found.append(user)
    return found[:16] or ["Where is my order?"]


def tiny_model(out: Path) -> Path:
    """A random GPT-2 (4 layers × 256, 1024 positions), a byte-level BPE and a chat template."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.core.tokenizer import train_bpe_tokenizer

    text = SUPPORT.read_text(encoding="utf-8")
    tok = train_bpe_tokenizer(iter(text.splitlines()), vocab_size=1024)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=1024, n_embd=256, n_layer=4, n_head=4,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def batches_logged(log: Path) -> list[int]:
    """The rows of each batch the server ran so far, in order (from its per-request lines)."""
    sizes: dict[int, int] = {}
    for m in re.finditer(r"\(batch (\d+), (\d+) rows\)", log.read_text()):
        sizes[int(m[1])] = int(m[2])
    return [sizes[b] for b in sorted(sizes)]


def one_request(port: int, question: str, max_tokens: int) -> dict:
    """One streamed chat request: ``{"ttft", "seconds", "tokens", "ok"}``."""
    body = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    res = conn.getresponse()
    ttft, tokens, done = None, 0, False
    if res.status == 200:
        for raw in res:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices") or []:
                if ttft is None and choice.get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    else:
        res.read()
    conn.close()
    seconds = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else seconds, "seconds": seconds, "tokens": tokens,
            "ok": done}  # fmt: skip


def run_level(port: int, clients: int, per_client: int, max_tokens: int, qs: list[str]) -> dict:
    """``clients`` threads, each sending ``per_client`` requests back to back."""
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(per_client):
            out = one_request(port, qs[(c * per_client + r) % len(qs)], max_tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "failed": sum(not r["ok"] for r in results),
        "tokens": tokens,
        "wall": wall,
        "tps": tokens / wall,
        "ttfts": ttfts,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": p95,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model to serve (default: SmolLM2 GGUF, else --tiny)")
    ap.add_argument("--tiny", action="store_true", help="serve a random GPT-2 built here")
    ap.add_argument("--levels", default="1,8,16", help="concurrent clients per level")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--serial-requests", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="serial + levels, this many times")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="server threads (default: free)")
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="server --batch-wait-ms")
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if any(not 1 <= n <= 16 for n in levels):
        ap.error("--levels: between 1 and 16 clients")

    tmp = tempfile.TemporaryDirectory(prefix="llmkit-serve-bench-")
    if args.model:
        model = args.model
    elif GGUF.exists() and not args.tiny:
        model = str(GGUF)
    else:
        model = str(tiny_model(Path(tmp.name) / "tiny"))
    cmd = [sys.executable, "-m", "llmkit", "serve", "--model", model, "--host", HOST]
    cmd += ["--port", "0", "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--max-queue", "64", "--default-max-tokens", str(args.max_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.batch_wait_ms is not None:
        cmd += ["--batch-wait-ms", str(args.batch_wait_ms)]
    log = Path(tmp.name) / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + args.time_limit

    def on_alarm(signum, frame):
        raise TimeoutError(f"the run took more than --time-limit {args.time_limit:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.time_limit))
    try:
        port = None
        while True:  # wait for the port it bound (--port 0: a free one), then /health 200
            if proc.poll() is not None:
                sys.stderr.write(log.read_text())
                raise SystemExit(f"the server exited with status {proc.returncode}")
            if port is None:
                found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
                if found is None:
                    time.sleep(0.05)
                    continue
                port = int(found[1])
            try:
                conn = http.client.HTTPConnection(HOST, port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not get ready in time")
            time.sleep(0.2)
        ready = [x for x in log.read_text().splitlines() if "ready:" in x]
        print(ready[-1] if ready else "[serve] ready")
        qs = questions()
        one_request(port, qs[0], 4)  # warm-up
        serial_name = "serial (1 client, one request at a time)"
        names = [serial_name] + [
            f"{n} concurrent client(s) × {args.requests_per_client}" for n in levels
        ]
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.rounds):  # the levels in turn, each round against its own serial run
            seen = len(batches_logged(log))
            serial = run_level(port, 1, args.serial_requests, args.max_tokens, qs)
            serial["batches"], seen = batches_logged(log)[seen:], len(batches_logged(log))
            serial["ratio"] = 1.0
            runs[serial_name].append(serial)
            for name, n in zip(names[1:], levels, strict=True):
                level = run_level(port, n, args.requests_per_client, args.max_tokens, qs)
                level["batches"], seen = batches_logged(log)[seen:], len(batches_logged(log))
                level["ratio"] = level["tps"] / serial["tps"]
                runs[name].append(level)
    finally:
        signal.alarm(0)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
    print(f"\nmodel {Path(model).name}, max_tokens {args.max_tokens}, greedy, streamed, "
          f"server --max-batch-size {args.max_batch_size}, {args.rounds} rounds")  # fmt: skip
    print(f"| {'run':<42} | req | failed | tokens | wall s | tokens/s | × serial | TTFT p50 s "
          "| TTFT p95 s |")  # fmt: skip
    print("|" + "|".join("-" * w for w in (44, 5, 8, 8, 8, 10, 10, 12, 12)) + "|")
    summary = {}
    for name, rs in runs.items():
        ttfts = sorted(t for r in rs for t in r["ttfts"])
        r = {
            "clients": rs[0]["clients"],
            "requests": sum(x["requests"] for x in rs),
            "failed": sum(x["failed"] for x in rs),
            "tokens": sum(x["tokens"] for x in rs),
            "wall": sum(x["wall"] for x in rs),
            "ratio": statistics.median(x["ratio"] for x in rs),
            "ratios": [x["ratio"] for x in rs],
            "p50": statistics.median(ttfts),
            "p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "batches": [b for x in rs for b in x["batches"]],
        }
        summary[name] = r
        print(
            f"| {name:<42} | {r['requests']:>3} | {r['failed']:>6} | {r['tokens']:>6} | "
            f"{r['wall']:>6.1f} | {r['tokens'] / r['wall']:>8.1f} | {r['ratio']:>8.2f} | "
            f"{r['p50']:>10.2f} | {r['p95']:>10.2f} |"
        )
    print("\n× serial: the median over the rounds of tokens/s ÷ that round's serial tokens/s; "
          "per round: " + "; ".join(
              f"{r['clients']}: " + " ".join(f"{x:.2f}" for x in r["ratios"])
              for r in list(summary.values())[1:]))  # fmt: skip
    print("rows per generate call: " + "; ".join(
        f"{r['clients']} client(s): {' '.join(map(str, r['batches']))}" for r in summary.values()
    ))  # fmt: skip
    eight = next((r for r in list(summary.values())[1:] if r["clients"] == 8), None)
    failed = sum(r["failed"] for r in summary.values())
    if eight is not None:
        verdict = "meets" if eight["ratio"] >= 3 else "MISSES"
        print(
            f"\n8 concurrent clients: {eight['ratio']:.2f}× the serial throughput "
            f"({verdict} the 3× target)"
        )
    if failed:
        print(f"{failed} request(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
