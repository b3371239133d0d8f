"""Normalize (ftfy, NFC/NFKC, control characters, whitespace) and PII redaction."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import shared_file

from llmkit.data.clean import Normalize, normalize_whitespace
from llmkit.data.pii import RedactPII, redact

#: in-the-wild.json cases not fixed on purpose: ftfy's fix_character_width is off, since it
#: would rewrite the full-width punctuation of all Chinese and Japanese text.
NOT_FIXED = {"Wide comma in UTF-8 / Windows-1252"}


def test_ftfy_in_the_wild_originals_come_out_fixed():
    cases = json.loads(shared_file("ftfy_mojibake/in-the-wild.json").read_text(encoding="utf-8"))
    norm = Normalize(whitespace=False)
    wrong = [c["label"] for c in cases if norm(c["original"])[0] != c["fixed"]]
    assert len(cases) == 70
    assert set(wrong) == NOT_FIXED
    [wide] = [c for c in cases if c["label"] in NOT_FIXED]
    assert norm(wide["original"])[0] == "Ningbo\uff0cChina"  # mojibake fixed, width kept


def test_ftfy_negative_cases_are_unchanged():
    """No mojibake "repair" of look-alike text: every case comes out as its ``fixed`` value,
    which is the original itself except for 3 curly quotes made straight (ftfy's
    uncurl_quotes) and one C1 control character U+0085 read as the ellipsis it stood for."""
    cases = json.loads(shared_file("ftfy_mojibake/negative.json").read_text(encoding="utf-8"))
    norm = Normalize()
    assert len(cases) == 31
    assert [c["label"] for c in cases if norm(c["original"])[0] != c["fixed"]] == []
    changed = [c for c in cases if norm(c["original"])[0] != c["original"]]
    assert len(changed) == 4
    for c in changed:
        out = norm(c["original"])[0]
        assert len(out) == len(c["original"])  # one character for one: no re-decoding
        assert {a for a, b in zip(c["original"], out, strict=True) if a != b} <= {
            "\u201c",
            "\u201d",
            "\u2019",
            "\x85",
        }


def test_nfc_and_nfkc():
    assert Normalize(fix_mojibake=False)("cafe\u0301 \ufb01")[0] == "caf\u00e9 \ufb01"
    assert Normalize()("cafe\u0301 \ufb01")[0] == "caf\u00e9 fi"  # ftfy: ligatures
    assert Normalize("NFKC", fix_mojibake=False)("cafe\u0301 \ufb01 \u2460")[0] == "caf\u00e9 fi 1"
    with pytest.raises(ValueError):
        Normalize("NFD")


def test_control_characters_and_whitespace():
    text = "\n\n  Title\u00a0 \r\nbody\x07 text\x1b\t\r\n\n\n\n\u3000\u3000indent\x85end  \n"
    out, _ = Normalize(fix_mojibake=False)(text)
    assert out == "  Title\nbody text\n\n\u3000\u3000indent\nend"
    assert normalize_whitespace("a  b\t\n") == "a  b"  # inner spaces kept
    assert Normalize()(" \x00\x07 \n") == (None, "empty")


def test_chinese_full_width_punctuation_is_kept():
    zh = "\u3000\u3000話說天下大勢，分久必合，合久必分：周末七國分爭。"
    assert Normalize()(zh) == (zh, None)


# ---------------------------------------------------------------------------------------------
# PII


def test_pii_real_emails_in_dolma_docs():
    import gzip

    path = shared_file("dolma_docs/000.json.gz")
    docs = [json.loads(line)["text"] for line in gzip.open(path, "rt", encoding="utf-8")]
    stage = RedactPII()
    out = [stage(d)[0] for d in docs]
    joined = "\n".join(docs)
    emails = ["ask@bufvc.ac.uk", "info@claihr.ca", "info@eun.org"]
    assert all(e in joined for e in emails)
    redacted = "\n".join(out)
    assert not any(e in redacted for e in emails)
    assert stage.replaced["email"] == 3 and redacted.count("<EMAIL>") == 3
    assert "@LearnonScreen" in redacted  # a Twitter handle is not an e-mail address
    assert stage.documents_changed == sum(o != d for o, d in zip(out, docs, strict=True))


@pytest.mark.parametrize(
    ("text", "expected", "kinds"),
    [
        ("write to jane.doe+news@mail.example.co.uk.", "write to <EMAIL>.", {"email": 1}),
        ("server 192.168.1.254 down", "server <IP_ADDRESS> down", {"ip": 1}),
        ("v6 2001:db8::8a2e:370:7334 up", "v6 <IP_ADDRESS> up", {"ip": 1}),
        ("loopback ::1 and fe80::1", "loopback <IP_ADDRESS> and <IP_ADDRESS>", {"ip": 2}),
        ("call +44 20 7946 0958 now", "call <PHONE> now", {"phone": 1}),
        ("call (415) 555-2671 or 415.555.2671", "call <PHONE> or <PHONE>", {"phone": 2}),
        # not PII: versions, bad octets, times, dates, years, prices, plain numbers
        ("version 1.2.3.4.5 and 999.1.1.1", "version 1.2.3.4.5 and 999.1.1.1", {}),
        ("at 12:30:45 on 2014-02-04", "at 12:30:45 on 2014-02-04", {}),
        ("in 2014 it cost $12.50 for 1,000,000 units", None, {}),
        ("std::vector<int> a::b", None, {}),
    ],
)
def test_pii_patterns(text, expected, kinds):
    counts = Counter()
    assert redact(text, counts) == (text if expected is None else expected)
    assert dict(counts) == kinds
