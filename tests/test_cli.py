"""The CLI starts light: no torch, transformers, datasets or accelerate for --help (SPEC §1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets", "accelerate", "tokenizers")

PROBE = """
import sys
from typer.testing import CliRunner
from llmkit.cli import app
args = sys.argv[1:]
result = CliRunner().invoke(app, args)
assert result.exit_code == 0, result.output
heavy = [m for m in {heavy!r} if m in sys.modules]
print(",".join(heavy))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["prepare", "--help"],
        ["train", "--help"],
        ["generate", "--help"],
        ["eval", "--help"],
        ["chat", "--help"],
        ["serve", "--help"],
        ["--version"],
    ],
)
def test_help_loads_no_heavy_library(args):
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "", f"`llmkit {' '.join(args)}` imported {out.stdout.strip()}"


def test_every_subcommand_is_registered():
    from typer.main import get_command

    from llmkit.cli import app

    names = set(get_command(app).commands)
    assert {"prepare", "train", "generate", "eval", "chat", "serve"} <= names
