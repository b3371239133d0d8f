"""What llmkit refuses to execute, in one place (README "What llmkit executes").

Two kinds of file can carry code that runs when they are loaded:

- **A model's own Python code.** A model directory (or Hub repository) whose ``config.json`` or
  ``tokenizer_config.json`` has an ``auto_map`` names ``modeling_*.py`` / ``tokenization_*.py``
  files that transformers imports to build it ("remote code"). transformers asks on standard
  input when ``trust_remote_code`` is left unset, so a piped chat line could answer "y". llmkit
  always passes ``trust_remote_code`` explicitly, False unless the user gave
  ``--trust-remote-code`` (Python: ``trust_remote_code=True``, recipes:
  ``model.trust_remote_code: true``); a model that needs its code is refused with
  :func:`remote_code_error`.
- **Pickles.** ``pickle`` (and ``torch.load(weights_only=False)``) calls whatever a file names.
  llmkit's checkpoints keep their own state as JSON, weights as safetensors, and the
  optimizer state is read with ``torch.load(weights_only=True)`` (PyTorch's restricted
  unpickler: tensors, numbers, strings and containers only); see
  :mod:`llmkit.training.checkpoint`. :func:`check_pickle_globals` vets the plain pickles that
  a library would read with ``pickle.load`` (a distributed checkpoint's ``.metadata``).

No heavy imports here: the CLI imports this module.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmkit.errors import UserError

TRUST_FLAG = "--trust-remote-code"
TRUST_HINT = (
    f"pass {TRUST_FLAG} (Python: trust_remote_code=True) only if you trust its author; "
    "the code runs with your permissions"
)


def is_remote_code_error(err: BaseException) -> bool:
    """True when ``err`` is transformers refusing a model because it needs its own code and
    ``trust_remote_code`` is not True (``dynamic_module_utils.resolve_trust_remote_code``)."""
    return isinstance(err, ValueError) and "trust_remote_code=True" in str(err)


def auto_map_files(where: str | Path) -> list[str]:
    """The Python files that the ``auto_map`` of a local model directory names, e.g.
    ``["modeling_evil.py"]`` (``config.json``, ``tokenizer_config.json``); [] for none or a
    Hub id. Entries look like ``"modeling_x.Class"`` or ``"repo--modeling_x.Class"``."""
    path = Path(where)
    found: list[str] = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for value in auto_map.values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and "." in ref:
                    module = ref.split("--")[-1].rsplit(".", 1)[0]
                    found.append(f"{module}.py")
    return list(dict.fromkeys(found))


def announce_remote_code(name: str, where: str | Path) -> None:
    """One ``warning:`` line on stderr (rank 0 only) when a model that ships Python code is
    loaded with ``trust_remote_code`` on, naming the files that will run: the flag, the API
    keyword or a recipe's ``model.trust_remote_code: true`` may have been set long before."""
    import os
    import sys

    files = auto_map_files(where)
    if files and os.environ.get("RANK", "0") == "0":
        sys.stderr.write(
            f"warning: running the Python code that {name} ships ({', '.join(files)}): "
            "trust_remote_code is on (--trust-remote-code, trust_remote_code=True or the "
            "recipe's model.trust_remote_code)\n"
        )
        sys.stderr.flush()


def remote_code_error(name: str, where: str | Path | None = None) -> UserError:
    """The one-line error for a model that needs its own code to load.

    Args:
        name: the model as the user named it (``--model``, ``model.name_or_path``...).
        where: the directory it is read from, to list the files its ``auto_map`` names.
    """
    files = auto_map_files(where if where is not None else name)
    what = f" ({', '.join(files)})" if files else ""
    return UserError(
        f"{name} needs Python code of its own{what} to load, and llmkit does not run a "
        "model's code unless told to",
        TRUST_HINT,
    )


class UnsafePickle(Exception):
    """A pickle names a global (a class or function to call) outside the allowed set."""


def check_pickle_globals(data: bytes, allowed: set[str] | frozenset[str]) -> None:
    """Refuse a plain pickle that would import anything but the ``allowed`` globals.

    Unpickles ``data`` into a throw-away object with an unpickler whose ``find_class`` returns
    only the ``allowed`` classes (the "restricting globals" recipe of the Python ``pickle``
    documentation): a global is the only way a pickle reaches code, so nothing else can run.
    Called before a library reads the same file with plain ``pickle.load``.

    Args:
        data: the pickle's bytes.
        allowed: ``"module.qualname"`` strings of harmless classes (dataclasses, enums).

    Raises:
        UnsafePickle: a global outside ``allowed``, or a pickle that cannot be read.
    """
    import io

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if f"{module}.{name}" not in allowed:
                raise UnsafePickle(f"it would import {module}.{name}")
            return super().find_class(module, name)

    try:
        _Restricted(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as err:  # truncated, garbage: UnpicklingError, EOFError, ValueError...
        raise UnsafePickle(f"not a readable pickle ({type(err).__name__})") from None


def torch_pickle_refusal(err: BaseException) -> str | None:
    """What torch's restricted unpickler (``torch.load(weights_only=True)``, the default of
    torch >= 2.6, which transformers also uses for ``pytorch_model.bin``) refused in a file,
    e.g. ``"Unsupported global: GLOBAL argparse.Namespace"``; None when ``err`` is not that
    refusal. Nothing of a refused file ran."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return detail[0].split(" was not an allowed global")[0][:100] if detail else ""


@contextmanager
def quiet_torch_pickle_warnings() -> Iterator[None]:
    """Within the block, torch's two-line ``UserWarning`` "Detected pickle protocol N in the
    checkpoint ..." (``torch/_weights_only_unpickler.py``, printed before it refuses a plain
    pickle) is not shown: llmkit's own one-line refusal follows (SPEC §6). Only that warning,
    only in the block (``warnings.catch_warnings`` restores the filters after)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def refused_weights_error(name: str, err: BaseException) -> UserError | None:
    """The one-line error for a model whose pickled weights (``pytorch_model.bin``) torch's
    restricted unpickler refused (:func:`torch_pickle_refusal`), else None."""
    detail = torch_pickle_refusal(err)
    if detail is None:
        return None
    return UserError(
        f"cannot load {name}: its pickled weights (.bin) are refused: they hold more than "
        f"tensors and numbers ({detail}); nothing of them was run",
        "use a model saved as safetensors (save_pretrained's default), or convert this one "
        "yourself only if you trust where it came from",
    )
