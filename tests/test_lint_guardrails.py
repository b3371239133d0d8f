"""The complexity guardrails of pyproject.toml ([tool.ruff.lint]: C901 McCabe complexity over 10,
PLR0915 over 40 statements) hold where the project says they do, so that a per-file-ignores
edit cannot quietly take a package out of them. ``make lint`` (run by ``.ci/run`` before the
tests) is what enforces them on the code; this pins their reach."""

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
    "llmkit/training/_probe.py",
    "llmkit/serve/_probe.py",
    "llmkit/export/_probe.py",
    "llmkit/cli/_probe.py",
    "llmkit/templates.py",
]
# Not yet: being restructured (issue 12); remove from here when they pass.
NOT_YET = ["llmkit/data/_probe.py", "llmkit/generation/_probe.py"]


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
def test_complexity_rules_hold_in_the_guarded_packages(path):
    assert _codes(path) == {"C901", "PLR0915"}


@pytest.mark.parametrize("path", NOT_YET)
def test_packages_being_restructured_are_not_yet_guarded(path):
    assert _codes(path) == set()
