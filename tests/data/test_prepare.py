"""`llmkit prepare`: reading, cleaning, splitting, the written layout, and bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import shared_file
from rich.console import Console
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.prepared import load_prepared
from llmkit.data.clean import ExactDedup, Normalize, StageStats, run_stages
from llmkit.data.pipeline import prepare, split_indices
from llmkit.data.readers import InputFile, discover_inputs, read_documents
from llmkit.errors import UserError

EOS = "<|endoftext|>"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def run_prepare(inputs, output, **kwargs) -> dict:
    return prepare([str(p) for p in inputs], output, console=quiet(), **kwargs)


def train_ids(path: Path) -> np.ndarray:
    """All train blocks of a prepared directory, shape (blocks, block_size)."""
    data = load_prepared(path)
    column = data.train.with_format("arrow")["input_ids"]
    return pc.list_flatten(column).to_numpy().reshape(len(data.train), data.block_size)


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


# ---------------------------------------------------------------------------------------------
# End to end on the first 60 kB of tiny Shakespeare.


@pytest.fixture(scope="module")
def shk(tmp_path_factory, shakespeare_slice) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "shk"
    manifest = run_prepare([shakespeare_slice], out, vocab_size=400, block_size=64)
    return out, manifest


def expected_documents(path: Path) -> list[str]:
    """The documents prepare should keep: blank-line split, NFC, first of each duplicate."""
    text = path.read_text(encoding="utf-8")
    docs = [d for d in re.split(r"\n(?:[ \t]*\n)+", text)]
    docs[-1] = docs[-1].removesuffix("\n")
    kept, seen = [], set()
    for d in (unicodedata.normalize("NFC", d) for d in docs):
        key = " ".join(d.split())
        if d.strip() and key not in seen:
            seen.add(key)
            kept.append(d)
    return kept


def test_end_to_end_layout_and_counts(shk, shakespeare_slice):
    from transformers import AutoTokenizer

    out, manifest = shk
    assert json.loads((out / "manifest.json").read_text()) == manifest
    data = load_prepared(out)
    assert data.block_size == 64
    assert str(data.train.features["input_ids"].feature.dtype) == "int32"
    for split in (data.train, data.validation):
        lengths = pc.list_value_length(split.with_format("arrow")["input_ids"]).to_numpy()
        assert len(lengths) > 0 and set(lengths.tolist()) == {64}
    for name, split in (("train", data.train), ("validation", data.validation)):
        sp = manifest["splits"][name]
        assert sp["blocks"] == len(split)
        assert sp["tokens"] == sp["blocks"] * 64 + sp["tail_tokens"]
        assert 0 <= sp["tail_tokens"] < 64
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == manifest["tokenizer"]["vocab_size"] <= 400
    assert tok.eos_token == EOS and tok.eos_token_id == manifest["tokenizer"]["eos_token_id"]

    [entry] = manifest["inputs"]
    raw = shakespeare_slice.read_bytes()
    assert entry["size_bytes"] == len(raw)
    assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
    docs = expected_documents(shakespeare_slice)
    dedup = manifest["stages"]["deduplicate"]
    assert dedup["documents_out"] == len(docs)
    assert dedup["documents_in"] == manifest["stages"]["normalize"]["documents_out"]
    assert dedup["documents_in"] - dedup["documents_out"] == dedup["dropped"].get("duplicate", 0)
    n_train = manifest["splits"]["train"]["documents"]
    n_val = manifest["splits"]["validation"]["documents"]
    assert (n_train + n_val, n_val) == (len(docs), round(len(docs) * 0.1))


def test_train_blocks_are_the_train_documents_joined_by_eos(shk, shakespeare_slice):
    out, manifest = shk
    docs = expected_documents(shakespeare_slice)
    train_idx, _ = split_indices(len(docs), 0.1, 1337)
    expected = "".join(docs[i] + EOS for i in train_idx)
    assert manifest["splits"]["train"]["bytes"] == sum(len(docs[i].encode()) for i in train_idx)
    decoded = load_prepared(out).tokenizer.decode(train_ids(out).ravel().tolist())
    assert expected.startswith(decoded)
    assert decoded.count(EOS) >= len(train_idx) - manifest["splits"]["train"]["tail_tokens"]
    assert len(decoded) > len(expected) - 64 * 20  # only the tail (< 64 tokens) is missing


def test_same_seed_same_blocks_other_seed_other_split(shk, shakespeare_slice, tmp_path):
    out, manifest = shk
    again = run_prepare([shakespeare_slice], tmp_path / "again", vocab_size=400, block_size=64)
    other = run_prepare(
        [shakespeare_slice], tmp_path / "other", vocab_size=400, block_size=64, seed=7
    )
    assert np.array_equal(train_ids(out), train_ids(tmp_path / "again"))
    assert again["splits"] == manifest["splits"]
    assert (
        other["splits"]["validation"]["documents"] == manifest["splits"]["validation"]["documents"]
    )
    assert other["splits"]["validation"]["bytes"] != manifest["splits"]["validation"]["bytes"]
    a, b = train_ids(out), train_ids(tmp_path / "other")
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_json_flag_prints_the_manifest_and_overwrite_replaces(shakespeare_slice, tmp_path):
    out = tmp_path / "nested" / "data"
    first = cli(str(shakespeare_slice), "-o", str(out), "--vocab-size", "300", "--json")
    assert first.exit_code == 0, first.output
    manifest = json.loads(first.stdout)
    assert manifest["settings"]["vocab_size"] == 300
    assert "train" in first.stderr and "tokens" in first.stderr  # the summary, on stderr
    second = cli(
        str(shakespeare_slice),
        "-o",
        str(out),
        "--vocab-size",
        "300",
        "--block-size",
        "32",
        "--overwrite",
    )
    assert second.exit_code == 0, second.output
    assert load_prepared(out).block_size == 32
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # no temp or old dir left


# ---------------------------------------------------------------------------------------------
# Reading and cleaning.


def test_text_split_on_blank_line_runs(tmp_path):
    f = tmp_path / "notes.md"
    f.write_bytes(
        "\ufeff\n\nFirst doc,\nline two.\n\nSecond.\n  \t\n\n\n   Third, indented.\r\n\r\n"
        "Fourth\n\n\n".encode()
    )
    [source] = discover_inputs([f])
    docs = list(read_documents(source))
    assert docs == ["First doc,\nline two.", "Second.", "   Third, indented.", "Fourth"]
    assert source.documents == 4
    assert source.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    [whole] = list(read_documents(InputFile(f, "text", None, 0), split_on="none"))
    assert whole.startswith("\n\nFirst doc") and whole.count("\n") == 14


def test_jsonl_text_field_and_compression(tmp_path):
    rows = [{"content": "one", "id": 1}, {"content": "two"}, {"content": "thr\u00e9e"}]
    f = tmp_path / "corpus.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
        fh.write(json.dumps(rows[2], ensure_ascii=False) + "\n")
    (tmp_path / "skip.dat").write_text("a,b\n")
    [source] = discover_inputs([tmp_path])
    assert (source.kind, source.compression) == ("jsonl", ".gz")
    assert list(read_documents(source, text_field="content")) == ["one", "two", "thr\u00e9e"]
    assert source.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=r"corpus\.jsonl\.gz:1: no field 'text'"):
        list(read_documents(source))


def test_exact_dedup_after_nfc():
    docs = ["caf\u00e9", "cafe\u0301", "a-b", "ab", "  ab\n", "\n \t", "A-B"]
    stages = [Normalize("NFC"), ExactDedup()]
    stats = [StageStats(s.name) for s in stages]
    assert list(run_stages(docs, stages, stats)) == ["caf\u00e9", "a-b", "ab", "A-B"]
    norm, dedup = (s.as_dict() for s in stats)
    assert norm["dropped"] == {"empty": 1} and norm["documents_out"] == 6
    assert norm["bytes_in"] == sum(len(d.encode()) for d in docs)
    # NFD é is 1 byte longer; 3 blank; the trailing line break of "  ab\n" is stripped
    assert norm["bytes_out"] == norm["bytes_in"] - 3 - 1 - 1
    assert dedup["dropped"] == {"duplicate": 2} and dedup["documents_out"] == 4


def test_dedup_counts_in_the_manifest(tmp_path):
    lines = ["caf\u00e9 au lait", "cafe\u0301 au lait", "a-b c", "ab c", "   "]
    lines += [f"line number {i} of the corpus" for i in range(40)]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    m = run_prepare([f], tmp_path / "out", vocab_size=300, block_size=16, val_fraction=0.0)
    assert m["inputs"][0]["documents"] == 45
    assert m["stages"]["normalize"]["dropped"] == {"empty": 1}
    assert m["stages"]["deduplicate"]["dropped"] == {"duplicate": 1}
    assert m["splits"]["train"]["documents"] == 43
    assert m["splits"]["validation"]["blocks"] == 0
    assert len(load_prepared(tmp_path / "out").validation) == 0


def test_string_input_and_stale_temporaries_of_killed_runs(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(f"document {i} says hello" for i in range(30)), encoding="utf-8")
    stale = tmp_path / ".out.tmp-999999999-0badf00d"  # no such process
    stale.mkdir()
    m = prepare(str(f), tmp_path / "out", vocab_size=300, block_size=8, console=quiet())
    assert m["inputs"][0]["documents"] == 30
    assert m["settings"]["vocab_size"] == 300 and m["settings"]["tokenizer"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "out"]


def test_split_indices_are_deterministic_and_disjoint():
    train, val = split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and sorted(set(train) | set(val)) == list(range(100))
    assert np.array_equal(val, split_indices(100, 0.1, seed=3)[1])
    assert not np.array_equal(val, split_indices(100, 0.1, seed=4)[1])
    assert len(split_indices(2, 0.01, seed=0)[1]) == 1  # at least one validation document
    assert len(split_indices(1, 0.5, seed=0)[1]) == 0  # but never the only one


def test_tokenizer_with_bos_gives_one_bos_and_one_eos_per_document(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i for i, c in enumerate("abcdef", start=3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(list("abcdef"), size=rng.integers(1, 9))) for _ in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs), encoding="utf-8")
    m = run_prepare(
        [tmp_path / "c.txt"],
        tmp_path / "out",
        tokenizer=str(tmp_path / "tok"),
        block_size=8,
        val_fraction=0.0,
    )
    assert m["tokenizer"]["adds_bos"] and not m["tokenizer"]["eos_added_by_tokenizer"]
    n_docs = m["splits"]["train"]["documents"]
    stream = train_ids(tmp_path / "out").ravel()
    (bos,) = np.nonzero(stream == 1)
    (eos,) = np.nonzero(stream == 2)
    assert stream[0] == 1
    assert np.array_equal(bos[1:], eos[: len(bos) - 1] + 1)  # every EOS is followed by a BOS
    assert n_docs - 1 <= len(eos) <= n_docs and len(bos) <= n_docs
    assert len(stream) + m["splits"]["train"]["tail_tokens"] == m["splits"]["train"]["tokens"]


def test_num_proc_does_not_change_the_output(
    shakespeare_slice, tmp_path, tiny_tokenizer, monkeypatch
):
    import llmkit.data.pipeline as pipeline

    # clean and encode in 2 processes even on 60 kB (test_prepare_scale.py: on real corpora)
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_BYTES_ENCODE", 1)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    kw = dict(tokenizer=str(tmp_path / "tok"), block_size=32, cache=False)
    one = run_prepare([shakespeare_slice], tmp_path / "one", num_proc=1, **kw)
    two = run_prepare([shakespeare_slice], tmp_path / "two", num_proc=2, **kw)
    assert one["splits"] == two["splits"] and one["stages"] == two["stages"]
    assert np.array_equal(train_ids(tmp_path / "one"), train_ids(tmp_path / "two"))


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written.


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("\n \n\t\n")
    (tmp / "nodocs").mkdir()
    (tmp / "nodocs" / "data.bin").write_bytes(b"\x00\x01")
    (tmp / "nodocs" / "table.xls").write_text("a,b\n")
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n', encoding="utf-8")
    (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    (tmp / "binary.txt").write_bytes(b"hello\nwor\x00ld\n")
    (tmp / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    return {
        "missing": (tmp / "nope.txt", "nope.txt does not exist"),
        "empty": (tmp / "empty.txt", "no documents left"),
        "blank": (tmp / "blank.txt", "no documents left"),
        "no text files": (tmp / "nodocs", "holds no supported text file"),
        "malformed json": (tmp / "bad.jsonl", "bad.jsonl:2: malformed JSON"),
        "missing field": (tmp / "nofield.jsonl", "nofield.jsonl:2: no field 'text'"),
        "binary": (tmp / "binary.txt", "binary.txt:2: looks like a binary file"),
        "not utf-8": (tmp / "latin1.txt", "latin1.txt:1: invalid UTF-8"),
        "glob": (tmp / "*.parquet", "no file matches"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "blank",
        "no text files",
        "malformed json",
        "missing field",
        "binary",
        "not utf-8",
        "glob",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    path, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "new" / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(str(path), "-o", str(out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--val-fraction", "1"], "--val-fraction 1.0 is outside [0, 1)"),
        (["--val-fraction", "-0.1"], "outside [0, 1)"),
        (["--vocab-size", "100"], "--vocab-size 100 is too small"),
        (["--block-size", "100000"], "fewer than one block of 100000"),
        (["--tokenizer", "/nonexistent/tok"], "tokenizer /nonexistent/tok does not exist"),
    ],
)
def test_bad_settings(tmp_path, args, message):
    f = tmp_path / "a.txt"
    f.write_text("some text\n\nand more text\n\nand a third document here\n")
    result = cli(str(f), "-o", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    # progress lines of the steps already done may come first; the error is one last line
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0]
    assert message in errors[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_existing_output_is_left_alone(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("some text\n\nand more text\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only a prepared directory
        result = cli(str(f), "-o", str(out), *extra)
        assert result.exit_code == 2, result.output
        assert len(result.stderr.splitlines()) == 1
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "precious"
    assert "--overwrite" in cli(str(f), "-o", str(out)).stderr


# ---------------------------------------------------------------------------------------------
# The report: PII counts, normalization and HTML options, the plot, every setting recorded.


def test_pii_is_redacted_by_default_counted_and_kept_with_pii_keep(tmp_path):
    docs = shared_file("dolma_docs/000.json.gz")
    out = tmp_path / "out"
    result = cli(str(docs), "-o", str(out), "--vocab-size", "300", "--no-plot", "--json")
    assert result.exit_code == 0, result.output
    pii = json.loads(result.stdout)["stages"]["pii"]
    assert pii["replaced"]["email"] == 3 and pii["documents_changed"] >= 3
    data = load_prepared(out)
    text = data.tokenizer.decode(
        pc.list_flatten(data.train.with_format("arrow")["input_ids"]).to_pylist()
        + pc.list_flatten(data.validation.with_format("arrow")["input_ids"]).to_pylist()
    )
    assert "<EMAIL>" in text and "info@eun.org" not in text
    kept = cli(
        str(docs), "-o", str(tmp_path / "kept"), "--vocab-size", "300", "--no-plot", "--pii",
        "keep", "--json",
    )  # fmt: skip
    assert kept.exit_code == 0, kept.output
    m = json.loads(kept.stdout)
    assert "pii" not in m["stages"] and m["settings"]["cleaning"]["pii"] == "keep"


def test_nfkc_and_html_options_reach_the_documents(tmp_path):
    pytest.importorskip(
        "trafilatura", reason="--html needs the html extra: pip install 'llmkit[html]'"
    )
    page = (
        "<html><head><title>t</title><script>var x = 1;</script></head><body>"
        "<nav>Home | About | Contact</nav><article><h1>The river</h1>"
        + "".join(
            f"<p>Paragraph {i}: the river runs past the old mill and the \ufb01elds "
            "beyond it, where the farmers bring their sheep down in autumn.</p>"
            for i in range(6)
        )
        + "</article><footer>Copyright 2024</footer></body></html>"
    )
    f = tmp_path / "pages.jsonl"
    f.write_text(json.dumps({"text": page}) + "\n" + json.dumps({"text": "<p></p>"}) + "\n")
    m = run_prepare(
        [f],
        tmp_path / "out",
        vocab_size=300,
        block_size=16,
        val_fraction=0.0,
        keep_dropped=True,
        plot=False,
        clean={"normalize": {"html": True, "form": "NFKC", "fix_mojibake": False}},
    )
    assert m["settings"]["normalization"] == "NFKC"
    assert m["stages"]["normalize"]["dropped"] == {"no main text": 1}
    data = load_prepared(tmp_path / "out")
    text = data.tokenizer.decode(train_ids(tmp_path / "out").ravel().tolist())
    assert "Paragraph 0: the river" in text and "fields" in text  # NFKC: the fi ligature
    assert "\ufb01" not in text and "<p>" not in text and "var x" not in text
    [dropped] = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").open()]
    assert dropped == {"stage": "normalize", "reason": "no main text", "text": "<p></p>"}


def test_lengths_png_and_the_histogram_count_every_document(shk):
    out, manifest = shk
    png = (out / "lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    hist = manifest["length_histogram"]
    assert sum(hist["read"]) == manifest["stages"]["read"]["documents_out"]
    kept = manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"]
    assert sum(hist["kept"]) == kept
    assert "lengths.png" in manifest["files"]


def test_the_manifest_records_every_setting(shk):
    import inspect

    _, manifest = shk
    params = set(inspect.signature(prepare).parameters)
    # inputs are recorded with sizes and hashes; config and clean as the merged "cleaning"
    # trust_remote_code is a permission, not a setting of the data (the tokenizer saved with
    # the data says itself whether it needs code of its own)
    not_settings = {"inputs", "output", "overwrite", "console", "config", "clean", "cache"}
    not_settings.add("trust_remote_code")
    assert params - not_settings <= set(manifest["settings"])
    assert manifest["settings"]["cleaning"]["dedup"] == {
        "exact": True,
        "near": True,
        "ngram_size": 5,
        "num_perm": 112,
        "bands": 14,
        "rows": 8,
        "threshold": None,
        "seed": 1,
        "normalize": False,
    }
    assert manifest["settings"]["cleaning"]["pii_region"] == ["US", "GB"]
    assert manifest["settings"]["cleaning"]["filters"]["gopher_quality"]["min_words"] == 50
    assert manifest["llmkit_version"] and set(manifest["fingerprint"]) == {"cleaning", "full"}
