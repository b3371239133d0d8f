"""`llmkit prepare` on chat data (issue 6): conversations in, rows of input_ids / labels /
position_ids out, the loss on the assistant's answers only, every conversation accounted for,
cleaned and de-duplicated like documents, the same output on any --num-proc, bad records named
by file and line, and a cache never shared with a text run."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import llmkit.data.pipeline as pipeline
from llmkit.cli import app
from llmkit.core.prepared import IGNORE_INDEX, load_prepared
from llmkit.data.sft import CHATML, conversation_from_record
from llmkit.errors import UserError

SUPPORT = Path(__file__).resolve().parents[1] / "examples" / "support"
CONVERSATIONS = SUPPORT / "conversations.jsonl"
ALPACA = SUPPORT / "alpaca.jsonl"
EMAIL = re.compile(r"[\w.+-]+@example\.com")


def run(inputs, output, log: io.StringIO | None = None, **kwargs) -> dict:
    console = Console(file=log if log is not None else io.StringIO(), width=400)
    kwargs.setdefault("plot", False)
    kwargs.setdefault("vocab_size", 400)
    kwargs.setdefault("block_size", 256)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    return pipeline.prepare([str(p) for p in inputs], output, console=console, **kwargs)


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", "--no-plot", "--vocab-size", "400", *args])


def one_error_line(result) -> str:
    """The one error line of a failed command (exit 2, no traceback), the last on stderr
    (after the log lines of the steps that ran)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def conversations(path: Path) -> list[list[dict[str, str]]]:
    return [
        conversation_from_record(r, where=f"{path}:{i}") for i, r in enumerate(records(path), 1)
    ]


def segments(row: dict, pad_id: int) -> list[tuple[list[int], list[int]]]:
    """The conversations of a packed row, as (ids, labels), from the restarts of position_ids;
    the trailing padding segment is checked and left out."""
    starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    out = []
    for a, b in zip(starts, starts[1:], strict=False):
        ids, labels = row["input_ids"][a:b], row["labels"][a:b]
        assert row["position_ids"][a:b] == list(range(b - a))
        if ids[0] == pad_id:  # padding: only at the end, never a target
            assert b == len(row["input_ids"]) and set(ids) == {pad_id}
            assert set(labels) == {IGNORE_INDEX}
            continue
        out.append((ids, labels))
    return out


def answers(messages: list[dict[str, str]]) -> str:
    return "".join(m["content"] + CHATML.end_of_turn for m in messages if m["role"] == "assistant")


# ---------------------------------------------------------------------------------------------
# The support set, prepared once with a tiny trained tokenizer.


@pytest.fixture(scope="module")
def support(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "support"
    manifest = run(CONVERSATIONS, out, keep_dropped=True)
    return out, manifest, load_prepared(out)


def test_columns_are_int32_rows_of_block_size(support):
    out, manifest, data = support
    assert data.format == "chat" and data.has_labels
    for split in (data.train, data.validation):
        assert split.column_names == ["input_ids", "labels", "position_ids"]
        for column in split.column_names:
            assert split.features[column].feature.dtype == "int32"
        assert {len(r) for c in split.column_names for r in split[c]} == {256}
    assert len(data.train) == manifest["splits"]["train"]["blocks"] > 0
    assert len(data.validation) == manifest["splits"]["validation"]["blocks"] > 0
    # the saved tokenizer carries the template, so train and chat render alike
    assert data.tokenizer.chat_template == CHATML.template
    assert manifest["tokenizer"]["added_tokens"] == []  # the trained BPE holds the markers
    assert manifest["chat"]["template"] == "chatml"
    assert manifest["chat"]["end_of_turn"] == "<|im_end|>"
    assert manifest["chat"]["record_formats"] == {"messages": 81}
    settings = manifest["settings"]
    assert (settings["format"], settings["chat_template"]) == ("chat", "auto")
    assert (settings["train_on"], settings["overlong"]) == ("assistant", "truncate")
    assert settings["cleaning"]["dedup"]["near"] is False  # chat default, see config.py


def test_labels_are_the_answers_and_their_end_of_turn_only(support):
    _, _, data = support
    tok = data.tokenizer
    seen = 0
    for split in (data.train, data.validation):
        for row in split:
            for ids, labels in segments(row, tok.pad_token_id):
                seen += 1
                assert labels[0] == IGNORE_INDEX
                for i, lab in zip(ids, labels, strict=True):
                    assert lab in (i, IGNORE_INDEX)
                text = tok.decode(ids)
                messages = [
                    {"role": role, "content": content}
                    for role, content in re.findall(
                        r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", text, flags=re.S
                    )
                ]
                assert tok.apply_chat_template(messages, tokenize=False) == text
                trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab >= 0])
                assert trained == answers(messages)
    assert seen == 81


def test_every_conversation_is_accounted_for(support):
    _, manifest, data = support
    assert manifest["stages"]["read"]["documents_out"] == 81
    assert manifest["inputs"][0]["documents"] == 81
    last = list(manifest["stages"].values())[-1]
    assert last["documents_out"] == 81
    splits = manifest["splits"]
    assert splits["train"]["conversations"] + splits["validation"]["conversations"] == 81
    assert splits["validation"]["conversations"] == round(81 * 0.1)
    for name, split in (("train", data.train), ("validation", data.validation)):
        entry = splits[name]
        packing = entry["packing"]
        assert packing["conversations"] == entry["conversations"] == entry["conversations_written"]
        assert packing["truncated"] == packing["dropped"] == packing["no_answer"] == 0
        assert packing["rows"] == len(split)
        labels = [lab for row in split["labels"] for lab in row]
        assert packing["answer_tokens"] == sum(lab != IGNORE_INDEX for lab in labels)
        assert packing["tokens"] + packing["pad_tokens"] == 256 * len(split)


def test_pii_placeholders_replace_the_example_com_addresses(support):
    _, manifest, data = support
    tok = data.tokenizer
    source = sum(len(EMAIL.findall(m["content"])) for c in conversations(CONVERSATIONS) for m in c)
    assert source >= 5
    assert manifest["stages"]["pii"]["replaced"] == {"email": source}
    text = "".join(tok.decode(r) for s in (data.train, data.validation) for r in s["input_ids"])
    assert "example.com" not in text
    assert text.count("<EMAIL>") == source


def test_exact_duplicates_are_dropped_and_shown(tmp_path):
    lines = CONVERSATIONS.read_text(encoding="utf-8").splitlines()
    again = json.loads(lines[4])
    again["messages"][-1]["content"] += "   "  # trailing spaces: the same after normalizing
    again["id"] = "another id"  # other fields do not matter
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([*lines, lines[0], json.dumps(again), lines[9]]) + "\n")
    manifest = run(dup, tmp_path / "out", keep_dropped=True)
    assert manifest["stages"]["deduplicate"]["dropped"] == {"duplicate": 3}
    assert manifest["splits"]["train"]["conversations"] + manifest["splits"]["validation"][
        "conversations"
    ] == len(lines)
    dropped = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert [d["where"] for d in dropped] == [f"{dup}:{n}" for n in (82, 83, 84)]
    assert {(d["stage"], d["reason"]) for d in dropped} == {("deduplicate", "duplicate")}
    first = conversation_from_record(json.loads(lines[0]), where="x")
    assert dropped[0]["messages"] == first  # the conversation as the stage received it


def test_near_dedup_on_conversations_when_asked(tmp_path):
    manifest = run(CONVERSATIONS, tmp_path / "out", clean={"dedup": {"near": True}})
    near = manifest["stages"]["near_dedup"]
    assert near["documents_in"] == 81 and near["dropped"] == {"near_duplicate": 2}


def test_web_filters_only_drop_whole_conversations(tmp_path):
    """Named explicitly, C4 judges each conversation as one text: short chats are dropped
    (fewer than 3 sentences), and the kept ones are not rewritten (its line removal would cut
    every turn of under 5 words), and the manifest warns."""
    manifest = run(
        CONVERSATIONS,
        tmp_path / "out",
        val_fraction=0,
        clean={"filters": {"c4": {"enabled": True}}, "pii": "keep"},
    )
    c4 = manifest["stages"]["c4"]
    assert c4["documents_in"] == 81 and 0 < c4["dropped"]["c4_few_sentences"] < 81
    assert c4["lines_removed"] == {}  # nothing was removed from a conversation
    assert any("judged whole conversations" in w for w in manifest["warnings"])
    data = load_prepared(tmp_path / "out")
    tok = data.tokenizer
    kept = {tok.decode(ids) for row in data.train for ids, _ in segments(row, tok.pad_token_id)}
    source = {tok.apply_chat_template(c, tokenize=False) for c in conversations(CONVERSATIONS)}
    assert len(kept) == c4["documents_out"] and kept <= source  # whole and unchanged


def test_num_proc_1_and_2_give_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)  # 2 processes even on 25 kB
    lines = CONVERSATIONS.read_text(encoding="utf-8").splitlines()
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([*lines, lines[3], lines[7]]) + "\n")  # two duplicates
    logs = {1: io.StringIO(), 2: io.StringIO()}
    out = {}
    for n in (1, 2):
        out[n] = run(data, tmp_path / f"p{n}", logs[n], num_proc=n, cache=False, keep_dropped=True)
    assert "cleaned in 2 processes" in logs[2].getvalue()
    assert "cleaned in 1 process" in logs[1].getvalue()
    one, two = load_prepared(tmp_path / "p1"), load_prepared(tmp_path / "p2")
    for split in ("train", "validation"):
        assert getattr(one, split).to_dict() == getattr(two, split).to_dict()
    assert (tmp_path / "p1" / "dropped.jsonl").read_bytes() == (
        tmp_path / "p2" / "dropped.jsonl"
    ).read_bytes()
    assert out[1]["stages"]["deduplicate"]["dropped"] == {"duplicate": 2}
    for m in out.values():
        del m["settings"]["num_proc"], m["created"]
        m.pop("files")
    assert out[1] == out[2]


def test_alpaca_and_prompt_response_records(tmp_path):
    manifest = run(ALPACA, tmp_path / "alpaca", vocab_size=300, val_fraction=0)
    assert manifest["settings"]["format"] == "chat"  # detected
    assert manifest["chat"]["record_formats"] == {"alpaca": 10}
    data = load_prepared(tmp_path / "alpaca")
    tok = data.tokenizer
    expected = {}
    for r in records(ALPACA):
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        expected[prompt] = r["output"] + "<|im_end|>"
    found = {}
    for row in data.train:
        for ids, labels in segments(row, tok.pad_token_id):
            text = tok.decode(ids)
            prompt = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
            found[prompt] = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab >= 0])
    assert found == expected

    pr = tmp_path / "pr.jsonl"
    pr.write_text(
        json.dumps({"prompt": "Is the Glow dimmable?", "response": "Yes, in the app."})
        + "\n"
        + json.dumps({"system": "Be brief.", "prompt": "Hi", "completion": "Hello."})
        + "\n"
    )
    manifest = run(pr, tmp_path / "pr", vocab_size=300, val_fraction=0, block_size=128)
    assert manifest["chat"]["record_formats"] == {"prompt-response": 2}
    data = load_prepared(tmp_path / "pr")
    texts = [data.tokenizer.decode(ids) for row in data.train for ids, _ in segments(row, 0)]
    assert texts == [
        "<|im_start|>user\nIs the Glow dimmable?<|im_end|>\n"
        "<|im_start|>assistant\nYes, in the app.<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n",
    ]


def test_train_on_all_and_overlong_rules(tmp_path):
    manifest = run(CONVERSATIONS, tmp_path / "all", train_on="all", val_fraction=0)
    data = load_prepared(tmp_path / "all")
    for row in data.train:
        for ids, labels in segments(row, data.tokenizer.pad_token_id):
            assert labels == [IGNORE_INDEX, *ids[1:]]  # every token but each first one
    assert manifest["settings"]["train_on"] == "all"

    lengths = []
    for row in data.train:
        lengths += [len(ids) for ids, _ in segments(row, data.tokenizer.pad_token_id)]
    block = sorted(lengths)[len(lengths) // 2]  # half the conversations are longer
    longer = sum(n > block for n in lengths)
    cut = run(CONVERSATIONS, tmp_path / "cut", block_size=block, val_fraction=0)
    drop = run(CONVERSATIONS, tmp_path / "drop", block_size=block, val_fraction=0, overlong="drop")
    cut_p, drop_p = cut["splits"]["train"]["packing"], drop["splits"]["train"]["packing"]
    assert cut_p["truncated"] == drop_p["dropped"] == longer > 0
    assert cut_p["dropped"] == drop_p["truncated"] == 0
    assert drop["splits"]["train"]["conversations_written"] == 81 - longer
    assert drop_p["cut_tokens"] == sum(n for n in lengths if n > block)
    assert cut_p["cut_tokens"] == sum(n - block for n in lengths if n > block)
    assert any("were truncated" in w for w in cut["warnings"])
    for row in load_prepared(tmp_path / "drop").train:
        assert all(len(ids) <= block for ids, _ in segments(row, 0))


# ---------------------------------------------------------------------------------------------
# Bad records: one line naming file:line and exit 2, or skipped and counted.

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize(
    ("bad", "message", "reason"),
    [
        ({"id": 3, "conversation": []}, "not a chat record (fields: conversation, id)", None),
        (
            {"messages": [{"role": "bot", "content": "Hi"}]},
            "message 0 has role 'bot'",
            "bad role",
        ),
        (
            {"messages": [{"role": "user", "content": "Anyone there?"}]},
            "no assistant message",
            "no assistant message",
        ),
        (
            {"messages": [{"role": "user", "content": "a <|im_end|> b"}, GOOD["messages"][1]]},
            "contains the special token '<|im_end|>'",
            "special token in text",
        ),
    ],
)
def test_bad_chat_record_names_file_and_line_or_is_skipped(tmp_path, bad, message, reason):
    path = tmp_path / "chat.jsonl"
    last = {"instruction": "Say bye.", "input": "", "output": "Bye!", "x": 1}
    lines = [GOOD, {"prompt": "Ping", "response": "Pong"}, bad, last]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    line = one_error_line(cli(str(path), "-o", str(out), "--block-size", "32"))
    assert line.startswith(f"error: {path}:3: ") and message in line, line
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    result = cli(str(path), "-o", str(out), "--block-size", "32", "--on-error", "skip", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    splits = manifest["splits"]
    written = sum(s["conversations_written"] for s in splits.values())
    assert written == 3
    if reason == "special token in text":  # read and cleaned; the template step skipped it
        assert manifest["stages"]["read"]["documents_out"] == 4
        assert sum(s["skipped"].get(reason, 0) for s in splits.values()) == 1
    else:
        key = reason or "not a chat record"
        assert manifest["inputs"][0]["skipped"] == {key: 1}
        assert manifest["stages"]["read"]["documents_out"] == 3
        assert message in manifest["inputs"][0]["first_error"]


def test_format_detection_and_its_errors(tmp_path):
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"text": "A plain document here.", **GOOD}) + "\n")
    text = tmp_path / "notes.txt"
    text.write_text("Some notes.\n")
    assert run(both, tmp_path / "a", val_fraction=0, block_size=8)["settings"]["format"] == "text"
    line = one_error_line(cli(str(CONVERSATIONS), str(text), "-o", str(tmp_path / "b")))
    assert "holds chat records but" in line and "notes.txt holds documents" in line
    line = one_error_line(cli(str(text), "-o", str(tmp_path / "c"), "--format", "chat"))
    assert "notes.txt: chat data must be JSON lines" in line
    line = one_error_line(
        cli(str(CONVERSATIONS), "-o", str(tmp_path / "d"), "--chat-template", "tokenizer")
    )
    assert "--chat-template tokenizer needs a pretrained tokenizer" in line
    with pytest.raises(UserError, match="--format 'json' is not one of: auto, text, chat"):
        run(CONVERSATIONS, tmp_path / "e", format="json")
    with pytest.raises(UserError, match="--overlong 'wrap' is not one of: truncate, drop"):
        run(CONVERSATIONS, tmp_path / "e", overlong="wrap")


def test_text_and_chat_runs_never_share_a_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    both = tmp_path / "both.jsonl"
    rows = [
        {"text": f"Document {i}: the Glow lamp has {i} modes.", **GOOD, "id": i} for i in range(6)
    ]
    for i, r in enumerate(rows):  # distinct conversations
        r["messages"] = [
            {"role": "user", "content": f"Q{i}"},
            {"role": "assistant", "content": "A"},
        ]
    both.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = run(both, tmp_path / "text", block_size=8, val_fraction=0)
    chat = run(both, tmp_path / "chat", block_size=16, val_fraction=0, format="chat")
    assert (text["settings"]["format"], chat["settings"]["format"]) == ("text", "chat")
    assert text["cache"]["stored"] and chat["cache"]["stored"]
    assert not text["cache"]["used"] and not chat["cache"]["used"]
    assert text["cache"]["path"] != chat["cache"]["path"]
    assert text["fingerprint"]["cleaning"] != chat["fingerprint"]["cleaning"]
    # a rerun of each reuses its own entry, and gives its own kind of rows
    again = run(both, tmp_path / "chat2", block_size=16, val_fraction=0, format="chat")
    assert again["cache"]["used"] and again["cache"]["path"] == chat["cache"]["path"]
    assert load_prepared(tmp_path / "chat2").has_labels
    text2 = run(both, tmp_path / "text2", block_size=8, val_fraction=0, format="text")
    assert text2["cache"]["used"] and text2["cache"]["path"] == text["cache"]["path"]
    assert not load_prepared(tmp_path / "text2").has_labels
    # another chat setting is another full fingerprint, and the same cleaned conversations
    other = run(
        both, tmp_path / "chat3", block_size=16, val_fraction=0, format="chat", train_on="all"
    )
    assert other["cache"]["used"] and other["fingerprint"]["full"] != chat["fingerprint"]["full"]


# ---------------------------------------------------------------------------------------------
# A pretrained tokenizer with a template of its own.

ZEPHYR_LIKE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def own_template_tokenizer(tmp_path_factory) -> Path:
    from llmkit.core.tokenizer import train_bpe_tokenizer
    from llmkit.data.sft import conversation_text

    texts = [conversation_text(c) for c in conversations(CONVERSATIONS)]
    tok = train_bpe_tokenizer(
        iter(texts),
        350,
        extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    tok.chat_template = ZEPHYR_LIKE
    out = tmp_path_factory.mktemp("tok") / "zephyr-like"
    tok.save_pretrained(out)
    return out


def test_pretrained_tokenizer_keeps_its_own_template(tmp_path, own_template_tokenizer):
    manifest = run(CONVERSATIONS, tmp_path / "own", tokenizer=str(own_template_tokenizer))
    assert manifest["chat"]["template"] == "tokenizer"
    assert manifest["chat"]["end_of_turn"] == "<|end|>"
    assert manifest["tokenizer"]["added_tokens"] == []
    data = load_prepared(tmp_path / "own")
    assert data.tokenizer.chat_template == ZEPHYR_LIKE
    ids, labels = segments(data.train[0], data.tokenizer.pad_token_id)[0]
    trained = data.tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab >= 0])
    assert trained.endswith("<|end|>") and "<|assistant|>" not in trained

    manifest = run(
        CONVERSATIONS,
        tmp_path / "chatml",
        tokenizer=str(own_template_tokenizer),
        chat_template="chatml",
    )
    assert manifest["chat"]["template"] == "chatml"
    assert manifest["tokenizer"]["added_tokens"] == ["<|im_end|>", "<|im_start|>"]
    assert manifest["tokenizer"]["vocab_size"] == 350 + 2
    assert load_prepared(tmp_path / "chatml").tokenizer.chat_template == CHATML.template


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_no_conversation_left_hint_names_only_what_helps(tmp_path, overlong):
    # Found by a fresh-eyes pass: under --overlong truncate the hint said "use --overlong
    # truncate". Rows of 4 tokens hold no answer token of any conversation.
    with pytest.raises(UserError, match="no training conversation left") as info:
        run(CONVERSATIONS, tmp_path / "o", block_size=4, val_fraction=0, overlong=overlong)
    assert "raise --block-size" in info.value.hint
    assert ("--overlong truncate" in info.value.hint) == (overlong == "drop")
    assert not (tmp_path / "o").exists()
