"""llmkit: raw text to a trained causal language model, generated text and measured quality.

The four jobs are plain functions, usable from a notebook::

    import llmkit
    llmkit.prepare(["input.txt"], "data/shakespeare", vocab_size=1024, block_size=128)
    llmkit.train("recipes/shakespeare-tiny.yaml")
    llmkit.generate("ROMEO:", model="runs/shakespeare-tiny")
    llmkit.evaluate("runs/shakespeare-tiny", "data/shakespeare")

Heavy libraries (torch, transformers, datasets) are imported only when a function is called,
so ``import llmkit`` and ``llmkit --help`` stay fast. The packages are laid out by job —
``llmkit.data`` (prepare), ``llmkit.training``, ``llmkit.generation``, ``llmkit.evaluation`` —
named apart from the functions so that importing a job package never replaces the function
of the same name on this module.
"""

from __future__ import annotations

from typing import Any

from llmkit.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "evaluate", "generate", "prepare", "train"]


def prepare(*args: Any, **kwargs: Any):
    """Clean, tokenize and pack raw text; see :func:`llmkit.data.pipeline.prepare`."""
    from llmkit.data.pipeline import prepare as _prepare

    return _prepare(*args, **kwargs)


def train(*args: Any, **kwargs: Any):
    """Train a causal LM from a recipe; see :func:`llmkit.training.loop.train`."""
    from llmkit.training.loop import train as _train

    return _train(*args, **kwargs)


def generate(*args: Any, **kwargs: Any):
    """Generate text from a model; see :func:`llmkit.generation.generate.generate`."""
    from llmkit.generation.generate import generate as _generate

    return _generate(*args, **kwargs)


def evaluate(*args: Any, **kwargs: Any):
    """Perplexity and bits per byte of a model; see :func:`llmkit.evaluation.evaluate.evaluate`."""
    from llmkit.evaluation.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
