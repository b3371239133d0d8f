"""`llmkit prepare` never deletes its inputs, and every output or number problem is one line.

Each failing case checks: exit status 2, exactly one stderr line starting ``error:``, no
traceback, and that nothing already on disk changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app

WORDS = "the quick brown fox jumps over a lazy dog while cats sat on warm mats".split()


def corpus(seed: int, n_docs: int = 30) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choices(WORDS, k=40)) for _ in range(n_docs))


def cli(*args: str):
    return CliRunner().invoke(
        app, ["prepare", "--no-plot", "--vocab-size", "300", "--block-size", "16", *args]
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) and a hash of its bytes."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert (
        "Traceback" not in result.output
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    )
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared directory (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "a.txt").write_text(corpus(0), encoding="utf-8")
    result = cli(str(root / "a.txt"), "-o", str(root / "prep"))
    assert result.exit_code == 0, result.output
    return root / "prep"


@pytest.fixture
def work(tmp_path, prepared) -> Path:
    """tmp_path with other.txt and prep/ (prepared, plus the user's mytext.txt and notes.txt)."""
    shutil.copytree(prepared, tmp_path / "prep")
    (tmp_path / "prep" / "mytext.txt").write_text(corpus(1), encoding="utf-8")
    (tmp_path / "prep" / "notes.txt").write_text("my notes\n", encoding="utf-8")
    (tmp_path / "other.txt").write_text(corpus(2), encoding="utf-8")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# 1. Inputs inside the output directory.


@pytest.mark.parametrize(
    "inputs",
    [
        ["prep/mytext.txt", "other.txt"],  # a file named inside OUTPUT
        ["prep"],  # OUTPUT itself as an input directory
        ["prep/train"],  # a directory inside OUTPUT
        ["prep/*.txt", "other.txt"],  # a glob matching files inside OUTPUT
        ["**/*.txt"],  # a recursive glob reaching into OUTPUT
        ["."],  # OUTPUT inside an input directory: its notes.txt would be read, then deleted
    ],
    ids=["file", "output-itself", "subdir", "glob", "recursive-glob", "parent-dir"],
)
def test_input_inside_output_is_refused_and_nothing_deleted(work, monkeypatch, inputs):
    monkeypatch.chdir(work)
    before = snapshot(work)
    result = cli(*inputs, "-o", "prep", "--overwrite")
    assert_one_error_line(result, "lies inside --output")
    assert snapshot(work) == before


def test_output_inside_an_input_directory_reruns_when_it_holds_only_its_own_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(corpus(3), encoding="utf-8")
    out = data / "prep"
    for _ in range(2):  # the second run finds its own tokenizer/manifest files and skips them
        result = cli(str(data), "-o", str(out), "--overwrite", "--json")
        assert result.exit_code == 0, result.output
        manifest = json.loads(result.stdout)
        assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.txt"]
        assert "manifest.json" in manifest["files"] and "train/state.json" in manifest["files"]
    # a manifest from before the "files" list: prepare's own files are known by name
    manifest.pop("files")
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert cli(str(data), "-o", str(out), "--overwrite").exit_code == 0
    (out / "mine.txt").write_text("mine\n", encoding="utf-8")
    before = snapshot(tmp_path)
    assert_one_error_line(cli(str(data), "-o", str(out), "--overwrite"), "mine.txt")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 2. Output that cannot be created or written; absurd numbers.


def test_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text(corpus(0), encoding="utf-8")
    (tmp_path / "existing_file").write_text("keep", encoding="utf-8")
    before = snapshot(tmp_path)
    result = cli(str(tmp_path / "a.txt"), "-o", str(tmp_path / "existing_file" / "sub" / "x"))
    assert_one_error_line(result, "existing_file is a file")
    assert snapshot(tmp_path) == before


def test_output_in_an_unwritable_place_is_one_line(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    (tmp_path / "a.txt").write_text(corpus(0), encoding="utf-8")
    result = cli(str(tmp_path / "a.txt"), "-o", "/proc/llmkit_test")
    assert_one_error_line(result, "cannot create /proc/llmkit_test")


@pytest.mark.parametrize(
    "code",
    [errno.EROFS, errno.ENOSPC, errno.EACCES],
    ids=["read-only", "disk-full", "permission"],
)
def test_os_errors_writing_the_output_are_one_line_and_keep_the_old_output(work, monkeypatch, code):
    """An OSError while renaming into place (plain) and while writing blocks (wrapped by
    ``datasets``): one line naming OUTPUT; the old OUTPUT and the inputs are untouched."""
    import llmkit.core.atomic as atomic
    import llmkit.data.pipeline as pipeline

    (work / "prep" / "mytext.txt").unlink()
    (work / "prep" / "notes.txt").unlink()
    before = snapshot(work)

    def rename_fails(tmp, output):
        raise OSError(code, "simulated", str(tmp / "train"))

    monkeypatch.setattr(atomic, "replace", rename_fails)
    result = cli(str(work / "other.txt"), "-o", str(work / "prep"), "--overwrite")
    line = assert_one_error_line(result, f"cannot write {work / 'prep'}", "simulated")
    assert str(work / "prep" / "train") in line and ".tmp-" not in line
    assert snapshot(work) == before

    monkeypatch.undo()

    def add_tokens_fails(self, tokens):
        raise OSError(code, "simulated")
        yield  # a generator, as the real one

    monkeypatch.setattr(pipeline.Packer, "add_tokens", add_tokens_fails)
    result = cli(str(work / "other.txt"), "-o", str(work / "prep"), "--overwrite")
    assert_one_error_line(result, f"cannot write {work / 'prep'}", "simulated")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--block-size", "99999999999999999999"], "--block-size 99999999999999999999 is too"),
        (["--block-size", str(2**20 + 1)], "is too large"),
        (["--vocab-size", "99999999999999999999"], "--vocab-size 99999999999999999999 is too"),
        (["--vocab-size", str(2**24 + 1)], "is too large"),
        (["--minhash-perm", "99999999999999999999"], "--minhash-perm 99999999999999999999 is"),
        (["--minhash-ngram", "0"], "--minhash-ngram 0 is outside [1, 4096]"),
        (["--minhash-bands", "0", "--minhash-rows", "8"], "--minhash-bands 0 must be"),
        (["--seed", "-1"], "--seed -1"),
    ],
)
def test_absurd_numbers_are_one_line_before_anything_is_written(tmp_path, args, message):
    (tmp_path / "a.txt").write_text(corpus(0), encoding="utf-8")
    before = snapshot(tmp_path)
    result = cli(str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"), *args)
    assert_one_error_line(result, message)
    assert snapshot(tmp_path) == before and result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# 3. Malformed .json files say what a .json file must hold.


@pytest.mark.parametrize(
    "content, where",
    [
        ('[{"text": "a"}, oops]\n', "bad.json:1: malformed JSON"),
        ('{\n  "text": "pretty-printed"\n}\n', "bad.json:1: malformed JSON"),
        ('["a string", "another"]\n', "bad.json: item 0: expected a JSON object, found str"),
        ('{"text": "a"}\n{"text": \n', "bad.json:2: malformed JSON"),
    ],
    ids=["array", "pretty-object", "array-of-strings", "jsonl"],
)
def test_malformed_json_says_what_was_expected(tmp_path, content, where):
    (tmp_path / "bad.json").write_text(content, encoding="utf-8")
    line = assert_one_error_line(cli(str(tmp_path / "bad.json"), "-o", str(tmp_path / "o")), where)
    assert "JSON lines" in line and "JSON array of objects" in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# 4. datasets.load_from_disk(OUTPUT).


def test_load_from_disk_of_the_output_gives_both_splits(prepared):
    from datasets import DatasetDict, load_from_disk

    from llmkit.core.prepared import load_prepared

    dd = load_from_disk(str(prepared))
    assert isinstance(dd, DatasetDict) and list(dd) == ["train", "validation"]
    data = load_prepared(prepared)
    assert dd["train"]["input_ids"] == data.train["input_ids"]
    assert len(dd["validation"]) == len(data.validation)
