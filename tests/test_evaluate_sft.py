"""`llmkit eval` on prepared chat (SFT) data: only the answer tokens (labels != -100) are scored,
packed conversations (position_ids restarting at 0) do not see each other, and the loss, the
token count and the bytes equal a hand computation over each conversation alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.tokenizer import token_byte_lengths
from llmkit.evaluation.evaluate import evaluate, score_blocks

BLOCK = 64
IGNORE = -100


def conversations(tok) -> list[tuple[list[int], list[int]]]:
    """Four short conversations as (ids, labels): the prompt part is not scored (-100), the
    answer part is (its ids). Hand-written, ChatML-like markers as plain text."""
    pairs = [
        ("<u>Where is it?\n<a>", " It left today.\n"),
        ("<u>Reset it\n<a>", " Use the link.\n"),
        ("<u>Hi\n<a>", " Hello, how can I help?\n"),
        ("<u>Open on Sunday?\n<a>", " Yes, ten to four.\n"),
    ]
    out = []
    for prompt, answer in pairs:
        p = tok(prompt)["input_ids"]
        a = tok(answer)["input_ids"]
        out.append((p + a, [IGNORE] * len(p) + a))
    return out


def pack(convs, block: int, pad_id: int):
    """Greedy packing of whole conversations into blocks of ``block`` tokens, padded at the end
    (pad: label -100, positions continuing)."""
    rows, cur = [], ([], [], [])
    for ids, labels in convs:
        assert len(ids) <= block
        if len(cur[0]) + len(ids) > block:
            rows.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend(labels)
        cur[2].extend(range(len(ids)))
    rows.append(cur)
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels, pos in rows:
        n = block - len(ids)
        out["input_ids"].append(ids + [pad_id] * n)
        out["labels"].append(labels + [IGNORE] * n)
        out["position_ids"].append(pos + list(range(len(pos), len(pos) + n)))
    return out


def hand_sums(model, convs, token_bytes):
    """Σ nats, scored tokens and their bytes, each conversation run alone (no packing)."""
    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for ids, labels in convs:
            logits = model(torch.tensor([ids])).logits[0, :-1]  # (T-1, vocab)
            targets = torch.tensor(labels[1:])
            nats += F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum").item()
            scored = targets[targets != IGNORE]
            tokens += len(scored)
            n_bytes += int(token_bytes[scored].sum())
    return nats, tokens, n_bytes


def llama_dir(tmp_path_factory, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    out = tmp_path_factory.mktemp("llama") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """GPT-2 (learned positions) and Llama (rotary positions): both must honour position_ids."""
    if request.param == "gpt2":
        return tiny_model_dir
    return llama_dir(tmp_path_factory, tiny_tokenizer)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_tokenizer):
    """A prepared directory by hand (llmkit.core.prepared layout) with labels and
    position_ids: validation = 2 blocks of 64 tokens, each packing two conversations."""
    from datasets import Dataset, Features, List, Value

    convs = conversations(tiny_tokenizer)
    packed = pack(convs, BLOCK, tiny_tokenizer.pad_token_id)
    assert len(packed["input_ids"]) == 2  # two conversations per block
    out = tmp_path_factory.mktemp("sft") / "data"
    int32 = List(Value("int32"))
    features = Features({"input_ids": int32, "labels": int32, "position_ids": int32})
    ds = Dataset.from_dict(packed, features=features)
    ds.save_to_disk(str(out / "validation"))
    ds.save_to_disk(str(out / "train"))
    tiny_tokenizer.save_pretrained(out)
    (out / "manifest.json").write_text(json.dumps({"settings": {"block_size": BLOCK}}))
    return out, convs


def test_prepared_sft_split_scores_answers_only(model_dir, sft_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    data, convs = sft_dir
    token_bytes = torch.as_tensor(token_byte_lengths(tiny_tokenizer))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nats, tokens, n_bytes = hand_sums(model, convs, token_bytes)
    answer_tokens = sum(sum(1 for x in labels if x != IGNORE) for _, labels in convs)
    assert tokens == answer_tokens  # every answer token, nothing else

    r = evaluate(str(model_dir), str(data), batch_size=2, device="cpu")
    assert r["tokens"] == tokens
    assert r["bytes"] == n_bytes
    assert r["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    # batch size changes nothing
    r1 = evaluate(str(model_dir), str(data), batch_size=1, device="cpu")
    assert r1["loss"] == pytest.approx(r["loss"], rel=1e-6) and r1["tokens"] == tokens


def test_without_position_ids_the_conversations_would_see_each_other(sft_dir, tiny_model_dir):
    """The check above has teeth: the same blocks without position_ids (one causal mask over
    the block) give another loss for the second conversation of each block."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    data, _ = sft_dir
    ds = load_from_disk(str(data / "validation"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ones = torch.ones(300)
    packed = score_blocks(model, ds, ones, 2, "cpu")
    unpacked = score_blocks(model, ds.remove_columns("position_ids"), ones, 2, "cpu")
    assert packed.tokens == unpacked.tokens
    assert abs(packed.nats - unpacked.nats) > 1e-3


def test_first_token_of_a_packed_conversation_is_never_a_target():
    """A label on a conversation's first token (no context of its own) is not scored."""
    from types import SimpleNamespace

    def model(input_ids, **_):
        B, T = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(B, T, 8))  # uniform: ln 8 nats per target

    blocks = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]]),
        "labels": torch.tensor([[1, 2, 3, 4, 5, 6]]),  # every token labelled
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]]),  # two conversations of 3
    }

    class Rows:
        column_names = list(blocks)

        def __len__(self):
            return 1

        def with_format(self, *a, **k):
            return self

        def __getitem__(self, s):
            return {k: v[s] for k, v in blocks.items()}

    sums = score_blocks(model, Rows(), torch.ones(8), 1, "cpu")
    assert sums.tokens == 4  # 2, 3 and 5, 6: token 4 starts the second conversation
    assert sums.nats == pytest.approx(4 * math.log(8))


def test_cli_json_on_sft_data(tiny_model_dir, sft_dir):
    data, convs = sft_dir
    res = CliRunner().invoke(app, ["eval", "-m", str(tiny_model_dir), "-d", str(data), "--json"])
    assert res.exit_code == 0, res.stderr
    answer_tokens = sum(sum(1 for x in labels if x != IGNORE) for _, labels in convs)
    assert json.loads(res.stdout)["tokens"] == answer_tokens


def test_scoring_packed_rows_does_not_ask_for_an_attention_mask(sft_dir, tiny_model_dir):
    """Packed rows hold pad (= EOS) ids and no mask on purpose: transformers' "pass an
    attention_mask" warning is turned off for the scored model (a fresh-eyes pass saw it on
    every chat-data eval)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    data, _ = sft_dir
    ds = load_from_disk(str(data / "validation"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    called = []
    for m in model.modules():
        if hasattr(m, "warn_if_padding_and_no_attention_mask"):
            m.warn_if_padding_and_no_attention_mask = lambda *a, **k: called.append(1)
    score_blocks(model, ds, torch.ones(300), 2, "cpu")
    assert called == []
