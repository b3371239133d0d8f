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


# --- mistakes in the flags: one line, exit 2, and no torch imported to say so ---------------

ERROR_PROBE = """
import json, sys
from typer.testing import CliRunner
from llmkit.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"code": result.exit_code, "stderr": result.stderr, "heavy": heavy}}))
"""


def run_probe(args: list[str], cwd) -> dict:
    import json

    out = subprocess.run(
        [sys.executable, "-c", ERROR_PROBE.format(heavy=HEAVY), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--config", "missing.yaml"], "recipe missing.yaml does not exist"),
        (["train", "train.mixed_precision=FP16"], "train.mixed_precision=fp16"),
        (["train", "data.path=nowhere"], "nowhere does not exist"),
        (["train", "--threads", "0"], "--threads 0 must be at least 1"),
        (["train", "--resume", "latest"], "--resume latest: runs/run/checkpoints holds no"),
        (["generate", "--temperature", "-1", "hi"], "--temperature -1.0 is negative"),
        (["generate", "--top-p", "2", "hi"], "--top-p 2.0 is outside (0, 1]"),
        (["generate", "--device", "gpu", "hi"], "unknown device 'gpu'"),
        (["generate", "--dtype", "float8", "hi"], "unknown dtype 'float8'"),
        (["generate", "--batch-size", "0", "hi"], "--batch-size 0 must be at least 1"),
        # were an OverflowError traceback, and 9.8 GB over 4 minutes
        (["generate", "--seed", str(2**64), "hi"], f"--seed {2**64} is outside torch's range"),
        (["chat", "--seed", str(-(2**63) - 1)], "is outside torch's range"),
        (["generate", "-n", "1000000", "hi"], "--num-return-sequences 1000000 is more than 1024"),
        (["generate", "-f", "."], "cannot read .: Is a directory — give --prompts-file a text"),
        (["train", "train.seed=4294967296"], "`train.seed` in the command-line overrides: "),
        (["train", "train.seed=-1"], "`train.seed` in the command-line overrides: "),
        (["chat", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
        (["eval", "-m", "x", "-d", "missing.txt"], "missing.txt does not exist"),
        (["eval", "-m", "x", "-d", ".", "--max-length", "8", "--stride", "9"], "--stride 9"),
        (["eval", "-m", "x", "-d", ".", "--stride", "0"], "--stride 0 must be at least 1 — "),
        (["eval", "-m", "x", "-d", ".", "--split", "test"], "unknown split 'test'"),
        (["eval", "-m", "x", "--tasks", "hellaswag", "--limit", "0"], "--limit 0"),
        (["serve", "--max-batch-size", "0"], "--max-batch-size 0 must be at least 1"),
        (["serve", "--threads", "0"], "--threads 0 must be at least 1"),
        # a segmentation fault while libraries loaded
        (["train", "--threads", "100000"], "--threads 100000 is more than "),
        (["generate", "--threads", "100000", "hi"], "--threads 100000 is more than "),
        (["prepare", "x.txt", "-o", "o", "--pii-region", ","], "--pii-region is empty"),
        (["prepare", "x.txt", "-o", "o", "--num-proc", "100000"], "--num-proc 100000 is more"),
        (["serve", "--port", "70000"], "--port 70000 is not a port number"),
        (["serve", "--batch-wait-ms", "nan"], "--batch-wait-ms nan is not a number from 0 to"),
        (["serve", "--batch-wait-ms", "inf"], "--batch-wait-ms inf is not a number from 0 to"),
        (["serve", "--batch-wait-ms", "-1"], "--batch-wait-ms -1.0 is negative"),
    ],
)
def test_bad_flags_fail_before_torch_is_imported(tmp_path, args, needle):
    data = tmp_path / "data" / "shakespeare"  # the default data.path, prepared (empty)
    (data / "train").mkdir(parents=True)
    (data / "manifest.json").write_text('{"settings": {"block_size": 8}}')
    got = run_probe(args, tmp_path)
    assert got["code"] == 2, got
    lines = got["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert got["heavy"] == [], f"`llmkit {' '.join(args)}` imported {got['heavy']} first"


@pytest.mark.parametrize(
    "args, needle, command",
    [
        (["train", "--foo"], "no such option '--foo'", "llmkit train"),
        (["generate", "--max-new-tokens", "x"], "'x' is not a valid integer", "llmkit generate"),
        (["eval"], "missing option '--model'", "llmkit eval"),
        (["eval", "-m"], "option '-m' requires an argument", "llmkit eval"),
        (["prepare", "in.txt", "--format", "xml"], "'xml' is not one of", "llmkit prepare"),
        (["chat", "--top-k", "1.5"], "'1.5' is not a valid integer", "llmkit chat"),
        (["trian"], "no such command 'trian'. Did you mean 'train'?", "llmkit"),
    ],
)
def test_usage_errors_are_one_line_with_a_hint(tmp_path, args, needle, command):
    got = run_probe(args, tmp_path)
    assert got["code"] == 2, got
    lines = got["stderr"].splitlines()
    assert len(lines) == 1, got["stderr"]  # no "Usage:" block
    assert lines[0].startswith("error: ") and needle in lines[0], lines
    assert lines[0].endswith(f"— run `{command} --help`"), lines
    assert lines[0].count("Did you mean") <= 1, lines  # Typer and Click both suggested
    assert got["heavy"] == []


def test_usage_error_from_the_installed_command(tmp_path):
    """The real entry point (not CliRunner): one line on stderr, status 2."""
    out = subprocess.run(
        [sys.executable, "-m", "llmkit", "train", "--nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: no such option '--nope'. Did you mean '--no-progress'? "
        "— run `python -m llmkit train --help`"
    ]


def test_train_without_a_recipe_or_data_says_the_defaults_were_used(tmp_path):
    """No --config and no prepared data/shakespeare: the line says that the built-in defaults
    chose that path, and how to name a recipe or data (before torch is imported)."""
    got = run_probe(["train"], tmp_path)
    assert got["code"] == 2, got
    assert got["stderr"].splitlines() == [
        "error: data/shakespeare does not exist (no --config given: the built-in defaults read "
        "data.path=data/shakespeare) — pass --config recipes/NAME.yaml, or data.path=DIR of a "
        "`llmkit prepare` output"
    ]
    assert got["heavy"] == []
    # with an explicit data.path the plain message stays
    got = run_probe(["train", "data.path=nowhere"], tmp_path)
    assert "no --config given" not in got["stderr"]


def test_a_prompts_file_with_malformed_json_names_line_and_column(tmp_path):
    """Was 'not valid JSON (Unterminated string starting at)': json's msg without its
    position."""
    from llmkit.cli.generate import read_prompts
    from llmkit.errors import UserError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "abc}\n')
    with pytest.raises(UserError) as err:
        read_prompts(None, prompts)
    assert str(err.value) == (
        f"{prompts}, line 2: not valid JSON (Unterminated string starting at column 12) — "
        'write one object per line, e.g. {"prompt": "Once upon a time"}'
    )
