"""``llmkit prepare --executor local`` on web archives (WARC, one shard per archive file, read
by prepare's own reader) mixed with a text corpus cut into ranges: rows and manifest counts
equal ``llmkit prepare --num-proc 1`` for 1 and 2 tasks, with the cut-off archive skipped and
counted, or named in one line under ``--on-error fail``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from typer.testing import CliRunner

from llmkit.cli import app

pytest.importorskip("datatrove")
pytest.importorskip("warcio")

ARCHIVES = (
    "example.warc.gz",
    "example-iana.org-chunked.warc",
    "example-resource.warc.gz",
    "example-trunc.warc",
)
COMMON = ("--vocab-size", "300", "--block-size", "32", "--no-plot", "--on-error", "skip")


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_slice) -> Path:
    """The four web archives of ../shared/data/warc (one cut off mid-record) between two
    text files, so that archive shards sit between range shards."""
    d = tmp_path_factory.mktemp("web")
    (d / "a.txt").write_bytes(shakespeare_slice.read_bytes()[:40_000])
    for name in ARCHIVES:
        (d / f"b_{name}").write_bytes(shared_file(f"warc/{name}").read_bytes())
    (d / "c.txt").write_bytes(shakespeare_slice.read_bytes()[40_000:])
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("ref") / "out"
    result = cli(str(corpus), "--output", str(out), "--num-proc", "1", "--no-cache", *COMMON)
    assert result.exit_code == 0, result.output
    return out


def _loaded(out: Path) -> dict:
    from llmkit.core.prepared import load_prepared

    data = load_prepared(out)
    return {
        "train": np.asarray(data.train["input_ids"]),
        "validation": np.asarray(data.validation["input_ids"]),
        "manifest": data.manifest.as_dict(),
    }


@pytest.mark.parametrize("tasks", [1, 2])
def test_web_archives_equal_num_proc_1(tmp_path, corpus, reference, tasks):
    out = tmp_path / "out"
    args = ("--executor", "local", "--tasks", str(tasks), "--work-dir", str(tmp_path / "w"))
    result = cli(str(corpus), "--output", str(out), *args, "--num-proc", "1", *COMMON)
    assert result.exit_code == 0, result.output
    got, ref = _loaded(out), _loaded(reference)
    for name in ("train", "validation"):
        assert got[name].shape == ref[name].shape and len(got[name]) > 5
        assert (got[name] == ref[name]).all()
        for key in ("documents", "tokens", "blocks", "tail_tokens"):
            assert got["manifest"]["splits"][name][key] == ref["manifest"]["splits"][name][key]
    assert got["manifest"]["inputs"] == ref["manifest"]["inputs"]
    assert got["manifest"]["stages"] == ref["manifest"]["stages"]
    web = [e for e in ref["manifest"]["inputs"] if "warc" in e["path"]]
    assert len(web) == 4 and sum(e["documents"] for e in web) >= 3  # pages were read
    assert sum(sum(e.get("records_skipped", {}).values()) for e in web) > 0  # warcinfo...
    assert [e.get("skipped") for e in web if "trunc" in e["path"]] != [None]  # the cut one
    assert got["manifest"]["executor"]["shards"] >= 4 + 2  # one per archive, and the texts


def test_a_cut_off_archive_is_one_line_naming_it(tmp_path, corpus):
    args = ("--vocab-size", "300", "--block-size", "32", "--no-plot")
    result = cli(
        str(corpus), "--output", str(tmp_path / "o"), "--executor", "local", "--tasks", "2",
        "--work-dir", str(tmp_path / "w"), *args,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    line = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "b_example-trunc.warc" in line[0] and "shard " in line[0]
    assert not (tmp_path / "o").exists()
