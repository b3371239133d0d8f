"""PII: phone numbers by libphonenumber with regions, e-mail top-level domains (issue 11)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import shared_file
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.config import build_stages, load_config
from llmkit.data.pii import DEFAULT_REGIONS, RedactPII, find_phone_numbers, redact
from llmkit.errors import UserError


@pytest.mark.parametrize(
    ("text", "regions"),
    [
        ("Call 0800 169 6031 for details.", ["GB"]),
        ("Tel. 020 7393 1500", ["GB"]),
        ("Ruf +49 30 12345678 an.", ["US"]),  # international: found in any region
        ("Ruf +49 30 12345678 an.", ["GB"]),
        ("Call (415) 555-2671 today", ["US"]),
        ("Tel +86 138 0013 8000.", ["GB"]),
        ("Txt 09061701461 to claim your prize", ["GB"]),
    ],
)
def test_phone_numbers_are_replaced_whole(text, regions):
    counts = Counter()
    out = redact(text, counts, regions=regions)
    assert counts == {"phone": 1}
    assert out.count("<PHONE>") == 1
    # nothing of the number is left: no digit at all in these sentences once redacted
    assert not any(c.isdigit() for c in out), out


def test_the_default_regions_read_uk_and_us_national_numbers():
    assert DEFAULT_REGIONS == ("US", "GB")
    text = "UK 0207 153 9153, US (415) 555-2671, premium 09061701461."
    assert redact(text) == "UK <PHONE>, US <PHONE>, premium <PHONE>."
    # a national number is read only in its own region
    assert redact("Call (415) 555-2671", regions=["GB"]) == "Call (415) 555-2671"
    assert redact("Call 020 7393 1500", regions=["US"]) == "Call 020 7393 1500"


@pytest.mark.parametrize(
    "text",
    [
        "ISBN 123-456-7890",
        "The shares rose +1 234 567 units",
        "Published on 2023-10-05 at noon",
        "It sold for $1,234,567 in total",
        "Upgrade to version 2.0.0.1 now",
        "In 1643 and 1645 – 46 the war went on",  # years WikiText holds
        "page 200-300, population 1,234,567",
    ],
)
def test_numbers_that_are_not_phone_numbers_stay(text):
    counts = Counter()
    for regions in (DEFAULT_REGIONS, ["GB"], ["US"]):
        assert redact(text, counts, regions=regions) == text
    assert counts == {}


def test_real_corpora_phone_numbers_found_and_no_false_positive():
    """Common Crawl pages (dolma): a London office number and two Brussels numbers written
    internationally; WikiText's thousands of years and figures give none."""
    import gzip

    docs = [
        json.loads(x)["text"] for x in open(shared_file("dolma_cc_jsonl/cc_en_head-0091.jsonl"))
    ]
    docs += [
        json.loads(x)["text"] for x in open(shared_file("dolma_cc_jsonl/cc_en_head-0174.jsonl"))
    ]
    docs += [json.loads(x)["text"] for x in gzip.open(shared_file("dolma_docs/000.json.gz"), "rt")]
    found = [(d[s:e]) for d in docs for s, e in find_phone_numbers(d)]
    assert sorted(found) == ["+32 (0)2 790 75 75", "+32 (0)2 790 75 85", "020 7393 1500"]
    wiki = shared_file("wikitext2/test.txt").read_text(encoding="utf-8")
    assert find_phone_numbers(wiki) == []


@pytest.mark.parametrize(
    ("text", "expected", "n"),
    [
        ("Send msg+ticket@kiosk.Valid 12hrs only", "Send msg+ticket@kiosk.Valid 12hrs only", 0),
        ("mail info@example.com.Thanks a lot", "mail <EMAIL>.Thanks a lot", 1),
        ("write to jane.doe+news@mail.example.co.uk.", "write to <EMAIL>.", 1),
        ("ask@bufvc.ac.uk and Bob@Example.ORG", "<EMAIL> and <EMAIL>", 2),
        ("a@b.notatld here", "a@b.notatld here", 0),
    ],
)
def test_email_top_level_domain_is_validated(text, expected, n):
    counts = Counter()
    assert redact(text, counts) == expected
    assert counts.get("email", 0) == n


def test_region_setting_config_cli_and_manifest(tmp_path):
    cfg = load_config(None, {"pii_region": ["gb"]})
    [stage] = [s for s in build_stages(cfg) if s.name == "pii"]
    assert stage.regions == ("GB",) and stage.settings()["regions"] == ["GB"]
    assert stage("Call 0800 169 6031 now.") == ("Call <PHONE> now.", None)
    with pytest.raises(UserError, match="unknown phone region"):
        load_config(None, {"pii_region": ["XX"]})
    with pytest.raises(ValueError):
        RedactPII(regions=["UK"])  # the ISO code is GB

    docs = tmp_path / "sms.txt"
    docs.write_text(
        "Free entry! Txt WIN to claim, or call 09061701461 before midnight tonight.\n\n"
        "Our office is on 020 7393 1500 and ask@bufvc.ac.uk answers mail.\n\n"
        "Nothing private in this message at all, only words.\n",
        encoding="utf-8",
    )
    args = ["prepare", str(docs), "-o", str(tmp_path / "o"), "--vocab-size", "260"]
    args += ["--no-plot", "--val-fraction", "0", "--json", "--pii-region", "GB"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["stages"]["pii"]["replaced"] == {"email": 1, "phone": 2}
    assert m["stages"]["pii"]["documents_changed"] == 2
    assert m["settings"]["cleaning"]["pii_region"] == ["GB"]
    r = CliRunner().invoke(app, args[:-1] + ["XX"])
    assert r.exit_code == 2 and "unknown phone region(s) XX" in r.stderr
