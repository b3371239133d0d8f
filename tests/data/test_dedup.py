"""Exact and MinHash LSH near-duplicate removal."""

from __future__ import annotations

import io
import json

import pytest
from conftest import shared_file
from rich.console import Console

from llmkit.data.clean import ExactDedup, Normalize, StageStats, run_stages
from llmkit.data.dedup import MinHashDedup, jaccard
from llmkit.data.pipeline import prepare


def licenses():
    names = ["rails_mit_license.txt", "react_mit_license.txt", "pytorch_license.txt"]
    return [shared_file(f"fuzzy_dup_licenses/{n}").read_text(encoding="utf-8") for n in names]


def test_mit_licenses_merged_at_default_settings_bsd_kept():
    rails, react, bsd = licenses()
    assert round(jaccard(rails, react), 3) == 0.919
    assert round(jaccard(rails, bsd), 3) == 0.007
    d = MinHashDedup()
    assert (d.ngram_size, d.num_perm, d.bands, d.rows) == (5, 112, 14, 8)
    assert [d(t)[1] for t in (rails, react, bsd)] == [None, "near_duplicate", None]


def test_threshold_is_settable():
    rails, react, bsd = licenses()
    strict = MinHashDedup(threshold=0.99)  # bands/rows 14x8, plus a Jaccard check
    assert [strict(t)[1] for t in (rails, react, bsd)] == [None, None, None]
    chosen = MinHashDedup(bands=None, rows=None, threshold=0.8, num_perm=128)
    assert chosen.bands * chosen.rows <= 128
    assert [chosen(t)[1] for t in (rails, react, bsd)] == [None, "near_duplicate", None]
    with pytest.raises(ValueError):
        MinHashDedup(bands=20, rows=8)


def test_short_documents_are_never_merged_by_accident():
    d = MinHashDedup()
    assert [d(t) for t in ["cat", "dog", "cat", "!!", "?"]] == [
        ("cat", None),
        ("dog", None),
        ("cat", None),  # exact duplicates are the exact stage's job
        ("!!", None),
        ("?", None),
    ]
    assert d.too_short == 5
    stages = [Normalize(), ExactDedup(), MinHashDedup()]
    stats = [StageStats(s.name) for s in stages]
    assert list(run_stages(["cat", "dog", "cat"], stages, stats)) == ["cat", "dog"]


def test_exact_dedup_on_normalized_text():
    docs = ["caf\u00e9", "cafe\u0301", "caf\u00e9   ", "a-b", "ab"]
    d = ExactDedup()
    assert [d(t)[1] for t in docs] == [None, "duplicate", "duplicate", None, None]


def test_near_duplicates_across_files_in_prepare(tmp_path):
    rails, react, bsd = licenses()
    filler = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": rails}) + "\n" + json.dumps({"text": filler}) + "\n", encoding="utf-8"
    )
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": react}) + "\n" + json.dumps({"text": bsd}) + "\n", encoding="utf-8"
    )
    m = prepare(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        tmp_path / "out",
        vocab_size=300,
        block_size=16,
        val_fraction=0.0,
        split_on="none",
        keep_dropped=True,
        console=Console(file=io.StringIO()),
    )
    assert m["stages"]["near_dedup"]["dropped"] == {"near_duplicate": 1}
    assert m["splits"]["train"]["documents"] == 3  # rails, filler, bsd
    assert m["settings"]["cleaning"]["dedup"]["bands"] == 14
    [dropped] = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").open()]
    assert dropped["stage"] == "near_dedup" and dropped["reason"] == "near_duplicate"
    assert "Facebook" in dropped["text"] or dropped["text"].startswith("MIT License")


def _story_and_edit():
    """A TinyStories story and a copy with every 11th word changed (from word 3): Jaccard
    0.37, yet one of their 14 LSH bands collides at the default seed."""
    text = shared_file("tinystories/tinystories.txt").read_text(encoding="utf-8")
    story = [s for s in text.split("\n\n") if len(s.split()) > 100][4]
    words = story.split()
    edited = " ".join("zz" + w if i % 11 == 3 else w for i, w in enumerate(words))
    return story, edited


def test_lsh_candidates_verified_by_estimated_jaccard_when_asked():
    story, edited = _story_and_edit()
    assert round(jaccard(story, edited), 2) == 0.37
    plain = MinHashDedup()
    assert [plain(t)[1] for t in (story, edited)] == [None, "near_duplicate"]  # one band
    sa, sb = plain.signature(story), plain.signature(edited)
    assert len(set(plain.band_hashes(sa)) & set(plain.band_hashes(sb))) >= 1
    assert round(float((sa == sb).mean()), 2) == 0.40  # the estimate verification uses
    verified = MinHashDedup(threshold=0.8)
    assert [verified(t)[1] for t in (story, edited)] == [None, None]
    # a true near duplicate still goes with verification
    rails, react, _ = licenses()
    assert [verified(t)[1] for t in (rails, react)] == [None, "near_duplicate"]


def test_number_and_accent_normalization_as_datatrove_is_optional():
    pages = [
        f"Order {n} shipped on 2024-03-{d:02d}: {q} items to the café in Zürich, total "
        f"{q * 9.5} euros. Thank you for shopping with us, see you next time."
        for n, d, q in ((1041, 3, 2), (2210, 17, 5), (3399, 28, 11))
    ]
    off = MinHashDedup()
    assert off.normalize is False and [off(p)[1] for p in pages] == [None, None, None]
    on = MinHashDedup(normalize=True)
    assert [on(p)[1] for p in pages] == [None, "near_duplicate", "near_duplicate"]
    assert jaccard(pages[0], pages[1]) < 0.5 and jaccard(pages[0], pages[1], normalize=True) == 1
    assert jaccard("café crème brûlée au lait", "cafe creme brulee au lait", normalize=True) == 1
    assert jaccard("café crème brûlée au lait", "cafe creme brulee au lait") == 0


def test_minhash_options_from_flags(tmp_path):
    from llmkit.cli.prepare import clean_overrides
    from llmkit.data.config import build_stages, load_config

    over = clean_overrides(
        filters=[],
        no_filters=[],
        languages=None,
        pii=None,
        normalization=None,
        html=None,
        near_dedup=None,
        gutenberg=None,
        minhash={"normalize": True, "threshold": 0.8},
    )
    [near] = [s for s in build_stages(load_config(None, over)) if s.name == "near_dedup"]
    assert (near.normalize, near.threshold) == (True, 0.8)
    assert near.settings()["normalize"] is True
