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
TASKS = Path(__file__).resolve().parents[2] / "examples" / "eval_tasks"
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
def test_include_path_given_a_file_asks_for_its_directory(tiny_model_dir):
    """The harness indexes the YAMLs under a directory; a file there added nothing and the
    task was reported as unknown."""
    task_file = TASKS / "opposites.yaml"
    res = runner.invoke(
        app, ["eval", "-m", str(tiny_model_dir), "--tasks", TASK, "--include-path", str(task_file)]
    )
    one_line_error(
        res,
        f"error: --include-path {task_file} is a file: it takes a directory",
        f"— give the directory that holds it: --include-path {TASKS}",
    )
    assert "unknown" not in res.output


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


# --- tokenizers of real model families: a BOS post-processor, tokens spanning the join ------

ROLLING_TEXT = "the quick brown fox jumps over the lazy dog, and the world says hello to the fox"


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 whose byte-level BPE adds BOS itself (a TemplateProcessing post-processor,
    as Llama's and Gemma's tokenizers do) and has merged "Ġworld" but not "ld" after "wor"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["hello world, the world says hello"] * 20 + [ROLLING_TEXT] * 5
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(fast),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    out = tmp_path_factory.mktemp("bos") / "tiny-gpt2-bos"
    GPT2LMHeadModel(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def _task(directory: Path, name: str, docs: list[dict], body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(d) + "\n" for d in docs)
    (directory / f"{name}.jsonl").write_text(lines, encoding="utf-8")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {name}.jsonl\ntest_split: test\n{body}",
        encoding="utf-8",
    )
    return directory


@needs_harness
@pytest.mark.parametrize("harness_length", [None, 16])
def test_rolling_perplexity_has_one_bos_and_equals_llmkit_eval(
    bos_model_dir, tmp_path, harness_length
):
    """lm-evaluation-harness #3333: the tokenizer's own BOS came on top of the harness's prefix
    token. One window (the document fits the context) and several (--max-length 16 in the
    harness scores 16 tokens a window, as llmkit eval's 17-token windows do)."""
    from transformers import AutoTokenizer

    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.evaluation.harness import run_tasks

    tok = AutoTokenizer.from_pretrained(bos_model_dir)
    bos = tok.bos_token_id
    assert tok("hello")["input_ids"][0] == bos  # the tokenizer adds BOS itself
    ids = tok(ROLLING_TEXT, add_special_tokens=False)["input_ids"]
    assert 16 < len(ids) < 63 and bos not in ids

    (tmp_path / "doc.txt").write_text(ROLLING_TEXT, encoding="utf-8")
    length = [] if harness_length is None else ["--max-length", str(harness_length + 1)]
    res = runner.invoke(
        app,
        ["eval", "-m", str(bos_model_dir), "--data", str(tmp_path / "doc.txt"), "--json"] + length,
    )
    assert res.exit_code == 0, res.stderr
    ours = json.loads(res.stdout)
    assert ours["tokens"] == len(ids)

    tasks = _task(
        tmp_path / "tasks",
        "llmkit_rolling",
        [{"text": ROLLING_TEXT}],
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n",
    )
    lm, tokenizer, _ = load_model_and_tokenizer(str(bos_model_dir), device="cpu")
    inputs: list[list[int]] = []
    forward = lm.forward

    def capture(input_ids=None, *args, **kwargs):
        inputs.extend(input_ids.tolist())
        return forward(input_ids, *args, **kwargs)

    lm.forward = capture
    r = run_tasks(
        lm,
        tokenizer,
        "llmkit_rolling",
        include_path=str(tasks),
        max_length=harness_length,
        log_samples=True,
    )
    # the model's first input is BOS then the text; no other BOS in any input
    assert inputs[0][0] == bos and inputs[0][1:3] == ids[:2]
    assert sum(row.count(bos) for row in inputs) == 1
    assert len(inputs) == (1 if harness_length is None else math.ceil(len(ids) / 16))

    task = r["tasks"]["llmkit_rolling"]
    (ll,) = [float(x) for x in task["docs"][0]["filtered_resps"]]
    assert math.exp(-ll / len(ids)) == pytest.approx(ours["perplexity"], rel=1e-5)
    bpb = task["metrics"]["bits_per_byte"]["value"]
    assert bpb == pytest.approx(ours["bits_per_byte"], rel=1e-5)


@needs_harness
def test_a_token_spanning_the_join_is_scored_with_the_continuation_alone(bos_model_dir, tmp_path):
    """lm-evaluation-harness #1297 / PR #4055: "hello wor" + "ld" is "hello" "Ġworld" as a
    whole, so the harness's cut left no continuation and the run died on an assert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_model_dir)
    whole = tok("hello world")["input_ids"]
    context = tok("hello wor")["input_ids"]
    assert len(whole) == len(context) == 3  # <s> hello Ġworld / <s> hello Ġwor
    docs = [
        {"context": "hello wor", "continuation": "ld"},  # spans the join
        {"context": "hello", "continuation": " world"},  # does not
    ]
    tasks = _task(
        tmp_path / "tasks",
        "llmkit_join",
        docs,
        "output_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    )
    res = runner.invoke(
        app,
        ["eval", "-m", str(bos_model_dir), "--tasks", "llmkit_join", "--include-path", str(tasks)]
        + ["--json"],
    )
    assert res.exit_code == 0, res.output
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 request(s) had a token")
    # stdout is the JSON alone: the harness's own "bootstrapping for stddev" print (for the
    # perplexity metric) used to come first and break --json
    task = json.loads(res.stdout)["tasks"]["llmkit_join"]
    assert task["samples"] == 2

    # by hand: log P(tokens of "ld" alone | <s> hello Ġwor) and log P(Ġworld | <s> hello)
    model = AutoModelForCausalLM.from_pretrained(bos_model_dir).eval()

    def loglikelihood(ctx: list[int], cont: list[int]) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont[:-1]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))

    ld = tok("ld", add_special_tokens=False)["input_ids"]
    lls = [loglikelihood(context, ld), loglikelihood(whole[:2], whole[2:])]
    ppl = task["metrics"]["perplexity"]["value"]
    assert ppl == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-4)


@needs_harness
def test_num_fewshot_bounded_by_the_fewshot_documents(tiny_model_dir, tmp_path):
    """--num-fewshot above what a task's few-shot documents hold was a `ValueError: Sample
    larger than population` traceback from the harness's random.sample; now one line naming
    the task and the most it allows, before the model loads. opposites has no few-shot split:
    the harness draws from its 12 test documents (the scored one not left out); with
    fewshot_split: test it leaves the scored one out, so 11 at most."""
    n_docs = len(documents())
    args = ["eval", "-m", str(tiny_model_dir), "--tasks", TASK, "--include-path", str(TASKS)]
    for shots in (1_000_000, n_docs + 1):
        res = runner.invoke(app, [*args, "--num-fewshot", str(shots)])
        line = one_line_error(res, f"--num-fewshot {shots}", repr(TASK), f"hold {n_docs}")
        assert f"use --num-fewshot {n_docs} or less" in line
    res = runner.invoke(app, [*args, "--num-fewshot", str(n_docs), "--limit", "1", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["tasks"][TASK]["num_fewshot"] == n_docs
    # a few-shot split that is the evaluated one: the scored document is left out
    own = tmp_path / "tasks"
    own.mkdir()
    (own / "opposites.jsonl").write_text((TASKS / "opposites.jsonl").read_text())
    yaml = (TASKS / "opposites.yaml").read_text().replace("task: llmkit_opposites", "task: own")
    (own / "own.yaml").write_text(yaml + "fewshot_split: test\n")
    args = ["eval", "-m", str(tiny_model_dir), "--tasks", "own", "--include-path", str(own)]
    res = runner.invoke(app, [*args, "--num-fewshot", str(n_docs)])
    one_line_error(res, "'own'", f"hold {n_docs} (the scored one left out)")
    res = runner.invoke(app, [*args, "--num-fewshot", str(n_docs - 1), "--limit", "1"])
    assert res.exit_code == 0, res.stderr
