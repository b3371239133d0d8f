"""Tester-found bugs of `llmkit train` / `generate` / `eval`: a failed --overwrite never leaves a
"finished" run, run-dir OS errors and bad names are one-line errors, hints name the real fix,
the picked model is announced, SIGTERM behaves like Ctrl-C, and small output fixes."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import UserError
from llmkit.runs import is_finished_run, newest_finished_run
from llmkit.training.config import load_recipe


@pytest.fixture
def write_split(write_prepared):
    """conftest's prepared directory; n_val=0: no validation split (as prepare may write)."""
    import shutil

    def write(root, tokenizer, block_size: int, n_train: int, n_val: int):
        out = write_prepared(root, tokenizer, block_size, n_train, max(n_val, 1))
        if not n_val:
            shutil.rmtree(out / "validation")
        return out

    return write


TINY = [
    "model.n_layer=1",
    "model.n_embd=16",
    "model.n_head=2",
    "train.micro_batch_size=4",
    "train.max_steps=4",
    "train.warmup_steps=0",
    "train.trackers=[]",
    "eval.interval=2",
]


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress lines may precede
    assert "Traceback" not in result.stderr
    return errors[0]


def test_failed_overwrite_leaves_no_finished_run(
    write_split, tmp_path, tiny_tokenizer, monkeypatch, capsys
):
    from llmkit.core.loading import _candidates, load_model_and_tokenizer
    from llmkit.training.loop import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMKIT_MODEL", raising=False)
    data = write_split(tmp_path / "data", tiny_tokenizer, 16, 24, 0)  # no validation
    base = [f"data.path={data}", "name=r", *TINY]
    train(None, base, progress=False)
    run = tmp_path / "runs" / "r"
    assert is_finished_run(run)
    err = capsys.readouterr().err
    done = next(line for line in err.splitlines() if line.startswith("done:"))
    assert done.rstrip().endswith(")")  # no validation: no stray " | " after MFU
    # without --model the newest finished run is used, and stderr says so
    load_model_and_tokenizer(None, device="cpu")
    assert "using runs/r (newest finished run)" in capsys.readouterr().err

    nan = ["train.learning_rate=1e30", "train.min_lr=0", "train.max_bad_steps=1"]
    result = CliRunner().invoke(app, ["train", *base, *nan, "--overwrite", "--no-progress"])
    line = _one_error_line(result)
    assert "non-finite" in line and "grad_clip" not in line  # grad_clip is already 1.0
    assert not is_finished_run(run) and newest_finished_run("runs") is None
    assert all(c.origin != "newest finished run" for c in _candidates(None))
    assert not (run / "model.safetensors").exists() and not (run / "README.md").exists()
    # grad_clip=0: now the hint suggests it
    result = CliRunner().invoke(app, ["train", *base, *nan, "train.grad_clip=0", "--overwrite"])
    assert "set train.grad_clip" in _one_error_line(result)
    # the finished run both failed overwrites replaced is kept aside, whole (it was deleted
    # before the new run started: an interrupted --overwrite lost the model)
    kept = tmp_path / "runs" / ".r.previous"
    assert is_finished_run(kept) and (kept / "model.safetensors").exists()
    result = CliRunner().invoke(app, ["train", *base, "--overwrite", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert is_finished_run(run) and not kept.exists()  # dropped once the new run finished


def test_run_dir_os_errors_and_bad_names_are_one_line(write_split, tmp_path, tiny_tokenizer):
    data = write_split(tmp_path / "data", tiny_tokenizer, 16, 8, 0)
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        result = CliRunner().invoke(app, ["train", f"data.path={data}", f"out_dir={out}", *TINY])
        line = _one_error_line(result)
        assert str(out) in line and "file is in the way" in line
    assert blocker.read_text() == "keep me"
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = CliRunner().invoke(
            app, ["train", f"data.path={data}", f"out_dir={locked / 'run'}", *TINY]
        )
        assert str(locked / "run") in _one_error_line(result)
        locked.chmod(0o700)
    # an unknown model type is found before the run dir is made
    result = CliRunner().invoke(
        app, ["train", f"data.path={data}", f"out_dir={tmp_path / 't3'}", "model.type=gpt5"]
    )
    assert "gpt5" in _one_error_line(result) and not (tmp_path / "t3").exists()


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "a\\b", "' '", ".", ".."])
def test_name_must_be_a_plain_directory_name(name):
    with pytest.raises(UserError, match="name must be a plain directory name"):
        load_recipe(None, [f"name={name}"])
    assert load_recipe(None, ["out_dir=../elsewhere/x"]).run_dir.as_posix() == "../elsewhere/x"


def test_recipe_hints_name_the_real_fix(tmp_path):
    with pytest.raises(UserError) as err:
        load_recipe(None, ["foo.bar=1"])
    assert "data, model, train, eval" in str(err.value) and "--help" not in str(err.value)
    with pytest.raises(UserError, match="is a directory"):
        load_recipe(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n  x: [1\n")
    with pytest.raises(UserError, match="line 4"):
        load_recipe(bad)
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path)])
    assert "is a directory" in _one_error_line(result)


def test_prompt_too_long_hint_gives_the_real_limit():
    from llmkit.generation.prompts import check_fits

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128))
    with pytest.raises(UserError) as err:
        check_fits(model, 1197, 20)
    assert "108 tokens or fewer" in str(err.value) and "under 128" not in str(err.value)
    with pytest.raises(UserError, match="--max-new-tokens 28 or less"):
        check_fits(model, 100, 40)


def test_llmkit_model_is_named_and_announced(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from llmkit.core.loading import load_model_and_tokenizer

    monkeypatch.setenv("LLMKIT_MODEL", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="LLMKIT_MODEL="):
        load_model_and_tokenizer(None, device="cpu")
    monkeypatch.setenv("LLMKIT_MODEL", str(tiny_model_dir))
    load_model_and_tokenizer(None, device="cpu")
    assert f"using $LLMKIT_MODEL={tiny_model_dir}" in capsys.readouterr().err
    load_model_and_tokenizer(str(tiny_model_dir), device="cpu")  # explicit: nothing said
    assert "using" not in capsys.readouterr().err


def test_empty_prompt_does_not_trigger_the_attention_mask_warning(tiny_model_dir, monkeypatch):
    from transformers import PreTrainedModel

    from llmkit.generation.generate import generate

    def fail(self, input_ids, attention_mask):
        if attention_mask is None and self.config.pad_token_id in input_ids[:, [-1, 0]]:
            raise AssertionError("transformers would warn about a missing attention_mask")

    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask", fail)
    assert len(generate("", model=str(tiny_model_dir), max_new_tokens=2, device="cpu")) == 1


def test_sigterm_is_an_interrupt_with_a_useful_message(
    write_split, tmp_path, tiny_tokenizer, monkeypatch
):
    from llmkit.cli._common import sigterm_as_interrupt
    from llmkit.training import loop

    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)

    data = write_split(tmp_path / "data", tiny_tokenizer, 16, 24, 0)
    run = tmp_path / "run"

    def stop(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(loop.TrainingInterrupted) as err:
        loop.train(
            None,
            [f"data.path={data}", f"out_dir={run}", *TINY, "train.save_interval=2"],
            progress=False,
            on_step=stop,
        )
    message = str(err.value)
    assert "step 3" in message and str(run) in message and "--resume latest" in message
    assert not is_finished_run(run)

    def interrupted(*args, **kwargs):
        raise loop.TrainingInterrupted(message)

    monkeypatch.setattr(loop, "train", interrupted)
    result = CliRunner().invoke(app, ["train", f"data.path={data}"])
    assert "--resume latest" in _one_error_line(result, code=130)


def test_eval_table_fits_80_columns():
    from rich.console import Console

    from llmkit.cli.evaluate import results_table

    row = {
        "model": "runs/a-rather-long-run-name-for-a-model",
        "tokens": 123456,
        "loss": 3.2,
        "perplexity": 24.5,
        "bits_per_byte": 1.23,
        "data": "/some/long/path/to/prepared/data/directory",
    }
    for rows in ([row], [row, {**row, "data": "/other/data", "bits_per_byte": 1.0}]):
        console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(results_table(rows))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80
        assert ("llmkit eval on /some/long/path" in text) == (len(rows) == 1)
        assert "bits per byte" in text and "1.2300" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 on CPU only")
def test_fp16_on_cpu_warns(write_split, tmp_path, tiny_tokenizer, capsys, monkeypatch):
    import accelerate

    from llmkit.training.loop import train

    class Stop(Exception):
        pass

    def no_accelerator(*args, **kwargs):  # accelerate's state is per process: never start it
        raise Stop

    monkeypatch.setattr(accelerate, "Accelerator", no_accelerator)

    data = write_split(tmp_path / "data", tiny_tokenizer, 16, 8, 0)
    # the warning is part of the plan, which (like the whole dry run) starts no accelerator
    plan = train(
        None,
        [f"data.path={data}", f"out_dir={tmp_path / 'r'}", *TINY, "train.mixed_precision=fp16"],
        dry_run=True,
    )
    assert plan["steps"] > 0
    assert "fp16 without a GPU" in capsys.readouterr().err


# --- bad distributed / precision values: one line naming the closest valid value -----------


@pytest.mark.parametrize(
    "override, hint",
    [
        (
            "distributed.strategy=fdsp",
            "did you mean `distributed.strategy=fsdp`? valid values: ddp, fsdp, deepspeed",
        ),
        ("distributed.strategy=DDP", "did you mean `distributed.strategy=ddp`?"),
        (
            "train.mixed_precision=FP16",
            "did you mean `train.mixed_precision=fp16`? valid values: no, bf16, fp16",
        ),
        ("distributed.zero_stage=4", "the closest valid value is 3; valid values: 0, 1, 2, 3"),
        ("distributed.zero_stage=-1", "the closest valid value is 0; valid values: 0, 1, 2, 3"),
        ("train.learning_rate=-1", "train.learning_rate must be > 0"),
        # ill-typed values say what the key takes (they had no hint)
        ("train.max_steps=abc", "train.max_steps takes an integer, e.g. `train.max_steps=1000`"),
        ("train.learning_rate=x", "train.learning_rate takes a number, e.g. `train.learning_rate"),
        ("train.trackers=5", 'train.trackers takes a list, e.g. `train.trackers=["tensorboard"]`'),
    ],
)
def test_bad_values_name_the_valid_ones(tmp_path, override, hint):
    result = CliRunner().invoke(app, ["train", override])
    line = _one_error_line(result)
    key = override.split("=")[0]
    assert line.startswith(f"error: `{key}` in the command-line overrides: "), line
    assert f" — {hint}" in line, line


def test_distributed_keys_the_strategy_ignores_are_named():
    warnings = load_recipe(None, ["distributed.zero_stage=3"]).ignored_settings()
    assert warnings == [
        "distributed.zero_stage is ignored with distributed.strategy=ddp (it applies to "
        "deepspeed only); remove it or set distributed.strategy=deepspeed"
    ]
    both = load_recipe(
        None, ["distributed.reshard_after_forward=false", "distributed.cpu_offload=true"]
    )
    assert [w.split(" is ignored")[0] for w in both.ignored_settings()] == [
        "distributed.reshard_after_forward",
        "distributed.cpu_offload",
    ]
    # the default zero_stage (2) is not "set": no warning; deepspeed uses it: no warning
    assert load_recipe(None, []).ignored_settings() == []
    ds = ["distributed.strategy=deepspeed", "distributed.zero_stage=3"]
    assert load_recipe(None, ds).ignored_settings() == []
    with_file = load_recipe(None, [*ds, "distributed.deepspeed_config=ds.json"])
    assert with_file.ignored_settings() == [
        "distributed.zero_stage is ignored: distributed.deepspeed_config ds.json is used as it "
        "is; set it in that file"
    ]


def test_train_prints_the_ignored_zero_stage(write_split, tmp_path, tiny_tokenizer):
    data = write_split(tmp_path / "data", tiny_tokenizer, 16, 8, 0)
    args = ["train", f"data.path={data}", f"out_dir={tmp_path / 'r'}", *TINY]
    result = CliRunner().invoke(app, [*args, "distributed.zero_stage=3", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "warning: distributed.zero_stage is ignored with distributed.strategy=ddp" in (
        " ".join(result.stderr.split())
    )


def test_overwrite_never_touches_a_directory_llmkit_did_not_write(
    write_split, tmp_path, tiny_tokenizer
):
    """`out_dir=. --overwrite` in a project directory replaced its README.md and config.json
    (names a run also writes); prepare refused the same case. Now train refuses too."""
    data = write_split(tmp_path / "data", tiny_tokenizer, 16, 8, 0)
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("mine")
    (mine / "config.json").write_text('{"mine": true}')
    args = ["train", f"data.path={data}", f"out_dir={mine}", *TINY, "--overwrite"]
    line = _one_error_line(CliRunner().invoke(app, args))
    assert "holds files that llmkit train did not write (README.md, config.json)" in line
    assert (mine / "README.md").read_text() == "mine"
    assert (mine / "config.json").read_text() == '{"mine": true}'
    # a run directory of llmkit's own is still replaced
    run = tmp_path / "run"
    base = ["train", f"data.path={data}", f"out_dir={run}", *TINY, "--no-progress"]
    assert CliRunner().invoke(app, base).exit_code == 0
    assert CliRunner().invoke(app, [*base, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize(
    ("max_steps", "overrides", "source"),
    [
        (0, [], "{cfg}"),  # the file's own value: the file, without "or its overrides"
        (5, ["train.max_steps=0"], "the command-line overrides"),  # the override wins
        (0, ["train.learning_rate=1"], "{cfg}"),  # another key overridden: the file's value
    ],
)
def test_a_bad_value_names_where_it_was_written(tmp_path, max_steps, overrides, source):
    """Was "`train.max_steps` in r.yaml or its overrides" whenever any override was given."""
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"train: {{max_steps: {max_steps}}}\n")
    with pytest.raises(UserError) as err:
        load_recipe(cfg, overrides)
    assert err.value.message.startswith(
        f"`train.max_steps` in {source.format(cfg=cfg)}: Input should be greater than or equal"
    )


def test_a_check_across_a_section_names_file_and_overrides_only_when_both_wrote_it(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: {n_embd: 30, n_head: 4}\n")
    for overrides, source in (
        ([], f"{cfg}"),
        (["train.max_steps=3"], f"{cfg}"),
        (["model.n_layer=2"], f"{cfg} or its overrides"),
    ):
        with pytest.raises(UserError) as err:
            load_recipe(cfg, overrides)
        assert err.value.message == (
            f"`model` in {source}: n_embd (30) must be divisible by n_head (4)"
        )


def test_a_recipe_without_data_path_says_the_default_was_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: {n_layer: 1}\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    assert _one_error_line(result) == (
        f"error: data/shakespeare does not exist ({cfg} sets no data.path: the built-in defaults "
        f"read data.path=data/shakespeare) — add data.path to {cfg}, or pass data.path=DIR of a "
        "`llmkit prepare` output"
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=.inf", "train.epochs"),  # was an OverflowError traceback
        ("train.learning_rate=.inf", "train.learning_rate"),  # passed the dry run
        ("train.grad_clip=.nan", "train.grad_clip"),
        ("eval.min_delta=.inf", "eval.min_delta"),
    ],
)
def test_nan_and_infinity_are_refused_for_every_number(override, key):
    with pytest.raises(UserError) as err:
        load_recipe(None, [override])
    assert err.value.message.startswith(
        f"`{key}` in the command-line overrides: Input should be a finite number"
    )
    assert err.value.hint.startswith(f"{key} takes a finite number")


def _config(**extra):
    from llmkit.training.config import ModelConfig
    from llmkit.training.model import build_config

    mcfg = ModelConfig(type=extra.pop("type", "gpt2"), n_layer=1, n_head=2, n_embd=32, extra=extra)
    return build_config(mcfg, vocab_size=50, block_size=16, eos_token_id=0)


def test_model_extra_reaches_the_config_as_transformers_reads_it():
    """transformers 5 reads rope_theta into rope_parameters when the config is made: set on
    the config afterwards (as llmkit did) it changed no model."""
    config = _config(type="llama", rope_theta=1000.0, intermediate_size=48)
    assert config.rope_parameters["rope_theta"] == 1000.0
    assert config.intermediate_size == 48
    assert _config(n_inner=48, activation_function="relu").n_inner == 48


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"n_innner": 48},
            "model.extra.n_innner is not a setting of gpt2's config (GPT2Config), so no model "
            "would read it",
        ),
        (
            {"n_inner": -5},
            "a gpt2 model cannot be built from these settings (n_layer=1, n_head=2, n_embd=32, "
            "n_inner=-5): Trying to create tensor with negative dimension -5: [32, -5]",
        ),
    ],
)
def test_model_extra_that_no_model_reads_or_builds_with_is_one_line(extra, message):
    """A misspelt key was kept and ignored; a bad value was a RuntimeError traceback from torch
    when the model (or --dry-run's count) was built."""
    with pytest.raises(UserError) as err:
        _config(**extra)
    assert err.value.message == message
