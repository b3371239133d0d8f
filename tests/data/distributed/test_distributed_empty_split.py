"""``--val-fraction 0`` with ``--executor``: the validation split is empty, written as one
empty shard that ``load_from_disk`` reads, as ``--num-proc 1`` writes it (writing it was a
``ValueError: Instruction "train" corresponds to no data!`` traceback, for documents and for
conversations)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app

pytest.importorskip("datatrove")

SUPPORT = Path(__file__).resolve().parents[3] / "examples" / "support"


@pytest.mark.parametrize("kind", ["documents", "conversations"])
def test_no_validation_split(tmp_path, kind, shakespeare_slice):
    from llmkit.core.prepared import load_prepared

    if kind == "documents":
        inputs, args = shakespeare_slice, ("--vocab-size", "300", "--block-size", "32")
    else:
        inputs, args = SUPPORT / "alpaca.jsonl", ("--vocab-size", "300", "--block-size", "128")
    common = (str(inputs), *args, "--no-plot", "--val-fraction", "0", "--num-proc", "1")
    ref = CliRunner().invoke(app, ["prepare", *common, "-o", str(tmp_path / "ref"), "--no-cache"])
    assert ref.exit_code == 0, ref.output
    dist = ("--executor", "local", "--tasks", "2", "--work-dir", str(tmp_path / "w"))
    result = CliRunner().invoke(app, ["prepare", *common, "-o", str(tmp_path / "out"), *dist])
    assert result.exit_code == 0, result.output
    got, want = load_prepared(tmp_path / "out"), load_prepared(tmp_path / "ref")
    assert len(got.validation) == len(want.validation) == 0
    assert got.validation.column_names == want.validation.column_names
    assert len(got.train) == len(want.train) > 0
    assert got.train.to_dict() == want.train.to_dict()
