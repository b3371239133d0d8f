"""prepare's settings model (llmkit.data.config.PrepareSettings): one definition of every allowed
value, validated once, unknown keys named with the closest valid one, defaults < YAML < flags."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.cli import prepare as cli
from llmkit.data import choices
from llmkit.data.config import PrepareSettings
from llmkit.errors import UserError


def test_every_choice_is_defined_once_and_the_cli_and_the_modules_use_it():
    from llmkit.data import pack, readers, sft
    from llmkit.data.filters import FILTERS

    assert [e.value for e in cli.Format] == list(choices.FORMATS) == ["auto", "text", "chat"]
    assert [e.value for e in cli.SplitOn] == list(readers.SPLIT_MODES)
    assert [e.value for e in cli.Overlong] == list(pack.OVERLONG_RULES)
    assert [e.value for e in cli.TrainOn] == list(sft.TRAIN_ON)
    assert choices.CHAT_TEMPLATE_CHOICES == ("auto", sft.OWN_TEMPLATE, *sft.CHAT_TEMPLATES)
    assert choices.FILTER_NAMES == tuple(FILTERS)
    assert readers.FORMATS is choices.FORMATS and pack.OVERLONG_RULES is choices.OVERLONG_RULES


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"blok_size": 64}, "unknown prepare setting blok_size — did you mean block_size?"),
        ({"dedup": {"num_prem": 64}}, "unknown prepare setting dedup.num_prem — did you mean "),
        ({"block_size": "64"}, "block_size: expected int, got str '64'"),
        ({"keep_dropped": 1}, "keep_dropped: expected bool, got int 1"),
        ({"overlong": "wrap"}, "--overlong 'wrap' is not one of: truncate, drop"),
        ({"block_size": 1}, "--block-size 1 is too small"),
        ({"filters": {"c4": {"enabled": "yes"}}}, "filters.c4.enabled: expected bool"),
    ],
)
def test_a_bad_setting_is_one_user_error_naming_it(layer, message):
    with pytest.raises(UserError) as err:
        PrepareSettings.load(None, layer)
    assert str(err.value).startswith(message)


def test_yaml_then_flags(tmp_path):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(
        "block_size: 64\nseed: 3\nfilters: {c4: {enabled: true}}\ndedup: {near: false}\n"
    )
    s = PrepareSettings.load(cfg)
    assert (s.block_size, s.seed, s.vocab_size) == (64, 3, 1024)
    assert s.cleaning.filters.c4.enabled and not s.cleaning.dedup.near
    s = PrepareSettings.load(cfg, {"block_size": 32, "cleaning": {"dedup": {"near": True}}})
    assert (s.block_size, s.seed) == (32, 3) and s.cleaning.dedup.near
    assert s.cleaning.filters.c4.enabled
    # chat data: its defaults (near dedup off) sit under the YAML and the flags
    assert s.cleaning_for("chat").dedup.near and s.cleaning_for("chat").filters.c4.enabled
    assert not PrepareSettings.load(None).cleaning_for("chat").dedup.near


def test_cli_flags_win_over_the_yaml_and_a_flag_left_at_its_default_does_not(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(f"Paragraph {i} of some text, with words." for i in range(300)))
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("block_size: 16\nvocab_size: 300\nplot: false\n")
    runner = CliRunner()
    out = tmp_path / "o"
    args = ["prepare", str(text), "-o", str(out), "--config", str(cfg), "--no-cache", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert (settings["block_size"], settings["vocab_size"], settings["plot"]) == (16, 300, False)
    r = runner.invoke(app, [*args, "--block-size", "32", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["block_size"] == 32


def test_cli_unknown_yaml_key_is_one_line_exit_2(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("some text\n")
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("vocab_sise: 300\n")
    r = CliRunner().invoke(
        app, ["prepare", str(text), "-o", str(tmp_path / "o"), "--config", str(cfg)]
    )
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        f"error: unknown prepare setting vocab_sise in {cfg} — did you mean vocab_size?"
    ]


# Each setting validated in llmkit.data.config, set once in a YAML file and once by its flag:
# the error names what the user wrote (the key in the file, or the flag). Before, every one was
# named by its flag, and the YAML's user looked for a flag never typed.
SAME_MISTAKE = [
    (
        "block_size: 1",
        ["--block-size", "1"],
        "block_size in {cfg}: 1 is too small",
        "--block-size 1 is too small",
    ),
    (
        "vocab_size: 100",
        ["--vocab-size", "100"],
        "vocab_size in {cfg}: 100 is too small",
        "--vocab-size 100 is too small",
    ),
    (
        "val_fraction: 1.5",
        ["--val-fraction", "1.5"],
        "val_fraction in {cfg}: 1.5 is outside [0, 1)",
        "--val-fraction 1.5 is outside [0, 1)",
    ),
    ("seed: -1", ["--seed", "-1"], "seed in {cfg}: -1 is negative", "--seed -1 is negative"),
    (
        "num_proc: 0",
        ["--num-proc", "0"],
        "num_proc in {cfg}: 0 must be at least 1",
        "--num-proc 0 must be at least 1",
    ),
    (
        "encoding: nope",
        ["--encoding", "nope"],
        "encoding in {cfg}: 'nope' is not an encoding Python knows",
        "--encoding 'nope' is not an encoding Python knows",
    ),
    (
        "max_document_bytes: 5",
        ["--max-document-bytes", "5"],
        "max_document_bytes in {cfg}: 5 is too small",
        "--max-document-bytes 5 is too small",
    ),
    (
        "dedup: {ngram_size: 0}",
        ["--minhash-ngram", "0"],
        "dedup.ngram_size in {cfg}: 0 is outside [1, 4096]",
        "--minhash-ngram 0 is outside [1, 4096]",
    ),
    (
        "dedup: {num_perm: 9000}",
        ["--minhash-perm", "9000"],
        "dedup.num_perm in {cfg}: 9000 is outside [1, 4096]",
        "--minhash-perm 9000 is outside [1, 4096]",
    ),
    (
        "dedup: {bands: 0, rows: 8}",
        ["--minhash-bands", "0", "--minhash-rows", "8"],
        "dedup.bands in {cfg}: 0 must be at least 1",
        "--minhash-bands 0 must be at least 1",
    ),
    (
        "dedup: {bands: 30}",
        ["--minhash-bands", "30"],
        "dedup.bands x dedup.rows = 240 exceeds dedup.num_perm 112 (in {cfg})",
        "--minhash-bands x --minhash-rows = 240 exceeds --minhash-perm 112",
    ),
    (
        "dedup: {threshold: 2.0}",
        ["--minhash-threshold", "2"],
        "dedup.threshold in {cfg}: 2.0 is outside (0, 1]",
        "--minhash-threshold 2.0 is outside (0, 1]",
    ),
    (
        "pii_region: [XX]",
        ["--pii-region", "XX"],
        "pii_region in {cfg}: unknown phone region",
        "--pii-region: unknown phone region",
    ),
    (
        "tasks: 0",
        ["--tasks", "0"],
        "tasks in {cfg} must be at least 1",
        "--tasks must be at least 1",
    ),
    (
        "tasks: 3",
        ["--tasks", "3"],
        "tasks in {cfg} applies to --executor only",
        "--tasks applies to --executor only",
    ),
    (
        "executor: local",
        ["--executor", "local"],
        "executor in {cfg}: local needs work_dir",
        "--executor local needs --work-dir",
    ),
]


@pytest.mark.parametrize(("yaml_text", "flags", "from_file", "from_flag"), SAME_MISTAKE)
def test_an_error_names_the_yaml_key_or_the_flag_that_set_the_value(
    tmp_path, yaml_text, flags, from_file, from_flag
):
    text = tmp_path / "a.txt"
    text.write_text("some text\n")
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(yaml_text + "\n")
    base = ["prepare", str(text), "-o", str(tmp_path / "o")]
    for args, expected in (
        ([*base, "--config", str(cfg)], from_file),
        ([*base, *flags], from_flag),
    ):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, r.output
        [line] = r.stderr.splitlines()
        assert line.startswith("error: " + expected.format(cfg=cfg)), line
    assert not (tmp_path / "o").exists()


def test_a_flag_given_over_the_yaml_is_named_as_the_flag(tmp_path):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("block_size: 64\nseed: -2\n")
    with pytest.raises(UserError, match=r"^--block-size 1 is too small"):
        PrepareSettings.load(cfg, {"block_size": 1})
    with pytest.raises(UserError, match=rf"^seed in {cfg}: -2 is negative"):
        PrepareSettings.load(cfg, {"block_size": 32})


def test_a_yaml_value_that_does_not_apply_is_named_in_the_warning(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(f"Paragraph {i} of some text, with words." for i in range(300)))
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("train_on: all\nblock_size: 16\nvocab_size: 300\nplot: false\n")
    args = ["prepare", str(text), "-o", str(tmp_path / "o"), "--config", str(cfg), "--no-cache"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"warning: train_on in {cfg} ignored: the inputs are read as documents" in r.stderr


@pytest.mark.parametrize("partition", ["cpu", "gpu-a100", "debug_2", "cpu,gpu", "long.q"], ids=str)
@pytest.mark.parametrize(
    "time", ["30", "30:00", "04:00:00", "2-0", "2-12", "1-04:30", "1-04:30:15", "0"], ids=str
)
def test_slurm_partition_names_and_time_limits_of_sbatch_are_taken(partition, time):
    s = PrepareSettings.load(
        None,
        {
            "executor": "slurm",
            "work_dir": "w",
            "slurm_partition": partition,
            "slurm_time": time,
        },
    )
    assert (s.slurm_partition, s.slurm_time) == (partition, time)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("slurm_partition", "cpu\ntouch /tmp/x", "--slurm-partition 'cpu\\ntouch /tmp/x' is not"),
        ("slurm_partition", "cpu --wrap=evil", "--slurm-partition 'cpu --wrap=evil' is not a"),
        ("slurm_partition", "cpu;id", "--slurm-partition 'cpu;id' is not a Slurm partition"),
        ("slurm_partition", "", "--slurm-partition '' is not a Slurm partition name"),
        ("slurm_partition", "cpu,", "--slurm-partition 'cpu,' is not a Slurm partition name"),
        ("slurm_time", "banana", "--slurm-time 'banana' is not a Slurm time limit"),
        ("slurm_time", "04:00:00\n#SBATCH", "--slurm-time '04:00:00\\n#SBATCH' is not a Slurm"),
        ("slurm_time", "1:2:3:4", "--slurm-time '1:2:3:4' is not a Slurm time limit"),
        ("slurm_time", "1-2-3", "--slurm-time '1-2-3' is not a Slurm time limit"),
        ("slurm_time", "-5", "--slurm-time '-5' is not a Slurm time limit"),
        ("slurm_time", "٤", "--slurm-time '٤' is not a Slurm time limit"),  # not an ASCII digit
    ],
)
def test_a_slurm_value_that_is_not_slurms_is_refused(key, value, message):
    """--slurm-partition $'cpu\\ntouch /tmp/x' wrote a shell command into the launch script's
    header (sbatch ignores #SBATCH lines after it); 'cpu --wrap=evil' and --slurm-time banana
    were accepted."""
    other = {"slurm_partition": "cpu", "slurm_time": "01:00:00"}
    with pytest.raises(UserError) as err:
        PrepareSettings.load(None, {"executor": "slurm", "work_dir": "w", **other, key: value})
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_bad_slurm_value_in_the_yaml_names_the_key(tmp_path):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("executor: slurm\nwork_dir: w\nslurm_partition: cpu\nslurm_time: banana\n")
    with pytest.raises(UserError, match=rf"^slurm_time in {cfg}: 'banana' is not a Slurm time"):
        PrepareSettings.load(cfg, {})
