"""llmkit.core.manifest: the typed manifest.json keeps the file byte-identical and names the
field a damaged manifest lacks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from llmkit.core.manifest import Manifest
from llmkit.core.prepared import read_manifest
from llmkit.data import pipeline
from llmkit.errors import UserError

SUPPORT = Path(__file__).resolve().parents[2] / "examples" / "support"


@pytest.fixture(scope="module")
def written(tmp_path_factory, shakespeare_slice) -> dict[str, Path]:
    """A text and a chat directory written by ``prepare`` (small, plot on for the text one)."""
    root = tmp_path_factory.mktemp("manifests")
    console = Console(file=io.StringIO())
    pipeline.prepare(
        [str(shakespeare_slice)], root / "text", console=console, vocab_size=300, block_size=32
    )
    pipeline.prepare(
        [str(SUPPORT / "conversations.jsonl")],
        root / "chat",
        console=console,
        vocab_size=400,
        block_size=256,
        plot=False,
        format="chat",
    )
    return {"text": root / "text", "chat": root / "chat"}


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_read_and_written_back_is_byte_identical(written, kind):
    raw = (written[kind] / "manifest.json").read_text(encoding="utf-8")
    manifest = read_manifest(written[kind])
    assert manifest.to_json() == raw
    assert manifest.as_dict() == json.loads(raw)
    assert manifest.format == kind
    assert manifest.block_size == json.loads(raw)["settings"]["block_size"]
    assert manifest.tokenizer.trained is True
    assert manifest.split_blocks("train") == json.loads(raw)["splits"]["train"]["blocks"] > 0


def test_unknown_keys_are_kept_after_the_known_ones_and_a_missing_format_is_text():
    raw = {"settings": {"block_size": 8, "later": 1}, "newer": {"x": [1]}, "files": ["a"]}
    manifest = Manifest.model_validate(raw)
    assert manifest.format == "text" and manifest.split_blocks("train") is None
    expected = {"settings": {"block_size": 8, "later": 1}, "files": ["a"], "newer": {"x": [1]}}
    assert manifest.to_json() == json.dumps(expected, indent=2) + "\n"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m["settings"].pop("block_size"), "settings.block_size: field required"),
        (lambda m: m["settings"].update(block_size="32"), "settings.block_size: input should"),
        (lambda m: m["splits"]["train"].update(blocks=1.5), "splits.train.blocks"),
        (lambda m: m["tokenizer"].update(trained="yes"), "tokenizer.trained"),
    ],
)
def test_a_damaged_manifest_is_one_line_naming_the_field(written, tmp_path, edit, field):
    """Before the typed manifest, train read ``manifest["settings"]["block_size"]`` and a
    missing or mistyped field ended in a KeyError / ValueError traceback."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(written["text"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="rerun llmkit prepare") as err:
        read_manifest(copy)
    assert field in str(err.value) and str(copy / "manifest.json") in str(err.value)


def test_a_manifest_that_is_not_json_says_so_with_its_position(written, tmp_path):
    """A truncated manifest.json was 'the top level: invalid json: eof while parsing ...'
    (pydantic's message lowered, the position glued on)."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(written["text"], copy)
    (copy / "manifest.json").write_text('{\n  "settings": {"block_size": 8, "x": "abc')
    with pytest.raises(UserError) as err:
        read_manifest(copy)
    assert str(err.value) == (
        f"cannot read {copy / 'manifest.json'}: not valid JSON (EOF while parsing a string at "
        "line 2, column 41) — rerun llmkit prepare"
    )
