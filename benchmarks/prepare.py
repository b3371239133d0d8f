"""Benchmark of ``llmkit prepare`` (SPEC §7; issue 3): not a test, prints tables.

    python benchmarks/prepare.py [--scale 10] [--skip-rss]

Corpus: every distinct document of the text corpora in ../shared/data (tinyshakespeare,
tinystories, the English and Chinese Gutenberg books, wikitext2, dolma, the licenses), read
with llmkit's readers, exact duplicates removed, in a fixed shuffled order: about 5 MB of
*distinct* text. Nothing is repeated to make a corpus larger: copies would be collapsed by
deduplication and flatter the memory and speed figures. Printed:

1. MB/s of each cleaning stage on its own (documents in memory: a benchmark, not the pipeline),
   with every filter on;
2. tokenize-and-pack as ``llmkit prepare`` runs it (``_encode_split`` over an arrow dataset,
   then ``_block_rows`` + ``Packer`` into an arrow dataset) against bare ``tokenizers``
   ``Tokenizer.encode_batch`` on the same documents and the same 8k BPE, in batches of 1000
   (target ratio >= 0.7); and the encode step in 2 worker processes;
3. end to end ``prepare`` (default filters, dedup and PII on, cache off) at ``--num-proc`` 1
   and 2 on the whole corpus: seconds, MB/s and speed-up;
4. peak RSS of a fresh process running ``prepare`` (``--num-proc 1``, cache off) on the first
   1/``scale`` of the corpus and on all of it (``scale`` times more distinct text; target
   ratio <= 1.5); and the peak RSS of the worker processes at ``--num-proc 2``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMKIT_SHARED") or ROOT.parent / "shared") / "data"
FILES = [
    "tinyshakespeare/input.txt",
    "tinystories/tinystories.txt",
    "gutenberg_en/pg11.txt",
    "gutenberg_en/pg1342.txt",
    "gutenberg_zh/23950-0.txt",
    "wikitext2/test.txt",
    "dolma_cc_jsonl/cc_en_head-0091.jsonl",
    "dolma_cc_jsonl/cc_en_head-0174.jsonl",
    "dolma_docs/000.json.gz",
    "fuzzy_dup_licenses/rails_mit_license.txt",
    "fuzzy_dup_licenses/react_mit_license.txt",
    "fuzzy_dup_licenses/pytorch_license.txt",
]


def distinct_docs() -> list[str]:
    """Every distinct document of :data:`FILES` (exact duplicates and blank ones removed), in a
    fixed shuffled order, so that any prefix mixes all the corpora."""
    from llmkit.data.readers import discover_inputs, read_documents

    seen, docs = set(), []
    for f in discover_inputs([str(DATA / p) for p in FILES]):
        for d in read_documents(f):
            if d.strip() and d not in seen:
                seen.add(d)
                docs.append(d)
    random.Random(0).shuffle(docs)
    return docs


def write_jsonl(docs: list[str], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return path


def prefix(docs: list[str], n_bytes: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= n_bytes:
            break
        out.append(d)
        total += len(d.encode())
    return out


def mb(n: float) -> float:
    return n / 1e6


def nbytes(docs: list[str]) -> int:
    return sum(len(d.encode()) for d in docs)


def stage_rates(docs: list[str]) -> list[tuple[str, float]]:
    from llmkit.data.config import build_stages, default_config

    cfg = default_config()
    for name in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb"):
        cfg["filters"][name]["enabled"] = True
    cfg["filters"]["language"]["languages"] = ["en", "zh"]
    size = nbytes(docs)
    rows = []
    for stage in build_stages(cfg):
        t = time.perf_counter()
        for d in docs:
            stage(d)
        rows.append((stage.name, mb(size) / (time.perf_counter() - t)))
    return rows


def pack_ratio(docs: list[str], work: Path) -> dict[str, float]:
    """MB/s of bare encode_batch, of llmkit's encode + pack, and of its encode in 2 processes."""
    from datasets import Dataset, Features, List, Value, load_from_disk

    import llmkit.data.pipeline as pipeline
    from llmkit.core.tokenizer import train_bpe_tokenizer
    from llmkit.data.pack import Packer

    tok = train_bpe_tokenizer(iter(docs[:3000]), 8192)
    size = mb(nbytes(docs))
    backend = tok.backend_tokenizer
    t = time.perf_counter()
    for i in range(0, len(docs), 1000):
        backend.encode_batch(docs[i : i + 1000])
    bare = size / (time.perf_counter() - t)
    ds = Dataset.from_dict({"text": docs, "n_bytes": [len(d.encode()) for d in docs]})
    ds.save_to_disk(str(work / "docs"))  # memory-mapped, as the pipeline's documents
    ds = load_from_disk(str(work / "docs"))

    def ours(num_proc: int, name: str) -> float:
        t = time.perf_counter()
        enc = pipeline._encode_split(
            ds,
            tok,
            eos_token_id=tok.eos_token_id,
            append_eos=True,
            num_proc=num_proc,
            n_bytes=nbytes(docs),
            name=name,
            advance=lambda n=1: None,
            cache=work,
        )
        packer = Packer(128)
        blocks = pipeline._from_generator(
            lambda: pipeline._block_rows(enc, packer, lambda n=1: None),
            Features({"input_ids": List(Value("int32"))}),
            work,
            f"blocks-{name}",
        )
        assert len(blocks) == packer.blocks_out
        return size / (time.perf_counter() - t)

    one = ours(1, "one")
    saved = pipeline.PARALLEL_MIN_BYTES_ENCODE
    pipeline.PARALLEL_MIN_BYTES_ENCODE = 1
    try:
        two = ours(2, "two")
    finally:
        pipeline.PARALLEL_MIN_BYTES_ENCODE = saved
    return {"bare": bare, "ours": one, "ours_2proc": two}


def run_prepare(path: Path, out: Path, num_proc: int) -> float:
    from rich.console import Console

    from llmkit.data.pipeline import prepare

    t = time.perf_counter()
    prepare(
        [str(path)],
        out,
        vocab_size=1024,
        num_proc=num_proc,
        overwrite=True,
        plot=False,
        cache=False,
        console=Console(file=io.StringIO()),
    )
    return time.perf_counter() - t


def child_rss(path: Path, out: Path, num_proc: int) -> tuple[int, int]:
    """Peak RSS (bytes) of a fresh process running prepare, and of its worker processes."""
    code = (
        "import io,resource;from rich.console import Console;"
        "from llmkit.data.pipeline import prepare;"
        f"prepare([{str(path)!r}],{str(out)!r},vocab_size=1024,num_proc={num_proc},"
        "overwrite=True,plot=False,cache=False,console=Console(file=io.StringIO()));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    own, children = res.stdout.split()[-2:]
    return int(own) * 1024, int(children) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    docs = distinct_docs()
    size = nbytes(docs)
    print(f"corpus: {len(docs):,} distinct documents, {mb(size):.2f} MB of text")
    print("\n| stage (every filter on) | MB/s |\n|---|---|")
    for name, rate in stage_rates(docs):
        print(f"| {name} | {rate:.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rates = pack_ratio(docs, tmp)
        print("\n| tokenize and pack (8k BPE) | MB/s |\n|---|---|")
        print(f"| bare tokenizers encode_batch | {rates['bare']:.2f} |")
        print(f"| llmkit encode + pack (1 process, Rust threads) | {rates['ours']:.2f} |")
        print(f"| llmkit encode + pack (2 processes) | {rates['ours_2proc']:.2f} |")
        print(f"| ratio, 1 process (target >= 0.7) | {rates['ours'] / rates['bare']:.2f} |")
        whole = write_jsonl(docs, tmp / "whole.jsonl")
        t1 = run_prepare(whole, tmp / "o1", 1)
        t2 = run_prepare(whole, tmp / "o2", 2)
        print("\n| prepare end to end, whole corpus | s | MB/s |\n|---|---|---|")
        print(f"| --num-proc 1 | {t1:.1f} | {mb(size) / t1:.2f} |")
        print(f"| --num-proc 2 | {t2:.1f} | {mb(size) / t2:.2f} |")
        print(f"| speed-up | {t1 / t2:.2f} | |")
        if not args.skip_rss:
            small = write_jsonl(prefix(docs, size // args.scale), tmp / "small.jsonl")
            rows = []
            for label, path in (("1x", small), (f"{args.scale}x", whole)):
                own, _ = child_rss(path, tmp / f"r{label}", 1)
                own2, workers = child_rss(path, tmp / f"r2{label}", 2)
                rows.append((label, path.stat().st_size, own, own2, workers))
            print(
                "\n| corpus (distinct text) | MB on disk | peak RSS MB, --num-proc 1 "
                "| --num-proc 2: main | workers |\n|---|---|---|---|---|"
            )
            for label, on_disk, own, own2, workers in rows:
                print(
                    f"| {label} | {mb(on_disk):.1f} | {own / 2**20:.0f} | {own2 / 2**20:.0f} "
                    f"| {workers / 2**20:.0f} |"
                )
            print(f"| ratio (target <= 1.5) | | {rows[1][2] / rows[0][2]:.2f} | | |")


if __name__ == "__main__":
    main()
