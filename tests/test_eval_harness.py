"""`llmkit eval --tasks`: lm-evaluation-harness through its Python API on the model llmkit
loaded, with the shipped local task examples/eval_tasks/opposites.yaml (no hub), and the
one-line error without the `eval` extra."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.evaluation.harness import parse_tasks, summarize

runner = CliRunner()
TASKS = Path(__file__).resolve().parents[1] / "examples" / "eval_tasks"
TASK = "llmkit_opposites"
HAVE_HARNESS = importlib.util.find_spec("lm_eval") is not None
needs_harness = pytest.mark.skipif(
    not HAVE_HARNESS, reason="lm-evaluation-harness absent (pip install 'llmkit[eval]')"
)


def one_line_error(res, *needles):
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def documents() -> list[dict]:
    lines = (TASKS / "opposites.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def hand_loglikelihoods(model, tok, doc) -> list[float]:
    """log P(" " + choice | question) for each choice, summed over the choice's tokens: the
    context is the question's tokens, the continuation the tokens the question + choice adds
    (the harness's split for causal models)."""
    context = tok(doc["question"], add_special_tokens=False)["input_ids"]
    out = []
    for choice in doc["choices"]:
        whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0]  # (T-1, vocab)
        logp = torch.log_softmax(logits.double(), dim=-1)
        out.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole))))
    return out


# --- without the extra ------------------------------------------------------------------


def test_without_the_extra_one_line_naming_it(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    res = runner.invoke(app, ["eval", "-m", str(tiny_model_dir), "--tasks", "hellaswag"])
    one_line_error(res, "lm-evaluation-harness", "pip install 'llmkit[eval]'")


def test_task_names_are_split_on_commas():
    assert parse_tasks(["hellaswag, arc_easy", "arc_easy,,mmlu"]) == [
        "hellaswag",
        "arc_easy",
        "mmlu",
    ]


def test_summarize_names_metrics_without_the_default_filter():
    raw = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": "N/A",
            }
        },
        "n-samples": {"t": {"original": 10, "effective": 4}},
        "n-shot": {"t": 0},
        "versions": {"t": 1.0},
        "higher_is_better": {"t": {"acc": True, "exact_match": True}},
    }
    out = summarize(raw)["t"]
    assert out["metrics"] == {
        "acc": {"value": 0.5, "stderr": 0.1},
        "exact_match,strict-match": {"value": 0.25, "stderr": None},
    }
    assert (out["samples"], out["num_fewshot"], out["version"]) == (4, 0, 1.0)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tasks", TASK, "--data", "x.txt"], "--data and --tasks are exclusive"),
        (["--limit", "3", "--data", "x.txt"], "--limit goes with --tasks"),
    ],
)
def test_mode_errors(tiny_model_dir, args, needle):
    res = runner.invoke(app, ["eval", "-m", str(tiny_model_dir), *args])
    one_line_error(res, needle)


# --- with the harness: the shipped local task, end to end ---------------------------------


@needs_harness
def test_local_task_end_to_end_on_exactly_n_documents(tiny_model_dir, tmp_path, monkeypatch):
    from llmkit.evaluation.harness import evaluate_tasks

    monkeypatch.chdir(tmp_path)  # the JSONL is found next to the YAML, not in the cwd
    n = 5
    r = evaluate_tasks(
        str(tiny_model_dir),
        TASK,
        include_path=str(TASKS),
        limit=n,
        batch_size=4,
        log_samples=True,
        device="cpu",
    )
    assert r["model"] == str(tiny_model_dir) and r["limit"] == n
    task = r["tasks"][TASK]
    assert set(task["metrics"]) == {"acc", "acc_norm"}
    assert task["samples"] == n and task["num_fewshot"] == 0
    docs = task["docs"]
    assert sorted(d["doc_id"] for d in docs) == list(range(n))  # the first n, each once

    # The harness scored the model llmkit loaded: its log-likelihoods are ours, and acc is
    # the share of the n documents whose answer has the highest log-likelihood.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # a separate load of the same model
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    truth = documents()[:n]
    hits = hits_norm = 0
    for d in sorted(docs, key=lambda d: d["doc_id"]):
        doc = truth[d["doc_id"]]
        lls = hand_loglikelihoods(model, tok, doc)
        got = [float(x[0]) for x in d["filtered_resps"]]
        assert got == pytest.approx(lls, abs=1e-3)
        best = max(range(4), key=lambda i: lls[i])
        best_norm = max(range(4), key=lambda i: lls[i] / len(doc["choices"][i]))
        hits += best == doc["answer"]
        hits_norm += best_norm == doc["answer"]
    assert task["metrics"]["acc"]["value"] == pytest.approx(hits / n)
    assert task["metrics"]["acc_norm"]["value"] == pytest.approx(hits_norm / n)
    p = hits / n
    assert task["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


@needs_harness
def test_cli_json_and_table(tiny_model_dir):
    args = ["eval", "-m", str(tiny_model_dir), "--tasks", TASK, "--include-path", str(TASKS)]
    res = runner.invoke(app, [*args, "--limit", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert set(r) == {"model", "tasks", "limit", "lm_eval_version"}
    assert r["tasks"][TASK]["samples"] == 3
    assert 0 <= r["tasks"][TASK]["metrics"]["acc"]["value"] <= 1
    table = runner.invoke(app, [*args, "--limit", "3"])
    assert table.exit_code == 0, table.stderr
    acc = r["tasks"][TASK]["metrics"]["acc"]["value"]
    assert TASK in table.stdout and f"{acc:.4f}" in table.stdout


@needs_harness
def test_task_data_that_cannot_be_loaded(tiny_model_dir, tmp_path):
    (tmp_path / "hub.yaml").write_text(
        "task: llmkit_hub_only\n"
        "dataset_path: llmkit-tests/no-such-dataset\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n",
        encoding="utf-8",
    )
    res = runner.invoke(
        app,
        ["eval", "-m", str(tiny_model_dir), "--tasks", "llmkit_hub_only"]
        + ["--include-path", str(tmp_path)],
    )
    one_line_error(res, "cannot load lm-evaluation-harness task 'llmkit_hub_only'")


@needs_harness
def test_missing_include_path(tiny_model_dir, tmp_path):
    res = runner.invoke(
        app,
        ["eval", "-m", str(tiny_model_dir), "--tasks", TASK, "--include-path", str(tmp_path / "x")],
    )
    one_line_error(res, "does not exist")


@needs_harness
@pytest.mark.slow  # indexing the harness's ~15,000 built-in tasks takes 15-40 s here
def test_unknown_task_names_the_closest(tiny_model_dir):
    res = runner.invoke(
        app,
        ["eval", "-m", str(tiny_model_dir), "--tasks", "llmkit_oposites"]
        + ["--include-path", str(TASKS)],
    )
    one_line_error(res, "unknown lm-evaluation-harness task 'llmkit_oposites'", TASK)


@needs_harness
def test_chat_on_a_model_without_a_template_is_one_line(tiny_model_dir):
    # Found by a fresh-eyes pass: the harness raised a 76-line ValueError traceback.
    args = ["eval", "-m", str(tiny_model_dir), "--tasks", TASK, "--include-path", str(TASKS)]
    res = runner.invoke(app, [*args, "--limit", "2", "--chat"])
    one_line_error(res, "--chat needs a chat template", "drop --chat")
