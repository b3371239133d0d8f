"""``prepare`` across processes and machines on datatrove's executors, with the bytes of one
process (issue 13). The foundation; ``llmkit prepare --executor local|slurm|ray`` is wired to it
next (see "Wiring" below).

What is sharded
    The inputs, into :class:`~llmkit.data.distributed.shards.Shard` s with stable ids in the
    order the one-process reader walks them: one per compressed file (and per file whose
    documents depend on more than their own lines: a JSON array, a line filter such as the
    Gutenberg header/footer rule, ``split_on="none"``, a non-UTF-8 or detected encoding, a NUL
    byte), document-aligned byte ranges of large plain text files and line-aligned ranges of
    JSON-lines files, and parquet row groups. Every document is keyed by its global position
    ``(shard index, index within the shard)``; reading the shards in order gives exactly the
    one-process reader's documents (``tests/data/distributed/test_distributed_shards.py``).

How determinism is held
    - cleaning is prepare's own steps (:func:`llmkit.data.config.build_steps`), their
      ``run(data, rank, world_size)`` per shard: the steps before the de-duplication barrier
      (normalize, filters, signatures) in the ``signatures`` stage, the steps after it (PII)
      in the ``admit`` stage; so any shard does it the same;
    - dedup (:mod:`~llmkit.data.distributed.dedup`): the signature keys are hashed to
      partitions, collision groups are found per partition, and one resolve replays the
      one-process greedy order of :class:`~llmkit.data.steps.dedup.ResolveStep` (a document
      is dropped when it collides with an earlier *kept* one) over the colliding documents'
      candidate graph; MinHash collisions are not transitive, which "one per cluster" would
      get wrong; each shard then runs the real resolve steps with those decisions, so the
      statistics are the steps' own;
    - the tokenizer is trained by one task on the train documents in global order (byte for
      byte prepare's ``tokenizer.json``);
    - the split draws from the global kept rank (:func:`llmkit.data.pipeline.split_indices`
      over the total kept count), so a document's split does not depend on its shard;
    - packing (:mod:`~llmkit.data.distributed.pack`) cuts by running token totals: each shard
      writes the blocks that start in its tokens, and their concatenation is
      concatenate-then-cut with one tail per split (:class:`llmkit.data.pack.Packer`).
    The job (:mod:`~llmkit.data.distributed.job`) equals ``llmkit prepare --num-proc 1`` row by
    row for 1, 2 and 5 tasks and for two processes sharing the work directory
    (``tests/data/distributed/test_distributed_job.py``).

Engine
    datatrove (Apache-2.0) runs the stages: plain ``fn(data, rank, world_size)`` callables
    (:class:`~llmkit.data.distributed.job.Stage`), one job array per stage, completion markers
    under ``<work_dir>/logs/<stage>/completions`` (a rerun skips finished tasks), Slurm
    ``afterok`` dependencies and Ray dependencies between stages. Every file a task writes
    goes through a temporary name and a rename, so a task killed mid-way leaves nothing a
    rerun reads. Optional: ``pip install 'llmkit[distributed]'`` (and ``[ray]``).

Nothing read from the work directory runs code
    The work directory is shared, and other users of a cluster may be able to write it, so
    every intermediate file is JSON, parquet or a ``.npy`` array read with
    ``allow_pickle=False``; a file that is not what its name says is refused in one line
    (:class:`~llmkit.errors.UserError`). datatrove's Slurm array tasks would unpickle
    ``executor.pik`` from the logging directory: :class:`~llmkit.data.distributed.launch.
    SafeSlurmExecutor` makes them run ``python -m llmkit.data.distributed.launch`` instead
    (``tests/data/distributed/test_distributed_security.py``).

The output and its manifest
    :func:`~llmkit.data.distributed.job.assemble` (documents) and :func:`~llmkit.data.
    distributed.chat.assemble_chat` (conversations) write what ``prepare --num-proc 1``
    writes, every file byte for byte but ``manifest.json`` (rows, tokenizer,
    ``dropped.jsonl`` in the order one process drops, ``lengths.png``), and the manifest from
    prepare's own functions, equal on every key but ``created`` and the executor's
    (``executor``, ``settings.executor/tasks/work_dir``); the fingerprint is prepare's, so
    either path's output is up to date for the other
    (``tests/data/distributed/test_distributed_cli.py``, ``test_distributed_chat.py``).

Chat data, web archives, Hub datasets
    Conversations run the stages of :mod:`~llmkit.data.distributed.chat` (the packing rule of
    :class:`~llmkit.data.pack.SFTPacker` laid out over the conversations' packed lengths in
    one task, each shard then packing the rows that start in it); a web archive is one shard
    (its pages' URLs carried with the documents, for ``--keep-dropped``); a Hub dataset is
    one shard per parquet data file when it streams that way
    (:func:`~llmkit.data.distributed.shards.hub_file_rows`), else one shard.
"""
