"""``llmkit prepare --executor local`` on Hub dataset inputs. Nothing can be downloaded here,
so the Hub's streaming loader is pointed at local files (the same ``datasets.load_dataset(...,
streaming=True)`` stream prepare reads, from parquet or JSON-lines data files): a Hub dataset
is one shard read by prepare's own reader, and the rows and manifest counts equal ``llmkit
prepare --num-proc 1`` for 1 and 2 tasks, for documents and for conversations. An unreachable
Hub (``HF_HUB_OFFLINE=1``) is one line, exit 2, in seconds, before anything runs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from typer.testing import CliRunner

from llmkit.cli import app

pytest.importorskip("datatrove")

SUPPORT = Path(__file__).resolve().parents[3] / "examples" / "support"
STORIES = "acme/stories"
SUPPORT_ID = "acme/support"


def cli(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory) -> dict:
    """Data files of two made-up Hub datasets: tiny stories in three parquet files (a
    ``text`` column; one row of the last without text), the support conversations as JSON
    lines (``messages``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("hub")
    stories = shared_file("tinystories/tinystories.txt").read_text(encoding="utf-8")
    docs = [x for x in stories.split("\n\n") if x.strip()]
    parts = np.array_split(np.arange(len(docs)), 3)
    files = []
    for k, idx in enumerate(parts):
        path = d / f"train-{k:05d}-of-00003.parquet"
        texts = [docs[i] for i in idx]
        if k == 2:
            texts[5] = None  # a row without text: skipped, the first error names its row
        pq.write_table(pa.table({"text": texts, "id": idx.tolist()}), path)
        files.append(str(path))
    return {
        STORIES: ("parquet", files),
        SUPPORT_ID: ("json", [str(SUPPORT / "conversations.jsonl")]),
    }


@pytest.fixture
def fake_hub(monkeypatch, hub_files):
    """The Hub reachable, and its datasets streamed from the local data files."""
    import datasets

    import llmkit.data.readers as readers

    real = datasets.load_dataset

    def load_dataset(name, config=None, *, split, streaming, trust_remote_code=False):
        assert streaming and not trust_remote_code
        builder, files = hub_files[name]
        return real(builder, data_files={"train": files}, split=split, streaming=True)

    monkeypatch.setattr(readers, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def _loaded(out: Path) -> dict:
    from llmkit.core.prepared import load_prepared

    data = load_prepared(out)
    return {
        "train": data.train.to_dict(),
        "validation": data.validation.to_dict(),
        "manifest": data.manifest.as_dict(),
    }


@pytest.mark.parametrize(
    ("inputs", "args"),
    [
        ((STORIES,), ("--vocab-size", "300", "--block-size", "32")),
        pytest.param(
            (SUPPORT_ID,),
            ("--format", "chat", "--vocab-size", "400", "--block-size", "256"),
            marks=pytest.mark.slow,  # about 15 s
        ),
    ],
    ids=["documents", "conversations"],
)
def test_hub_dataset_equals_num_proc_1(tmp_path, fake_hub, inputs, args, shakespeare_slice):
    extra = (str(shakespeare_slice),) if inputs == (STORIES,) else ()
    common = (*inputs, *extra, *args, "--no-plot", "--num-proc", "1", "--on-error", "skip")
    one = cli(*common, "--output", str(tmp_path / "ref"), "--no-cache")
    assert one.exit_code == 0, one.output
    ref = _loaded(tmp_path / "ref")
    for tasks in (1, 2):
        out = tmp_path / f"out{tasks}"
        dist = (
            "--executor",
            "local",
            "--tasks",
            str(tasks),
            "--work-dir",
            str(tmp_path / f"w{tasks}"),
        )
        result = cli(*common, "--output", str(out), *dist)
        assert result.exit_code == 0, result.output
        got = _loaded(out)
        for name in ("train", "validation"):
            assert got[name] == ref[name] and len(got[name]["input_ids"]) > 3
        for key in ("inputs", "stages"):
            assert got["manifest"][key] == ref["manifest"][key], key
        for name in ("train", "validation"):
            for key in ("documents", "tokens", "blocks"):
                assert got["manifest"]["splits"][name][key] == ref["manifest"]["splits"][name][key]
        if inputs == (STORIES,):  # one shard per data file, and the text file's
            assert got["manifest"]["executor"]["shards"] == 3 + 1
    hub = ref["manifest"]["inputs"][0]
    assert hub["hub"] is True and hub["split"] == "train" and hub["documents"] > 50
    if inputs == (STORIES,):  # numbered across the files, as one process numbers it
        n = len(np.array_split(np.arange(hub["documents"] + 1), 3)[0])
        assert hub["first_error"].startswith(f"acme/stories: row {2 * n + 6}:"), hub


def test_unreachable_hub_is_one_line_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    result = cli(
        STORIES, "--output", str(tmp_path / "o"), "--executor", "local", "--tasks", "2",
        "--work-dir", str(tmp_path / "w"),
    )  # fmt: skip
    assert time.monotonic() - started < 10
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert "the Hub dataset acme/stories cannot be loaded: offline mode (HF_HUB_OFFLINE=1)" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_hub_parts_come_from_the_parquet_footers(fake_hub, hub_files, monkeypatch):
    """One part per parquet data file, with its rows; a JSON-lines dataset, or footers out of
    reach, make the dataset one shard (always right)."""
    import fsspec
    import pyarrow.parquet as pq

    from llmkit.data.distributed.shards import hub_file_rows
    from llmkit.data.readers import discover_inputs

    [stories] = discover_inputs([STORIES])
    want = [pq.ParquetFile(f).metadata.num_rows for f in hub_files[STORIES][1]]
    assert hub_file_rows(stories) == want and len(want) == 3
    [support] = discover_inputs([SUPPORT_ID])
    assert hub_file_rows(support) is None

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(fsspec, "open", unreachable)
    assert hub_file_rows(stories) is None
