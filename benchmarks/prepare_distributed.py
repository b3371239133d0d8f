"""Benchmark of ``llmkit prepare --executor local`` against the in-process path (issue 13):
not a test, prints a table.

    python benchmarks/prepare_distributed.py [--size-mb 200] [--tasks 2] [--only ...]

Corpus (:func:`build_corpus`, cached under ``--cache-dir``, by default
``$TMPDIR/llmkit-bench-prepare-distributed``; never written under ``../shared``): **new,
distinct documents** made from the sentences of the text corpora in ``../shared/data`` (about
6 MB: tinyshakespeare, tinystories, the English and Chinese Gutenberg books, wikitext2, the
dolma web pages). Each document takes one corpus (the Chinese book for about one document in
eight) and draws 1 to 6 paragraphs of 2 to 9 of its sentences in seeded random order, so two
documents share a 5-word shingle only by chance; nothing is a copy of a source document and
the same ``--seed`` and ``--size-mb`` give the same bytes. The documents are written in mixed
formats: two large plain files (a JSON-lines file and a text file with documents between
blank lines, each cut into byte-range shards), ``.jsonl.gz`` and ``.txt.gz`` files (one shard
each) and small ``.jsonl`` / ``.txt`` files. Planted across files: about 1% exact copies of
earlier documents and 1% near copies (one word changed, or a sentence dropped or added) placed
in *later* files, so the global de-duplication has collisions that cross shards. The counts
are printed.

Runs (each a fresh ``llmkit prepare`` process, the console script as users run it,
``--no-plot``, the in-process runs ``--no-cache``), all in the same invocation, in this order:
``--num-proc 1``, ``--num-proc 2``, ``--executor local --tasks T --num-proc 1`` and
``--num-proc 2`` (the local executor's ``workers``). Printed per run: wall seconds, documents
read per second and its ratio to ``--num-proc 1``; "CLI RSS", the peak RSS of the CLI
process and the processes it waited for (``wait4``; the executor's pool workers are children
of multiprocess' forkserver and are not among them); "task RSS", the largest peak RSS of a
task process (each task records ``getrusage(RUSAGE_SELF).ru_maxrss`` in
``<work>/taskstats/``; with one worker the tasks run in the CLI's own process, so that figure
is the whole run's; it counts the pages a worker shares with the forkserver, whose imports
include torch); and the seconds of the global de-duplication stages ``signatures`` (read,
clean, sign), ``groups`` and ``resolve``, as datatrove's executor saw them
(``logs/<stage>/executor.json`` to ``stats.json``, start-up included). Then, per executor
run, every stage's wall, its tasks' running time, the gaps between stages and the task RSS by
stage. Last, the check: the four outputs must have the same row counts and the same SHA-256
of the train and validation ``input_ids``; the script says so, or exits 1.

Tokenizer: the runs use ``--tokenizer DIR``, a byte-level BPE of ``--vocab-size`` (1024,
prepare's default) trained once (cached) on the first 4 MB of the corpus, so what is measured
is cleaning, de-duplication, encoding and packing, which scale with the tasks; training runs
in one task in both paths (the executor's ``tokenizer`` stage is one task by design), so
including it would only add the same serial seconds to every run and blur the ratios.

Figures on a shared machine are noisy: the load average before and after is printed; compare
ratios within one run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMKIT_SHARED") or ROOT.parent / "shared") / "data"
#: Source corpora: name -> files under ``DATA``.
SOURCES = {
    "shakespeare": ["tinyshakespeare/input.txt"],
    "stories": ["tinystories/tinystories.txt"],
    "gutenberg_en": ["gutenberg_en/pg11.txt", "gutenberg_en/pg1342.txt"],
    "gutenberg_zh": ["gutenberg_zh/23950-0.txt"],
    "wikitext": ["wikitext2/test.txt"],
    "web": [
        "dolma_cc_jsonl/cc_en_head-0091.jsonl",
        "dolma_cc_jsonl/cc_en_head-0174.jsonl",
        "dolma_docs/000.json.gz",
    ],
}
#: Share of the documents drawn from each corpus.
WEIGHTS = {
    "shakespeare": 0.15,
    "stories": 0.15,
    "gutenberg_en": 0.2,
    "gutenberg_zh": 0.125,
    "wikitext": 0.225,
    "web": 0.15,
}
#: Bump when the corpus recipe changes (it keys the cache).
CORPUS_VERSION = 1
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；])")


def sentence_pools() -> dict[str, list[str]]:
    """The distinct sentences (at least 12 characters) of each source corpus, in file order,
    read with llmkit's readers (Gutenberg header and footer removed)."""
    from llmkit.data.boilerplate import strip_gutenberg
    from llmkit.data.readers import discover_inputs, read_documents

    pools: dict[str, list[str]] = {}
    for name, paths in SOURCES.items():
        seen: set[str] = set()
        pool: list[str] = []
        for f in discover_inputs([str(DATA / p) for p in paths]):
            for doc in read_documents(f, line_filter=strip_gutenberg):
                for para in doc.split("\n"):
                    for s in _SENTENCE_END.split(para.strip()):
                        s = " ".join(s.split()) if name != "gutenberg_zh" else s.strip()
                        if len(s) >= 12 and s not in seen:
                            seen.add(s)
                            pool.append(s)
        pools[name] = pool
    return pools


def new_document(rng: random.Random, pools: dict[str, list[str]], names, weights) -> str:
    """One new document: 1-6 paragraphs of 2-9 sentences of one corpus, drawn at random;
    paragraphs joined by ``\\n`` (never a blank line, so a text file keeps it whole)."""
    name = rng.choices(names, weights)[0]
    pool = pools[name]
    sep = "" if name == "gutenberg_zh" else " "
    paras = [
        sep.join(pool[rng.randrange(len(pool))] for _ in range(rng.randint(2, 9)))
        for _ in range(rng.randint(1, 6))
    ]
    return "\n".join(paras)


def near_copy(rng: random.Random, doc: str, pools: dict[str, list[str]]) -> str:
    """``doc`` with one small edit: a word replaced, its last sentence-sized piece dropped, or
    a sentence appended (for a document of a few hundred words, a MinHash band collision)."""
    kind = rng.randrange(3)
    words = doc.split(" ")
    if kind == 0 and len(words) > 20:
        words[rng.randrange(len(words))] = rng.choice(["indeed", "perhaps", "truly", "again"])
        return " ".join(words)
    if kind == 1 and len(doc) > 400:
        return doc[: len(doc) - len(doc) // 12].rstrip()
    return doc + " " + rng.choice(pools["stories"])


#: Layout: (file name, share of the bytes). Big plain files are cut into byte ranges; each
#: compressed file is one shard; small files are whole-file shards.
LAYOUT = (
    [("big-a.jsonl", 0.25), ("big-b.txt", 0.25)]
    + [(f"web-{i:02d}.jsonl.gz", 0.03) for i in range(8)]
    + [(f"books-{i:02d}.txt.gz", 0.04) for i in range(4)]
    + [(f"small-{i:02d}.jsonl", 0.012) for i in range(5)]
    + [(f"small-{i:02d}.txt", 0.012) for i in range(5)]
)


def _writer(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=1)
    return open(path, "w", encoding="utf-8")


def _write_doc(fh, path: Path, doc: str) -> int:
    if ".jsonl" in path.name:
        line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
    else:
        line = doc + "\n\n"
    fh.write(line)
    return len(line.encode("utf-8"))


def build_corpus(directory: Path, size_mb: float, seed: int) -> dict:
    """Write the corpus (see the module docstring) into ``directory``; returns its summary
    (documents, bytes, planted exact and near copies). Deterministic in ``size_mb`` and
    ``seed``."""
    pools = sentence_pools()
    names = list(WEIGHTS)
    weights = [WEIGHTS[n] for n in names]
    rng = random.Random(seed)
    total = int(size_mb * 1e6)
    directory.mkdir(parents=True, exist_ok=True)
    earlier: list[str] = []  # a sample of the documents of the files before this one
    summary = {"documents": 0, "bytes": 0, "exact_copies": 0, "near_copies": 0, "files": {}}
    for fname, share in LAYOUT:
        path = directory / fname
        want = int(total * share)
        written = 0
        sampled: list[str] = []
        with _writer(path) as fh:
            while written < want:
                r = rng.random()
                if earlier and r < 0.01:
                    doc = rng.choice(earlier)
                    summary["exact_copies"] += 1
                elif earlier and r < 0.02:
                    doc = near_copy(rng, rng.choice(earlier), pools)
                    summary["near_copies"] += 1
                else:
                    doc = new_document(rng, pools, names, weights)
                    if rng.random() < 0.02:
                        sampled.append(doc)
                written += _write_doc(fh, path, doc)
                summary["documents"] += 1
        earlier += sampled
        summary["bytes"] += written
        summary["files"][fname] = written
    return summary


def corpus(cache: Path, size_mb: float, seed: int) -> tuple[Path, dict]:
    """The cached corpus of this size and seed (built once)."""
    d = cache / f"corpus-v{CORPUS_VERSION}-{size_mb:g}mb-s{seed}"
    info = d / "corpus.json"
    if not info.exists():
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.perf_counter()
        summary = build_corpus(tmp / "data", size_mb, seed)
        summary["build_seconds"] = round(time.perf_counter() - t, 1)
        (tmp / "corpus.json").write_text(json.dumps(summary, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    return d / "data", json.loads(info.read_text())


def tokenizer(cache: Path, data: Path, key: str, vocab_size: int) -> Path:
    """A byte-level BPE of ``vocab_size`` trained (once, cached) on the first 4 MB of
    ``big-a.jsonl`` (llmkit's :func:`~llmkit.core.tokenizer.train_bpe_tokenizer`)."""
    d = cache / f"tokenizer-{key}-v{vocab_size}"
    if not (d / "tokenizer.json").exists():
        from llmkit.core.tokenizer import train_bpe_tokenizer

        texts, n = [], 0
        with open(data / "big-a.jsonl", encoding="utf-8") as fh:
            for line in fh:
                texts.append(json.loads(line)["text"])
                n += len(line)
                if n > 4_000_000:
                    break
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        train_bpe_tokenizer(iter(texts), vocab_size, length=len(texts)).save_pretrained(tmp)
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    return d


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_cli(args: list[str]) -> tuple[float, int]:
    """Run ``llmkit ARGS`` in a fresh process: ``(wall seconds, peak RSS bytes of the largest
    process of its tree)`` (``wait4``: the child and the descendants it waited for)."""
    script = Path(sys.executable).parent / "llmkit"  # the console script, as users run it
    cmd = [str(script), *args] if script.exists() else [sys.executable, "-m", "llmkit", *args]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(stderr.decode(errors="replace")[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def task_records(work: Path) -> dict[str, list[dict]]:
    """The records each task of an executor run left (``taskstats/<stage>-<rank>.json``:
    ``start``, ``end`` (epoch seconds), ``max_rss`` bytes), by stage."""
    out: dict[str, list[dict]] = {}
    for p in sorted((work / "taskstats").glob("*.json")):
        rec = json.loads(p.read_text())
        out.setdefault(rec["stage"], []).append(rec)
    return out


def stage_seconds(records: dict[str, list[dict]], stage: str) -> float:
    """Wall seconds of a stage: its first task's start to its last task's end."""
    recs = records.get(stage, [])
    return max(r["end"] for r in recs) - min(r["start"] for r in recs) if recs else 0.0


def stage_gaps(records: dict[str, list[dict]]) -> dict[str, float]:
    """Seconds between the last task of a stage ending and the first task of the next one
    starting (the executor's start-up of the next stage: a pool of worker processes with
    more than one worker)."""
    order = [s for s in STAGE_ORDER if s in records]
    return {
        b: min(r["start"] for r in records[b]) - max(r["end"] for r in records[a])
        for a, b in zip(order, order[1:], strict=False)
    }


def stage_walls(work: Path) -> dict[str, float]:
    """Wall seconds of each stage as datatrove's executor saw it: from its ``executor.json``
    (written as the stage starts, before its worker processes) to its ``stats.json``
    (written once every task has finished): start-up included. Present with any version of
    the job (the task records are newer)."""
    out = {}
    for stage in STAGE_ORDER:
        d = work / "logs" / stage
        if (d / "executor.json").exists() and (d / "stats.json").exists():
            out[stage] = (d / "stats.json").stat().st_mtime - (d / "executor.json").stat().st_mtime
    return out


STAGE_ORDER = ("signatures", "groups", "resolve", "admit", "tokenizer", "encode", "pack")


def output_digest(out: Path) -> dict:
    """Rows of each split and one SHA-256 over the train then validation ``input_ids``."""
    import numpy as np
    from datasets import load_from_disk

    h = hashlib.sha256()
    rows = {}
    for split in ("train", "validation"):
        ds = load_from_disk(str(out / split)).with_format("numpy")
        rows[split] = len(ds)
        for i in range(0, len(ds), 65536):
            h.update(np.ascontiguousarray(ds[i : i + 65536]["input_ids"], dtype="<i4").tobytes())
    return {"rows": rows, "sha256": h.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=200.0, help="corpus size (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    ap.add_argument("--tasks", type=int, default=2, help="--tasks of the executor runs")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--tokenizer", help="a tokenizer directory (default: trained once, cached)")
    ap.add_argument(
        "--cache-dir",
        default=str(Path(tempfile.gettempdir()) / "llmkit-bench-prepare-distributed"),
        help="where the corpus, the tokenizer and the runs' outputs go",
    )
    ap.add_argument(
        "--only",
        default="np1,np2,ex1,ex2",
        help="runs, comma-separated: np1, np2 (--num-proc), ex1, ex2 (--executor local, "
        "1 or 2 workers)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the outputs and work dirs")
    args = ap.parse_args(argv)
    cache = Path(args.cache_dir).resolve()
    if DATA.resolve() in [cache, *cache.parents]:
        raise SystemExit(f"--cache-dir {cache} is under {DATA}: give another")
    cache.mkdir(parents=True, exist_ok=True)
    data, info = corpus(cache, args.size_mb, args.seed)
    print(
        f"corpus {data}: {info['documents']} documents, {info['bytes'] / 1e6:.1f} MB in "
        f"{len(info['files'])} files, planted {info['exact_copies']} exact and "
        f"{info['near_copies']} near copies (built in {info['build_seconds']} s)"
    )
    key = f"{args.size_mb:g}mb-s{args.seed}"
    tok = Path(args.tokenizer) if args.tokenizer else tokenizer(cache, data, key, args.vocab_size)
    print(f"tokenizer {tok}")
    runs_dir = cache / f"runs-{key}"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir()
    common = [str(data), "--tokenizer", str(tok), "--no-plot", "--overwrite"]
    configs = {
        "np1": ("--num-proc 1", ["--num-proc", "1", "--no-cache"]),
        "np2": ("--num-proc 2", ["--num-proc", "2", "--no-cache"]),
        "ex1": (f"local, {args.tasks} tasks, 1 worker", ["--num-proc", "1"]),
        "ex2": (f"local, {args.tasks} tasks, 2 workers", ["--num-proc", "2"]),
    }
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    print(f"load average before: {load_average()}  ({os.cpu_count()} cores)")
    results = {}
    for name in chosen:
        label, extra = configs[name]
        out = runs_dir / f"out-{name}"
        cli = ["prepare", *common, "--output", str(out), *extra]
        work = None
        if name.startswith("ex"):
            work = runs_dir / f"work-{name}"
            cli += ["--executor", "local", "--tasks", str(args.tasks), "--work-dir", str(work)]
        wall, tree_rss = run_cli(cli)
        manifest = json.loads((out / "manifest.json").read_text())
        docs = manifest["stages"]["read"]["documents_out"]
        r = {"label": label, "wall": wall, "docs": docs, "tree_rss": tree_rss}
        if work is not None:
            recs = task_records(work)
            r["task_rss"] = max((x["max_rss"] for v in recs.values() for x in v), default=0)
            r["stages"] = {s: stage_seconds(recs, s) for s in STAGE_ORDER if s in recs}
            r["gaps"] = stage_gaps(recs)
            r["walls"] = stage_walls(work)
            r["stage_rss"] = {
                s: max(x["max_rss"] for x in recs[s]) for s in STAGE_ORDER if s in recs
            }
        r.update(output_digest(out))
        results[name] = r
        print(
            f"  {name}: {wall:.1f} s, {docs / wall:.0f} documents/s, peak RSS "
            f"{tree_rss / 2**20:.0f} MiB; rows {r['rows']}"
        )
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {load_average()}")
    print_table(results)
    digests = {(json.dumps(r["rows"]), r["sha256"]) for r in results.values()}
    if len(digests) == 1:
        rows = next(iter(results.values()))["rows"]
        print(f"outputs identical across {len(results)} runs: rows {rows}, sha256 of tokens ok")
        return 0
    print("OUTPUTS DIFFER:")
    for name, r in results.items():
        print(f"  {name}: rows {r['rows']} sha256 {r['sha256']}")
    return 1


def print_table(results: dict) -> None:
    """The table: per run, seconds, documents read per second and its ratio to ``--num-proc
    1``, peak RSS of the CLI process (and what it waited for) and of the largest task, and
    the seconds of the de-duplication stages (datatrove's stage walls, start-up included);
    then per executor run each stage's wall, task seconds, task RSS and start-up gaps."""
    base = results.get("np1")
    mib = 2**20
    print()
    print(
        f"{'run':<28} {'seconds':>8} {'docs/s':>8} {'vs np1':>7} {'CLI RSS':>9} "
        f"{'task RSS':>9} {'dedup s':>8}  (signatures + groups + resolve)"
    )
    for r in results.values():
        rate = r["docs"] / r["wall"]
        ratio = f"{rate / (base['docs'] / base['wall']):.2f}" if base else "-"
        task = f"{r['task_rss'] / mib:.0f} MiB" if r.get("task_rss") else "-"
        dedup = f"{'-':>8}"
        if r.get("walls"):
            d = [r["walls"].get(s, 0.0) for s in ("signatures", "groups", "resolve")]
            dedup = f"{sum(d):8.1f}  ({d[0]:.1f} + {d[1]:.1f} + {d[2]:.1f})"
        print(
            f"{r['label']:<28} {r['wall']:8.1f} {rate:8.0f} {ratio:>7} "
            f"{r['tree_rss'] / mib:5.0f} MiB {task:>9} {dedup}"
        )
    for r in results.values():
        if not r.get("walls"):
            continue
        print(f"\n{r['label']}: stage walls (datatrove, start-up included), seconds:")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in r["walls"].items()))
        if r.get("stages"):
            print("  tasks running (first start to last end): ", end="")
            print(", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()))
            gaps = r["gaps"]
            print(f"  between stages ({sum(gaps.values()):.1f} s): ", end="")
            print(", ".join(f"{k} {v:.1f}" for k, v in gaps.items()))
            print("  peak RSS of a task, MiB: ", end="")
            print(", ".join(f"{k} {v / mib:.0f}" for k, v in r["stage_rss"].items()))


if __name__ == "__main__":
    sys.exit(main())
