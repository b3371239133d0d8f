"""LoRA on a model whose input and output embeddings are one matrix (tie_word_embeddings):
targets that adapt a tied module are refused in one line before any weight is loaded (peft's
merge would move both uses of the matrix, so the export would not be the model trained;
huggingface/peft #2018); the default targets train and export the model trained."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app

runner = CliRunner()


def _llama_dir(root, tokenizer, *, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory, tiny_tokenizer):
    return _llama_dir(tmp_path_factory.mktemp("tied") / "llama", tiny_tokenizer, tied=True)


@pytest.fixture(scope="module")
def prepared(write_prepared, tmp_path_factory, tiny_tokenizer):
    return write_prepared(tmp_path_factory.mktemp("data") / "d", tiny_tokenizer, 16, 16, 4)


def _args(data, model, run, *extra):
    return [
        "train",
        f"data.path={data}",
        f"model.name_or_path={model}",
        f"out_dir={run}",
        "lora.r=2",
        "train.micro_batch_size=4",
        "train.max_steps=2",
        "train.warmup_steps=0",
        "train.learning_rate=5e-2",
        "train.trackers=[]",
        "train.peak_flops=1e11",
        "eval.interval=2",
        *extra,
    ]


@pytest.mark.parametrize(
    "targets,named",
    [
        ("[q_proj,lm_head]", "lm_head"),
        ("[embed_tokens]", "model.embed_tokens"),
        ("'.*(v_proj|lm_head)'", "lm_head"),  # a string is peft's full-match regex
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_tied_embedding_targets_are_refused_in_one_line_before_loading(
    tmp_path, monkeypatch, tied_llama, prepared, targets, named, dry_run
):
    import llmkit.training.model as model_module

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(model_module, "load_pretrained", no_load)
    run = tmp_path / "r"
    args = _args(prepared, tied_llama, run, f"lora.target_modules={targets}")
    res = runner.invoke(app, [*args, *(["--dry-run"] if dry_run else [])])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    assert lines[0].startswith("error: lora.target_modules adapts ")
    assert named in lines[0] and "tied" in lines[0] and "all-linear" in lines[0]
    assert not run.exists()


def _merged_and_adapter_logits(base_dir, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    merged = AutoModelForCausalLM.from_pretrained(run).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        return merged(ids).logits, adapted(ids).logits


def test_default_targets_on_a_tied_model_train_and_export_the_model_trained(
    tmp_path, tied_llama, prepared
):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    res = runner.invoke(app, _args(prepared, tied_llama, run))  # lora.target_modules: all-linear
    assert res.exit_code == 0, res.output
    merged, adapted = _merged_and_adapter_logits(tied_llama, run)
    assert torch.allclose(merged, adapted, atol=1e-4)
    # the adapters trained (the export is not the base model) and the embeddings did not move
    base = load_file(tied_llama / "model.safetensors")
    out = load_file(run / "model.safetensors")
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"],
        out["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(base["model.embed_tokens.weight"], out["model.embed_tokens.weight"])


def test_lm_head_on_an_untied_model_stays_allowed(tmp_path, tiny_tokenizer, prepared):
    """Only tied weights are refused: an untied output layer merges into itself alone."""
    untied = _llama_dir(tmp_path / "untied", tiny_tokenizer, tied=False)
    run = tmp_path / "run"
    res = runner.invoke(app, _args(prepared, untied, run, "lora.target_modules=[q_proj,lm_head]"))
    assert res.exit_code == 0, res.output
    merged, adapted = _merged_and_adapter_logits(untied, run)
    assert torch.allclose(merged, adapted, atol=1e-4)
