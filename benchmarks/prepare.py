"""Benchmark of ``llmkit prepare`` (SPEC §7; issue 3): not a test, prints tables.

    python benchmarks/prepare.py [--scale 10] [--skip-rss]

Corpus: the English and web text of ../shared/data (tinyshakespeare, tinystories, the two
Gutenberg books, wikitext2, dolma), about 3.7 MB. Printed:

1. MB/s of each cleaning stage on its own (documents in memory: a benchmark, not the pipeline);
2. tokenize-and-pack (llmkit's encode + Packer over a datasets.Dataset) against bare
   ``tokenizers`` ``encode_batch`` on the same documents, same tokenizer (target >= 0.7);
3. end to end ``prepare`` MB/s at --num-proc 1 and 2 (speed-up);
4. peak RSS of a fresh process running ``prepare`` at 1x and at ``--scale`` x the corpus
   (target ratio <= 1.5).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FILES = [
    "tinyshakespeare/input.txt",
    "tinystories/tinystories.txt",
    "gutenberg_en/pg11.txt",
    "gutenberg_en/pg1342.txt",
    "wikitext2/test.txt",
    "dolma_cc_jsonl/cc_en_head-0091.jsonl",
    "dolma_cc_jsonl/cc_en_head-0174.jsonl",
    "dolma_docs/000.json.gz",
]


def corpus_docs() -> list[str]:
    from llmkit.data.readers import discover_inputs, read_documents

    docs = []
    for f in discover_inputs([str(DATA / p) for p in FILES]):
        docs.extend(read_documents(f))
    return docs


def make_corpus(dir_: Path, scale: int) -> list[str]:
    """``scale`` copies of the corpus files (each copy altered so dedup keeps it)."""
    paths = []
    for k in range(scale):
        for p in FILES:
            src = DATA / p
            dst = dir_ / f"copy{k}" / p
            dst.parent.mkdir(parents=True, exist_ok=True)
            if k == 0 or not src.name.endswith((".txt",)):
                dst.write_bytes(src.read_bytes())
            else:  # a different number in every paragraph: not a duplicate of copy 0
                text = src.read_text(encoding="utf-8-sig")
                dst.write_text(re.sub(r"\n\n", f" [{k}]\n\n", text), encoding="utf-8")
            paths.append(str(dst))
    return paths


def mb(n: int) -> float:
    return n / 1e6


def stage_rates(docs: list[str]) -> list[tuple[str, float]]:
    from llmkit.data.config import build_stages, default_config

    cfg = default_config()
    for name in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb"):
        cfg["filters"][name]["enabled"] = True
    cfg["filters"]["language"]["languages"] = ["en"]
    size = sum(len(d.encode()) for d in docs)
    rows = []
    for stage in build_stages(cfg):
        t = time.perf_counter()
        for d in docs:
            stage(d)
        rows.append((stage.name, mb(size) / (time.perf_counter() - t)))
    return rows


def pack_ratio(docs: list[str]) -> tuple[float, float]:
    from datasets import Dataset

    from llmkit.data.pack import Packer
    from llmkit.data.pipeline import encode_batch
    from llmkit.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(iter(docs[:3000]), 8192)
    size = mb(sum(len(d.encode()) for d in docs))
    backend = tok.backend_tokenizer
    t = time.perf_counter()
    for i in range(0, len(docs), 1000):
        backend.encode_batch(docs[i : i + 1000])
    bare = size / (time.perf_counter() - t)
    ds = Dataset.from_dict({"text": docs})
    t = time.perf_counter()
    enc = ds.map(
        lambda b: {"input_ids": encode_batch(b["text"], tok, eos_token_id=tok.eos_token_id)},
        batched=True,
        batch_size=1000,
        remove_columns=["text"],
    )
    packer = Packer(128)
    import pyarrow.compute as pc

    for table in enc.with_format("arrow").iter(batch_size=1000):
        packer.add_tokens(pc.list_flatten(table.column("input_ids")).to_numpy())
    ours = size / (time.perf_counter() - t)
    return bare, ours


def run_prepare(paths: list[str], out: Path, num_proc: int | None) -> float:
    from rich.console import Console

    from llmkit.data.pipeline import prepare

    t = time.perf_counter()
    prepare(
        paths,
        out,
        vocab_size=1024,
        num_proc=num_proc,
        overwrite=True,
        plot=False,
        console=Console(file=io.StringIO()),
    )
    return time.perf_counter() - t


def child_rss(paths_file: Path, out: Path) -> int:
    code = (
        "import json,sys,io,resource;from rich.console import Console;"
        "from llmkit.data.pipeline import prepare;"
        f"p=json.load(open({str(paths_file)!r}));"
        f"prepare(p,{str(out)!r},vocab_size=1024,overwrite=True,plot=False,"
        "console=Console(file=io.StringIO()));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    return int(res.stdout.split()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    docs = corpus_docs()
    size = sum(len(d.encode()) for d in docs)
    print(f"corpus: {len(docs):,} documents, {mb(size):.2f} MB")
    print("\n| stage | MB/s |\n|---|---|")
    for name, rate in stage_rates(docs):
        print(f"| {name} | {rate:.2f} |")
    bare, ours = pack_ratio(docs)
    print("\n| tokenize | MB/s |\n|---|---|")
    print(f"| bare tokenizers encode_batch | {bare:.2f} |")
    print(f"| llmkit encode + pack | {ours:.2f} |")
    print(f"| ratio (target >= 0.7) | {ours / bare:.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_corpus(tmp / "c1", 1)
        total = sum(Path(p).stat().st_size for p in paths)
        t1 = run_prepare(paths, tmp / "o1", 1)
        t2 = run_prepare(paths, tmp / "o2", 2)
        print("\n| prepare end to end | s | MB/s |\n|---|---|---|")
        print(f"| --num-proc 1 | {t1:.1f} | {mb(total) / t1:.2f} |")
        print(f"| --num-proc 2 | {t2:.1f} | {mb(total) / t2:.2f} |")
        print(f"| speed-up | {t1 / t2:.2f} | |")
        if not args.skip_rss:
            rows = []
            for scale in (1, args.scale):
                paths = make_corpus(tmp / f"r{scale}", scale)
                pf = tmp / f"paths{scale}.json"
                pf.write_text(json.dumps(paths))
                rows.append(
                    (
                        scale,
                        sum(Path(p).stat().st_size for p in paths),
                        child_rss(pf, tmp / f"ro{scale}"),
                    )
                )
            print("\n| corpus | MB on disk | peak RSS MB |\n|---|---|---|")
            for scale, nbytes, rss in rows:
                print(f"| {scale}x | {mb(nbytes):.1f} | {rss / 2**20:.0f} |")
            print(f"| ratio (target <= 1.5) | | {rows[1][2] / rows[0][2]:.2f} |")


if __name__ == "__main__":
    main()
