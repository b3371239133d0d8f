"""llmkit never runs code it is handed unless told to (README "What llmkit executes").

Real crafted inputs: a model directory whose config.json / tokenizer_config.json ``auto_map``
names Python files that create a marker file when imported, run through the real CLI with
"y" piped into standard input (transformers' "run the custom code? [y/N]" prompt read it
before); a task YAML with ``!function``. The marker must never exist, the exit status is 2 and
stderr one line naming the model and --trust-remote-code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _payload(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"


def _evil_model(out: Path, marker: Path, tokenizer) -> Path:
    """A tiny GPT-2 whose config names a model type transformers does not know, mapped by
    ``auto_map`` to configuration_evil.py / modeling_evil.py (each writes ``marker``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "llmkit_evil"
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (out / "config.json").write_text(json.dumps(config))
    (out / "configuration_evil.py").write_text(
        _payload(marker) + "from transformers import GPT2Config\n"
        "class EvilConfig(GPT2Config):\n    model_type = 'llmkit_evil'\n"
    )
    (out / "modeling_evil.py").write_text(
        _payload(marker) + "from transformers import GPT2LMHeadModel\n"
        "from .configuration_evil import EvilConfig\n"
        "class EvilModel(GPT2LMHeadModel):\n    config_class = EvilConfig\n"
    )
    return out


def _evil_tokenizer(out: Path, marker: Path, tokenizer) -> Path:
    """A tokenizer directory whose tokenizer_config.json maps AutoTokenizer to
    tokenization_evil.py (writes ``marker``)."""
    tokenizer.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizerFast"
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizerFast"]}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "tokenization_evil.py").write_text(
        _payload(marker) + "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
    )
    return out


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, tiny_tokenizer, shakespeare_slice):
    """The crafted model and tokenizer, a marker path, prepared data and a text file."""
    import llmkit

    root = tmp_path_factory.mktemp("crafted")
    marker = root / "MARKER"
    model = _evil_model(root / "evil-model", marker, tiny_tokenizer)
    tok = _evil_tokenizer(root / "evil-tokenizer", marker, tiny_tokenizer)
    text = root / "text.txt"
    text.write_text(shakespeare_slice.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    data = root / "data"
    llmkit.prepare([text], data, vocab_size=300, block_size=32, plot=False, num_proc=1)
    assert not marker.exists()
    return {
        "root": root,
        "marker": marker,
        "model": model,
        "tokenizer": tok,
        "data": data,
        "text": text,
    }


@pytest.fixture(autouse=True)
def _no_marker_yet(request):
    """Each test starts without the marker (one that ran code must not fail the next)."""
    if "crafted" in request.fixturenames:
        request.getfixturevalue("crafted")["marker"].unlink(missing_ok=True)


def _cli(args: list[str], cwd: Path, stdin: str = "y\ny\nhello\n") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LLMKIT_MODEL": ""}
    env.pop("LLMKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "llmkit", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def _assert_refused(proc: subprocess.CompletedProcess, name: str, marker: Path) -> None:
    assert not marker.exists(), "the crafted model's code ran"
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: ") and name in line and "--trust-remote-code" in line, line
    assert "Traceback" not in proc.stderr and "[y/N]" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("command", ["chat", "generate", "eval-data", "eval-tokens", "train"])
def test_crafted_model_never_runs_its_code(crafted, command):
    model, marker, root = str(crafted["model"]), crafted["marker"], crafted["root"]
    args = {
        "chat": ["chat", "--model", model, "--max-new-tokens", "2"],
        "generate": ["generate", "--model", model, "--max-new-tokens", "2", "hello"],
        "eval-data": ["eval", "--model", model, "--data", str(crafted["text"])],
        "eval-tokens": ["eval", "--model", model, "--tokens", "hello"],
        "train": [
            "train",
            f"data.path={crafted['data']}",
            f"model.name_or_path={model}",
            f"out_dir={root / 'runs'}",
            "name=evil",
            "train.max_steps=1",
        ],
    }[command]
    _assert_refused(_cli(args, cwd=root), model, marker)
    if command == "train":
        assert not (root / "runs" / "evil" / "config.json").exists()


def test_crafted_tokenizer_never_runs_its_code(crafted):
    root, marker, tok = crafted["root"], crafted["marker"], str(crafted["tokenizer"])
    proc = _cli(
        ["prepare", str(crafted["text"]), "--output", str(root / "out"), "--tokenizer", tok],
        cwd=root,
    )
    _assert_refused(proc, tok, marker)
    assert not (root / "out").exists()


def test_python_api_refuses_and_names_the_files(crafted):
    import llmkit
    from llmkit.core.tokenizer import load_tokenizer

    marker = crafted["marker"]
    with pytest.raises(llmkit.UserError) as err:
        llmkit.generate("hi", model=str(crafted["model"]), max_new_tokens=1, device="cpu")
    assert "configuration_evil.py" in err.value.message and "modeling_evil.py" in err.value.message
    assert "trust_remote_code=True" in err.value.hint
    with pytest.raises(llmkit.UserError, match="tokenization_evil.py"):
        load_tokenizer(crafted["tokenizer"])
    with pytest.raises(llmkit.UserError, match="needs Python code of its own"):
        llmkit.evaluate(str(crafted["model"]), str(crafted["text"]), device="cpu")
    out = crafted["root"] / "api-out"
    with pytest.raises(llmkit.UserError, match="tokenization_evil.py"):
        llmkit.prepare([crafted["text"]], out, tokenizer=str(crafted["tokenizer"]), plot=False)
    assert not marker.exists() and not out.exists()


def test_prepared_data_with_a_crafted_tokenizer_is_refused(crafted, tmp_path):
    """train and eval read the tokenizer saved with prepared data: a crafted one is refused."""
    import shutil

    from llmkit import UserError
    from llmkit.core.prepared import load_prepared

    data = tmp_path / "data"
    shutil.copytree(crafted["data"], data)
    config = json.loads((data / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizerFast"
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizerFast"]}
    (data / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(crafted["tokenizer"] / "tokenization_evil.py", data)
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_prepared(data)
    assert not crafted["marker"].exists()


def test_trust_remote_code_reaches_transformers(crafted, tmp_path):
    """With the flag the model's own code does run (here: it writes a marker in tmp)."""
    marker = crafted["marker"]
    proc = _cli(
        [
            "generate",
            "--model",
            str(crafted["model"]),
            "--max-new-tokens",
            "2",
            "--temperature",
            "0",
            "--trust-remote-code",
            "hello",
        ],
        cwd=tmp_path,
        stdin="",
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert marker.read_text() == "code ran"
        # ... and says so, naming the files, whichever way the permission was given
        assert "warning: running the Python code that" in proc.stderr
        assert "modeling_evil.py" in proc.stderr.split("warning: running", 1)[1].splitlines()[0]
    finally:
        marker.unlink(missing_ok=True)


def test_recipe_key_and_api_keyword_reach_the_loaders(crafted, monkeypatch):
    """``model.trust_remote_code`` / ``train(trust_remote_code=True)`` are what the loaders
    get (spied, so that no code runs here)."""
    import llmkit
    from llmkit.training import model as model_mod

    seen = []

    def spy(name, trust_remote_code=False):
        seen.append(trust_remote_code)
        raise llmkit.UserError("stop here")

    monkeypatch.setattr(model_mod, "load_pretrained_config", spy)
    base = [f"data.path={crafted['data']}", f"model.name_or_path={crafted['model']}"]
    for overrides, kwargs in (
        (base, {}),
        ([*base, "model.trust_remote_code=true"], {}),
        (base, {"trust_remote_code": True}),
    ):
        with pytest.raises(llmkit.UserError, match="stop here"):
            llmkit.train(None, overrides, dry_run=True, progress=False, **kwargs)
    assert seen == [False, True, True]


TASK_YAML = """task: llmkit_evil_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
process_docs: !function utils.process_docs
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_include_path_task_code_is_refused(crafted, tmp_path):
    pytest.importorskip("lm_eval")
    marker = crafted["marker"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    (tasks / "evil.yaml").write_text(TASK_YAML.format(data=rows))
    (tasks / "utils.py").write_text(_payload(marker) + "def process_docs(d):\n    return d\n")
    proc = _cli(
        [
            "eval",
            "--model",
            str(crafted["model"]),
            "--tasks",
            "llmkit_evil_task",
            "--include-path",
            str(tasks),
        ],
        cwd=tmp_path,
    )
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "!function utils.process_docs" in lines[0], proc.stderr
    assert "--trust-remote-code" in lines[0]


def test_task_code_guard_fails_closed_on_an_unknown_harness_layout(monkeypatch):
    """A harness release without the loader function llmkit wraps runs no task at all
    (rather than running a task's code unguarded)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import _yaml_loader

    from llmkit.errors import UserError
    from llmkit.evaluation.harness import task_code_guard

    monkeypatch.delattr(_yaml_loader, "_import_func_in_yml")
    with pytest.raises(UserError, match="cannot keep a task's Python code") as err:
        with task_code_guard(trust_remote_code=False):
            pass
    assert "--trust-remote-code" in err.value.hint
    with task_code_guard(trust_remote_code=True):  # the user's explicit choice still works
        pass


def test_hub_datasets_are_read_without_dataset_scripts(tmp_path, monkeypatch):
    """``datasets`` 3.x would ask on stdin before running a dataset script when
    ``trust_remote_code`` is unset: llmkit always passes False."""
    import datasets

    import llmkit
    import llmkit.data.readers as readers

    seen = []

    def fake_load_dataset(path, name=None, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "unset"))
        return iter([{"text": f"Story {i}: the cat sat on mat {i}."} for i in range(40)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(readers, "hub_unreachable", lambda: None)
    llmkit.prepare(["someone/stories"], tmp_path / "out", vocab_size=300, block_size=8)
    assert seen == [False]


def test_tasks_that_run_model_written_code_are_refused(tiny_model_dir, tmp_path):
    """A task the harness marks ``unsafe_code`` (it executes what the model writes) is
    refused in one line, before any document is scored."""
    pytest.importorskip("lm_eval")
    import shutil

    from llmkit import UserError
    from llmkit.evaluation.harness import evaluate_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(ROOT / "examples" / "eval_tasks" / "opposites.jsonl", tasks)
    yaml_text = (ROOT / "examples" / "eval_tasks" / "opposites.yaml").read_text()
    yaml_text = yaml_text.replace("task: llmkit_opposites", "task: llmkit_unsafe")
    (tasks / "unsafe.yaml").write_text(yaml_text + "unsafe_code: true\n")
    with pytest.raises(UserError) as err:
        evaluate_tasks(
            str(tiny_model_dir), "llmkit_unsafe", include_path=tasks, limit=2, device="cpu"
        )
    assert err.value.message.startswith("task llmkit_unsafe executes the code the model writes")


# --- metrics and task modules the harness resolves by name ---------------------------------


def _metric_script(marker: Path) -> str:
    """An ``evaluate`` metric module that writes ``marker`` when imported."""
    return _payload(marker) + (
        "import datasets\nimport evaluate\n\n\n"
        "class M(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        feats = {'predictions': datasets.Value('int64'),\n"
        "                 'references': datasets.Value('int64')}\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='',\n"
        "                                   features=datasets.Features(feats))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'m': 0.0}\n"
    )


def _metric_task(tmp_path: Path, metric: str) -> Path:
    """The shipped opposites task, renamed ``llmkit_metric_task``, whose second metric is
    ``metric`` (a name the harness does not register)."""
    import shutil

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(ROOT / "examples" / "eval_tasks" / "opposites.jsonl", tasks)
    text = (ROOT / "examples" / "eval_tasks" / "opposites.yaml").read_text()
    text = text.replace("task: llmkit_opposites", "task: llmkit_metric_task")
    assert "- metric: acc_norm" in text
    (tasks / "t.yaml").write_text(text.replace("- metric: acc_norm", f"- metric: {metric}"))
    return tasks


def _eval_cli(model: Path, task: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["eval", "--model", str(model), "--tasks", task, "--limit", "2", "--device", "cpu"]
    return _cli([*args, *extra], cwd=cwd)


def _one_refusal(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_task_metric_naming_a_script_is_refused_unless_trusted(tiny_model_dir, tmp_path):
    """``metric_list: - metric: /path/m.py``: the harness hands an unknown metric name to
    ``evaluate.load``, which imports the file. Refused in one line without the flag; with
    ``--trust-remote-code`` the user's choice runs it."""
    pytest.importorskip("lm_eval")
    marker = tmp_path / "MARKER"
    script = tmp_path / "m" / "m.py"
    script.parent.mkdir()
    script.write_text(_metric_script(marker))
    tasks = _metric_task(tmp_path, str(script))
    proc = _eval_cli(tiny_model_dir, "llmkit_metric_task", tmp_path, "--include-path", str(tasks))
    assert not marker.exists(), "the metric's code ran"
    _one_refusal(proc, "'llmkit_metric_task'", repr(str(script)), "--trust-remote-code")
    proc = _eval_cli(
        tiny_model_dir,
        "llmkit_metric_task",
        tmp_path,
        "--include-path",
        str(tasks),
        "--trust-remote-code",
    )
    assert marker.exists(), proc.stderr


def test_a_task_metric_named_like_a_directory_in_the_cwd_is_refused(tiny_model_dir, tmp_path):
    """A bare metric name the harness does not know resolves to ``./NAME/NAME.py`` in the
    working directory (else the Hub): refused as well, before anything is imported."""
    pytest.importorskip("lm_eval")
    marker = tmp_path / "MARKER"
    (tmp_path / "evilmetric").mkdir()
    (tmp_path / "evilmetric" / "evilmetric.py").write_text(_metric_script(marker))
    tasks = _metric_task(tmp_path, "evilmetric")
    proc = _eval_cli(tiny_model_dir, "llmkit_metric_task", tmp_path, "--include-path", str(tasks))
    assert not marker.exists(), "the metric's code ran"
    _one_refusal(proc, "'llmkit_metric_task'", "'evilmetric'", "--trust-remote-code")


@pytest.mark.slow  # indexes the harness's ~15,000 built-in tasks
def test_humaneval_is_refused_by_name_before_its_module_loads_code_eval(tiny_model_dir, tmp_path):
    """HumanEval's utils.py calls ``evaluate.load("code_eval")`` when imported, which would
    run ``./code_eval/code_eval.py``: the task is refused (unsafe) from the task index,
    before its module is imported, with or without --trust-remote-code."""
    pytest.importorskip("lm_eval")
    marker = tmp_path / "MARKER"
    (tmp_path / "code_eval").mkdir()
    (tmp_path / "code_eval" / "code_eval.py").write_text(_metric_script(marker))
    for extra in ((), ("--trust-remote-code",)):
        proc = _eval_cli(tiny_model_dir, "humaneval", tmp_path, *extra)
        assert not marker.exists(), "code_eval.py ran"
        _one_refusal(proc, "task humaneval executes the code the model writes")


def test_the_metric_guard_refuses_evaluate_load_in_the_cwd_and_restores_it(tmp_path, monkeypatch):
    """Inside ``task_code_guard(False)`` any ``evaluate.load`` (as a built-in task's module
    makes at import) raises, whatever the name and the working directory; outside it, and
    with trust, ``evaluate`` is as it was."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("evaluate")
    import evaluate.loading

    from llmkit.evaluation.harness import MetricCodeRefused, task_code_guard

    marker = tmp_path / "MARKER"
    (tmp_path / "code_eval").mkdir()
    (tmp_path / "code_eval" / "code_eval.py").write_text(_metric_script(marker))
    monkeypatch.chdir(tmp_path)
    original = evaluate.loading.evaluation_module_factory
    with task_code_guard(trust_remote_code=False) as refused:
        with pytest.raises(MetricCodeRefused) as err:
            evaluate.load("code_eval")
        with pytest.raises(MetricCodeRefused):
            evaluate.load(str(tmp_path / "code_eval" / "code_eval.py"))
    assert not marker.exists()
    assert err.value.metric == "code_eval"
    assert [r.metric for r in refused] == [
        "code_eval",
        str(tmp_path / "code_eval" / "code_eval.py"),
    ]
    assert evaluate.loading.evaluation_module_factory is original
    with task_code_guard(trust_remote_code=True):
        evaluate.load("code_eval")
    assert marker.exists()


def test_unsafe_tasks_are_found_by_name_through_groups_and_tags(tmp_path):
    """A group or tag holding an ``unsafe_code`` task is refused from the task index (YAML
    read without importing the tasks' code), before any task module is loaded."""
    pytest.importorskip("lm_eval")
    from llmkit.errors import UserError
    from llmkit.evaluation.harness import load_tasks, task_manager, unsafe_task

    tasks = _metric_task(tmp_path, "acc_norm")  # a safe task: llmkit_metric_task
    text = (tasks / "t.yaml").read_text().replace("llmkit_metric_task", "llmkit_unsafe")
    (tasks / "u.yaml").write_text(text + "tag: llmkit_unsafe_tag\nunsafe_code: true\n")
    (tasks / "g.yaml").write_text(
        "group: llmkit_group\ntask:\n  - llmkit_metric_task\n"
        "  - group: llmkit_inner\n    task: [llmkit_unsafe]\n"
    )
    (tasks / "s.yaml").write_text("group: llmkit_safe_group\ntask: [llmkit_metric_task]\n")
    names = ["llmkit_group", "llmkit_unsafe_tag", "llmkit_safe_group", "llmkit_metric_task"]
    tm = task_manager(names, [tasks.resolve()])
    found = {name: unsafe_task(tm, name) for name in names}
    assert found == {
        "llmkit_group": "llmkit_unsafe",
        "llmkit_unsafe_tag": "llmkit_unsafe",
        "llmkit_safe_group": None,
        "llmkit_metric_task": None,
    }
    with pytest.raises(UserError, match="^task llmkit_unsafe executes the code the model"):
        load_tasks(tm, ["llmkit_group"], ["llmkit_group"])


def test_a_raw_pickle_in_a_checkpoint_is_refused_without_torchs_warning(tmp_path):
    """The checkpoint vetting (torch.load(weights_only=True)) of a bare pickle: torch's two-line
    "Detected pickle protocol 4" UserWarning came before llmkit's one line."""
    import pickle
    import warnings

    from llmkit.training.checkpoint import _vet_torch_file

    f = tmp_path / "optimizer.bin"
    f.write_bytes(pickle.dumps({"state": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as seen, pytest.raises(Exception) as err:
        warnings.simplefilter("always")
        _vet_torch_file(f)
    assert "Weights only load failed" in str(err.value)
    assert [str(w.message) for w in seen if "pickle" in str(w.message)] == []
    # the filter is restored after the block: llmkit hides that warning only around its loads
    assert not any("pickle protocol" in str(f[1]) for f in warnings.filters if f[1] is not None)
