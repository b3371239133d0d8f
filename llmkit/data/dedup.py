"""Near-duplicate removal with MinHash LSH (Broder 1997; Leskovec et al., "Mining of Massive
Datasets", ch. 3), on ``datasketch``.

Defaults are the FineWeb pipeline's (Penedo et al. 2024, §3.4; datatrove ``MinhashConfig``):
word 5-grams, 112 hash permutations in 14 bands of 8 rows, so two documents become
candidates with probability ``1 - (1 - s**8)**14`` at Jaccard similarity ``s`` (about 0.5 at
s = 0.72, 0.92 at s = 0.8). As in FineWeb, a candidate is a duplicate without checking its
similarity; set ``threshold`` to also require an estimated Jaccard of at least that much.

The text is simplified before shingling (lower case, punctuation dropped, runs of whitespace
collapsed — line wrapping does not matter), as in datatrove. Chinese and Japanese characters
count as one word each, so text without spaces still has n-grams.

A document with fewer words than the n-gram size has no n-gram: it is never put in the index
and never dropped here (exact duplicates of it are the exact stage's job), so short documents
are never merged by accident (an empty shingle set would hash like every other empty one).
"""

from __future__ import annotations

import re

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKENS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def shingles(text: str, n: int) -> set[bytes]:
    """The set of word ``n``-grams of the simplified text, UTF-8 encoded (empty when short)."""
    words = _TOKENS.findall(text.lower())
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


class MinHashDedup:
    """Drop a document whose MinHash collides in one LSH band with a document kept earlier.

    Args:
        ngram_size: words per shingle (5).
        num_perm: hash permutations (112 = bands x rows).
        bands, rows: the LSH band structure (14 x 8). When both are None, datasketch chooses
            them for ``threshold``.
        threshold: when set, a candidate is a duplicate only if its estimated Jaccard
            similarity is at least this (None: any band collision, as FineWeb).
        seed: seed of the permutations.

    Stateful: it must see the whole corpus, in order (the first of a cluster is kept). Memory:
    one key per band per document (plus the signatures when ``threshold`` is set).
    Drop reason: ``"near_duplicate"``.
    """

    name = "near_dedup"
    stateless = False

    def __init__(
        self,
        ngram_size: int = 5,
        num_perm: int = 112,
        bands: int | None = 14,
        rows: int | None = 8,
        threshold: float | None = None,
        seed: int = 1,
    ):
        from datasketch import MinHashLSH

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
        if bands is None:
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            bands, rows = self._lsh.b, self._lsh.r
        else:
            self._lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
        self.bands, self.rows = bands, rows
        self._signatures: dict[int, object] = {}
        self._next = 0
        self.too_short = 0
        self._template = None

    def settings(self) -> dict:
        return {
            "ngram_size": self.ngram_size,
            "num_perm": self.num_perm,
            "bands": self.bands,
            "rows": self.rows,
            "threshold": self.threshold,
            "seed": self.seed,
        }

    def extra(self) -> dict:
        return {"not_indexed_too_short": self.too_short}

    def minhash(self, text: str):
        """The ``datasketch.MinHash`` of a text, or None when it has no n-gram."""
        from datasketch import MinHash

        grams = shingles(text, self.ngram_size)
        if not grams:
            return None
        if self._template is None:  # drawing the permutations costs more than hashing
            self._template = MinHash(num_perm=self.num_perm, seed=self.seed)
        m = self._template.copy()
        m.update_batch(list(grams))
        return m

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        m = self.minhash(text)
        if m is None:
            self.too_short += 1
            return text, None
        candidates = self._lsh.query(m)
        if candidates:
            if self.threshold is None:
                return None, "near_duplicate"
            if any(self._signatures[c].jaccard(m) >= self.threshold for c in candidates):
                return None, "near_duplicate"
        key = self._next
        self._next += 1
        self._lsh.insert(key, m, check_duplication=False)
        if self.threshold is not None:
            self._signatures[key] = m
        return text, None


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of the word ``n``-gram sets of two texts (for tests, reports)."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa or sb else 0.0
