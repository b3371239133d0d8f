"""``llmkit serve`` in process: which requests share a batch, request validation, and a fault
while generating (a 500 before the stream starts, an error event after it)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="llmkit serve needs the serve extra (starlette)")

from llmkit.serve.schemas import ApiError, Sampling, parse_chat, parse_completion  # noqa: E402


def test_only_compatible_requests_share_a_batch(tiny_model_dir):
    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.serve.worker import BatchWorker, Job, QueueFull, Row

    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    worker = BatchWorker(model, tok, max_batch_size=3, max_queue=7, batch_wait=0, log=None)

    def job(name, n=1, **sampling):
        j = Job(rows=[Row([1, 2], 4, []) for _ in range(n)], sampling=Sampling(**sampling))
        j.name = name
        return j

    jobs = [
        job("greedy-a", temperature=0),
        job("hot-b", temperature=0.7),
        job("greedy-c", temperature=0, seed=5),  # a seed changes nothing under greedy decoding
        job("seeded-d", temperature=0.7, seed=1),
        job("hot-e", temperature=0.7),
        job("greedy-f", n=2, temperature=0),  # 2 rows: over the batch of 3 with a and c
        job("warm-g", temperature=0.7, top_p=0.9),
    ]
    for j in jobs:
        worker.submit(j)
    with pytest.raises(QueueFull) as full:
        worker.submit(job("one-too-many", temperature=0))
    assert full.value.status == 503 and int(full.value.headers["Retry-After"]) >= 1
    batches = []
    while worker.queued():
        batches.append([j.name for j in worker._next_batch()])
    assert batches == [
        ["greedy-a", "greedy-c"],
        ["hot-b", "hot-e"],
        ["seeded-d"],
        ["greedy-f"],
        ["warm-g"],
    ]


@pytest.mark.parametrize("announced", [True, False])
def test_a_batch_waits_for_requests_still_being_prepared(tiny_model_dir, announced):
    """With a 50 ms gap, a request submitted 200 ms after the first joins its batch only when
    it was announced (being parsed and tokenized) meanwhile; the wait is at most 10 gaps."""
    import threading
    import time

    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.serve.worker import BatchWorker, Job, Row

    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    worker = BatchWorker(model, tok, max_batch_size=8, batch_wait=0.05, log=None)

    def job():
        return Job(rows=[Row([1, 2], 4, [])], sampling=Sampling(temperature=0))

    first, late = job(), job()
    worker.submit(first)
    if announced:
        worker.expect()
    got = {}
    t = threading.Thread(target=lambda: got.update(batch=worker._next_batch()))
    t0 = time.monotonic()
    t.start()
    time.sleep(0.2)
    worker.submit(late)
    if announced:
        worker.unexpect()
    t.join(5)
    assert got["batch"] == ([first, late] if announced else [first])
    assert time.monotonic() - t0 < 0.5 + 0.2  # never more than 10 × 50 ms of gathering


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": "s"}, "seed"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
        (
            {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1},
            "presence_penalty",
        ),
    ],
)
def test_chat_validation_names_the_field(body, param):
    with pytest.raises(ApiError) as info:
        parse_chat(body, max_n=8)
    assert (info.value.status, info.value.param) == (400, param)


def test_chat_parsing_keeps_what_was_asked():
    p = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_tokens": 9,
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 2,
            "seed": 3,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert p.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert (p.max_tokens, p.max_tokens_param) == (7, "max_completion_tokens")
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.seed, p.n) == (0.5, 0.9, 3, 2)
    assert p.stop == ["\n"] and p.stream and p.include_usage
    tiny = parse_chat({"messages": [{"role": "user", "content": "x"}], "temperature": 1e-6})
    assert tiny.sampling.greedy and tiny.sampling.batch_key() == ("greedy",)


def test_completion_prompts():
    assert parse_completion({"prompt": "a"}).prompts == ["a"]
    assert parse_completion({"prompt": [5, 6]}).prompts == [[5, 6]]
    assert parse_completion({"prompt": ["a", [7]]}).prompts == ["a", [7]]
    for bad in ({}, {"prompt": 3}, {"prompt": []}, {"prompt": [["x"]]}):
        with pytest.raises(ApiError) as info:
            parse_completion(bad)
        assert info.value.param == "prompt"
    with pytest.raises(ApiError) as info:
        parse_completion({"prompt": ["a", "b", "c"], "n": 3}, max_n=8)
    assert info.value.param == "n"


@pytest.fixture(scope="module")
def faulty_app(tmp_path_factory, tiny_tokenizer):
    """The app on a loaded tiny chat model whose ``generate`` fails: at once for a prompt that
    says "fail now", after streaming one token ("e") for one that says "fail later"."""
    import torch
    from serve_helpers import tiny_chat_model
    from starlette.testclient import TestClient

    from llmkit.serve.app import ServerState, build_app

    model_dir = tiny_chat_model(tiny_tokenizer, tmp_path_factory.mktemp("faulty"), 256)
    state = ServerState(str(model_dir), threads=1, log=None)
    state.load()
    assert state.ready.is_set(), state.error
    real = state.model.generate
    tok = state.tokenizer
    now, later = (tok("fail now")["input_ids"], tok("fail later")["input_ids"])
    e = tok.convert_tokens_to_ids("e")

    def contains(row, part):
        return any(row[i : i + len(part)] == part for i in range(len(row)))

    def generate(*args, **kwargs):
        ids = kwargs["input_ids"]
        row = ids[0].tolist()
        if contains(row, now):
            raise RuntimeError("the accelerator fell over")
        if contains(row, later):
            kwargs["stopping_criteria"][0](torch.cat([ids, torch.full_like(ids[:, :1], e)], 1))
            raise RuntimeError("the accelerator fell over")
        return real(*args, **kwargs)

    state.model.generate = generate
    with TestClient(build_app(state)) as client:
        yield client
    state.worker.shutdown()


def chat(text, **extra):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 3, "temperature": 0,
            **extra}  # fmt: skip


def test_a_fault_before_any_text_is_a_plain_500(faulty_app):
    assert faulty_app.post("/v1/chat/completions", json=chat("hi")).status_code == 200
    for body in (chat("fail now"), chat("fail now", stream=True), chat("fail later")):
        res = faulty_app.post("/v1/chat/completions", json=body)
        assert res.status_code == 500, body
        err = res.json()["error"]
        assert err["type"] == "server_error" and "fell over" in err["message"]
    assert faulty_app.post("/v1/chat/completions", json=chat("hi")).status_code == 200  # still up


def test_a_fault_after_the_stream_started_is_an_error_event(faulty_app):
    with faulty_app.stream(
        "POST", "/v1/chat/completions", json=chat("fail later", stream=True)
    ) as res:
        assert res.status_code == 200
        events = [line[6:] for line in res.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[1]["choices"][0]["delta"]["content"] == "e"
    assert "error" in chunks[-1] and chunks[-1]["error"]["type"] == "server_error"
    assert all("error" not in c for c in chunks[:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])  # no false finish


@pytest.mark.parametrize(
    "extra",
    [
        {"seed": 2**70},
        {"temperature": 1e-300},
        {"seed": -(2**70)},
        {"max_tokens": 10**30},
        {"max_tokens": 1e3},
        {"n": 2**40},
        {"top_k": 10**30},
        {"stop": None, "n": None, "temperature": None, "seed": None},
        {"stream_options": []},
        {"stream_options": {"include_usage": "yes"}},
        {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user", "content": {"text": "x"}}]},
        {"messages": [["user", "x"]]},
        {"messages": [{"role": ["user"], "content": "x"}]},
        {"logit_bias": {"5": 100}},
        {"response_format": {"type": "json_object"}},
    ],
)
def test_odd_requests_are_never_a_500(faulty_app, extra):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    res = faulty_app.post("/v1/chat/completions", json=body)
    assert res.status_code in (200, 400), res.text
    if res.status_code == 400:
        assert res.json()["error"]["type"] == "invalid_request_error"


def test_odd_completion_requests_are_never_a_500(faulty_app):
    for body in (
        {"prompt": [10**12], "max_tokens": 2},
        {"prompt": [-1], "max_tokens": 2},
        {"prompt": "", "max_tokens": 2},
        {"prompt": ["a", ""], "max_tokens": 2},
        {"prompt": "x", "echo": True},
        {"prompt": "x", "best_of": 3},
    ):
        res = faulty_app.post("/v1/completions", json=body)
        assert res.status_code in (200, 400), (body, res.text)


@pytest.mark.parametrize(
    ("raw", "escape"),
    [
        (b'{"prompt": "a\\udcff", "max_tokens": 3}', "\\udcff"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "\\ud800"),
        (b'{"prompt": "a", "stop": ["\\udcff"]}', "\\udcff"),
    ],
)
def test_a_lone_surrogate_escape_is_a_400_not_a_500(raw, escape):
    """Valid JSON, no text: the tokenizer (or the context check's .encode) failed on it and the
    client got a 500 'internal error: surrogates not allowed' with a traceback in the log."""
    from llmkit.serve.schemas import parse_json

    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert info.value.status == 400
    assert info.value.message == (
        f"the request body holds a lone surrogate escape ({escape}), which is not text"
    )


def test_a_request_body_of_text_in_any_script_passes():
    from llmkit.serve.schemas import parse_json

    assert parse_json('{"prompt": "naïve 日本 😀"}'.encode())["prompt"] == "naïve 日本 😀"


def test_a_body_nested_past_the_recursion_limit_is_a_400():
    """json.loads raised RecursionError, which no handler caught: a 500."""
    from llmkit.serve.schemas import parse_json

    with pytest.raises(ApiError) as info:
        parse_json(b'{"prompt": ' + b"[" * 100_000 + b"}")
    assert info.value.status == 400
    assert info.value.message == (
        "the request body is not valid JSON: nested more deeply than the JSON reader allows"
    )
