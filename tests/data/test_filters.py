"""The named filters, their thresholds, language handling, and the prepare config."""

from __future__ import annotations

import io
import re

import pytest
from conftest import shared_file
from rich.console import Console
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.config import build_stages, load_config
from llmkit.data.filters import (
    C4Filter,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
    LanguageFilter,
    LengthFilter,
    count_sentences,
    detect_language,
    no_space_script,
)
from llmkit.data.pipeline import prepare
from llmkit.errors import UserError

GOOD = (
    "The committee met on Tuesday to discuss the budget for the coming year. Members agreed "
    "that the library should have longer opening hours, and that the park needs new benches. "
    "A vote on the proposal to repair the bridge was postponed until the engineers have "
    "finished their report. The chair thanked everyone for coming and closed the meeting "
    "with a reminder that the next session will be held in the town hall."
)


def test_published_defaults():
    g = GopherQuality()
    assert (g.min_words, g.max_words, g.min_mean_word_length, g.max_mean_word_length) == (
        50,
        100_000,
        3.0,
        10.0,
    )
    assert (g.max_symbol_word_ratio, g.max_bullet_lines_ratio, g.min_alpha_words_ratio) == (
        0.1,
        0.9,
        0.8,
    )
    r = GopherRepetition()
    assert r.max_duplicate_ngram_chars_ratio[5] == 0.15 and r.max_top_ngram_chars_ratio[2] == 0.2
    f = FineWebFilter()
    assert (f.line_punct_thr, f.short_line_thr, f.char_duplicates_ratio, f.new_line_ratio) == (
        0.12,
        0.67,
        0.01,
        0.3,
    )
    assert (C4Filter().min_words_per_line, C4Filter().min_sentences) == (5, 3)


def test_good_prose_passes_every_rule_set():
    for flt in (GopherQuality(), GopherRepetition(), C4Filter(), FineWebFilter()):
        assert flt(GOOD) == (GOOD, None), flt.name
    assert LanguageFilter(languages=["en"])(GOOD) == (GOOD, None)


@pytest.mark.parametrize(
    ("flt", "text", "reason"),
    [
        (GopherQuality(), "too short to count", "gopher_min_words"),
        (GopherQuality(), " ".join(["#tag"] * 60), "gopher_hash_ratio"),
        (GopherQuality(), " ".join(["xy the and"] * 30), "gopher_short_mean_word_length"),
        (GopherRepetition(), "\n".join(["same line here"] * 10 + [GOOD]), "gopher_duplicate_lines"),
        (C4Filter(), GOOD + "\nlorem ipsum dolor sit amet.", "c4_lorem_ipsum"),
        (C4Filter(), GOOD + "\nThe call f() { return 1; } is the whole body.", "c4_curly_bracket"),
        # TFDS looks for "{" only in lines the line rules kept: this one ends without a mark
        (C4Filter(), GOOD + " function() { return 1; }", "c4_few_sentences"),
        (FineWebFilter(), "\n".join(["menu item"] * 3 + ["home", "about", GOOD]), None),
        (LengthFilter(min_chars=500), GOOD, "too_short"),
        (LanguageFilter(languages=["de"]), GOOD, "language:en"),
    ],
)
def test_rules_drop_with_their_reason(flt, text, reason):
    out, why = flt(text)
    if reason is None:
        assert why is not None and why.startswith("fineweb_")
    else:
        assert (out, why) == (None, reason)


def test_c4_removes_lines_and_keeps_the_document():
    text = GOOD + "\nPlease enable JavaScript to view this page properly today.\nHome\nMenu"
    out, why = C4Filter()(text)
    assert why is None and out == GOOD
    f = C4Filter()
    f(text)
    assert f.lines_removed == {"javascript": 1, "no_terminal_punct": 2}


def test_chinese_skips_only_the_word_rules_and_says_so():
    zh = "\u3000\u3000話說天下大勢，分久必合，合久必分：周末七國分爭，并入於秦。"
    zh += "及秦滅之後，楚漢分爭。"
    assert detect_language(zh)[0] == "zh" and no_space_script(zh)
    for flt in (GopherQuality(), GopherRepetition(), FineWebFilter()):
        assert flt(zh) == (zh, None)
        assert flt.extra()["no_space_script_documents"] == 1
        assert set(flt.rules_skipped) == set(flt.word_rules)
    assert GopherQuality().rules_skipped == {} and len(GopherQuality.word_rules) == 7
    # C4's sentence rule counts sentences, not words: two here, three needed
    assert count_sentences(zh.strip(), no_space=True) == 2
    c4 = C4Filter()
    assert c4(zh) == (None, "c4_few_sentences")
    assert c4.rules_skipped == {"c4_long_word": 1, "c4_few_words": 1}
    # Japanese too (Natsume Soseki, 1905, public domain): one sentence would fail Gopher's
    # 50 words, C4's 5 words per line and FineWeb's rules if they counted spaces
    ja = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    ja += "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。"
    assert no_space_script(ja)
    out, reason, counts = GopherQuality().apply(ja)
    assert (out, reason, counts["no_space_script_documents"]) == (ja, None, 1)
    assert C4Filter().apply(ja)[0] == ja  # four sentences ending in 。
    assert GopherQuality().check(ja) == "gopher_min_words"  # what skipping avoids


def test_english_is_never_skipped_as_chinese_whatever_the_language_guess():
    """py3langid calls "Yup..." Chinese at probability 0.02; the skip looks at scripts."""
    assert detect_language("Yup...") == ("zh", pytest.approx(0.0217, abs=1e-4))
    assert not no_space_script("Yup...")
    g = GopherQuality()
    assert g("Yup...") == (None, "gopher_min_words") and g.rules_skipped == {}
    sms = "URGENT! YOU HAVE WON A 1 WEEK FREE MEMBERSHIP IN OUR PRIZE JACKPOT! TXT CLAIM TO 81010"
    assert not no_space_script(sms)
    assert FineWebFilter().apply(sms)[2] is None  # no skip counted
    # a few Chinese words in an English page do not make it Chinese
    assert not no_space_script(GOOD + " The novel 三國演義 is long.")


def test_a_chinese_chapter_still_gets_curly_bracket_and_duplicate_line_rules():
    text = shared_file("gutenberg_zh/23950-0.txt").read_text(encoding="utf-8-sig")
    start = text.index("第一回")
    chapter = text[start : text.index("第二回", start)].replace("\r\n", "\n")
    assert no_space_script(chapter) and len(chapter) > 4_000
    c4 = C4Filter()
    out, why = c4(chapter)
    assert why is None and c4.rules_skipped == {"c4_long_word": 1, "c4_few_words": 1}
    # hard-wrapped lines end mid-sentence: C4 keeps only the lines ending in 。！？」』
    kept = out.splitlines()
    assert kept and all(line.endswith(("。", "！", "？", "」", "』")) for line in kept)
    assert c4.lines_removed["no_terminal_punct"] > len(kept)
    # a kept line with a curly bracket drops the chapter, as for any language
    bracket = chapter.replace("\n盜賊蜂起。\n", "\n盜賊{蜂起}。\n", 1)
    assert "{" in bracket and C4Filter()(bracket) == (None, "c4_curly_bracket")
    # the duplicate-line rules of Gopher repetition apply
    lines = [line for line in chapter.splitlines() if line.strip()]  # one paragraph
    repeated = "\n".join(lines[:20] + lines[:20] + lines[20:40])
    rep = GopherRepetition()
    assert rep(repeated) == (None, "gopher_duplicate_lines")
    assert rep.rules_skipped == {"gopher_top_ngram": 1, "gopher_duplicate_ngram_chars": 1}
    assert GopherRepetition()(chapter) == (chapter, None)


def test_stop_words_are_matched_without_their_punctuation():
    text = "Tom wanted to win. ... He said that, smiling."
    g = GopherQuality(min_words=1, max_symbol_word_ratio=1.0)
    assert g(text) == (text, None)  # "to" and "that," are two stop words
    assert GopherQuality(min_words=1, max_symbol_word_ratio=1.0, min_stop_words=3)(text) == (
        None,
        "gopher_stop_words",
    )
    assert g("And, of course: THE end.") == ("And, of course: THE end.", None)


def test_fineweb_line_punctuation_has_no_quotes():
    page = "\n".join(
        [
            'Welcome to the official website of "Home"',
            'Read the latest news and reports about "Sports"',
            'Browse our complete catalogue of "Books"',
            'Contact the friendly team behind "Support"',
        ]
    )
    assert FineWebFilter()(page) == (None, "fineweb_line_punct_ratio")
    stories = shared_file("tinystories/tinystories.txt").read_text(encoding="utf-8")
    dialogue = next(
        p.strip()
        for p in stories.split("\n\n")
        if p.strip().endswith('."') and p.count('"') >= 4 and len(p) > 300
    )
    assert FineWebFilter()(dialogue) == (dialogue, None)


def test_c4_ellipsis_lines_and_long_words_remove_the_line_only():
    text = GOOD + "\nAnd so the story goes on and on and on..."
    assert C4Filter()(text) == (GOOD, None)
    c4 = C4Filter()
    long_line = "A token " + "x" * 1001 + " sits in this line."
    assert c4(GOOD + "\n" + long_line) == (GOOD, None)
    assert c4.lines_removed == {"long_word": 1}
    assert C4Filter()(GOOD + "\nA token " + "x" * 1000 + " sits in this line.")[0] != GOOD


def test_c4_sentence_count_skips_abbreviations_and_ellipses():
    assert count_sentences("Mr. Smith met Dr. Jones at 5 p.m. on Main St. in town.") == 1
    assert count_sentences("He waited... and waited. Then he left! Did she?") == 3
    assert count_sentences('She said "Go home." He went. J. R. R. Tolkien wrote it.') == 3
    # three real sentences in one line pass C4's rule, one with two abbreviations does not
    assert C4Filter()("The cat sat down. The dog ran off. The bird flew away.")[1] is None
    assert C4Filter()("Mr. Smith and Dr. Jones met at the U.S. embassy today.")[1] == (
        "c4_few_sentences"
    )


def _zh_survives(book, tmp_path, drops: dict | None = None) -> None:
    m = prepare(
        [str(book)],
        tmp_path / "out",
        vocab_size=400,
        block_size=128,
        clean={
            "filters": {
                "language": {"enabled": True, "languages": ["zh"]},
                **{
                    n: {"enabled": True}
                    for n in ("gopher_quality", "gopher_repetition", "c4", "fineweb")
                },
            },
            "dedup": {"near": False},
        },
        console=Console(file=io.StringIO()),
    )
    text = book.read_text(encoding="utf-8-sig")
    paragraphs = [p for p in re.split(r"\n(?:[ \t]*\n)+", text) if p.strip()]
    read = m["stages"]["read"]["documents_out"]
    assert read == len(paragraphs) - 1  # the leftover PG line is cut by the gutenberg rule
    st = m["stages"]
    assert st["language"]["dropped"] == {}
    assert st["language"]["languages_kept"] == {"zh": read}
    for name in ("gopher_quality", "gopher_repetition", "c4", "fineweb"):
        assert st[name]["no_space_script_documents"] == st[name]["documents_in"], name
        assert set(st[name]["rules_skipped"].values()) == {st[name]["documents_in"]}
    # the word rules are skipped; the rules that count no words judge the paragraphs
    assert st["gopher_quality"]["dropped"] == {}
    assert st["gopher_repetition"]["dropped"] == {}
    assert set(st["c4"]["dropped"]) <= {"c4_few_sentences"}
    assert st["fineweb"]["documents_out"] >= st["fineweb"]["documents_in"] // 2
    if drops is not None:  # C4 keeps the lines ending in 。！？」』 of the hard-wrapped text
        assert {n: st[n]["dropped"] for n in drops} == drops
    assert m["inputs"][0]["gutenberg_lines_removed"] == 2  # the PG line and the blank after


def test_gutenberg_zh_first_150k_survive_every_filter_with_zh_kept(tmp_path):
    text = shared_file("gutenberg_zh/23950-0.txt").read_text(encoding="utf-8")
    cut = text.index("\n\n", 150_000)
    tail = text[text.index("End of Project Gutenberg's") - 5 :]
    book = tmp_path / "zh_head.txt"
    book.write_text(text[:cut] + "\n\n" + tail, encoding="utf-8")
    drops = {"c4": {"c4_few_sentences": 612}, "fineweb": {"fineweb_short_line_ratio": 39}}
    _zh_survives(book, tmp_path, drops)


@pytest.mark.slow
def test_gutenberg_zh_whole_book_survives_every_filter_with_zh_kept(tmp_path):
    _zh_survives(shared_file("gutenberg_zh/23950-0.txt"), tmp_path)


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "prepare.yaml"
    cfg_file.write_text(
        "filters:\n  gopher_quality: {enabled: true, min_words: 30}\n"
        "dedup: {ngram_size: 3, bands: 20, rows: 5, num_perm: 100}\npii: keep\n"
    )
    cfg = load_config(cfg_file, {"filters": {"c4": {"enabled": True}}})
    names = [s.name for s in build_stages(cfg)]
    assert names == ["normalize", "length", "gopher_quality", "c4", "deduplicate", "near_dedup"]
    gq = build_stages(cfg)[2]
    assert gq.min_words == 30 and gq.min_stop_words == 2
    assert build_stages(cfg)[-1].settings() == {
        "ngram_size": 3,
        "num_perm": 100,
        "bands": 20,
        "rows": 5,
        "threshold": None,
        "seed": 1,
        "normalize": False,
    }
    cfg_file.write_text("filters:\n  gopher_qualty: {enabled: true}\n")
    with pytest.raises(UserError, match="did you mean filters.gopher_quality"):
        load_config(cfg_file)
    cfg_file.write_text("dedup: {bands: 20, rows: 8}\n")
    with pytest.raises(UserError) as err:
        load_config(cfg_file)
    assert err.value.message == (
        f"dedup.bands x dedup.rows = 160 exceeds dedup.num_perm 112 (in {cfg_file})"
    )
    with pytest.raises(UserError) as err:  # the same from flags: named as the flags
        load_config(None, {"dedup": {"bands": 20, "rows": 8}})
    assert err.value.message == "--minhash-bands x --minhash-rows = 160 exceeds --minhash-perm 112"
    cfg_file.write_text("filters: {length: {min_chars: ten}}\n")
    with pytest.raises(UserError) as err:
        load_config(cfg_file)
    assert str(err.value) == (
        f"filters.length.min_chars in {cfg_file}: expected int, got str 'ten' — fix the value "
        "in that file"
    )


def test_cli_config_error_is_one_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("some text\n")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("pii: maybe\n")
    r = CliRunner().invoke(
        app, ["prepare", str(f), "-o", str(tmp_path / "o"), "--config", str(cfg)]
    )
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"error: pii in {cfg}: 'maybe' is not redact or keep"
    ]
    r = CliRunner().invoke(app, ["prepare", str(f), "-o", str(tmp_path / "o"), "--filter", "gophr"])
    # was "unknown prepare setting filters.gophr — did you mean filters.gopher_quality?"
    assert r.exit_code == 2 and r.stderr.startswith("error: --filter gophr: no such filter — ")
    r = CliRunner().invoke(
        app, ["prepare", str(f), "-o", str(tmp_path / "o"), "--no-filter", "c44"]
    )
    assert r.stderr.startswith("error: --no-filter c44: no such filter — did you mean c4? ")


@pytest.mark.parametrize("procs, workers", [(1, 1), (2, 2), (2, 1)])
def test_the_steps_under_the_executor_count_like_the_plain_loop(
    tmp_path, monkeypatch, procs, workers
):
    """workers=1: one pool process runs both ranks (a pool may do so whenever one worker is
    faster); its counts were summed twice (seen as a flaky failure in CI)."""
    """The pipeline's form (the cleaning steps of build_steps under the executor: the
    per-document steps on ``procs`` worker processes, then de-duplication's resolve in order)
    gives the plain loop's documents, counts and dropped texts, for every rule set with its
    own counts."""
    import gzip
    import json
    from contextlib import contextmanager

    from datasets import Dataset

    from llmkit.data.clean import StageStats, run_stages
    from llmkit.data.config import build_steps, default_config
    from llmkit.data.executor import run_pipeline
    from llmkit.data.steps.base import DroppedWriter, merge_dropped

    path = shared_file("dolma_docs/000.json.gz")
    docs = [json.loads(line)["text"] for line in gzip.open(path, "rt", encoding="utf-8")]
    zh = shared_file("gutenberg_zh/23950-0.txt").read_text(encoding="utf-8")[5_000:9_000]
    docs = docs + [GOOD, zh, docs[3], GOOD + "\nMenu", "   ", "x" * 40]
    cfg = default_config()
    for name in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb"):
        cfg["filters"][name]["enabled"] = True
    cfg["filters"]["language"]["languages"] = ["en", "zh"]

    plain_stages = build_stages(cfg)
    plain = [StageStats.of(s) for s in plain_stages]
    plain_dropped = []
    kept = list(
        run_stages(docs, plain_stages, plain, lambda t, s, r: plain_dropped.append((s, r, t)))
    )

    @contextmanager
    def task(description, total=None):
        yield lambda n=1: None

    import multiprocessing

    from llmkit.data import executor

    monkeypatch.setattr(
        executor, "_pool", lambda n: multiprocessing.get_context("fork").Pool(workers)
    )
    steps = build_steps(cfg, DroppedWriter(tmp_path / "dropped"))
    out, ranks = run_pipeline(
        steps, Dataset.from_dict({"text": docs}), chat=False, procs=procs, work=tmp_path, task=task
    )
    assert ranks == procs
    kept2 = out["text"]
    merge_dropped(tmp_path / "dropped", tmp_path / "dropped.jsonl")
    lines = (tmp_path / "dropped.jsonl").read_text(encoding="utf-8").splitlines()
    dropped2 = [(r["stage"], r["reason"], r["text"]) for r in map(json.loads, lines)]
    stats = [step.stats for step in steps if step.stats is not None]
    assert kept2 == kept and dropped2 == plain_dropped
    assert [s.as_dict() for s in stats] == [s.as_dict() for s in plain]
    by_name = {s.name: s.as_dict() for s in stats}
    # the comparison covers real work of each kind
    assert by_name["c4"]["lines_removed"] and by_name["language"]["languages_kept"]["zh"] == 1
    assert by_name["gopher_quality"]["no_space_script_documents"] == 1
    # docs[3] again, and GOOD + "\nMenu" once C4 has removed the line "Menu"
    assert by_name["deduplicate"]["dropped"] == {"duplicate": 2}
    assert by_name["normalize"]["dropped"] == {"empty": 1}
