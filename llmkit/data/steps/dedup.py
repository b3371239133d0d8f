"""De-duplication as two steps, as datatrove's ``pipeline/dedup/minhash.py`` splits it: a
per-document signature, then — behind a barrier — the global, order-dependent part.

A de-duplication rule (:class:`llmkit.data.clean.ExactDedup`, :class:`llmkit.data.dedup.
MinHashDedup`) has a pure ``key(text)`` (a hash, a MinHash signature's band hashes) and a
sequential ``admit(key)`` that must see the keys of the whole corpus in order (the first of a
group of duplicates is kept). :class:`SignatureStep` computes the key of each document on any
rank and leaves it in the document's metadata; :class:`ResolveStep` admits or drops each
document and must run once over every document in corpus order (``global_order``: the
executor gives it one rank of the whole corpus).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from llmkit.data.document import Document
from llmkit.data.steps.base import DroppedWriter, PipelineStep


def key_name(rule) -> str:
    """The metadata key (and arrow column) of ``rule``'s signature: ``key_<name>``."""
    return f"key_{rule.name}"


class SignatureStep(PipelineStep):
    """The per-document part of a de-duplication ``rule``: ``metadata["key_<name>"] =
    rule.key(text)``. Keeps every document; not listed in the manifest (its stage is the
    :class:`ResolveStep`'s)."""

    def __init__(self, rule):
        self.rule = rule
        self.name = f"{rule.name} signature"
        self.key = key_name(rule)

    @property
    def stats(self) -> None:
        return None

    def feature(self):
        """The ``datasets`` feature of the signature (how an executor stores it)."""
        return self.rule.key_feature()

    def run(
        self, data: Iterable[Document], rank: int = 0, world_size: int = 1
    ) -> Iterator[Document]:
        for doc in data:
            doc.metadata[self.key] = self.rule.key(doc.text)
            yield doc


class ResolveStep(PipelineStep):
    """The global part of a de-duplication ``rule``: ``rule.admit`` on each document's
    signature, in corpus order; the documents it drops go to ``dropped_writer``. Counted in
    the manifest under the rule's name (``deduplicate``, ``near_dedup``)."""

    global_order = True
    dropped_writer: DroppedWriter | None = None

    def __init__(self, rule):
        self.rule = rule
        self.name = rule.name
        self.count_template = dict(getattr(rule, "count_template", {}))
        self.key = key_name(rule)

    def run(
        self, data: Iterable[Document], rank: int = 0, world_size: int = 1
    ) -> Iterator[Document]:
        if world_size != 1:
            raise ValueError(
                f"{self.name} must see every document in corpus order: run it as one task"
            )
        st = self.stats
        for doc in data:
            st.documents_in += 1
            st.bytes_in += doc.n_bytes
            reason, counts = self.rule.admit(doc.metadata.pop(self.key))
            if counts:
                st.counts.update(counts)
            if reason is not None:
                st.dropped[reason] += 1
                if self.dropped_writer is not None:
                    self.dropped_writer.write(doc, self.name, reason, rank)
                continue
            st.documents_out += 1
            st.bytes_out += doc.n_bytes
            yield doc


def dedup_steps(rule) -> tuple[SignatureStep, ResolveStep]:
    """The two steps of one de-duplication rule."""
    return SignatureStep(rule), ResolveStep(rule)
