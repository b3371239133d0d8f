"""The complexity guardrails of pyproject.toml ([tool.ruff.lint]: C901 McCabe complexity over 10,
PLR0915 over 40 statements) hold where the project says they do, so that a per-file-ignores
edit cannot quietly take a package out of them. ``make lint`` (run by ``.ci/run`` before the
tests) is what enforces them on the code; this pins their reach: the whole package, except the
files listed in EXCLUDED, and nothing outside it (tests, benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One function with 11 branches (complexity 12) and over 40 statements: over both limits.
TOO_BIG = "def f(x):\n" + "".join(f"    if x == {i}:\n        x += {i}\n" for i in range(11))
TOO_BIG += "".join(f"    y{i} = x\n" for i in range(20)) + "    return x\n"

GUARDED = [
    "llmkit/_probe.py",
    "llmkit/errors.py",
    "llmkit/runtime.py",
    "llmkit/security.py",
    "llmkit/runs.py",
    "llmkit/templates.py",
    "llmkit/core/_probe.py",
    "llmkit/core/loading.py",
    "llmkit/data/_probe.py",
    "llmkit/data/clean.py",
    "llmkit/data/config.py",
    "llmkit/data/pii.py",
    "llmkit/data/pipeline.py",
    "llmkit/data/encode.py",
    "llmkit/data/distributed/_probe.py",
    "llmkit/data/distributed/shards.py",
    "llmkit/data/distributed/chat.py",
    "llmkit/cli/prepare.py",
    "llmkit/data/filters/_probe.py",
    "llmkit/data/steps/_probe.py",
    "llmkit/evaluation/_probe.py",
    "llmkit/generation/_probe.py",
    "llmkit/training/_probe.py",
    "llmkit/serve/_probe.py",
    "llmkit/export/_probe.py",
    "llmkit/cli/_probe.py",
]
# Not yet: being rewritten on other branches (pyproject.toml says which and why); remove a file
# from here (and from pyproject.toml) when it passes. The value: the codes that still hold.
EXCLUDED = {
    "llmkit/data/readers.py": set(),
    "llmkit/data/outdir.py": set(),
    "llmkit/data/sft.py": set(),
    "llmkit/data/distributed/job.py": set(),
}
OUTSIDE = ["tests/_probe.py", "benchmarks/_probe.py"]


def _codes(path: str) -> set[str]:
    """The C901/PLR0915 codes ruff reports for TOO_BIG as if it were the file at ``path``,
    with the project's own configuration."""
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "json"]
        + ["--stdin-filename", path, "-"],
        input=TOO_BIG,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return {d["code"] for d in json.loads(result.stdout)} & {"C901", "PLR0915"}


@pytest.mark.parametrize("path", GUARDED)
def test_complexity_rules_hold_in_the_package(path):
    assert _codes(path) == {"C901", "PLR0915"}


@pytest.mark.parametrize("path", sorted(EXCLUDED))
def test_files_being_rewritten_are_not_yet_guarded(path):
    assert _codes(path) == EXCLUDED[path]


@pytest.mark.parametrize("path", OUTSIDE)
def test_complexity_rules_stop_at_the_package(path):
    assert _codes(path) == set()
