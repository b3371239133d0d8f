"""Every use of a library's private API, one function each, in one place.

llmkit reaches into four libraries where their public API has no way to do what it needs. Each
such use is here, and nowhere else, with the version it was written against and why no public
API does; a library upgrade that breaks one breaks it here, and the tests that call it
(named per function) say so. Where no upstream issue asks for the missing public API, the
comment says "upstream issue: none found" rather than inventing one.

Every function imports its library lazily: this module is imported by light modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def reset_accelerate_state() -> None:
    """Forget accelerate's per-process state, so that a second ``Accelerator`` in the same
    process (a notebook, the tests: ``llmkit.train`` called twice) starts fresh.

    accelerate 1.15.0: ``AcceleratorState`` and ``GradientState`` share one state per process
    and keep the first run's mixed precision and compile backend (or refuse another one); the
    only reset is the private ``_reset_state``. Asked upstream without a public answer:
    huggingface/accelerate#2463 ("How to initialize Accelerator twice"); transformers' own
    ``TrainingArguments`` calls the same private method (huggingface/transformers#29781).
    Tested by tests/test_train.py (several runs in one process).
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_registered_objects(accelerator: Any) -> list:
    """The objects registered with ``accelerator.register_for_checkpointing`` (which
    ``save_state`` would pickle and ``load_state`` unpickle).

    accelerate 1.15.0: kept in the private ``Accelerator._custom_objects``; no public accessor
    since the feature came (huggingface/accelerate#270). Upstream issue asking for one: none
    found. llmkit registers nothing and refuses to checkpoint if something did.
    """
    return list(getattr(accelerator, "_custom_objects", None) or [])


def lm_eval_import_func() -> Callable | None:
    """The function through which lm_eval resolves a task YAML's ``!function`` reference
    (``_import_func_in_yml(qual, base_dir)``), or None when this lm_eval has none.

    lm_eval 0.4.13 (0.4.10+): private ``lm_eval.tasks._yaml_loader._import_func_in_yml``;
    there is no public hook to refuse a task's Python code. Upstream issue: none found (the
    harness's trust_remote_code concerns datasets, EleutherAI/lm-evaluation-harness#1135).
    Tested by tests/test_security.py (a task YAML outside the harness imports nothing).
    """
    try:
        from lm_eval.tasks import _yaml_loader as loader
    except ImportError:
        return None
    return getattr(loader, "_import_func_in_yml", None)


def set_lm_eval_import_func(func: Callable) -> None:
    """Make lm_eval resolve ``!function`` references through ``func`` (see
    :func:`lm_eval_import_func`, which must have returned a function first)."""
    from lm_eval.tasks import _yaml_loader as loader

    loader._import_func_in_yml = func


def lm_eval_load_yaml() -> Callable | None:
    """lm_eval's own task-YAML reader (its ``!function`` tag and ``include:`` handling), or None
    when this lm_eval lays its modules out otherwise.

    lm_eval 0.4.13 (0.4.10+): private ``lm_eval.tasks._yaml_loader.load_yaml``, not exported.
    Upstream issue: none found.
    """
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        return None
    return load_yaml


@contextmanager
def quiet_gguf_conversion() -> Iterator[None]:
    """Silence transformers' "Converting and de-quantizing GGUF tensors" bar for the block.

    transformers 5.24: a bare ``tqdm`` imported into ``modeling_gguf_pytorch_utils`` that
    ``transformers.utils.logging.disable_progress_bar`` does not reach; the module's ``tqdm``
    is swapped for one with ``disable=True``. Upstream issue: none found. No test checks the
    bar (cosmetic); the GGUF loading tests run through it.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as mod
    except ImportError:
        yield
        return
    original = getattr(mod, "tqdm", None)
    if original is None:
        yield
        return
    mod.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        mod.tqdm = original


def compile_chat_templates_in(environment: type) -> Callable:
    """Make transformers compile every chat template in ``environment`` (a Jinja
    ``ImmutableSandboxedEnvironment`` subclass); returns transformers' compile function.

    transformers 5.24: ``apply_chat_template`` compiles through the private, ``lru_cache``d
    ``chat_template_utils._compile_jinja_template``, which builds a module-level
    ``ImmutableSandboxedEnvironment``; there is no parameter to pass another environment, so
    the module's name is rebound and the cache cleared (templates compiled before recompile).
    Upstream issue: none found. Tested by tests/test_chat_templates.py.
    """
    from transformers.utils import chat_template_utils as ctu

    if ctu.ImmutableSandboxedEnvironment is not environment:
        ctu.ImmutableSandboxedEnvironment = environment
        ctu._compile_jinja_template.cache_clear()
    return ctu._compile_jinja_template
