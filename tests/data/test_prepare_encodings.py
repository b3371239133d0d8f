"""Legacy encodings in `llmkit prepare`: the hint of a non-UTF-8 file names the encoding that
charset-normalizer detects (it used to say `iconv -f latin1` for everything, which turns CJK
into mojibake), and `--encoding auto|NAME` decodes it to the same documents as the UTF-8
original."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import shared_file

from llmkit.data.pipeline import prepare
from llmkit.data.readers import (
    InputFile,
    discover_inputs,
    guess_encoding,
    read_documents,
)
from llmkit.errors import UserError

# Text written for these tests (the Chinese comes from the shared corpus).
JAPANESE = (
    "吾輩は猫である。名前はまだ無い。\n"
    "どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた事だけは記憶している。\n"
    "\n"
    "吾輩はここで始めて人間というものを見た。しかもあとで聞くとそれは書生という人間中で一番獰悪な種族であったそうだ。\n"
)
RUSSIAN = (
    "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива "
    "по-своему.\nВсё смешалось в доме Облонских. Жена узнала, что муж был в связи с бывшею в "
    "их доме француженкою-гувернанткой.\n\nЖена не выходила из своих комнат, мужа третий день "
    "не было дома. Дети бегали по всему дому, как потерянные.\n"
)
FRENCH = (
    "Le cœur a ses raisons que la raison ne connaît point ; on le sait en mille choses.\n"
    "C'est le cœur qui sent Dieu, et non la raison. Voilà ce que c'est que la foi.\n\n"
    "L'été dernier, à Noël, nous étions déçus ; où êtes-vous allés ? Ça m'a beaucoup ému, "
    "ô combien ! Les œuvres complètes coûtent 2 000 €, dit-il à sa sœur.\n"
)
#: What each test encoding may be reported as: the codec itself or a superset that decodes
#: these bytes to the same text (cp932 for Shift_JIS, gb18030 for GB2312...).
ACCEPTED = {
    "big5": {"big5", "cp950", "big5hkscs"},
    "gb18030": {"gb18030", "gbk", "gb2312"},
    "shift_jis": {"shift_jis", "cp932", "shift_jis_2004"},
    "cp1251": {"cp1251"},
    "cp1252": {"cp1252"},
}


@pytest.fixture(scope="module")
def chinese() -> str:
    """About 20 kB of 三國演義 (traditional Chinese), only the lines Big5 can encode."""
    text = shared_file("gutenberg_zh/23950-0.txt").read_text(encoding="utf-8-sig")[5000:25000]
    lines = []
    for line in text.split("\n"):
        try:
            line.encode("big5")
        except UnicodeEncodeError:
            continue
        lines.append(line)
    return "\n".join(lines)


def _cases(chinese: str) -> list[tuple[str, str]]:
    return [
        ("big5", chinese),
        ("gb18030", chinese),
        ("shift_jis", JAPANESE),
        ("cp1251", RUSSIAN),
        ("cp1252", FRENCH),
    ]


def _pair(tmp_path, name: str, text: str, codec: str):
    utf8 = tmp_path / f"{name}-utf8.txt"
    legacy = tmp_path / f"{name}-{codec}.txt"
    utf8.write_text(text, encoding="utf-8")
    legacy.write_bytes(text.encode(codec))
    return utf8, legacy


@pytest.mark.parametrize("codec", list(ACCEPTED))
def test_hint_names_the_encoding_and_auto_or_name_decode_it(tmp_path, chinese, codec):
    text = dict(_cases(chinese))[codec]
    utf8, legacy = _pair(tmp_path, "doc", text, codec)
    expected = list(read_documents(discover_inputs([utf8])[0]))
    assert len(expected) >= 2

    [source] = discover_inputs([legacy])
    with pytest.raises(UserError) as err:
        list(read_documents(source))
    assert f"{legacy}:1: invalid UTF-8" in err.value.message
    named = err.value.hint.split("--encoding ")[1].split()[0]
    assert named in ACCEPTED[codec], err.value.hint
    assert "latin1" not in err.value.hint
    # The encoding named decodes the file to the original text, and so does iconv's name.
    assert legacy.read_bytes().decode(named) == text
    assert f"iconv -f {named.upper().replace('_', '-')} -t UTF-8" in err.value.hint

    auto = InputFile(legacy, "text", None, legacy.stat().st_size)
    assert list(read_documents(auto, encoding="auto")) == expected
    assert auto.encoding in ACCEPTED[codec] and auto.encoding_detected
    assert auto.as_dict()["encoding"] == auto.encoding

    named_source = InputFile(legacy, "text", None, legacy.stat().st_size)
    assert list(read_documents(named_source, encoding=codec)) == expected
    assert named_source.as_dict()["encoding_detected"] is False


def test_auto_on_utf8_and_ascii_reads_utf8(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("héllo wörld\n\nplain ascii\n", encoding="utf-8")
    source = InputFile(f, "text", None, f.stat().st_size)
    assert list(read_documents(source, encoding="auto")) == ["héllo wörld", "plain ascii"]
    assert source.encoding == "utf_8"
    assert guess_encoding(b"only ascii here\n") == "ascii"


def test_jsonl_and_csv_in_a_legacy_encoding(tmp_path):
    records = [{"text": RUSSIAN.split("\n")[0]}, {"text": RUSSIAN.split("\n")[1]}]
    jl = tmp_path / "ru.jsonl"
    jl.write_bytes(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("cp1251")
    )
    [source] = discover_inputs([jl])
    assert list(read_documents(source, encoding="cp1251")) == [r["text"] for r in records]
    csv_file = tmp_path / "fr.csv"
    csv_file.write_bytes(('id,text\n1,"' + FRENCH.split("\n")[0] + '"\n').encode("cp1252"))
    [source] = discover_inputs([csv_file])
    assert list(read_documents(source, encoding="auto")) == [FRENCH.split("\n")[0]]


def test_wrong_or_unusable_encoding_names(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(JAPANESE.encode("shift_jis"))
    [source] = discover_inputs([f])
    with pytest.raises(UserError, match="not an encoding Python knows"):
        list(read_documents(source, encoding="klingon"))
    with pytest.raises(UserError, match="UTF-16") as err:
        list(read_documents(source, encoding="utf-16"))
    assert "iconv -f UTF-16" in err.value.hint
    # A wrong (but real) encoding is an error naming the line, not mojibake.
    with pytest.raises(UserError, match=r"a\.txt:\d+: invalid euc_kr|invalid cp1251"):
        list(read_documents(source, encoding="euc_kr"))


def test_prepare_encoding_auto_is_in_the_manifest(tmp_path, chinese):
    _, legacy = _pair(tmp_path, "zh", chinese, "gb18030")
    m = prepare(
        [legacy],
        tmp_path / "out",
        vocab_size=300,
        block_size=32,
        encoding="auto",
        plot=False,
        num_proc=1,
    )
    assert m["inputs"][0]["encoding"] == "gb18030" and m["inputs"][0]["encoding_detected"]
    assert m["settings"]["encoding"] == "auto"
    utf8 = tmp_path / "zh.txt"
    utf8.write_text(chinese, encoding="utf-8")
    ref = prepare([utf8], tmp_path / "ref", vocab_size=300, block_size=32, plot=False)
    assert m["splits"]["train"]["tokens"] == ref["splits"]["train"]["tokens"]
    assert m["stages"]["read"]["documents_out"] == ref["stages"]["read"]["documents_out"]


def test_cli_error_line_names_the_encoding(tmp_path):
    f = tmp_path / "ja.txt"
    f.write_bytes(JAPANESE.encode("shift_jis"))
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "prepare", str(f), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--encoding cp932" in lines[0] and "iconv -f CP932 -t UTF-8" in lines[0]


def test_a_short_ambiguous_sample_names_the_close_candidates(tmp_path):
    # One line of Japanese: charset-normalizer ranks Korean cp949 (mess 0.0) over cp932
    # (0.025); the hint names both rather than only the wrong one.
    f = tmp_path / "ja.txt"
    f.write_bytes("吾輩は猫である。名前はまだ無い。\n".encode("shift_jis"))
    [source] = discover_inputs([f])
    with pytest.raises(UserError) as err:
        list(read_documents(source))
    assert "cp932" in err.value.hint and "detected by charset-normalizer" in err.value.hint
