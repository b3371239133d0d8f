"""Two CPU processes over gloo (``torchrun --nproc_per_node 2``) against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.training.loop import train

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys
from llmkit.training.loop import train
rank = int(os.environ["RANK"])
seen = {}
final = train(None, sys.argv[2:], progress=False,
              on_step=lambda s, r: seen.__setitem__(s, (r["rank_samples"], r["loss"])))
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"seen": seen, "final": final}, f)
"""


def _overrides(data: Path, run: Path, micro: int) -> list[str]:
    return [
        f"data.path={data}",
        f"out_dir={run}",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.n_head=2",
        f"train.micro_batch_size={micro}",
        "train.max_steps=6",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "train.save_interval=0",
        "train.trackers=[]",
        "eval.interval=6",
        "train.peak_flops=1e11",
    ]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_match_one_with_twice_the_micro_batch(
    write_prepared, tmp_path, tiny_tokenizer
):
    # 24 blocks, 4 per step: steps 1-6 are exactly one epoch; 9 validation blocks.
    data = write_prepared(tmp_path / "data", tiny_tokenizer, 16, 24, 9)
    one: dict[int, float] = {}
    single = train(
        None,
        _overrides(data, tmp_path / "one", 4),
        progress=False,
        on_step=lambda s, r: one.__setitem__(s, r["loss"]),
    )

    script = tmp_path / "run2.py"
    script.write_text(SCRIPT)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            str(tmp_path),
            *_overrides(data, tmp_path / "two", 2),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for step in range(1, 7):
        for r in ranks:  # every rank reports the loss over both ranks' targets
            assert r["seen"][str(step)][1] == pytest.approx(one[step], abs=1e-5)
    # one epoch: the two ranks together read every block exactly once
    blocks = [i for r in ranks for s in range(1, 7) for i in r["seen"][str(s)][0]]
    assert sorted(blocks) == list(range(24))
    # validation: 9 blocks x 15 targets, no padded duplicates, same value as one process
    two = ranks[0]["final"]
    val = [
        json.loads(x)
        for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in x
    ]
    assert [v["val_tokens"] for v in val] == [9 * 15]
    assert two["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    assert ranks[1]["final"]["val_loss"] == two["val_loss"]
    # only the main process wrote the run directory: one line per step, no duplicates
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"loss"' in x] == [1, 2, 3, 4, 5, 6]
