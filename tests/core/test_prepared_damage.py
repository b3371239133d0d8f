"""A damaged prepared directory (a truncated or missing .arrow file, fewer rows than the
manifest counts) is one line naming the file, exit 2, in `llmkit train` and `llmkit eval`."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from llmkit.cli import app


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shakespeare_slice):
    """60 kB of tiny Shakespeare through the real `llmkit prepare` (blocks of 32 tokens)."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    args = ["prepare", str(shakespeare_slice), "--output", str(out), "--vocab-size", "300"]
    result = CliRunner().invoke(app, [*args, "--block-size", "32", "--no-plot"])
    assert result.exit_code == 0, result.output
    return out


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def run_both(data, tiny_model_dir, tmp_path) -> list[str]:
    train = ["train", f"data.path={data}", f"out_dir={tmp_path / 'run'}", "model.n_layer=1"]
    train += ["model.n_embd=16", "model.n_head=2", "train.max_steps=2", "train.trackers=[]"]
    evaluate = ["eval", "-m", str(tiny_model_dir), "-d", str(data), "--json"]
    lines = [one_error_line(CliRunner().invoke(app, args)) for args in (train, evaluate)]
    assert not (tmp_path / "run").exists()
    return lines


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_truncated_arrow_is_one_line_naming_the_file(prepared, tiny_model_dir, tmp_path, keep):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (arrow,) = (data / "train").glob("*.arrow")
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:
        f.truncate(int(size * keep))
    for line in run_both(data, tiny_model_dir, tmp_path):
        assert line.startswith(f"error: prepared data {data} is damaged: {arrow} cannot be read")
        assert line.endswith(
            f"— rerun llmkit prepare with the same inputs and --output {data} --overwrite"
        )


def test_missing_arrow_is_named(prepared, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (arrow,) = (data / "validation").glob("*.arrow")
    arrow.unlink()
    for line in run_both(data, tiny_model_dir, tmp_path):
        assert line.startswith(f"error: prepared data {data} is damaged: {arrow} is missing")


def test_arrow_cut_between_record_batches_is_caught_by_the_count(
    prepared, tiny_model_dir, tmp_path
):
    """A file cut exactly after a record batch is a valid, shorter Arrow stream: the rows are
    counted against the manifest."""
    import json

    import pyarrow as pa

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (arrow,) = (data / "train").glob("*.arrow")
    with pa.memory_map(str(arrow)) as source:
        table = pa.ipc.open_stream(source).read_all()
    half = table.slice(0, table.num_rows // 2)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(half)
    blocks = json.loads((data / "manifest.json").read_text())["splits"]["train"]["blocks"]
    assert blocks == table.num_rows
    for line in run_both(data, tiny_model_dir, tmp_path):
        assert line.startswith(
            f"error: prepared data {data} is damaged: {arrow} holds {half.num_rows:,} blocks "
            f"where manifest.json counts {blocks:,} (truncated?)"
        )
