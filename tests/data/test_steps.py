"""The cleaning steps on hand-made documents, without running prepare: the step contract
``run(documents, rank, world_size)``, the counting and dropped-document writer done once in the
base, conversations, and de-duplication split into signature and resolve."""

from __future__ import annotations

import json

import pytest

from llmkit.data.clean import ExactDedup, Normalize, StageStats, run_stages
from llmkit.data.config import build_stages, build_steps, default_config
from llmkit.data.document import Document
from llmkit.data.filters import C4Filter, LengthFilter
from llmkit.data.pii import RedactPII
from llmkit.data.steps.base import DroppedWriter, merge_dropped, run_chain
from llmkit.data.steps.dedup import ResolveStep, SignatureStep, dedup_steps


def docs(*texts: str) -> list[Document]:
    return [Document(t, i) for i, t in enumerate(texts)]


def check_filter(step, doc: Document, reason: str | None) -> None:
    """``step`` keeps ``doc`` (reason None) or drops it for ``reason``, and counts it."""
    out = list(step.run([doc]))
    assert (out == []) == (reason is not None)
    if reason is not None:
        assert step.stats.dropped[reason] == 1


def test_a_filter_counts_documents_bytes_and_drops_in_its_base(tmp_path):
    step = LengthFilter(min_chars=5)
    step.dropped_writer = DroppedWriter(tmp_path)
    kept = list(step.run(docs("hi", "hello world", "héllo"), rank=0, world_size=1))
    assert [d.text for d in kept] == ["hello world", "héllo"]
    st = step.stats
    assert (st.documents_in, st.documents_out) == (3, 2)
    assert (st.bytes_in, st.bytes_out) == (2 + 11 + 6, 11 + 6)
    assert st.dropped == {"too_short": 1}
    step.dropped_writer.close()
    [line] = (tmp_path / "length-00000.jsonl").read_text().splitlines()
    assert json.loads(line) == {"id": 0, "stage": "length", "reason": "too_short", "text": "hi"}
    check_filter(LengthFilter(max_chars=3), Document("four"), "too_long")
    check_filter(LengthFilter(max_chars=3), Document("abc"), None)


def test_dropped_files_of_every_rank_merge_back_in_corpus_order(tmp_path):
    writer = DroppedWriter(tmp_path / "d")
    for rank, ids in ((1, [5, 9]), (0, [0, 3]), (2, [7])):
        for i in ids:
            writer.write(Document(f"doc {i}", i, {"where": f"u{i}"}), "length", "too_short", rank)
    writer.close()
    merge_dropped(tmp_path / "d", tmp_path / "dropped.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == ["doc 0", "doc 3", "doc 5", "doc 7", "doc 9"]
    assert lines[0] == {"stage": "length", "reason": "too_short", "url": "u0", "text": "doc 0"}


def test_a_formatter_rewrites_each_message_of_a_conversation():
    conv = Document.conversation(
        [
            {"role": "user", "content": "mail me at a@example.com  \n"},
            {"role": "assistant", "content": "ok, b@example.com or c@example.com"},
        ],
        id=4,
        metadata={"where": "f.jsonl:5"},
    )
    before = conv.n_bytes
    original = [dict(m) for m in conv.messages]
    [out] = list(run_chain([Normalize(), RedactPII()], [conv]))
    assert [m["content"] for m in out.messages] == [
        "mail me at <EMAIL>",
        "ok, <EMAIL> or <EMAIL>",
    ]
    assert out.text == "user: mail me at <EMAIL>\n\nassistant: ok, <EMAIL> or <EMAIL>"
    assert out.n_bytes == len(out.stored().encode()) < before
    # grouped counts add up over the messages, a plain count counts the conversation once
    pii = RedactPII()
    list(pii.run([Document.conversation(original)]))
    assert pii.stats.as_dict()["replaced"] == {"email": 3}
    assert pii.stats.as_dict()["documents_changed"] == 1


def test_a_message_left_empty_drops_the_conversation():
    step = Normalize()
    conv = Document.conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \x00 "}]
    )
    assert list(step.run([conv])) == []
    assert step.stats.dropped == {"empty message": 1}


def test_a_filter_judges_a_conversation_whole_and_never_rewrites_it():
    good = "This is a sentence. This is another sentence. And a third one is here."
    messages = [
        {"role": "user", "content": good},
        {"role": "assistant", "content": good + "\nand a line without an end mark"},
    ]
    conv = Document.conversation(messages)
    text = conv.text
    rewritten, reason, counts = C4Filter().apply(text)
    assert reason is None and rewritten != text and counts  # on a document: a line removed
    c4 = C4Filter()
    [out] = list(c4.run([conv]))
    assert out.text == text and out.messages == messages  # the conversation: kept as it is
    assert c4.stats.as_dict()["lines_removed"] == {}  # and no count of a removal not done
    assert (c4.stats.documents_out, c4.stats.bytes_out) == (1, conv.n_bytes)


def test_dedup_signatures_on_any_rank_then_one_ordered_resolve():
    rule = ExactDedup()
    signature, resolve = dedup_steps(rule)
    assert isinstance(signature, SignatureStep) and isinstance(resolve, ResolveStep)
    corpus = docs("a b", "c", "a  b", "c", "d")
    # signatures in two "ranks" (any split, any order of ranks)
    part2 = list(signature.run(corpus[3:], rank=1, world_size=2))
    part1 = list(signature.run(corpus[:3], rank=0, world_size=2))
    assert signature.stats is None
    kept = list(resolve.run(part1 + part2))
    assert [d.id for d in kept] == [0, 1, 4]
    assert resolve.stats.dropped == {"duplicate": 2}
    assert all("key_deduplicate" not in d.metadata for d in kept)
    with pytest.raises(ValueError, match="every document in corpus order"):
        list(ResolveStep(ExactDedup()).run(docs("x"), rank=0, world_size=2))


def test_the_steps_of_a_config_give_the_plain_loops_documents_counts_and_drops(tmp_path):
    """build_steps piped in one process (signature, then resolve) = run_stages over
    build_stages, every rule set on."""
    cfg = default_config()
    for name in cfg["filters"]:
        cfg["filters"][name]["enabled"] = name != "language"
    texts = [
        "The cat sat on the mat. " * 20,
        "The cat sat on the mat. " * 20,
        "short",
        "Contact me at someone@example.com, it is the way to reach me. " * 10,
        "  \x00  ",
        "Line one of a list\nLine two\nline three has an end.\n" * 5,
        "A different document about the weather and the sea. It is long enough to pass. " * 8,
    ]
    stats = [StageStats.of(s) for s in build_stages(cfg)]
    dropped_plain: list = []
    plain = list(
        run_stages(texts, build_stages(cfg), stats, lambda t, s, r: dropped_plain.append((s, r, t)))
    )
    writer = DroppedWriter(tmp_path / "d")
    steps = build_steps(cfg, writer)
    kept = list(run_chain(steps, docs(*texts)))
    writer.close()
    assert [d.text for d in kept] == plain
    listed = [s for s in steps if s.stats is not None]
    assert [s.stats.as_dict() for s in listed] == [s.as_dict() for s in stats]
    merge_dropped(tmp_path / "d", tmp_path / "dropped.jsonl")
    dropped = [json.loads(x) for x in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert [(d["stage"], d["reason"], d["text"]) for d in dropped] == dropped_plain
    assert len(dropped) >= 3
