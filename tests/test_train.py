"""Training: loss normalisation under gradient accumulation, optimizer groups, schedule, recipe
validation, and a short real run on packed blocks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.core.scoring import split_batch
from llmkit.errors import UserError
from llmkit.training.config import Recipe, load_recipe
from llmkit.training.setup import make_scheduler, param_groups
from llmkit.training.step import count_targets, micro_batch_loss, summed_loss

REPO = Path(__file__).resolve().parents[1]


def _logits_for_losses(losses: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, n, 2) logits and (1, n) targets (all 0) whose per-token cross-entropy is ``losses``.

    With logits [a, 0] and target 0, CE = ln(1 + e^-a), so a = -ln(e^L - 1).
    """
    a = torch.tensor([-math.log(math.expm1(x)) for x in losses], dtype=torch.float64)
    logits = torch.stack([a, torch.zeros_like(a)], dim=-1).unsqueeze(0)
    return logits, torch.zeros(1, len(losses), dtype=torch.long)


def test_accumulated_loss_is_mean_over_all_target_tokens():
    # 4 micro-batches with 3, 10, 1 and 2 targets; per-token losses 1.0, 2.0, 4.0, 0.5.
    spec = [(3, 1.0), (10, 2.0), (1, 4.0), (2, 0.5)]
    n = sum(k for k, _ in spec)
    total = 0.0
    for k, value in spec:
        logits, targets = _logits_for_losses([value] * k)
        total += float(micro_batch_loss(logits, targets, num_targets=n))
    assert total == pytest.approx(28 / 16, abs=1e-6)
    # The mean of micro-batch means would be (1 + 2 + 4 + 0.5) / 4 = 1.875: not what we do.
    assert total != pytest.approx(1.875)


def test_accumulation_matches_one_big_batch_loss_and_gradients():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50,
            n_positions=16,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    )
    T = 12
    micro = []
    for k in (3, 10, 1, 2):  # target tokens per micro-batch
        ids = torch.randint(0, 50, (1, T))
        labels = torch.full_like(ids, -100)
        labels[0, T - k :] = ids[0, T - k :]  # the last k tokens are targets
        micro.append({"input_ids": ids, "labels": labels})
    n = count_targets(micro)
    assert n == 16

    model.zero_grad()
    accumulated = 0.0
    for mb in micro:
        inputs, targets = split_batch(mb)
        loss = micro_batch_loss(model(**inputs).logits, targets, n)
        loss.backward()
        accumulated += float(loss.detach())
    grads_acc = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    big = {key: torch.cat([mb[key] for mb in micro]) for key in ("input_ids", "labels")}
    inputs, targets = split_batch(big)
    logits = model(**inputs).logits
    loss = summed_loss(logits, targets) / n
    loss.backward()
    assert accumulated == pytest.approx(float(loss.detach()), abs=1e-6)
    for g_acc, p in zip(grads_acc, model.parameters(), strict=True):
        torch.testing.assert_close(g_acc, p.grad, atol=1e-6, rtol=1e-5)


def test_no_weight_decay_on_biases_and_norms():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.h.0.ln_1.weight" in no_decay_names
    assert "transformer.h.0.attn.c_attn.bias" in no_decay_names
    assert "transformer.h.0.attn.c_attn.weight" not in no_decay_names
    assert all(names[id(p)].endswith(("weight",)) for p in decay["params"])


def test_cosine_schedule_warms_up_and_decays_to_floor():
    cfg = Recipe().train.model_copy(
        update={"learning_rate": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 110}
    )
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.max_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(5e-4)
    assert lrs[10] == pytest.approx(1e-3)
    # halfway through the decay: floor + (peak - floor) / 2
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)
    assert min(lrs[10:]) >= 1e-4 - 1e-12


def test_recipe_typo_names_the_closest_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rat: 1.0e-3\n")
    with pytest.raises(UserError, match="train.learning_rate"):
        load_recipe(recipe)
    result = CliRunner().invoke(app, ["train", "--config", str(recipe)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "learning_rate" in lines[0] and "Traceback" not in result.output


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.learning_rate=fast", "train.learning_rate"),
        ("train.max_steps=0", "train.max_steps"),
        ("model.n_embd=30", "divisible"),
        ("trian.max_steps=3", "train.max_steps"),
        ("train.lr_schedule=exp", "train.lr_schedule"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, needle):
    result = CliRunner().invoke(app, ["train", override])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_every_recipe_loads():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.name == path.stem


def _write_prepared(root: Path, tokenizer, block_size: int, n_train: int, n_val: int) -> Path:
    """A prepared directory of random blocks, in the layout llmkit prepare writes."""
    from datasets import Dataset

    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    for name, n in (("train", n_train), ("validation", n_val)):
        blocks = rng.integers(0, vocab, size=(n, block_size), dtype=np.int32)
        Dataset.from_dict({"input_ids": blocks.tolist()}).save_to_disk(str(root / name))
    tokenizer.save_pretrained(root)
    (root / "manifest.json").write_text(json.dumps({"settings": {"block_size": block_size}}))
    return root


def test_block_size_above_model_positions_fails_before_building(tmp_path, tiny_tokenizer):
    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 32, 8, 2)
    result = CliRunner().invoke(
        app, ["train", f"data.path={data}", "model.block_size=16", f"out_dir={tmp_path / 'r'}"]
    )
    assert result.exit_code == 2
    assert "block_size" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_short_run_writes_a_loadable_model(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 40, 6)
    run = tmp_path / "run"
    overrides = [
        f"data.path={data}",
        f"out_dir={run}",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.n_head=2",
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=2",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "eval.interval=3",
        "train.log_interval=2",
    ]
    from llmkit.training.loop import train

    final = train(None, overrides, progress=False)
    assert final["steps"] == 6
    assert final["tokens"] == 6 * 4 * 2 * 15  # steps x micro x accumulation x (T - 1) targets
    # random tokens: validation loss near ln(vocab) after 6 tiny steps
    assert abs(final["val_loss"] - math.log(len(tiny_tokenizer))) < 1.0
    info = json.loads((run / "llmkit_run.json").read_text())
    assert info["status"] == "finished"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    saved = load_recipe(run / "llmkit_config.yaml")
    assert saved.train.max_steps == 6 and saved.model.n_embd == 16
    # outputs: TensorBoard events, a loss-curve PNG, a model card; MFU in (0, 1]
    if importlib.util.find_spec("tensorboard"):
        assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    if importlib.util.find_spec("matplotlib"):
        assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run / "README.md").read_text()
    assert "## Final metrics" in card and f"| val_loss | {final['val_loss']:.4g} |" in card
    assert "micro_batch_size: 4" in card and '"block_size": 16' in card
    mfus = [r["mfu"] for r in records if "mfu" in r]
    assert len(mfus) == 3 and all(0 < m <= 1 for m in mfus)
    model = AutoModelForCausalLM.from_pretrained(run)
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert AutoTokenizer.from_pretrained(run).eos_token_id == tiny_tokenizer.eos_token_id
    # `llmkit eval` on the validation split calls the scoring function validation used:
    # the final model's numbers are the run's last validation, to the last bit
    from llmkit.evaluation.evaluate import evaluate

    same_batches = saved.eval.batch_size  # float32 sums per batch: batching counts in the bits
    scored = evaluate(str(run), str(data), batch_size=same_batches, device="cpu")
    assert scored["loss"] == final["val_loss"] and scored["bits_per_byte"] == final["val_bpb"]
    # a second run into the same directory is refused, the first one intact
    result = CliRunner().invoke(app, ["train", *overrides])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert json.loads((run / "llmkit_run.json").read_text())["status"] == "finished"


def test_flops_per_token_is_palm_appendix_b():
    from llmkit.training.flops import flops_per_token, measure_peak_flops

    # nanoGPT quick-run shape: 4 layers, 4 heads of 32, T = 64; N = 1M parameters
    assert flops_per_token(1_000_000, 4, 4, 32, 64) == 6_000_000 + 12 * 4 * 4 * 32 * 64
    # LoRA with 1% trainable: (4 + 2 x 0.01) N + attention
    assert flops_per_token(1_000_000, 4, 4, 32, 64, trainable_fraction=0.01) == pytest.approx(
        4_020_000 + 393_216
    )
    peak = measure_peak_flops("cpu", "float32", 256, 0.05)
    assert 1e8 < peak < 1e14  # a measured rate, FLOP/s


def test_vocabulary_mismatch_with_a_pretrained_model_fails_before_building(
    tmp_path, tiny_tokenizer, tiny_model_dir
):
    import json as _json

    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)
    cfg = _json.loads((tiny_model_dir / "config.json").read_text())
    small = tmp_path / "small-model"
    small.mkdir()
    cfg["vocab_size"] = len(tiny_tokenizer) - 10
    (small / "config.json").write_text(_json.dumps(cfg))  # no weights: never loaded
    result = CliRunner().invoke(
        app,
        ["train", f"data.path={data}", f"model.name_or_path={small}", f"out_dir={tmp_path / 'r'}"],
    )
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "vocabulary mismatch" in line and str(len(tiny_tokenizer)) in line
    assert len(line.splitlines()) == 1 and not (tmp_path / "r").exists()
    # positions: the data's blocks of 80 tokens do not fit the model's 64 positions
    data80 = _write_prepared(tmp_path / "data80", tiny_tokenizer, 80, 8, 2)
    result = CliRunner().invoke(
        app,
        [
            "train",
            f"data.path={data80}",
            f"model.name_or_path={tiny_model_dir}",
            f"out_dir={tmp_path / 'r'}",
        ],
    )
    assert result.exit_code == 2 and "64 positions" in result.stderr
    assert not (tmp_path / "r").exists()


def test_lora_on_a_pretrained_model_exports_merged_weights(
    tmp_path, tiny_tokenizer, tiny_model_dir
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmkit.training.loop import train

    data = _write_prepared(tmp_path / "data", tiny_tokenizer, 16, 16, 2)
    run = tmp_path / "lora"
    final = train(
        None,
        [
            f"data.path={data}",
            f"out_dir={run}",
            f"model.name_or_path={tiny_model_dir}",
            "lora.r=4",
            "lora.target_modules=[c_attn]",
            "model.gradient_checkpointing=true",
            "train.micro_batch_size=4",
            "train.max_steps=3",
            "train.warmup_steps=0",
            "train.learning_rate=1e-2",
            "train.min_lr=0",
            "train.trackers=[]",
            "train.peak_flops=1e11",
            "eval.interval=3",
        ],
        progress=False,
    )
    # 2 layers x c_attn (32 -> 96): A (4 x 32) + B (96 x 4) each
    assert final["trainable_parameters"] == 2 * (4 * 32 + 96 * 4)
    assert (run / "adapter" / "adapter_config.json").is_file()
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(run / "model.safetensors")
    assert set(merged) == set(base)  # a plain model: no lora_A / lora_B keys
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"}
    model = AutoModelForCausalLM.from_pretrained(run)
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_a_smaller_different_tokenizer_is_refused(
    tmp_path, tiny_tokenizer, tiny_model_dir, shakespeare
):
    """A 200-token BPE fits into the model's embeddings but is another vocabulary: refused
    (found by a fresh-eyes pass: it used to train silently and save a broken model)."""
    from llmkit.core.tokenizer import train_bpe_tokenizer

    text = shakespeare.read_text(encoding="utf-8")[60_000:120_000]
    other = train_bpe_tokenizer(iter(text.split("\n\n")), vocab_size=280)
    assert len(other) < len(tiny_tokenizer)
    data = _write_prepared(tmp_path / "data", other, 16, 8, 2)
    result = CliRunner().invoke(
        app,
        [
            "train",
            f"data.path={data}",
            f"model.name_or_path={tiny_model_dir}",
            f"out_dir={tmp_path / 'r'}",
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vocabulary mismatch" in lines[0] and "tokens differ" in lines[0]
    assert not (tmp_path / "r").exists()


def test_the_same_tokenizer_passes_the_check(tiny_tokenizer, tiny_model_dir):
    from llmkit.training.model import check_same_tokenizer

    check_same_tokenizer(tiny_tokenizer, len(tiny_tokenizer), str(tiny_model_dir), "d", True)


def test_a_trained_bpe_of_another_size_is_refused_when_the_model_has_no_tokenizer(
    tmp_path, tiny_tokenizer
):
    from llmkit.training.model import check_same_tokenizer

    with pytest.raises(
        UserError, match=r"vocabulary mismatch: d was tokenized with a \d+-token BPE"
    ):
        check_same_tokenizer(tiny_tokenizer, 49_152, str(tmp_path), "d", True)
    check_same_tokenizer(tiny_tokenizer, 49_152, str(tmp_path), "d", False)  # no evidence
