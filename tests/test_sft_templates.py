"""Chat templates of real model families in fine-tuning data (issue 17): a generation prompt
that is not the rendered answer's start, earlier turns rendered differently once a later turn
exists (Qwen3), a template's own ``{% generation %}`` mask; ShareGPT records; and the same
messages giving the same token ids through ``prepare --format chat``, ``generate --chat`` and
``chat``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import MODELS
from rich.console import Console

import llmkit.data.pipeline as pipeline
from llmkit.core.prepared import load_prepared
from llmkit.data.sft import (
    CHATML,
    IGNORE_INDEX,
    answer_spans,
    conversation_from_record,
    detect_chat_format,
    end_of_turn_token,
    ensure_chat_template,
    render_with_labels,
)
from llmkit.errors import UserError

SUPPORT = Path(__file__).resolve().parents[1] / "examples" / "support"
GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
X = IGNORE_INDEX

TWO_TURNS = [
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "Open Orders in the app."},
    {"role": "user", "content": "And the invoice?"},
    {"role": "assistant", "content": "Tap the order, then Invoice."},
]

#: ChatML whose generation prompt adds a blank line the rendered answer does not have.
CHATML_BLANK_LINE = CHATML.template.replace(
    "'<|im_start|>assistant\\n' }}{% endif %}", "'<|im_start|>assistant\\n\\n' }}{% endif %}"
)

#: Shaped like Qwen3's template: an assistant answer after the last user message is written
#: with a think block (empty when the text has none and it is the last message), an earlier
#: one without it (its text after "</think>" only); the generation prompt is
#: "<|im_start|>assistant\n".
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set answer = m['content'].split('</think>')[-1].lstrip('\\n') -%}"
    "{%- if '</think>' in m['content'] -%}"
    "{%- set thought = m['content'].split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- else -%}{%- set thought = '' -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and (loop.last or thought) -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + answer"
    " + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

#: ChatML with {% generation %} markers around each answer, its end-of-turn token and the
#: newline after it (more than the prefix rule would train: proof the markers are used).
CHATML_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>\\n' }}"
    "{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: SmolLM2-shaped: a default system message when the conversation has none.
WITH_DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful support assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def trained_bpe():
    """A byte-level BPE trained by llmkit on the support answers and questions, ChatML markers
    as special tokens (a fresh copy per test: templates are set on it)."""
    from llmkit.core.tokenizer import train_bpe_tokenizer

    texts = []
    for line in (SUPPORT / "conversations.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return train_bpe_tokenizer(
        iter(texts), vocab_size=400, extra_special_tokens=CHATML.special_tokens
    )


@pytest.fixture()
def bpe(trained_bpe, tmp_path):
    from transformers import AutoTokenizer

    trained_bpe.save_pretrained(str(tmp_path / "base-tok"))
    return AutoTokenizer.from_pretrained(str(tmp_path / "base-tok"))


def trained_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive target tokens (one per trained answer)."""
    runs: list[list[int]] = []
    previous = X
    for token, label in zip(ids, labels, strict=True):
        assert label in (X, token)
        if label != X:
            if previous == X:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


# --------------------------------------------------------------------------- the library
@pytest.mark.parametrize(
    ("template", "answers", "located"),
    [
        (
            CHATML_BLANK_LINE,
            ["Open Orders in the app.<|im_end|>", "Tap the order, then Invoice.<|im_end|>"],
            {"common_prefix": 2},
        ),
        (
            QWEN3_LIKE,
            [
                "Open Orders in the app.<|im_end|>",  # before the last user turn: no think block
                "<think>\n\n</think>\n\nTap the order, then Invoice.<|im_end|>",
            ],
            {"in_rendering": 1, "prefix": 1},
        ),
        (
            CHATML_GENERATION,
            ["Open Orders in the app.<|im_end|>\n", "Tap the order, then Invoice.<|im_end|>\n"],
            {"generation_markers": 2},
        ),
    ],
    ids=["chatml-blank-line", "qwen3-like", "generation-markers"],
)
def test_targets_are_the_answers_the_template_renders(bpe, template, answers, located):
    bpe.chat_template = template
    text = bpe.apply_chat_template(TWO_TURNS, tokenize=False)
    counts: dict[str, int] = {}
    rendered, spans = answer_spans(bpe, TWO_TURNS, located=counts)
    assert rendered == text and counts == located
    assert [text[s:e] for s, e in spans] == answers  # each is where the template wrote it
    ids, labels = render_with_labels(bpe, TWO_TURNS)
    assert ids == bpe.apply_chat_template(TWO_TURNS, tokenize=True)["input_ids"]
    assert trained_runs(bpe, ids, labels) == answers
    assert end_of_turn_token(bpe) == "<|im_end|>"  # the probe no longer fails first


@pytest.mark.parametrize(
    ("messages", "answers", "located"),
    [
        (  # the think block of the earlier answer is dropped once a user turn follows it
            [
                TWO_TURNS[0],
                {"role": "assistant", "content": "<think>\nLook it up.\n</think>\n\nOpen Orders."},
                TWO_TURNS[2],
                {"role": "assistant", "content": "<think>\nInvoice.\n</think>\n\nTap Invoice."},
            ],
            ["Open Orders.<|im_end|>", "<think>\nInvoice.\n</think>\n\nTap Invoice.<|im_end|>"],
            {"in_rendering": 1, "prefix": 1},
        ),
        (  # two answers in a row: the first loses its empty think block once the second follows
            [TWO_TURNS[0], TWO_TURNS[1], TWO_TURNS[3]],
            [
                "Open Orders in the app.<|im_end|>",
                "<think>\n\n</think>\n\nTap the order, then Invoice.<|im_end|>",
            ],
            {"in_rendering": 1, "prompt_text": 1},
        ),
    ],
    ids=["reasoning-in-history", "answers-in-a-row"],
)
def test_qwen3_like_reasoning_and_consecutive_answers(bpe, messages, answers, located):
    bpe.chat_template = QWEN3_LIKE
    counts: dict[str, int] = {}
    text, spans = answer_spans(bpe, messages, located=counts)
    assert counts == located
    assert [text[s:e] for s, e in spans] == answers
    ids, labels = render_with_labels(bpe, messages)
    assert trained_runs(bpe, ids, labels) == answers


def test_generation_markers_give_transformers_assistant_mask(bpe):
    """With {% generation %} markers the labels are exactly transformers' own mask."""
    bpe.chat_template = CHATML_GENERATION
    out = bpe.apply_chat_template(TWO_TURNS, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = render_with_labels(bpe, TWO_TURNS)
    assert ids == out["input_ids"]
    assert labels == [t if m else X for t, m in zip(ids, out["assistant_masks"], strict=True)]
    assert sum(out["assistant_masks"]) > 0


def test_the_old_prefix_rule_is_kept_where_it_applies(bpe):
    """ChatML itself: every answer by the prefix rule, as before issue 17."""
    ensure_chat_template(bpe, "chatml")
    counts: dict[str, int] = {}
    text, spans = answer_spans(bpe, TWO_TURNS, located=counts)
    assert counts == {"prefix": 2}
    assert [text[s:e] for s, e in spans] == [
        "Open Orders in the app.<|im_end|>",
        "Tap the order, then Invoice.<|im_end|>",
    ]


# --------------------------------------------------------------------------- prepare
def prepare(tokenizer, tmp_path: Path, records: list[dict], **kwargs) -> tuple[dict, dict]:
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out"
    kwargs.setdefault("val_fraction", 0.0)
    manifest = pipeline.prepare(
        [str(data)],
        out,
        console=Console(file=io.StringIO(), width=300),
        plot=False,
        block_size=128,
        tokenizer=str(tok_dir),
        num_proc=1,
        format="chat",
        **kwargs,
    )
    return manifest, load_prepared(out)


def conversations_of(row: dict) -> list[tuple[list[int], list[int]]]:
    starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [
        (row["input_ids"][a:b], row["labels"][a:b])
        for a, b in zip(starts, starts[1:], strict=False)
    ]


@pytest.mark.parametrize(
    ("template", "rule"),
    [
        (CHATML_BLANK_LINE, {"common_prefix": 4}),
        (QWEN3_LIKE, {"in_rendering": 2, "prefix": 2}),
        (CHATML_GENERATION, {"generation_markers": 4}),
    ],
    ids=["chatml-blank-line", "qwen3-like", "generation-markers"],
)
def test_prepare_trains_such_templates_and_counts_the_rule(bpe, tmp_path, template, rule):
    """Two two-turn conversations prepare (they were refused before: exit 2 at the end-of-turn
    probe or on the first record); the targets are the rendered answers; the manifest counts
    how each answer was located."""
    bpe.chat_template = template
    second = [
        {"role": "user", "content": "Can I pay by card?"},
        {"role": "assistant", "content": "Yes, in Settings."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    manifest, ds = prepare(bpe, tmp_path, [{"messages": TWO_TURNS}, {"messages": second}])
    assert manifest["chat"]["answers_located"] == rule
    assert manifest["splits"]["train"]["answers_located"] == rule
    assert manifest["splits"]["train"]["conversations_written"] == 2
    found = [
        trained_runs(bpe, ids, labels)
        for row in ds.train
        for ids, labels in conversations_of(row)
        if ids[0] != bpe.pad_token_id
    ]
    expected = []
    for conv in (TWO_TURNS, second):
        text, spans = answer_spans(bpe, conv)
        expected.append([text[s:e] for s, e in spans])
        assert bpe.apply_chat_template(conv, tokenize=True)["input_ids"] in [
            ids for row in ds.train for ids, _ in conversations_of(row)
        ]
    assert sorted(found) == sorted(expected)
    assert all(run.endswith(("<|im_end|>", "<|im_end|>\n")) for runs in found for run in runs)


def test_a_final_answer_that_cannot_be_located_is_one_line(bpe, tmp_path):
    """A template that writes '...' for an assistant answer followed by a user turn: a
    conversation ending on the user turn cannot train its final answer: named, exit 2; skipped
    and counted with --on-error skip while the other conversations are prepared."""
    bpe.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    records = [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:3]}]
    with pytest.raises(UserError, match=r"chats\.jsonl:2: .*final assistant message 1"):
        prepare(bpe, tmp_path, records)
    manifest, _ = prepare(bpe, tmp_path / "skip", records, on_error="skip")
    train = manifest["splits"]["train"]
    assert train["skipped"] == {"template inconsistent": 1}
    assert train["answers_located"] == {"not_trained": 1, "prefix": 1}


# --------------------------------------------------------------------------- ShareGPT
SHAREGPT = {
    "id": "x1",
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Where is my order?"},
        {"from": "gpt", "value": "Open Orders in the app."},
        {"from": "human", "value": "And the invoice?"},
        {"from": "gpt", "value": "Tap the order, then Invoice."},
    ],
}
AS_MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, *TWO_TURNS]}


def test_sharegpt_records_are_the_equivalent_messages(bpe):
    from llmkit.data.readers import is_chat_record

    assert detect_chat_format(SHAREGPT) == "sharegpt"
    assert is_chat_record(SHAREGPT) and not is_chat_record(SHAREGPT | {"text": "a document"})
    share = conversation_from_record(SHAREGPT, where="s:1")
    assert share == AS_MESSAGES["messages"]
    ensure_chat_template(bpe, "chatml")
    assert render_with_labels(bpe, share) == render_with_labels(
        bpe, conversation_from_record(AS_MESSAGES, where="m:1")
    )


def test_sharegpt_prepares_like_messages(bpe, tmp_path):
    ensure_chat_template(bpe, "chatml")
    m1, share = prepare(bpe, tmp_path / "a", [SHAREGPT, SHAREGPT | {"id": "x2"}])
    m2, msgs = prepare(bpe, tmp_path / "b", [AS_MESSAGES, AS_MESSAGES])
    assert m1["inputs"][0]["chat_formats"] == {"sharegpt": 2}
    for column in ("input_ids", "labels", "position_ids"):
        assert list(share.train[column]) == list(msgs.train[column])
    assert len(share.train) > 0


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"from": "bing", "value": "Hi"}], r"s:4: conversations\[0\] has the unknown role 'bing'"),
        ([{"value": "Hi"}], r"s:4: conversations\[0\] has no 'from' role"),
        ([{"from": "human", "value": 3}], r"s:4: conversations\[0\] \(human\) has a value of"),
        ([{"from": "gpt", "value": "Hi"}], r"s:4: the conversation does not start with a user"),
        ("hello", r"s:4: field 'conversations' is str, not a list"),
        ([], r"s:4: field 'conversations' is empty"),
    ],
)
def test_bad_sharegpt_records_are_one_line(turns, message):
    with pytest.raises(UserError, match=message) as err:
        conversation_from_record({"conversations": turns}, where="s:4")
    assert "\n" not in str(err.value)


def test_an_unknown_sharegpt_role_names_the_record_in_prepare(bpe, tmp_path):
    ensure_chat_template(bpe, "chatml")
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "chatgpt", "value": "Yo"}]}
    with pytest.raises(UserError, match=r"chats\.jsonl:2: conversations\[1\] .* 'chatgpt'"):
        prepare(bpe, tmp_path, [SHAREGPT, bad])
    manifest, _ = prepare(bpe, tmp_path / "skip", [SHAREGPT, bad], on_error="skip")
    assert manifest["inputs"][0]["skipped"] == {"bad role": 1}


# --------------------------------------------------------------------------- one rendering
def check_same_token_ids(tokenizer, monkeypatch, system: str | None, default_system: str):
    """The same messages give the same token ids through the functions `prepare --format
    chat` (encode_chat_batch), `generate --chat` (encode_chat of chat_messages) and `chat`
    (ChatSession, two turns, its second prompt holding the first answer) call; the template's
    default system message (``default_system``) is there when none is given."""
    from llmkit.generation import chat as chat_module
    from llmkit.generation.prompts import chat_messages, encode_chat
    from llmkit.generation.settings import GenerationSettings

    head = [{"role": "system", "content": system}] if system else []
    messages = [*head, *TWO_TURNS]
    prepared = pipeline.encode_chat_batch(
        [json.dumps(messages)], ["c:1"], tokenizer, train_on="assistant"
    )
    ids, labels = prepared["input_ids"][0], prepared["labels"][0]
    assert prepared["error"] == [None]
    starts = [t for t in range(len(ids)) if labels[t] != X and (t == 0 or labels[t - 1] == X)]
    assert len(starts) == 2
    assert (default_system in tokenizer.decode(ids)) is (system is None)

    # generate --chat: the prompt of the first answer
    first_prompt = encode_chat(tokenizer, chat_messages(TWO_TURNS[0]["content"], system))
    assert first_prompt == ids[: starts[0]]

    # chat: two turns; the model is replaced by the prepared answers, the prompts recorded
    prompts: list[list[int]] = []
    answers = iter([TWO_TURNS[1]["content"], TWO_TURNS[3]["content"]])

    def fake_complete(model, tokenizer, prompt, settings, *, stream_to, prompt_ids):
        prompts.append(list(prompt_ids))
        return type("Result", (), {"completion": next(answers)})()

    monkeypatch.setattr(chat_module, "complete", fake_complete)
    monkeypatch.setattr(chat_module, "model_max_positions", lambda model: None)
    session = chat_module.ChatSession(None, tokenizer, GenerationSettings(), system=system)
    for turn in (TWO_TURNS[0], TWO_TURNS[2]):
        session.reply(turn["content"], out=io.StringIO(), err=io.StringIO())
    assert prompts == [ids[: starts[0]], ids[: starts[1]]]


@pytest.mark.parametrize("system", [None, "Answer in one sentence."])
def test_prepare_generate_and_chat_give_the_same_token_ids(bpe, monkeypatch, system):
    bpe.chat_template = WITH_DEFAULT_SYSTEM
    check_same_token_ids(bpe, monkeypatch, system, "You are a helpful support assistant.")


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent")
def test_smollm2_prepare_generate_and_chat_give_the_same_token_ids(monkeypatch):
    """SmolLM2-135M-Instruct's own template (a default system message naming SmolLM). Slow:
    reading the GGUF's vocabulary takes about 20 s here."""
    tok = pipeline.load_pretrained_tokenizer(str(GGUF))
    for system in (None, "Answer in one sentence."):
        check_same_token_ids(tok, monkeypatch, system, "named SmolLM")


def test_prepare_cli_takes_a_qwen3_like_tokenizer(bpe, tmp_path):
    """The command that exited 2 at the end-of-turn probe, before reading a record."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    bpe.chat_template = QWEN3_LIKE
    bpe.save_pretrained(str(tmp_path / "tok"))
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": TWO_TURNS}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["prepare", str(data), "-o", str(out), "--tokenizer", str(tmp_path / "tok")]
    args += ["--format", "chat", "--block-size", "64", "--val-fraction", "0", "--no-plot"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["chat"]["answers_located"] == {"in_rendering": 1, "prefix": 1}
    assert manifest["chat"]["end_of_turn"] == "<|im_end|>"
