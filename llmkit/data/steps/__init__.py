"""The steps of ``llmkit prepare``: each a small object with one contract,
``step.run(documents, rank, world_size) -> documents`` (a generator), in the manner of
datatrove's ``PipelineStep`` (``src/datatrove/pipeline/base.py``).

- :mod:`llmkit.data.steps.base`: :class:`~llmkit.data.steps.base.PipelineStep`, the
  one-document step that counts and writes dropped documents once for every formatter and
  filter (:class:`~llmkit.data.steps.base.DocumentStep`), and the writer of dropped documents;
- :mod:`llmkit.data.steps.dedup`: de-duplication split in two, a per-document signature step
  and a global resolve step that sees every document in corpus order.

The formatters (:class:`llmkit.data.clean.Normalize`, :class:`llmkit.data.pii.RedactPII`)
and filters (:mod:`llmkit.data.filters`) are document steps. Steps know nothing about
processes, files or arrow: :mod:`llmkit.data.executor` runs them.
"""
