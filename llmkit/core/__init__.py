"""The shared layer below the jobs: what prepare, train, generate, eval, serve and export all use.

Jobs (``llmkit.data``, ``llmkit.training``, ``llmkit.generation``, ``llmkit.evaluation``,
``llmkit.serve``, ``llmkit.export``) import this package and not each other (the allowed
exceptions are listed in ``tests/test_import_direction.py``); nothing here imports a job.

- :mod:`~llmkit.core.cache`: the cache root (``$LLMKIT_CACHE``), the prepare cache, GGUF copies;
- :mod:`~llmkit.core.loading`: model source resolution (directory, ``.gguf``, Hub id) and loading;
- :mod:`~llmkit.core.tokenizer`: training and loading tokenizers, bytes per token;
- :mod:`~llmkit.core.prepared`: the prepared-data layout that prepare writes and train/eval read;
- :mod:`~llmkit.core.metrics`, :mod:`~llmkit.core.scoring`: next-token loss, perplexity, bits
  per byte, one scoring function for training validation and ``llmkit eval``.
"""
