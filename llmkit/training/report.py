"""What a finished run leaves for people: a loss-curve PNG and a model card (README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmkit.core.atomic import atomic_output


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (unreadable lines skipped)."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except (ValueError, RecursionError):
                continue
    return out


def plot_loss_curve(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Training loss and validation loss (nats/token) against step, as a PNG.

    Returns:
        ``out``, or None when matplotlib is not installed or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format="png")  # the temporary's name ends in .tmp-<pid>-<hex>
    finally:
        plt.close(fig)
    return out


def _fmt(value: Any, key: str = "") -> str:
    if key == "mfu":  # the run's average; None: the measured peak was below the achieved rate
        return "n/a" if value is None else f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(
    *,
    name: str,
    base: str,
    manifest: dict[str, Any],
    config_yaml: str,
    final: dict[str, Any],
    version: str,
) -> str:
    """README.md text for the final model directory: data manifest, config, final metrics."""
    settings = manifest.get("settings", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llmkit, causal-lm]",
        "---",
        "",
        f"# {name}",
        "",
        f"A causal language model trained by llmkit {version} ({base}).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v, k)} |" for k, v in final.items()]
    lines += ["", "## Data", ""]
    inputs = manifest.get("inputs")
    if inputs:
        shown = inputs if isinstance(inputs, list) else [inputs]
        lines.append(
            "Inputs: "
            + ", ".join(
                str(i.get("path", i)) if isinstance(i, dict) else str(i) for i in shown[:10]
            )
        )
    if settings:
        lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for key in ("tokens", "splits", "counts"):
        if key in manifest:
            lines.append(f"{key.capitalize()}: `{json.dumps(manifest[key])}`")
    lines += [
        "",
        "<details><summary>Full data manifest</summary>",
        "",
        "```json",
        json.dumps(manifest, indent=2)[:20000],
        "```",
        "",
        "</details>",
        "",
        "## Training config (resolved)",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
