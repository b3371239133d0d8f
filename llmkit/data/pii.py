"""PII redaction: e-mail addresses, IP addresses and phone numbers become placeholders.

The patterns are written here after the ones used in web-corpus pipelines (dolma's regex PII
tagger, datatrove's ``PIIFormatter``, BigScience ROOTS): conservative, so that version
numbers, dates and prices are left alone. Each candidate IP address is checked with
:mod:`ipaddress` (``999.1.1.1`` and ``1.2.3`` are not addresses), and a phone number needs
a phone-like shape — an international ``+`` prefix, or area-code grouping with separators —
not just a run of digits.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from llmkit.data.clean import DocumentStage, Outcome

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567, 555.123.4567
    r")(?![\w])"
)


def _valid_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _plausible_ipv6(candidate: str) -> bool:
    """A valid IPv6 address with a digit in it (``a::b`` in code is not taken)."""
    return any(c.isdigit() for c in candidate) and _valid_ip(candidate)


def redact(text: str, counts: Counter | None = None) -> str:
    """``text`` with e-mails, IPv4/IPv6 addresses and phone numbers replaced by placeholders.

    ``counts`` (when given) is increased by the replacements made, by kind.
    """
    counts = counts if counts is not None else Counter()

    def sub(kind: str, check=None):
        def replace(match: re.Match) -> str:
            if check is not None and not check(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return replace

    if "@" in text:
        text = EMAIL.sub(sub("email"), text)
    if ":" in text:
        text = IPV6.sub(sub("ip", _plausible_ipv6), text)
    if "." in text:
        text = IPV4.sub(sub("ip", _valid_ip), text)
    text = PHONE.sub(sub("phone"), text)
    return text


class RedactPII(DocumentStage):
    """Stage: replace PII by placeholders (see :func:`redact`); never drops a document.

    The manifest counts the replacements by kind (``replaced``) and the documents touched
    (``documents_changed``).
    """

    name = "pii"
    count_template = {"replaced": {}, "documents_changed": 0}

    def settings(self) -> dict:
        return {"mode": "redact", "placeholders": PLACEHOLDERS}

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
        out = redact(text, found)
        if not found:
            return text, None, None
        counts = {f"replaced/{kind}": n for kind, n in found.items()}
        counts["documents_changed"] = 1
        return out, None, counts
