"""Near-duplicate removal with MinHash LSH (Broder 1997; Leskovec et al., "Mining of Massive
Datasets", ch. 3): MinHash signatures from ``datasketch``, banding here.

Defaults are the FineWeb pipeline's (Penedo et al. 2024, §3.4; datatrove ``MinhashConfig``):
word 5-grams, 112 hash permutations in 14 bands of 8 rows, so two documents become
candidates with probability ``1 - (1 - s**8)**14`` at Jaccard similarity ``s`` (about 0.5 at
s = 0.72, 0.92 at s = 0.8). As in FineWeb, a candidate is a duplicate without checking its
similarity; set ``threshold`` to verify each LSH candidate: it is a duplicate only when the
estimated Jaccard similarity (the share of equal signature values) is at least ``threshold``
(a pair at Jaccard 0.34 can collide in one band by chance and is then kept).

The text is simplified before shingling: lower case, punctuation dropped, runs of whitespace
collapsed (line wrapping does not matter). With ``normalize=True`` also as datatrove's
``simplify_text`` does it for FineWeb's MinHash (``datatrove/utils/text.py``,
``TextNormConfig`` defaults): every number (digits in any script, with one decimal separator)
becomes ``0``, and combining marks are removed after Unicode NFD (``café`` -> ``cafe``), so
template pages that differ only in numbers (dates, prices, counters) are near duplicates, as
in FineWeb. Off by default, a documented departure from FineWeb: llmkit prepares a user's own
and often small corpora, where records that differ only in their numbers ("Document 3: the
lamp has 3 modes", numbered items, table rows) are distinct facts that a web-scale pipeline
can afford to merge and a fine-tuning set cannot. On the shared real corpora it changes
little either way (Pride and Prejudice: 46 paragraphs dropped without, 48 with it, the
difference in short illustration captions; Shakespeare, TinyStories and WikiText paragraphs
unchanged). Chinese and Japanese characters count as one word each, so text without
spaces still has n-grams.

A document with fewer words than the n-gram size has no n-gram: it is never put in the index
and never dropped here (exact duplicates of it are the exact stage's job), so short documents
are never merged by accident (an empty shingle set would hash like every other empty one).

The stage splits in two (:class:`~llmkit.data.clean.CorpusStage`): the signature and its band
hashes are a pure function of one document (:meth:`MinHashDedup.key`, computed in parallel by
the pipeline); the index lookups run in document order (:meth:`MinHashDedup.admit`). Each band
of ``rows`` hash values is reduced to one 64-bit BLAKE2b hash, and the index is a set of those
(as datatrove also bands signatures itself rather than keeping an LSH object): about 0.9 KB
of memory per indexed document at 14 bands, against 4.6 KB for ``datasketch.MinHashLSH``
(measured here with ``tracemalloc`` on 20,000 signatures). Two different bands collide by
accident with probability about ``n**2 / 2**64`` for ``n`` band hashes, negligible below
billions of documents.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
import regex

from llmkit.data.clean import CorpusStage

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKENS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


#: A number in any script, with at most one decimal separator (as datatrove's NUMBERS_PATTERN).
_NUMBER = regex.compile(r"\p{Nd}+(?:[.,\u060c\u066b\u2396\u2397\u2398]\p{Nd}+)?")


def simplify(text: str, normalize: bool = True) -> str:
    """``text`` in lower case; with ``normalize``, numbers as ``0`` and without combining
    marks (after NFD), as datatrove's ``simplify_text`` (see the module docstring)."""
    text = text.lower()
    if normalize:
        text = _NUMBER.sub("0", text)
        decomposed = unicodedata.normalize("NFD", text)
        text = "".join(c for c in decomposed if not unicodedata.combining(c))
    return text


def shingles(text: str, n: int, normalize: bool = False) -> set[bytes]:
    """The set of word ``n``-grams of the simplified text (:func:`simplify`), UTF-8 encoded
    (empty when short)."""
    words = _TOKENS.findall(simplify(text, normalize))
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


class MinHashDedup(CorpusStage):
    """Drop a document whose MinHash agrees in one LSH band with a document kept earlier.

    Args:
        ngram_size: words per shingle (5).
        num_perm: hash permutations (112 = bands x rows).
        bands, rows: the LSH band structure (14 x 8). When both are None, ``datasketch``
            chooses them for ``threshold`` (``MinHashLSH``'s false positive/negative balance).
        threshold: when set, each LSH candidate is verified: a duplicate only if its
            estimated Jaccard similarity (the share of equal signature values) is at least
            this (None: any band collision, as FineWeb).
        seed: seed of the permutations.
        normalize: numbers as 0 and accents removed before shingling, as datatrove and
            FineWeb (False by default; see the module docstring).

    Memory of :meth:`admit`: one 64-bit band hash per band per kept document (plus, with
    ``threshold``, each kept document's signature, 8 bytes per permutation). Drop reason:
    ``"near_duplicate"``; the manifest counts the documents too short to index
    (``not_indexed_too_short``).
    """

    name = "near_dedup"
    count_template = {"not_indexed_too_short": 0}

    def __init__(
        self,
        ngram_size: int = 5,
        num_perm: int = 112,
        bands: int | None = 14,
        rows: int | None = 8,
        threshold: float | None = None,
        seed: int = 1,
        normalize: bool = False,
    ):
        if ngram_size < 1:
            raise ValueError("ngram_size must be at least 1")
        if (bands is None) != (rows is None):
            raise ValueError("give both bands and rows, or neither")
        if bands is not None and bands * rows > num_perm:
            raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {num_perm}")
        if bands is None and threshold is None:
            raise ValueError("without bands and rows, give a threshold")
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self.ngram_size = ngram_size
        self.num_perm = num_perm
        self.threshold = threshold
        self.seed = seed
        self.normalize = normalize
        if bands is None:
            from datasketch import MinHashLSH

            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            bands, rows = lsh.b, lsh.r
        self.bands, self.rows = bands, rows
        self._seen: set[int] = set()  # band hashes of the kept documents (threshold None)
        self._buckets: dict[int, list[int]] = {}  # band hash -> kept documents (threshold)
        self._signatures: list[np.ndarray] = []
        self._template = None

    def settings(self) -> dict:
        return {
            "ngram_size": self.ngram_size,
            "num_perm": self.num_perm,
            "bands": self.bands,
            "rows": self.rows,
            "threshold": self.threshold,
            "seed": self.seed,
            "normalize": self.normalize,
        }

    @property
    def too_short(self) -> int:
        """Documents with no n-gram, never indexed (from ``counts``)."""
        return self.counts["not_indexed_too_short"]

    def __getstate__(self) -> dict:
        # Sent to worker processes for key(): the permutations, not the index.
        state = dict(self.__dict__)
        state["_seen"], state["_buckets"], state["_signatures"] = set(), {}, []
        return state

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature of a text (``num_perm`` values), or None when it has no
        n-gram."""
        from datasketch import MinHash

        grams = shingles(text, self.ngram_size, self.normalize)
        if not grams:
            return None
        if self._template is None:  # drawing the permutations costs more than hashing
            self._template = MinHash(num_perm=self.num_perm, seed=self.seed)
        m = self._template.copy()
        m.update_batch(list(grams))
        return m.hashvalues

    def band_hashes(self, signature: np.ndarray) -> list[int]:
        """One signed 64-bit hash per band: BLAKE2b of the band's index and its ``rows``
        values."""
        r = self.rows
        return [
            int.from_bytes(
                hashlib.blake2b(
                    b.to_bytes(4, "little") + signature[b * r : (b + 1) * r].tobytes(),
                    digest_size=8,
                ).digest(),
                "little",
                signed=True,  # int64 in arrow
            )
            for b in range(self.bands)
        ]

    def key(self, text: str) -> list[int] | None:
        """The band hashes of the text (then, with ``threshold``, its signature), or None."""
        sig = self.signature(text)
        if sig is None:
            return None
        key = self.band_hashes(sig)
        if self.threshold is not None:
            key += sig.tolist()
        return key

    def key_feature(self):
        from datasets import List, Value

        return List(Value("int64"))

    def admit(self, key: list[int] | None) -> tuple[str | None, dict[str, int] | None]:
        if key is None:
            return None, {"not_indexed_too_short": 1}
        hashes = key[: self.bands]
        if self.threshold is None:
            if any(h in self._seen for h in hashes):
                return "near_duplicate", None
            self._seen.update(hashes)
            return None, None
        sig = np.asarray(key[self.bands :], dtype=np.int64)
        candidates = {c for h in hashes for c in self._buckets.get(h, ())}
        for c in sorted(candidates):
            if np.count_nonzero(self._signatures[c] == sig) / sig.size >= self.threshold:
                return "near_duplicate", None
        index = len(self._signatures)
        self._signatures.append(sig)
        for h in hashes:
            self._buckets.setdefault(h, []).append(index)
        return None, None


def jaccard(a: str, b: str, n: int = 5, normalize: bool = False) -> float:
    """Exact Jaccard similarity of the word ``n``-gram sets of two texts (for tests, reports)."""
    sa, sb = shingles(a, n, normalize), shingles(b, n, normalize)
    return len(sa & sb) / len(sa | sb) if sa or sb else 0.0
