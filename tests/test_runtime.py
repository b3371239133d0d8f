"""Threads on a busy machine: fewer torch threads than free cores, one warning line, and the
user's own choice (--threads, OMP_NUM_THREADS) always wins."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from llmkit import runtime
from llmkit.cli import app
from llmkit.runtime import choose_threads


def busy(load: float, cores: int = 8) -> dict:
    return {"environ": {}, "cores": lambda: cores, "load": lambda: load}


def test_busy_machine_gets_the_free_cores():
    threads, message = choose_threads(None, 8, **busy(5.6))  # 2.4 cores free
    assert threads == 2
    assert message == (
        "this machine is busy (load average 5.6 on 8 cores): using 2 threads instead of "
        "torch's 8, which would wait on each other and run several times slower; choose "
        "with --threads N or OMP_NUM_THREADS=N"
    )
    assert choose_threads(None, 8, **busy(12.0))[0] == 1  # busier than its cores: one thread
    assert "using 1 thread instead" in choose_threads(None, 8, **busy(12.0))[1]


def test_idle_machine_and_user_choices_are_left_alone():
    assert choose_threads(None, 8, **busy(0.3)) == (None, None)  # 7.7 free: torch's 8 is fine
    assert choose_threads(None, 4, **busy(3.0)) == (None, None)  # 5 free >= 4
    assert choose_threads(3, 8, **busy(12.0)) == (3, None)  # --threads wins
    # ... even beyond the cores, but then it is told why it will be slow
    assert choose_threads(64, 2, **busy(0.0, cores=2)) == (
        64,
        "--threads 64 is more than the 2 cores this process may run on: the threads will "
        "wait on each other and run several times slower than with --threads 2 or fewer",
    )
    env = {"environ": {"OMP_NUM_THREADS": "4"}, "cores": lambda: 8, "load": lambda: 12.0}
    assert choose_threads(None, 8, **env) == (None, None)  # OMP_NUM_THREADS wins
    no_loadavg = {"environ": {}, "cores": lambda: 8, "load": lambda: None}
    assert choose_threads(None, 8, **no_loadavg) == (None, None)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_generate_on_a_busy_machine_uses_one_thread(tiny_model_dir, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "load_average", lambda: 40.0)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    args = ["generate", "-m", str(tiny_model_dir), "-t", "0", "--max-new-tokens", "2", "Hi"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert torch.get_num_threads() == 1
    warnings = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert warnings == [
        "warning: this machine is busy (load average 40.0 on 2 cores): using 1 thread instead "
        "of torch's 2, which would wait on each other and run several times slower; choose "
        "with --threads N or OMP_NUM_THREADS=N"
    ]
    # --threads wins, silently
    torch.set_num_threads(2)
    result = CliRunner().invoke(app, [*args, "--threads", "2"])
    assert result.exit_code == 0 and torch.get_num_threads() == 2
    assert "busy" not in result.stderr
    # so does OMP_NUM_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and torch.get_num_threads() == 2
    assert "busy" not in result.stderr


def test_train_on_a_busy_machine_uses_the_free_cores(
    write_prepared, tmp_path, tiny_tokenizer, monkeypatch, restore_threads
):

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "load_average", lambda: 5.2)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    torch.set_num_threads(8)
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)
    args = ["train", f"data.path={data}", f"out_dir={tmp_path / 'r'}"]
    args += ["train.micro_batch_size=4", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert torch.get_num_threads() == 3  # round(8 - 5.2)
    assert "load average 5.2 on 8 cores): using 3 threads instead of torch's 8" in (
        " ".join(result.stderr.split())
    )


def test_load_average_reads_the_one_minute_figure(monkeypatch):
    monkeypatch.undo()  # the real function, not conftest's idle machine
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    assert runtime.load_average() == 3.5


def test_an_error_before_the_work_is_one_line_without_the_busy_warning(
    tmp_path, monkeypatch, restore_threads
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "load_average", lambda: 40.0)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    result = CliRunner().invoke(app, ["generate", "-m", str(tmp_path / "nothing"), "Hi"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'nothing'} does not exist — check the path"
    ]
    assert torch.get_num_threads() == 1  # chosen all the same, only not announced
    runtime._pending.clear()
