"""Start and stop ``llmkit serve`` for the tests: a subprocess on 127.0.0.1 (a free port), stopped
by its process id; and a tiny chat model saved from a config (nothing downloaded)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # the tests only ever talk to the loopback address

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_chat_model(tokenizer, out: Path, positions: int = 1024) -> Path:
    """A random 2-layer GPT-2 with ``positions`` positions, saved with ``tokenizer`` and a chat
    template. Its EOS row of the output layer is zero (embeddings untied), so its EOS logit is 0
    while the largest of the other 299 random logits is positive: greedy decoding never ends by
    EOS, and a request runs to its ``max_tokens`` or a stop string — lengths the tests choose."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.lm_head.weight[eos].zero_()
    model.save_pretrained(out)
    tokenizer = copy.deepcopy(tokenizer)  # the fixture's tokenizer is shared: leave it as it is
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def get(url: str, timeout: float = 5.0) -> tuple[int, dict, Any]:
    """``(status, json body, headers)`` of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), err.headers


def post(url: str, body: bytes | dict, timeout: float = 30.0) -> tuple[int, dict, Any]:
    """``(status, json body, headers)`` of a POST of ``body`` (a dict is sent as JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), err.headers


class Server:
    """A running ``llmkit serve``: ``url``, ``pid``, and its log (stderr) on disk."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        self.pid = proc.pid
        self.health_seen: list[tuple[int, dict, Any]] = []
        """Each ``/health`` answer (status, body, headers) seen while waiting for it to be ready."""

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def requests_logged(self, after: int = 0) -> list[dict]:
        """The ``[serve] request`` lines of the log from the ``after``-th on, parsed:
        ``{"id", "batch", "rows", "completion_tokens", "finish", "queued", "seconds"}``."""
        found = []
        pattern = re.compile(
            r"\[serve\] request (\d+) \(batch (\d+), (\d+) rows\): (\d+) prompt \+ "
            r"(\d+) completion tokens, finish (\S+), queued ([\d.]+) s, generated in ([\d.]+) s"
        )
        for m in pattern.finditer(self.log_text()):
            found.append(
                {
                    "id": int(m[1]),
                    "batch": int(m[2]),
                    "rows": int(m[3]),
                    "completion_tokens": int(m[5]),
                    "finish": m[6],
                    "queued": float(m[7]),
                    "seconds": float(m[8]),
                }
            )
        return found[after:]

    def wait_for_log(self, needle: str, timeout: float = 20.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the server log:\n{self.log_text()}")


@contextmanager
def running_server(model: Path | str, log_dir: Path, *args: str, ready_timeout: float = 120.0):
    """Start ``llmkit serve --model model ARGS`` on 127.0.0.1 and a free port (``--port 0``; the
    server says which in its log), wait until
    ``/health`` says 200, yield a :class:`Server`; stop it by its pid (SIGTERM, then SIGKILL)."""
    log = log_dir / f"serve-{time.monotonic_ns()}.log"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "llmkit", "serve", "--model", str(model), "--host", HOST]
    cmd += ["--port", "0", "--threads", "1", *args]  # port 0: the server binds a free one
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    server = Server(proc, "", log)
    try:
        end = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"llmkit serve exited {proc.returncode}:\n{server.log_text()}")
            if not server.url:
                found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", server.log_text())
                if found is None:
                    assert time.monotonic() < end, "llmkit serve never said where it listens"
                    time.sleep(0.05)
                    continue
                server.url = found[1]
            try:
                answer = get(server.url + "/health", timeout=2)
                server.health_seen.append(answer)
                if answer[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"llmkit serve not ready in {ready_timeout} s")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
