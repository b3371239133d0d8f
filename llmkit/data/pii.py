"""PII redaction: e-mail addresses, IP addresses and phone numbers become placeholders.

- Phone numbers are found by Google's libphonenumber (the ``phonenumbers`` package, its
  ``PhoneNumberMatcher`` at leniency ``VALID``): a number is replaced only when it is a valid
  number of its country's numbering plan, whole (``+49 30 12345678``, not ``+49 30``), in any
  of the formats people write it in. National numbers (``020 7393 1500``, ``(415) 555-2671``)
  are read in the regions of ``regions`` (:data:`DEFAULT_REGIONS`); international ones
  (``+86 138 0013 8000``) in any region. Quantities, ISBNs, dates, prices and version numbers
  are not valid phone numbers and stay.
- E-mail addresses: a pattern after those of web-corpus pipelines (dolma's regex PII tagger,
  datatrove's ``PIIFormatter``), whose last domain label must be a top-level domain of the
  Public Suffix List (the ``tld`` package ships it): in ``msg+ticket@kiosk.Valid`` the next
  sentence's first word is no top-level domain, so it is not an address; in
  ``info@example.com.Thanks`` the address ends at ``.com``.
- IP addresses: each candidate is checked with :mod:`ipaddress` (``999.1.1.1`` and ``1.2.3``
  are not addresses).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from llmkit.data.clean import DocumentStage, Outcome

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}

#: Regions (ISO 3166-1 alpha-2, as libphonenumber names them) whose national numbers are
#: found when none is given. The United States and the United Kingdom: the two largest
#: English-speaking numbering plans, and on the real corpora of the tests (Shakespeare,
#: Gutenberg in English and Chinese, WikiText, TinyStories, Common Crawl pages) they find
#: only real numbers (4: the Gutenberg foundation's, a London office's and two Brussels ones
#: written internationally); adding DE or IN read years and ranges in WikiText as numbers
#: ("1643", "1971 – 2000 30"). International numbers (+...) are found whatever the regions.
DEFAULT_REGIONS = ("US", "GB")

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
#: Words after which a dotted quad is a version number, not an address ("version 2.0.0.1").
_VERSION_WORD = re.compile(
    r"\b(?:version|ver|v|release|build|firmware|rev)[.:]?\s*$", re.IGNORECASE
)
_DIGITS = re.compile(r"\d(?:\D{0,3}\d){5}")  # six digits close together: worth a matcher run


def check_regions(regions: Sequence[str]) -> tuple[str, ...]:
    """``regions`` in upper case, each checked against libphonenumber's supported regions.

    Raises:
        ValueError: a code libphonenumber does not know (the message names it).
    """
    import phonenumbers

    out = tuple(r.strip().upper() for r in regions if r.strip())
    unknown = [r for r in out if r not in phonenumbers.SUPPORTED_REGIONS]
    if unknown:
        raise ValueError(f"unknown phone region(s) {', '.join(unknown)}")
    return out


@lru_cache(maxsize=1)
def _tlds() -> frozenset[str]:
    """The top-level domains of the Public Suffix List shipped in the ``tld`` package (ICANN
    and private sections; the last label of each rule), lower case."""
    from tld.utils import get_tld_names

    names: set[str] = set()
    for trie in get_tld_names().values():  # one trie, keyed by the last label first
        names.update(trie.root.children or ())
    return frozenset(n.lower() for n in names)


def is_tld(label: str) -> bool:
    """True when ``label`` (any case) is a top-level domain of the Public Suffix List."""
    return label.lower() in _tlds()


def _email_end(address: str) -> int:
    """Length of the e-mail address at the start of ``address`` once its domain ends at a
    real top-level domain, or 0 when there is none (``a@kiosk.Valid`` -> 0,
    ``a@example.com.Thanks`` -> len("a@example.com"))."""
    local, _, domain = address.partition("@")
    labels = domain.split(".")
    while len(labels) >= 2:
        if is_tld(labels[-1]):
            return len(local) + 1 + len(".".join(labels))
        labels.pop()
    return 0


def find_phone_numbers(
    text: str, regions: Sequence[str] = DEFAULT_REGIONS
) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the valid phone numbers in ``text``, in order and
    not overlapping (libphonenumber's matcher run once per region; international numbers are
    found in any)."""
    if not _DIGITS.search(text):
        return []
    from phonenumbers import Leniency, PhoneNumberMatcher

    spans = set()
    for region in regions or ("ZZ",):  # ZZ: unknown region, international numbers only
        for m in PhoneNumberMatcher(text, region, leniency=Leniency.VALID):
            spans.add((m.start, m.end))
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
        if out and start < out[-1][1]:
            continue
        out.append((start, end))
    return out


def redact(
    text: str, counts: Counter | None = None, regions: Sequence[str] = DEFAULT_REGIONS
) -> str:
    """``text`` with e-mails, IPv4/IPv6 addresses and phone numbers replaced by placeholders.

    ``regions``: where national phone numbers are read (:data:`DEFAULT_REGIONS`). ``counts``
    (when given) is increased by the replacements made, by kind.
    """
    counts = counts if counts is not None else Counter()

    def sub(kind: str, check=None):
        def replace(match: re.Match) -> str:
            if check is not None and not check(match.group(0)):
                return match.group(0)
            if kind == "ip" and _VERSION_WORD.search(
                match.string, max(0, match.start() - 24), match.start()
            ):
                return match.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return replace

    def email(match: re.Match) -> str:
        found = match.group(0)
        end = _email_end(found)
        if not end:
            return found
        counts["email"] += 1
        return PLACEHOLDERS["email"] + found[end:]

    if "@" in text:
        text = EMAIL.sub(email, text)
    if ":" in text:
        text = IPV6.sub(sub("ip", _plausible_ipv6), text)
    if "." in text:
        text = IPV4.sub(sub("ip", _valid_ip), text)
    spans = find_phone_numbers(text, regions)
    if spans:
        parts, last = [], 0
        for start, end in spans:
            parts += [text[last:start], PLACEHOLDERS["phone"]]
            last = end
        parts.append(text[last:])
        counts["phone"] += len(spans)
        text = "".join(parts)
    return text


def _valid_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _plausible_ipv6(candidate: str) -> bool:
    """A valid IPv6 address with a digit in it (``a::b`` in code is not taken)."""
    return any(c.isdigit() for c in candidate) and _valid_ip(candidate)


class RedactPII(DocumentStage):
    """Stage: replace PII by placeholders (see :func:`redact`); never drops a document.

    ``regions``: where national phone numbers are read (:data:`DEFAULT_REGIONS`; checked by
    :func:`check_regions`, ValueError for an unknown code). The manifest counts the
    replacements by kind (``replaced``) and the documents touched (``documents_changed``).
    """

    name = "pii"
    rewrites_messages = True
    count_template = {"replaced": {}, "documents_changed": 0}

    def __init__(self, regions: Sequence[str] = DEFAULT_REGIONS):
        self.regions = check_regions(regions)

    def settings(self) -> dict:
        return {"mode": "redact", "placeholders": PLACEHOLDERS, "regions": list(self.regions)}

    @property
    def replaced(self) -> Counter:
        """Replacements made, by kind (from ``counts``)."""
        return self.count_group("replaced")

    @property
    def documents_changed(self) -> int:
        """Documents in which something was replaced (from ``counts``)."""
        return self.counts["documents_changed"]

    def apply(self, text: str) -> Outcome:
        found: Counter = Counter()
        out = redact(text, found, self.regions)
        if not found:
            return text, None, None
        counts = {f"replaced/{kind}": n for kind, n in found.items()}
        counts["documents_changed"] = 1
        return out, None, counts
