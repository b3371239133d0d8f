"""Run directories written by ``llmkit train`` (light: no heavy imports).

::

    runs/NAME/
      config.json, model.safetensors, generation_config.json   the final model (save_pretrained)
      tokenizer.json, tokenizer_config.json                     the tokenizer it was trained with
      llmkit_config.yaml       the resolved training config
      metrics.jsonl            one JSON object per logged step / evaluation
      llmkit_run.json          written last: {"status": "finished", "final_metrics": {...}, ...}

A run is *finished* when ``llmkit_run.json`` says so; ``llmkit generate`` without ``--model``
takes the newest finished run under ``./runs/``.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_MARKER = "llmkit_run.json"


def read_run_info(path: str | Path) -> dict | None:
    """The content of ``llmkit_run.json`` in ``path``, or None when absent or unreadable."""
    marker = Path(path) / RUN_MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def is_finished_run(path: str | Path) -> bool:
    """True when ``path`` holds a run that ``llmkit train`` finished."""
    info = read_run_info(path)
    return bool(info) and info.get("status") == "finished"


def newest_finished_run(root: str | Path = "runs") -> Path | None:
    """The finished run under ``root`` whose marker was written last, or None (hidden
    directories, such as a run ``--overwrite`` set aside, are not looked at)."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and is_finished_run(p)
    ]
    if not runs:
        return None
    return max(runs, key=lambda p: (p / RUN_MARKER).stat().st_mtime)
