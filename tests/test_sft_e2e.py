"""Chat fine-tuning end to end (issue 6): `llmkit prepare` on conversations -> `llmkit train`
-> the validation loss on the answers falls -> `llmkit generate --chat` answers a training prompt
with the trained answer's first words (greedy).

Two sizes: a tiny random Llama with a BPE tokenizer trained on the conversations (ChatML) in
the default suite, and SmolLM2-135M-Instruct with LoRA on the whole support set, as
recipes/smollm2-support.yaml runs it (slow; skipped without the GGUF)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from conftest import MODELS
from rich.console import Console
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.prepared import load_prepared
from llmkit.data.pipeline import prepare

ROOT = Path(__file__).resolve().parents[1]
CONVERSATIONS = ROOT / "examples" / "support" / "conversations.jsonl"
GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = ROOT / "recipes" / "smollm2-support.yaml"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def train_exchanges(data_dir: Path) -> list[tuple[str, str]]:
    """(first user message, first answer) of every conversation of the train split, decoded
    from the packed rows (so only conversations the model was trained on)."""
    data = load_prepared(data_dir)
    tok = data.tokenizer
    out = []
    for row in data.train:
        text = tok.decode(row["input_ids"])  # padding (SmolLM2 pads with <|im_end|>) ends it
        for user, answer in re.findall(
            r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>",
            text,
            flags=re.S,
        ):
            out.append((user, answer))
    return out


def generate_chat(run: Path, prompt: str, max_new_tokens: int) -> str:
    """`llmkit generate --chat` with greedy decoding; the completion from its JSON line."""
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(run),
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            str(max_new_tokens),
            "--json",
            prompt,
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return record["completion"]


# ---------------------------------------------------------------------------------------------
# Fast: a tiny random Llama, full fine-tuning, a handful of conversations.


def small_support_set(path: Path, topics: int, per_topic: int) -> None:
    """The first exchange (user question, assistant answer) of the first ``per_topic``
    phrasings of the first ``topics`` answers of the support set, as messages records."""
    by_answer: dict[str, list[str]] = {}
    for line in CONVERSATIONS.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        by_answer.setdefault(answer, []).append(user)
    rows = []
    for answer, users in list(by_answer.items())[:topics]:
        for user in users[:per_topic]:
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture
def one_thread():
    """Torch on one thread for a tiny model: with two threads on two cores shared with other
    work, every small op waits for the slower thread (7x slower measured here under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_llama_learns_the_answers_and_chat_repeats_one(tmp_path, one_thread):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.evaluation.evaluate import evaluate
    from llmkit.training.loop import train

    source = tmp_path / "support-small.jsonl"
    small_support_set(source, topics=6, per_topic=3)
    data = tmp_path / "data"
    manifest = prepare(
        [str(source)],
        data,
        vocab_size=400,
        block_size=128,
        val_fraction=0.2,
        plot=False,
        console=quiet(),
    )
    assert manifest["settings"]["format"] == "chat"
    assert manifest["splits"]["validation"]["conversations"] == 4
    tok = load_prepared(data).tokenizer

    # a random "pretrained" Llama with the data's vocabulary, saved like any model directory
    base = tmp_path / "base"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    before = evaluate(str(base), str(data), device="cpu")["loss"]

    run = tmp_path / "run"
    final = train(
        None,
        [
            f"data.path={data}",
            f"out_dir={run}",
            f"model.name_or_path={base}",
            "model.dropout=0.0",
            "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=1",
            "train.max_steps=120",
            "train.learning_rate=3e-3",
            "train.min_lr=3e-4",
            "train.warmup_steps=10",
            "train.weight_decay=0.0",
            "train.log_interval=10",
            "train.save_interval=0",
            "train.trackers=[]",
            "train.peak_flops=1e11",
            "eval.interval=120",
        ],
        progress=False,
    )
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.2 * losses[0], losses  # the training answers are learnt
    assert final["val_loss"] < before - 1.0, (before, final["val_loss"])

    user, answer = train_exchanges(data)[0]
    completion = generate_chat(run, user, max_new_tokens=30)
    assert completion.startswith(first_words(answer, 4)), (completion, answer)


# ---------------------------------------------------------------------------------------------
# Slow: the recipe, SmolLM2-135M-Instruct with LoRA on the support set.


def recipe_commands() -> list[str]:
    """The `llmkit ...` commands in the recipe's opening comment (continuation lines joined)."""
    commands: list[str] = []
    going = False
    for line in RECIPE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if going:
            commands[-1] += " " + text.rstrip("\\").strip()
        elif text.startswith("llmkit "):
            commands.append(text.rstrip("\\").strip())
        going = (going or text.startswith("llmkit ")) and text.endswith("\\")
    return commands


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent")
def test_smollm2_support_recipe_learns_the_answers(tmp_path, monkeypatch):
    """The recipe as its header says to run it (paths moved to tmp_path): the validation loss on
    the held-out conversations' answers falls, and greedy chat answers a training question with
    its trained answer. About 10 minutes on 2 busy cores."""
    import shlex

    from llmkit.evaluation.evaluate import evaluate
    from llmkit.training.loop import train

    commands = recipe_commands()
    assert [c.split()[1] for c in commands][:2] == ["prepare", "train"], commands
    prepare_args = shlex.split(commands[0])[2:]
    assert "--tokenizer" in prepare_args and "--output" in prepare_args
    data = tmp_path / "data"
    prepare_args[prepare_args.index("--output") + 1] = str(data)
    prepare_args[prepare_args.index("--tokenizer") + 1] = str(GGUF)
    prepare_args = [str(ROOT / a) if a.startswith("examples/") else a for a in prepare_args]
    result = CliRunner().invoke(app, ["prepare", "--no-plot", *prepare_args])
    assert result.exit_code == 0, result.output
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["chat"]["template"] == "tokenizer"  # SmolLM2's own ChatML template
    assert manifest["splits"]["validation"]["conversations"] >= 8

    before = evaluate(str(GGUF), str(data), device="cpu", dtype="float32")["loss"]
    run = tmp_path / "run"
    final = train(
        str(RECIPE),
        [f"data.path={data}", f"out_dir={run}", f"model.name_or_path={GGUF}", "train.trackers=[]"],
        progress=False,
    )
    assert final["val_loss"] < before - 0.5, (before, final["val_loss"])

    # the question the recipe's header asks: a training conversation without a system prompt,
    # so SmolLM2's template adds its default one, in training as in chat
    asked = shlex.split(next(c for c in commands if c.startswith("llmkit generate")))[-1]
    questions = dict(train_exchanges(data))
    assert asked in questions, asked
    completion = generate_chat(run, asked, max_new_tokens=16)
    assert completion.startswith(first_words(questions[asked], 5)), (completion, questions[asked])
