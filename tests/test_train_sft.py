"""Chat / instruction data in the training loop (issue 6): a ``labels`` column (-100 where no
loss) and a ``position_ids`` column (restarting at 0 at each packed conversation); embeddings
grown for tokens the data's tokenizer adds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.scoring import split_batch
from llmkit.training.loop import train
from llmkit.training.step import micro_batch_loss, summed_loss

IGNORE = -100
SEP, END = 1, 2  # "assistant:" marker and end of turn, in the tests' toy conversations
ANSWER = [5, 6]  # every conversation's answer: learnable in a few steps


def _conversation(rng: np.random.Generator, vocab: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one toy conversation: a random prompt, SEP, the answer, END.

    Labels follow the Hugging Face convention: the token's own id where it is a target (the
    answer and its END), -100 on the prompt and the SEP marker.
    """
    prompt = rng.integers(10, vocab, size=int(rng.integers(2, 4))).tolist()
    ids = [*prompt, SEP, *ANSWER, END]
    labels = [IGNORE] * (len(prompt) + 1) + [*ANSWER, END]
    return ids, labels


def _pack(convs, block: int, pad_id: int) -> dict[str, list[int]]:
    """Conversations packed into one block: positions restart at 0 for each, then padding
    (label -100, its own positions from 0)."""
    ids, labels, pos = [], [], []
    for c_ids, c_labels in convs:
        ids += c_ids
        labels += c_labels
        pos += list(range(len(c_ids)))
    pad = block - len(ids)
    assert pad >= 0
    return {
        "input_ids": ids + [pad_id] * pad,
        "labels": labels + [IGNORE] * pad,
        "position_ids": pos + list(range(pad)),
    }


def write_sft_prepared(root: Path, tokenizer, *, block: int, n_train: int, n_val: int, seed=0):
    """A prepared directory of chat data (two conversations per block), in the layout
    ``llmkit prepare`` writes, plus the conversations of the validation split unpacked."""
    from datasets import Dataset, Features, Sequence, Value

    rng = np.random.default_rng(seed)
    features = Features(
        {k: Sequence(Value("int32")) for k in ("input_ids", "labels", "position_ids")}
    )
    val_convs = []
    for name, n in (("train", n_train), ("validation", n_val)):
        rows = []
        for _ in range(n):
            convs = [_conversation(rng, len(tokenizer)) for _ in range(2)]
            if name == "validation":
                val_convs += convs
            rows.append(_pack(convs, block, tokenizer.eos_token_id))
        columns = {k: [r[k] for r in rows] for k in features}
        Dataset.from_dict(columns, features=features).save_to_disk(str(root / name))
    tokenizer.save_pretrained(root)
    (root / "manifest.json").write_text(json.dumps({"settings": {"block_size": block}}))
    return root, val_convs


def _tiny(model_type: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        intermediate_size=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_split_batch_shifts_labels_and_slices_positions():
    batch = {
        "input_ids": torch.tensor([[7, 8, 9, 10, 11]]),
        "labels": torch.tensor([[IGNORE, IGNORE, 9, IGNORE, 11]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
    }
    inputs, targets = split_batch(batch)
    assert inputs["input_ids"].tolist() == [[7, 8, 9, 10]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert inputs["use_cache"] is False
    # position t predicts token t+1: targets are labels[1:]
    assert targets.tolist() == [[IGNORE, 9, IGNORE, 11]]
    # a label on a conversation's first token is dropped: nothing in its conversation
    # precedes it (the end of the previous one must not predict it)
    batch["labels"][0, 3] = 10
    assert split_batch(batch)[1].tolist() == [[IGNORE, 9, IGNORE, 11]]
    plain, plain_targets = split_batch({"input_ids": batch["input_ids"]})
    assert "position_ids" not in plain and plain_targets.tolist() == [[8, 9, 10, 11]]


def test_masked_loss_equals_the_hand_computed_one():
    model = _tiny("gpt2", 50)
    rng = np.random.default_rng(1)
    row = _pack([_conversation(rng, 50), _conversation(rng, 50)], 16, 0)
    batch = {k: torch.tensor([v]) for k, v in row.items()}
    inputs, targets = split_batch(batch)
    with torch.no_grad():
        logits = model(**inputs).logits  # (1, 15, 50)
    n = int((targets != IGNORE).sum())
    assert n == 2 * (len(ANSWER) + 1)  # answers and their END, nothing else
    loss = float(micro_batch_loss(logits, targets, n))
    # by hand: mean over labelled positions t of -log softmax(logits[t - 1])[labels[t]]
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    nats = [
        -float(logp[t - 1, row["labels"][t]]) for t in range(1, 16) if row["labels"][t] != IGNORE
    ]
    assert len(nats) == n
    assert loss == pytest.approx(sum(nats) / n, rel=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@torch.no_grad()
def test_packed_loss_is_the_sum_over_conversations_alone(model_type):
    """position_ids keep packed conversations apart (transformers builds a block-diagonal
    causal mask from their restarts): the packed loss equals the conversations' summed loss
    computed one at a time, over the total answer tokens (issue 6)."""
    model = _tiny(model_type, 60)
    rng = np.random.default_rng(2)
    convs = [_conversation(rng, 60) for _ in range(2)]
    batch = {k: torch.tensor([v]) for k, v in _pack(convs, 16, 0).items()}
    inputs, targets = split_batch(batch)
    n = int((targets != IGNORE).sum())
    packed = float(micro_batch_loss(model(**inputs).logits, targets, n))
    alone = 0.0
    for ids, labels in convs:
        x = torch.tensor([ids])
        logits = model(input_ids=x[:, :-1]).logits
        alone += float(summed_loss(logits, torch.tensor([labels[1:]])))
    assert packed == pytest.approx(alone / n, rel=1e-5)
    # without position_ids the second conversation would see the first: a different loss
    del inputs["position_ids"]
    leaky = float(micro_batch_loss(model(**inputs).logits, targets, n))
    assert abs(leaky - packed) > 1e-3


def _sft_overrides(data: Path, run: Path, **extra) -> list[str]:
    base = {
        "data.path": data,
        "out_dir": run,
        "model.n_layer": 1,
        "model.n_embd": 32,
        "model.n_head": 2,
        "train.micro_batch_size": 4,
        "train.gradient_accumulation_steps": 2,
        "train.max_steps": 30,
        "train.warmup_steps": 2,
        "train.learning_rate": 1e-2,
        "train.min_lr": 1e-3,
        "train.log_interval": 1,
        "train.save_interval": 0,
        "train.trackers": "[]",
        "train.peak_flops": 1e11,
        "eval.interval": 30,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_training_on_chat_data_learns_the_answers_and_scores_only_them(tmp_path, tiny_tokenizer):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from llmkit.core.tokenizer import token_byte_lengths
    from llmkit.training.batches import step_samples

    data, val_convs = write_sft_prepared(
        tmp_path / "data", tiny_tokenizer, block=16, n_train=64, n_val=5
    )
    run = tmp_path / "run"
    seen: dict[int, dict] = {}
    final = train(
        None,
        _sft_overrides(data, run),
        progress=False,
        on_step=lambda s, r: seen.__setitem__(s, r),
    )
    # the loss falls on the answers only, and they are learnt: far below ln(300) = 5.7
    first, last = seen[1]["loss"], seen[30]["loss"]
    assert first > 4.0 and last < 1.0, (first, last)
    # trained target tokens: exactly the labelled ones of the blocks the 30 steps read
    labels = np.array(load_from_disk(str(data / "train"))["labels"])
    expect = sum(
        int((labels[step_samples(s, 64, 8, 1337).numpy(), 1:] != IGNORE).sum()) for s in range(30)
    )
    assert final["tokens"] == expect == 30 * 8 * 2 * (len(ANSWER) + 1)
    # validation: only labelled targets, i.e. 5 blocks x 2 conversations x 3 answer tokens
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["val_tokens"] for r in val] == [5 * 2 * (len(ANSWER) + 1)]
    # ... and the same value as the saved model scoring each conversation alone
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    byte_len = token_byte_lengths(tiny_tokenizer)
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for ids, labels_ in val_convs:
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits
            nats += float(summed_loss(logits, torch.tensor([labels_[1:]])))
            nbytes += sum(int(byte_len[t]) for t in labels_[1:] if t != IGNORE)
    n = val[0]["val_tokens"]
    assert final["val_loss"] == pytest.approx(nats / n, rel=1e-4)
    assert final["val_bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-4)
    assert final["val_ppl"] == pytest.approx(math.exp(nats / n), rel=1e-4)


def _tokenizer_with_chat_tokens(tokenizer, tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    extended = AutoTokenizer.from_pretrained(tmp_path / "tok")
    extended.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert len(extended) == len(tokenizer) + 2
    return extended


def test_added_chat_tokens_grow_the_embeddings(tmp_path, tiny_tokenizer, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    extended = _tokenizer_with_chat_tokens(tiny_tokenizer, tmp_path)
    data, _ = write_sft_prepared(tmp_path / "data", extended, block=16, n_train=16, n_val=2)
    common = [
        f"model.name_or_path={tiny_model_dir}",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=1",
    ]
    # dry run: the parameters counted with 302 embedding rows
    runner = CliRunner()
    result = runner.invoke(
        app, ["train", *_sft_overrides(data, tmp_path / "d"), *common, "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    base = load_file(tiny_model_dir / "model.safetensors")
    n_base = sum(t.numel() for t in base.values())
    assert plan["parameters"] == n_base + 2 * 32  # two new rows of width 32 (lm_head tied)

    full = tmp_path / "full"
    train(None, [*_sft_overrides(data, full), *common], progress=False)
    model = AutoModelForCausalLM.from_pretrained(full)
    assert model.get_input_embeddings().weight.shape == (302, 32)
    assert model.config.vocab_size == 302

    lora = tmp_path / "lora"
    lora_args = [*_sft_overrides(data, lora), *common, "lora.r=2", "lora.target_modules=[c_attn]"]
    result = runner.invoke(app, ["train", *lora_args, "--dry-run", "--json"])
    planned = json.loads(result.stdout.strip().splitlines()[-1])["trainable_parameters"]
    final = train(None, lora_args, progress=False)
    # LoRA on c_attn (2 layers x (2 x 32 + 96 x 2)) + the two new embedding rows
    assert final["trainable_parameters"] == planned == 2 * (2 * 32 + 96 * 2) + 2 * 32
    merged = load_file(lora / "model.safetensors")
    wte = merged["transformer.wte.weight"]
    assert wte.shape == (302, 32)
    assert torch.equal(wte[:300], base["transformer.wte.weight"])  # old rows untouched
    model = AutoModelForCausalLM.from_pretrained(lora)
    assert model.get_output_embeddings().weight.shape == (302, 32)


def test_a_different_tokenizer_is_still_refused(
    tmp_path, tiny_tokenizer, tiny_model_dir, shakespeare
):
    from llmkit.core.tokenizer import train_bpe_tokenizer

    text = shakespeare.read_text(encoding="utf-8")[60_000:160_000]
    other = train_bpe_tokenizer(iter(text.split("\n\n")), vocab_size=400)
    assert len(other) > len(tiny_tokenizer)
    data, _ = write_sft_prepared(tmp_path / "data", other, block=16, n_train=8, n_val=1)
    result = CliRunner().invoke(
        app,
        [
            "train",
            *_sft_overrides(data, tmp_path / "r"),
            f"model.name_or_path={tiny_model_dir}",
        ],
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vocabulary mismatch" in lines[0]
    assert not (tmp_path / "r").exists()
