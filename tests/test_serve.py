"""``llmkit serve`` through the real ``openai`` client and raw HTTP, against a server started on
127.0.0.1 by the test (a subprocess, stopped by its pid), serving a tiny random GPT-2 built from
a config with a chat template (see ``serve_helpers.tiny_chat_model``: greedy never ends by EOS,
so each answer's length is the ``max_tokens`` or stop string the test asks for). The chat page
is driven in Debian's headless chromium (skipped, with the reason, when it is absent; ``make
install`` installs it when it can)."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette", reason="llmkit serve needs the serve extra (starlette)")
pytest.importorskip("uvicorn", reason="llmkit serve needs the serve extra (uvicorn)")
openai = pytest.importorskip("openai", reason="the serve tests use the openai client (dev extra)")

from serve_helpers import HOST, get, post, running_server, tiny_chat_model  # noqa: E402

POSITIONS = 1024


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_tokenizer):
    return tiny_chat_model(tiny_tokenizer, tmp_path_factory.mktemp("serve-model"), POSITIONS)


MAX_QUEUE = 8  # = the batch size: 8 concurrent requests never overflow it, a 9th waiting does


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("serve-log")
    with running_server(chat_model_dir, log_dir, "--max-queue", str(MAX_QUEUE)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(chat_model_dir):
    """The same model loaded in this process, to compare with llmkit's own generation."""
    from llmkit.core.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(str(chat_model_dir), device="cpu")
    return model, tok


def ask(max_tokens=12, text="Good morrow", **extra):
    return dict(
        model="tiny",
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        **extra,
    )


def raw_stream(url: str, body: dict) -> tuple[int, bytes]:
    """POST ``body`` and read the whole raw response (status, bytes)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, data


# --- the API through the openai client ------------------------------------------------------


def test_health_is_503_while_loading_then_200(server):
    statuses = [status for status, _, _ in server.health_seen]
    assert statuses[-1] == 200 and 503 in statuses, statuses
    status, body, headers = next(a for a in server.health_seen if a[0] == 503)
    assert body == {"status": "loading"} and int(headers["Retry-After"]) >= 1


def test_a_model_that_does_not_load_ends_the_server_with_one_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "llmkit", "serve", "--model", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_a_busy_port_is_one_line(server):
    import subprocess
    import sys

    port = server.url.rsplit(":", 1)[1]
    res = subprocess.run(
        [sys.executable, "-m", "llmkit", "serve", "--model", "x", "--host", HOST, "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: cannot listen on {HOST}:{port}"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["serve-model0"]
    assert models.data[0].model_extra["context_length"] == POSITIONS
    status, body, _ = get(server.url + "/health")
    assert (status, body["status"]) == (200, "ok")
    assert client.models.retrieve("serve-model0").model_extra["context_length"] == POSITIONS
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.code == "model_not_found"


def test_a_huge_body_is_413_before_it_is_read(server):
    import http.client

    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 * 2**20))
    conn.endheaders()
    conn.send(b'{"messages": ')  # and never the other 64 MiB
    res = conn.getresponse()
    body = json.loads(res.read())
    conn.close()
    assert res.status == 413 and body["error"]["code"] == "request_too_large"


def test_chat_equals_llmkit_generation_and_streams_the_same_text(client, local):
    from llmkit.generation.batching import complete_batch
    from llmkit.generation.prompts import encode_chat
    from llmkit.generation.settings import GenerationSettings

    model, tok = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hail"}]
    res = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=14, temperature=0
    )
    ids = encode_chat(tok, messages)
    (want,) = complete_batch(
        model, tok, ["x"], GenerationSettings(max_new_tokens=14, temperature=0), prompt_ids=[ids]
    )
    choice = res.choices[0]
    assert choice.message.content == want.completion
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert res.usage.prompt_tokens == len(ids)  # the templated prompt's length
    assert res.usage.completion_tokens == 14

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=14,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == 14


def test_raw_stream_ends_with_done(server):
    status, data = raw_stream(server.url, ask(6, stream=True))
    assert status == 200
    assert data.endswith(b"data: [DONE]\n\n")
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    last_chunk = json.loads(events[-2].removeprefix("data: "))
    assert last_chunk["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer_before_it(client):
    full = client.chat.completions.create(**ask(20)).choices[0].message.content
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full.find(full[i : i + 2]) >= 3)
    res = client.chat.completions.create(**ask(20, stop=[stop]))
    assert res.choices[0].message.content == full[: full.find(stop)]
    assert res.choices[0].finish_reason == "stop"
    assert res.usage.completion_tokens < 20


def test_completions_endpoint_equals_llmkit_generate(client, local):
    from llmkit.generation.batching import complete_batch
    from llmkit.generation.settings import GenerationSettings

    model, tok = local
    res = client.completions.create(
        model="tiny", prompt=["ROMEO:", "Wherefore art"], max_tokens=9, temperature=0
    )
    want = complete_batch(
        model, tok, ["ROMEO:", "Wherefore art"], GenerationSettings(max_new_tokens=9, temperature=0)
    )
    assert [c.text for c in res.choices] == [w.completion for w in want]
    assert [c.index for c in res.choices] == [0, 1]
    assert res.usage.prompt_tokens == sum(w.prompt_tokens for w in want)


def test_a_seeded_request_equals_llmkit_generate_with_that_seed(client, local):
    """A seeded request runs in a batch of its own after ``torch.manual_seed(seed)``: its n
    answers are llmkit's ``--seed S --num-return-sequences n`` answers (top_k 0: no limit)."""
    from llmkit.generation.batching import complete_batch
    from llmkit.generation.prompts import encode_chat
    from llmkit.generation.settings import GenerationSettings

    model, tok = local
    messages = [{"role": "user", "content": "Speak"}]
    res = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0.9, top_p=0.95, seed=11, n=2
    )
    settings = GenerationSettings(
        max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=None, seed=11, num_return_sequences=2
    )
    want = complete_batch(model, tok, ["x"], settings, prompt_ids=[encode_chat(tok, messages)])
    assert [c.message.content for c in res.choices] == [w.completion for w in want]


def test_n_choices_and_seed(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    a = client.chat.completions.create(**kw, temperature=1.0, seed=7, n=3)
    b = client.chat.completions.create(**kw, temperature=1.0, seed=7, n=3)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # same seed, same answers
    assert len(set(texts)) > 1  # three samples, not one repeated
    assert a.usage.completion_tokens == 24


# --- batching ------------------------------------------------------------------------------


def test_eight_concurrent_greedy_requests_equal_the_same_one_by_one(client, server):
    prompts = [
        "Good morrow",
        "What say you",
        "O",
        "Speak, my lord, speak",
        "Alas",
        "Now",
        "Is it so",
        "Go",
    ]
    limits = [5, 17, 9, 12, 3, 20, 8, 14]

    def one(i):
        res = client.chat.completions.create(
            **ask(limits[i], prompts[i]), extra_body={"return_token_ids": True}
        )
        return res.choices[0].model_extra["token_ids"], res.choices[0].message.content

    alone = [one(i) for i in range(8)]
    before = len(server.requests_logged())
    start = threading.Barrier(8)

    def together(i):
        start.wait()
        return one(i)

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(together, range(8)))
    assert batched == alone
    assert [len(ids) for ids, _ in batched] == limits
    # they really ran together: fewer generate calls than requests
    logged = server.requests_logged(before)
    assert len(logged) == 8
    assert len({r["batch"] for r in logged}) < 8, logged
    assert max(r["rows"] for r in logged) > 1


# --- bad requests: OpenAI's envelope with the field at fault -------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body=body, cast_to=object)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


def test_malformed_json_is_400(server):
    status, body, _ = post(server.url + "/v1/chat/completions", b'{"messages": [')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    status, body, _ = post(server.url + "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]


@pytest.mark.parametrize("words", [300, 200_000])
def test_context_overflow_is_400_before_generating(client, server, words):
    text = "speak " * words
    before = server.log_text().count("[serve] request")
    t0 = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**ask(900, text))
    took = time.perf_counter() - t0
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    assert f"{POSITIONS} tokens" in info.value.message
    assert took < 1.0, f"answered in {took:.2f} s"
    assert server.log_text().count("[serve] request") == before  # nothing was generated


def test_prompt_plus_max_tokens_just_fits(client):
    ids = [(7 * i) % 250 + 5 for i in range(POSITIONS - 3)]  # token ids as the prompt
    res = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert res.usage.prompt_tokens + res.usage.completion_tokens == POSITIONS
    assert res.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "prompt")
    assert f"{POSITIONS - 3} in the prompt, 4 in max_tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # no max_tokens and no room left
        client.completions.create(model="tiny", prompt=ids + [5, 6, 7], temperature=0)
    assert info.value.code == "context_length_exceeded"


def test_unknown_path_and_method_use_the_envelope(server):
    status, body, _ = get(server.url + "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_the_page_is_served_without_external_assets(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    for needed in ('id="system"', 'id="input"', 'id="send"', 'id="reset"', "/v1/chat/completions"):
        assert needed in html
    assert "http://" not in html and "https://" not in html and "src=" not in html


# --- a bounded queue, and clients that leave ----------------------------------------------


class OpenStream:
    """A streamed chat request read event by event over a raw connection, closed at will."""

    def __init__(self, url: str, body: dict):
        self.conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        self.conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        self.res = self.conn.getresponse()
        assert self.res.status == 200

    def event(self) -> str:
        while True:
            line = self.res.fp.readline().decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                return line[6:].strip()

    def close(self) -> None:
        self.res.close()
        self.conn.close()


def send_and_keep(url: str, body: dict):
    """Send a chat request on a raw socket and return the socket (closing it = leaving)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def test_queue_full_is_503_with_retry_after(server):
    """A long request runs; 8 more wait behind its batch (the queue's bound); a 9th is refused
    with 503 and Retry-After; one waiting client leaves and its place is freed at once; once
    the long one's client leaves too, the 7 others are served and the one that left never ran."""
    long = OpenStream(server.url, ask(1000, "Long", stream=True))
    answers = []
    try:
        for _ in range(3):
            long.event()  # it is generating
        leaver = send_and_keep(server.url, ask(50, "I will not wait", stream=True))
        waiting = [
            threading.Thread(
                target=lambda i=i: answers.append(
                    post(server.url + "/v1/chat/completions", ask(2 + i % 3, f"Wait {i}"))
                )
            )
            for i in range(MAX_QUEUE - 1)
        ]
        for t in waiting:
            t.start()
        end = time.monotonic() + 20
        while get(server.url + "/health")[1].get("queued") != MAX_QUEUE:
            assert time.monotonic() < end, "the waiting requests never all queued"
            time.sleep(0.02)
        refused = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            refused.chat.completions.create(**ask(4))
        assert info.value.status_code == 503
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "queue_full"
        assert info.value.body["type"] == "server_error"
        leaver.close()  # its place in the queue is freed at once, before the worker gets to it
        server.wait_for_log("cancelled before it started")
        assert get(server.url + "/health")[1]["queued"] == MAX_QUEUE - 1
    finally:
        long.close()
    for t in waiting:
        t.join(60)
    assert sorted(status for status, _, _ in answers) == [200] * (MAX_QUEUE - 1)
    assert sorted(b["usage"]["completion_tokens"] for _, b, _ in answers) == sorted(
        2 + i % 3 for i in range(MAX_QUEUE - 1)
    )
    assert "cancelled before it started" in server.wait_for_log("cancelled before it started")
    assert not any(r["completion_tokens"] == 50 for r in server.requests_logged())


def test_disconnect_after_three_chunks_cancels_and_does_not_delay_the_next(server):
    before = len(server.requests_logged())
    stream = OpenStream(server.url, ask(1000, "Leave early", stream=True))
    for _ in range(3):
        stream.event()
    stream.close()
    t0 = time.perf_counter()
    status, body, _ = post(server.url + "/v1/chat/completions", ask(4, "Next"))
    took = time.perf_counter() - t0
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    left, nxt = server.requests_logged(before)
    assert left["finish"] == "cancelled"
    assert left["completion_tokens"] < 100, left  # stopped far below its limit of 1000
    full = left["seconds"] / max(left["completion_tokens"], 1) * 1000  # its whole run, estimated
    assert nxt["queued"] < full / 4 and took < full / 2, (left, nxt, took)


# --- the chat page in a real headless browser ----------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's chromium, headless, driven by selenium through chromedriver."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_streams_an_answer_and_resets(server, browser):
    """Type a question, see the answer grow while it streams and end equal to the API's answer
    for the same conversation; reset clears the conversation and keeps the system prompt."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    max_tokens = 400  # long enough to watch it grow
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.01)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    assert f"context {POSITIONS}" in browser.find_element(By.ID, "model").text

    browser.find_element(By.ID, "system").send_keys("Be brief.")
    mt = browser.find_element(By.ID, "max_tokens")
    mt.clear()
    mt.send_keys(str(max_tokens))
    browser.find_element(By.ID, "input").send_keys("Good morrow")
    browser.find_element(By.ID, "send").click()

    # the answer grows while it streams: several distinct lengths seen before it is done
    lengths = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        msgs = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if msgs:
            text = msgs[-1].find_element(By.CLASS_NAME, "text").get_attribute("textContent")
            if not lengths or lengths[-1] != len(text):
                lengths.append(len(text))
            if msgs[-1].get_attribute("data-state") == "done":
                break
        time.sleep(0.005)
    msg = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert msg.get_attribute("data-state") == "done"
    assert msg.get_attribute("data-finish") == "length"
    shown = msg.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
    assert len([n for n in lengths if 0 < n < len(shown)]) >= 2, lengths  # seen mid-stream

    # the page shows what the API answers for the same conversation
    status, body, _ = post(
        server.url + "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Good morrow"},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    assert status == 200
    assert shown == body["choices"][0]["message"]["content"]
    users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.find_element(By.CLASS_NAME, "text").text for u in users] == ["Good morrow"]

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert browser.execute_script("return conversation.length") == 0  # the conversation is gone
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Be brief."


# --- a real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_equals_llmkit_generate_chat(tmp_path):
    """SmolLM2-135M-Instruct (GGUF) served: a greedy chat completion through the openai client
    equals ``llmkit generate --chat`` with the same settings, and stops at ``<|im_end|>``."""
    import subprocess
    import sys

    from conftest import MODELS

    gguf = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip(f"{gguf} is absent (the shared models live in ../shared/models)")
    pytest.importorskip("gguf", reason="reading a .gguf needs the gguf package")
    system = "You are Pip, the customer support assistant of Pebblewick. Answer briefly."
    question = "Where can I update my account password?"
    with running_server(gguf, tmp_path, ready_timeout=300) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)
        res = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=48,
            temperature=0,
        )
    cli = subprocess.run(
        [sys.executable, "-m", "llmkit", "generate", "--model", str(gguf), "--chat"]
        + ["--system", system, "--temperature", "0", "--max-new-tokens", "48", "--json", question],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout.strip().splitlines()[-1])
    assert res.choices[0].message.content == want["completion"]
    assert res.usage.prompt_tokens == want["prompt_tokens"]
    assert res.usage.completion_tokens == want["new_tokens"]
    reason = {"eos": "stop", "stop": "stop", "length": "length"}[want["finish_reason"]]
    assert res.choices[0].finish_reason == reason
    assert len(res.choices[0].message.content) > 10
