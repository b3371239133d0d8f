"""llmkit.core.console: off a terminal (a file, a pipe, CliRunner) nothing llmkit prints is cut
at rich's default 80 columns."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.console import PIPE_WIDTH, make_console


def test_off_a_terminal_a_long_line_and_a_wide_table_stay_whole(capsys, monkeypatch):
    from rich.table import Table

    monkeypatch.delenv("COLUMNS", raising=False)
    console = make_console()
    assert not console.is_terminal and console.width == PIPE_WIDTH
    line = " ".join(f"word{i}" for i in range(60))  # 469 characters
    console.print(line, highlight=False)
    table = Table()
    for i in range(12):
        table.add_column(f"a long column name {i}")
    table.add_row(*[f"value number {i}" for i in range(12)])
    console.print(table)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == line
    assert len(out) == 1 + 5  # the table: top, header, rule, one row, bottom; no wrapped cells
    assert all(f"a long column name {i}" in out[2] for i in range(12))


def test_columns_set_by_the_user_is_honoured(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    assert make_console().width == 60


def test_dry_run_memory_line_is_one_line_off_a_terminal(write_prepared, tiny_tokenizer, tmp_path):
    """The dry run's memory line (about 100 characters) was cut at 80 columns in a pipe."""
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 16, 2)
    args = ["train", f"data.path={data}", f"out_dir={tmp_path / 'r'}", "model.n_layer=1"]
    args += ["model.n_embd=16", "model.n_head=2", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [memory] = [x for x in result.output.splitlines() if "memory per process" in x]
    assert re.fullmatch(
        r"  memory per process  [\d.]+ GiB = weights [\d.]+ \+ gradients [\d.]+ \+ optimizer "
        r"[\d.]+ \+ activations [\d.]+",
        memory,
    ), memory
    assert len(memory) > 80


@pytest.mark.parametrize("stderr", [False, True])
def test_on_a_terminal_rich_decides(monkeypatch, stderr):
    from rich.console import Console

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    assert make_console(stderr=stderr).width != PIPE_WIDTH
