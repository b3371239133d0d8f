"""Several GPUs and sharding, checked without a GPU: the decision to relaunch one process per
GPU and the torchrun command it builds; the FSDP / DeepSpeed plugins a recipe selects."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import UserError
from llmkit.training import distributed
from llmkit.training.config import load_recipe
from llmkit.training.distributed import (
    accelerator_plugins,
    check_strategy,
    launcher_args,
    processes_to_launch,
)


def test_relaunch_only_when_alone_with_several_gpus():
    assert processes_to_launch({}, 2) == 2
    assert processes_to_launch({"PATH": "/bin"}, 8) == 8
    assert processes_to_launch({}, 1) is None  # one GPU: this process
    assert processes_to_launch({}, 0) is None  # CPU
    for key in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):  # torchrun / accelerate launch started us
        assert processes_to_launch({key: "0"}, 4) is None


def test_launcher_args_are_what_torchrun_parses():
    from torch.distributed.run import get_args_parser

    train_args = ["--config", "recipes/x.yaml", "--overwrite", "train.max_steps=5"]
    args = launcher_args(4, train_args)
    parsed = get_args_parser().parse_args(args)
    assert parsed.standalone and parsed.module
    assert parsed.nproc_per_node == "4"
    assert parsed.training_script == "llmkit"
    assert parsed.training_script_args == ["train", *train_args]


@pytest.fixture
def no_launcher(monkeypatch, tmp_path):
    for key in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    # the default data.path, checked before torch is imported (an empty prepared directory)
    data = tmp_path / "cwd" / "data" / "shakespeare"
    (data / "train").mkdir(parents=True)
    (data / "manifest.json").write_text('{"settings": {"block_size": 8}}')
    monkeypatch.chdir(tmp_path / "cwd")


def _fake_train(calls):
    def fake(config, overrides, **kwargs):
        calls.append((config, list(overrides), kwargs))
        return {"steps": 1}

    return fake


def test_cli_relaunches_one_process_per_gpu(monkeypatch, no_launcher, tmp_path):
    from llmkit.training import loop

    launched, trained = [], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed, "relaunch", lambda n, a: launched.append((n, a)) or 0)
    monkeypatch.setattr(loop, "train", _fake_train(trained))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    args = ["train", "--config", str(recipe), "train.max_steps=5", "--overwrite", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert trained == []  # this process only waits for its workers
    assert launched == [
        (2, ["--config", str(recipe), "--overwrite", "--no-progress", "train.max_steps=5"])
    ]
    assert "2 GPUs visible" in result.stderr
    # a worker's failure is the command's exit status (2: a user error, printed by rank 0)
    monkeypatch.setattr(distributed, "relaunch", lambda n, a: 2)
    assert CliRunner().invoke(app, args).exit_code == 2


@pytest.mark.parametrize(
    "gpus, env", [(0, {}), (1, {}), (4, {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"})]
)
def test_cli_trains_in_process_on_cpu_one_gpu_or_under_a_launcher(
    monkeypatch, no_launcher, gpus, env
):
    from llmkit.training import loop

    launched, trained = [], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed, "relaunch", lambda n, a: launched.append(n) or 0)
    monkeypatch.setattr(loop, "train", _fake_train(trained))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["train", "train.max_steps=5", "--json"])
    assert result.exit_code == 0, result.output
    assert launched == [] and len(trained) == 1
    assert trained[0][1] == ["train.max_steps=5"]
    assert json.loads(result.stdout) == {"steps": 1}


def test_only_rank_0_prints_errors_and_results(monkeypatch, no_launcher):
    from llmkit.training import loop

    def fails(*args, **kwargs):
        raise UserError("bad data", "fix it")

    monkeypatch.setattr(loop, "train", fails)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2 and result.stderr == ""
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: bad data — fix it"
    monkeypatch.setattr(loop, "train", _fake_train([]))
    monkeypatch.setenv("RANK", "1")
    assert CliRunner().invoke(app, ["train", "--json"]).stdout == ""


def _section(**kw):
    return load_recipe(None, [f"distributed.{k}={v}" for k, v in kw.items()])


def test_fsdp_plugin_from_the_recipe():
    recipe = _section(strategy="fsdp", reshard_after_forward="false", cpu_offload="true")
    plugins = accelerator_plugins(
        recipe.distributed, recipe.train, micro_batch_size=4, accum=2, world=8
    )
    plugin = plugins["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert (
        accelerator_plugins(
            _section(strategy="ddp").distributed, recipe.train, micro_batch_size=4, accum=2, world=8
        )
        == {}
    )


def test_deepspeed_plugin_from_the_recipe(monkeypatch, tmp_path):
    recipe = load_recipe(
        None,
        [
            "distributed.strategy=deepspeed",
            "distributed.zero_stage=3",
            "train.mixed_precision=bf16",
            "train.grad_clip=0.5",
        ],
    )
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` fails
    with pytest.raises(UserError) as err:
        accelerator_plugins(recipe.distributed, recipe.train, micro_batch_size=4, accum=2, world=8)
    assert "pip install deepspeed" in str(err.value)
    with pytest.raises(UserError, match="pip install deepspeed"):
        check_strategy(recipe.distributed, cuda=True, lora=False)

    monkeypatch.setattr(distributed, "require_deepspeed", lambda: None)
    plugin = accelerator_plugins(
        recipe.distributed, recipe.train, micro_batch_size=4, accum=2, world=8
    )["deepspeed_plugin"]
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 4 * 2 * 8
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    # a DeepSpeed JSON file: used as it is, batch sizes filled in
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    recipe = load_recipe(
        None, ["distributed.strategy=deepspeed", f"distributed.deepspeed_config={ds}"]
    )
    plugin = accelerator_plugins(
        recipe.distributed, recipe.train, micro_batch_size=2, accum=1, world=2
    )["deepspeed_plugin"]
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 1
    assert plugin.deepspeed_config["train_batch_size"] == 4
    ds.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        check_strategy(recipe.distributed, cuda=True, lora=False)


def test_strategy_checks_before_any_model(write_prepared, tmp_path, tiny_tokenizer, monkeypatch):

    for key in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 8, 2)
    base = ["train", f"data.path={data}", f"out_dir={tmp_path / 'r'}"]
    # FSDP on CPUs runs under a launcher (its gloo process group); alone it is refused
    result = CliRunner().invoke(app, [*base, "distributed.strategy=fsdp"])
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs processes started by a launcher" in lines[0]
    assert "torchrun --nproc_per_node 2 -m llmkit train" in lines[0]
    fsdp = _section(strategy="fsdp").distributed
    check_strategy(fsdp, cuda=False, lora=False, launched=True)  # torchrun on CPUs: fine
    # ... but not in fp16 there: no loss scaler is set up for a sharded CPU run
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    fp16 = [*base, "distributed.strategy=fsdp", "train.mixed_precision=fp16"]
    result = CliRunner().invoke(app, fp16)
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    assert "fp16 with distributed.strategy=fsdp is not supported on CPUs" in result.stderr
    assert "mixed_precision=bf16" in result.stderr
    for key in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    # DeepSpeed on CPUs too: under a launcher (its CPU accelerator over gloo), not alone
    ds = _section(strategy="deepspeed").distributed
    with pytest.raises(UserError, match="deepspeed on CPUs needs processes started by a"):
        check_strategy(ds, cuda=False, lora=False, launched=False)
    monkeypatch.setattr(distributed, "require_deepspeed", lambda: None)
    monkeypatch.setenv("DS_ACCELERATOR", "unset")  # restored after the test
    monkeypatch.delenv("DS_ACCELERATOR")
    check_strategy(ds, cuda=False, lora=False, launched=True)
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # DeepSpeed's CPU accelerator, no warning
    # machine=False: the recipe's own checks only (make_plan runs them first, then the machine's)
    check_strategy(ds, cuda=False, lora=False, launched=False, machine=False)
    with pytest.raises(UserError, match="LoRA with distributed.strategy=deepspeed"):
        check_strategy(ds, cuda=False, lora=True, launched=False, machine=False)
    # with GPUs: LoRA and sharding are refused together, with the fix
    recipe = _section(strategy="fsdp")
    with pytest.raises(UserError, match="LoRA with distributed.strategy=fsdp"):
        check_strategy(recipe.distributed, cuda=True, lora=True)
    check_strategy(recipe.distributed, cuda=True, lora=False)  # fine (launched: the default)
    # one GPU, no launcher: accelerate would train without sharding, silently; refused
    with pytest.raises(UserError, match="fsdp on one GPU needs processes started by a") as err:
        check_strategy(recipe.distributed, cuda=True, lora=False, launched=False)
    assert "torchrun --nproc_per_node 1" in err.value.hint
    # ill-typed or unknown values: one line naming the key
    for override, needle in (
        ("distributed.strategy=zero", "distributed.strategy"),
        ("distributed.zero_stage=4", "distributed.zero_stage"),
        ("distributed.stratgy=fsdp", "distributed.strategy"),
    ):
        result = CliRunner().invoke(app, ["train", override])
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_divides_the_sharded_memory(tiny_tokenizer):
    from llmkit.training.model import build_config
    from llmkit.training.plan import _dry_run

    def plan(strategy: str, **kw):
        recipe = load_recipe(
            None,
            [
                "model.n_layer=1",
                "model.n_embd=16",
                "model.n_head=2",
                f"distributed.strategy={strategy}",
                *[f"distributed.{k}={v}" for k, v in kw.items()],
            ],
        )
        config = build_config(recipe.model, vocab_size=300, block_size=16, eos_token_id=0)
        return _dry_run(
            None,
            recipe,
            config,
            recipe.lora,
            accum=1,
            world=4,
            data_block=16,
            n_train=64,
            tokens_per_step=4 * 16 * 15,
            total_steps=10,
        )["memory_bytes"]

    ddp = plan("ddp")
    for strategy, kw, sharded in (
        ("deepspeed", {"zero_stage": 1}, {"optimizer"}),
        ("deepspeed", {"zero_stage": 2}, {"optimizer", "gradients"}),
        ("fsdp", {}, {"optimizer", "gradients", "weights"}),
    ):
        mem = plan(strategy, **kw)
        for part in ("weights", "gradients", "optimizer"):
            want = math.ceil(ddp[part] / 4) if part in sharded else ddp[part]
            assert mem[part] == want, (strategy, part)
        assert mem["activations"] == ddp["activations"]
        assert (
            mem["total"]
            == sum(mem[p] for p in ("weights", "gradients", "optimizer")) + (ddp["activations"])
        )


@pytest.mark.parametrize(
    "strategy, extra, sharded",
    [
        ("fsdp", [], "optimizer, gradients, weights"),
        ("deepspeed", ["distributed.zero_stage=2"], "optimizer, gradients"),
        ("deepspeed", ["distributed.zero_stage=3"], "optimizer, gradients, weights"),
    ],
)
def test_dry_run_on_a_cpu_shows_sharded_memory_per_process(
    write_prepared, tmp_path, tiny_tokenizer, monkeypatch, strategy, extra, sharded
):
    """No GPU: --dry-run under a launcher (WORLD_SIZE) prints (and returns) the memory per
    process of the launcher's processes (deepspeed stands installed here: without it the dry
    run refuses as a real run does, see the test below)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "require_deepspeed", lambda: None)
    monkeypatch.setenv("DS_ACCELERATOR", "unset")  # check_strategy sets it; restored after
    for key in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 16, 2)
    base = [
        "train",
        f"data.path={data}",
        f"out_dir={tmp_path / 'r'}",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.n_head=2",
        "train.micro_batch_size=2",
        "--dry-run",
        "--json",
    ]
    plans = {}
    for world in ("1", "4"):
        monkeypatch.setenv("WORLD_SIZE", world)
        result = CliRunner().invoke(app, [*base, f"distributed.strategy={strategy}", *extra])
        assert result.exit_code == 0, result.output
        plans[world] = json.loads(result.stdout.strip().splitlines()[-1])
        assert not (tmp_path / "r").exists()
    one, four = plans["1"]["memory_bytes"], plans["4"]["memory_bytes"]
    for part in ("weights", "gradients", "optimizer"):
        want = math.ceil(one[part] / 4) if part in sharded else one[part]
        assert four[part] == want, part
    assert four["total"] < one["total"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    text = CliRunner().invoke(app, [*base[:-1], f"distributed.strategy={strategy}", *extra])
    assert f"({sharded} sharded over 4)" in " ".join(text.stderr.split())


@pytest.mark.parametrize(
    "override, launcher, needle",
    [
        ("distributed.strategy=fsdp", False, "fsdp on CPUs needs processes started by a launcher"),
        (
            "distributed.strategy=deepspeed",
            False,
            "deepspeed on CPUs needs processes started by a launcher",
        ),
        ("distributed.strategy=deepspeed", True, "needs the deepspeed package"),
        (
            "distributed.strategy=fsdp train.mixed_precision=fp16",
            True,
            "fp16 with distributed.strategy=fsdp is not supported on CPUs",
        ),
    ],
)
def test_dry_run_refuses_what_a_run_refuses_after_the_memory(
    write_prepared, tmp_path, tiny_tokenizer, monkeypatch, override, launcher, needle
):
    """--dry-run makes every check a real run makes: where the run stops on this machine (no
    launcher, deepspeed missing, fp16 sharded on CPUs) the dry run prints the plan (memory per
    process, for the launch about to be done), then the run's one-line error, and exits 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` fails
    for key in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    if launcher:
        monkeypatch.setenv("WORLD_SIZE", "2")
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 16, 2)
    base = [
        "train",
        f"data.path={data}",
        f"out_dir={tmp_path / 'r'}",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.n_head=2",
        "train.micro_batch_size=2",
        *override.split(),
    ]
    run = CliRunner().invoke(app, base)
    dry = CliRunner().invoke(app, [*base, "--dry-run", "--json"])
    assert run.exit_code == 2 and dry.exit_code == 2, dry.output
    assert not (tmp_path / "r").exists()
    run_error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    dry_lines = dry.stderr.strip().splitlines()
    assert len(run_error) == 1 and needle in run_error[0]
    assert dry_lines[-1] == run_error[0]  # the same one line, last
    assert [line for line in dry_lines if line.startswith("error:")] == run_error
    assert any("memory per process" in line for line in dry_lines[:-1])  # shown first
    assert dry.stdout.strip() == ""  # no JSON plan: the command failed


def test_dry_run_counts_a_huge_model_without_building_it(
    write_prepared, tmp_path, tiny_tokenizer, monkeypatch
):
    """model.n_layer=100000 model.n_embd=65536 (about 5e15 parameters, 20 PB of float32
    weights): the dry run used to build all 100,000 blocks on the meta device (minutes, memory
    growing); it now counts from 1-3 blocks. The count is GPT-2's, from its shapes: embeddings
    V x d + P x d, per block 12 d^2 + 13 d (two layer norms 4d, qkv 3d^2 + 3d, attention
    output d^2 + d, MLP 8d^2 + 5d), final layer norm 2d, output layer tied."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 16, 2)
    n_layer, d = 100_000, 65_536
    args = [
        "train",
        f"data.path={data}",
        f"out_dir={tmp_path / 'r'}",
        "model.type=gpt2",
        f"model.n_layer={n_layer}",
        f"model.n_embd={d}",
        "model.n_head=512",
        "train.micro_batch_size=2",
        "--dry-run",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    vocab, positions = len(tiny_tokenizer), 16
    want = vocab * d + positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    assert plan["parameters"] == plan["trainable_parameters"] == want
    assert plan["memory_bytes"]["weights"] == 4 * want > 10**15  # far beyond any machine
    assert not (tmp_path / "r").exists()
    # the count from a few blocks is the count of the whole model where both can be built
    from llmkit.training.model import build_config
    from llmkit.training.plan import _meta_counts, count_parameters

    recipe = load_recipe(None, ["model.type=gpt2", "model.n_embd=16", "model.n_head=2"])
    config = build_config(recipe.model, vocab_size=300, block_size=16, eos_token_id=0)
    config.num_hidden_layers = 70  # above FULL_COUNT_LAYERS: counted from 1-3 blocks
    assert count_parameters(config, recipe.lora) == _meta_counts(config, recipe.lora, [], False)
    lora = load_recipe(None, ["lora.r=4"]).lora
    assert count_parameters(config, lora) == _meta_counts(config, lora, [], False)
    # LoRA on a tied output layer is refused from a one-block model's names, as quickly
    from llmkit.training.config import tied_lora_targets

    config.num_hidden_layers = n_layer
    lora = load_recipe(None, ["lora.r=4", "lora.target_modules=[c_attn,lm_head]"]).lora
    assert tied_lora_targets(lora, config) == ["lm_head"]
    assert config.num_hidden_layers == n_layer  # the caller's config is left as it was


def test_fsdp_is_switched_on_for_cpu_processes_only(monkeypatch):
    """accelerate keeps MULTI_CPU (plain DDP) when given an FSDP plugin with cpu=True:
    shard_on_cpu switches both of its state singletons to FSDP with the recipe's plugin;
    nothing changes on GPUs (accelerate chose FSDP itself) or without an fsdp plugin."""
    import types

    import accelerate.state
    from accelerate.utils import DistributedType

    partial = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.setattr(accelerate.state, "PartialState", lambda: partial)

    def fake(kind, precision="no"):
        state = types.SimpleNamespace(distributed_type=kind, fsdp_plugin=None)
        return types.SimpleNamespace(state=state, mixed_precision=precision)

    recipe = _section(strategy="fsdp", reshard_after_forward="false")
    plugins = accelerator_plugins(
        recipe.distributed, recipe.train, micro_batch_size=1, accum=1, world=2
    )
    acc = fake(DistributedType.MULTI_CPU, "bf16")
    distributed.shard_on_cpu(acc, plugins)
    assert acc.state.distributed_type == DistributedType.FSDP
    assert partial.distributed_type == DistributedType.FSDP
    assert acc.state.fsdp_plugin is plugins["fsdp_plugin"]
    assert acc.state.fsdp_plugin.reshard_after_forward is False
    assert acc.state.fsdp_plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    for kind, given in ((DistributedType.MULTI_GPU, plugins), (DistributedType.MULTI_CPU, {})):
        partial.distributed_type = kind
        acc = fake(kind)
        distributed.shard_on_cpu(acc, given)
        assert acc.state.distributed_type == kind and acc.state.fsdp_plugin is None
        assert partial.distributed_type == kind


def test_deepspeed_checkpoint_files_are_vetted_not_unpickled(tmp_path):
    """DeepSpeed's `latest` and copied conversion script are text that nothing loads; its
    *_states.pt files go through weights_only=True (with only DeepSpeed's own data classes
    allowed): tensors pass, a pickle naming anything else is refused before any load."""
    import argparse

    from llmkit.training import checkpoint as ckpt

    step = tmp_path / "run" / "checkpoints" / "step-00000010"
    shards = step / "pytorch_model"
    shards.mkdir(parents=True)
    (step / "trainer_state.json").write_text('{"step": 10, "tokens": 0}')
    (step / "rng_state_0.json").write_text("{}")
    (step / "latest").write_text("pytorch_model")
    (step / "zero_to_fp32.py").write_text("raise SystemExit('never run')\n")
    torch.save({"module": {"w": torch.ones(2)}}, shards / "mp_rank_00_model_states.pt")
    optim = shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"step": 10, "m": torch.zeros(2)}}, optim)
    ckpt.verify_checkpoint(step, 1)  # all vetted, nothing refused
    torch.save({"optimizer_state_dict": argparse.Namespace(lr=1.0)}, optim)
    with pytest.raises(UserError) as err:
        ckpt.verify_checkpoint(step, 1)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in str(err.value)
    assert "is refused" in str(err.value) and "Namespace" in str(err.value)


def test_zero3_placeholders_keep_their_weight_decay_group_and_count():
    """Under ZeRO-3 (deepspeed.zero.Init) every parameter is an empty 1-D placeholder whose real
    shape is in ds_shape: the matrices must still be decayed and counted (they were all put in
    the no-decay group and counted as 0 parameters, so ZeRO-3 trained without weight decay)."""
    from llmkit.training.setup import full_numel, param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for p in model.parameters():  # what zero.Init leaves behind
        shape = tuple(p.shape)
        p.data = torch.empty(0)
        p.ds_shape, p.ds_numel = torch.Size(shape), math.prod(shape)
    decay, no_decay = param_groups(model, 0.1)
    assert [tuple(p.ds_shape) for p in decay["params"]] == [(3, 4)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(tuple(p.ds_shape) for p in no_decay["params"]) == [(3,), (3,), (3,)]
    assert sum(full_numel(p) for p in model.parameters()) == 12 + 3 + 3 + 3


def test_gathered_weights_drop_the_copy_of_a_tied_matrix():
    """A sharded model's gathered weights hold lm_head.weight as a copy of the (tied) input
    embedding: the final save keeps one name, as the unsharded save does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.training.finish import drop_tied_copies

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in gathered
    kept = drop_tied_copies(model, gathered)
    assert set(kept) == set(gathered) - {"lm_head.weight"}
    untied = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=False
        )
    )
    state = {k: v.clone() for k, v in untied.state_dict().items()}
    assert drop_tied_copies(untied, state).keys() == state.keys()
