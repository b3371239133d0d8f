"""One optimizer step (llmkit.training.step.optimizer_step) without the loop: a tiny GPT-2, two
micro-batches with very different numbers of target tokens, checked against a hand computation
with plain torch; and the metric logger (llmkit.training.logger), silent off the main process."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.training import step as step_module
from llmkit.training.logger import MetricLogger
from llmkit.training.step import optimizer_step

IGNORE = -100


def _accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # one state per process
    GradientState._reset_state()
    return Accelerator(cpu=True)


def _model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).train()


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids_a = torch.randint(0, 32, (2, 8), generator=g)
    labels_a = torch.full_like(ids_a, IGNORE)
    labels_a[0, 5:] = ids_a[0, 5:]  # 3 targets (positions 5, 6, 7 of row 0)
    ids_b = torch.randint(0, 32, (2, 8), generator=g)  # every token a target: 2 x 7 = 14
    return [{"input_ids": ids_a, "labels": labels_a}, {"input_ids": ids_b}]


def _optimizer(model, weight_decay: float = 0.0):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    return opt, sched


def _hand_nats(model, micro) -> list[tuple[torch.Tensor, int]]:
    """(summed nats, targets) of each micro-batch, computed here without llmkit."""
    out = []
    for mb in micro:
        ids = mb["input_ids"]
        labels = mb.get("labels", ids)
        logits = model(input_ids=ids[:, :-1]).logits  # (B, T-1, V)
        targets = labels[:, 1:]  # position t predicts token t+1
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        out.append((nats, int((targets != IGNORE).sum())))
    return out


def test_one_step_matches_a_hand_computation():
    model = _model()
    reference = copy.deepcopy(model)
    micro = _micro_batches()
    opt, sched = _optimizer(model)
    result = optimizer_step(model, micro, opt, sched, _accelerator(), grad_clip=1.0)

    parts = _hand_nats(reference, micro)
    n = sum(k for _, k in parts)
    assert n == 3 + 14 and result.num_targets == n
    loss = sum(nats for nats, _ in parts) / n  # one mean over all 17 targets of the step
    mean_of_means = sum(float(nats.detach()) / k for nats, k in parts) / len(parts)
    assert abs(float(loss) - mean_of_means) > 1e-3  # the two normalisations differ here
    assert result.loss == pytest.approx(float(loss), rel=1e-6)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)
    ref_opt, _ = _optimizer(reference)
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert p.grad is None  # zeroed for the next step
    assert result.lr == 0.1 and sched.get_last_lr() == [0.05]  # trained at 0.1, then advanced
    assert result.finite and not result.skipped


def test_a_non_finite_step_is_skipped_and_the_schedule_moves_on(monkeypatch):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    real = step_module.micro_batch_loss
    monkeypatch.setattr(
        step_module, "micro_batch_loss", lambda *a, **k: real(*a, **k) * float("nan")
    )
    opt, sched = _optimizer(model)
    result = optimizer_step(model, _micro_batches(), opt, sched, _accelerator(), grad_clip=1.0)
    assert math.isnan(result.loss) and math.isnan(result.grad_norm)
    assert result.skipped and not result.finite and result.num_targets == 17
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # no update
    assert sched.get_last_lr() == [0.05]


def test_a_step_without_targets_updates_nothing():
    """All labels -100: AdamW's weight decay would still move the weights; no update at all."""
    model = _model()
    before = copy.deepcopy(model.state_dict())
    micro = _micro_batches()
    for mb in micro:
        mb["labels"] = torch.full_like(mb["input_ids"], IGNORE)
    opt, sched = _optimizer(model, weight_decay=0.5)
    result = optimizer_step(model, micro, opt, sched, _accelerator(), grad_clip=0.0)
    assert result.num_targets == 0 and result.loss == 0.0 and result.grad_norm is None
    assert result.finite and result.skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --- the metric logger -----------------------------------------------------------------------


class _Trackers:
    """Stands in for ``accelerator.log``."""

    def __init__(self):
        self.calls = []

    def log(self, values, step):
        self.calls.append((step, values))


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=False, width=200)


def _use(logger: MetricLogger, tmp_path, resume_step=None) -> _Trackers:
    trackers = _Trackers()
    logger.open(tmp_path / "metrics.jsonl", resume_step=resume_step, accelerator=trackers)
    logger.warn("careful")
    with logger.bar(total_steps=4, start_step=0, text_every=2):
        for step in (1, 2):
            logger.advance(step, loss=3.5, lr=1e-3, tps=100.0, mfu="1.0%")
            logger.log({"step": step, "loss": 3.5})
        logger.print("validated")
    logger.close()
    return trackers


def test_the_logger_writes_nothing_off_the_main_process(tmp_path):
    logger = MetricLogger(_console(), main=False)
    trackers = _use(logger, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no metrics file, not even an empty one
    assert trackers.calls == []
    assert logger.console.file.getvalue() == ""


def test_the_logger_on_the_main_process(tmp_path):
    logger = MetricLogger(_console(), main=True)
    trackers = _use(logger, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.5}]
    assert trackers.calls == [(1, {"loss": 3.5}), (2, {"loss": 3.5})]  # step passed apart
    text = logger.console.file.getvalue()
    assert "warning: careful" in text and "validated" in text
    # off a terminal: a plain progress line every text_every (2) steps, not at step 1
    assert "step 2/4 | loss 3.5000" in text and "step 1/4" not in text


def test_the_logger_on_resume_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    _use(MetricLogger(_console(), main=True), tmp_path, resume_step=1)
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [1, 1, 2]  # step 1 kept from before, then the resumed run's 1 and 2
