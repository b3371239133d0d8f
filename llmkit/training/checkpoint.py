"""Checkpoints of a run: written atomically, the last K kept, the best kept beside them, and
read back without unpickling anything that could run code.

::

    run_dir/checkpoints/
      step-00000500/            model.safetensors         weights (accelerate ``save_state``)
      step-00001000/            optimizer.bin             AdamW state (``torch.save``)
      best/                     scaler.pt                 fp16 loss scale (``torch.save``)
                                rng_state_<rank>.json     python, numpy, torch (+ CUDA) RNGs
                                trainer_state.json        step, tokens, early stopping, the LR
                                                          scheduler, the last validation
                                config.json               the model's config

Under FSDP / DeepSpeed the weights and optimizer state are accelerate's sharded layout instead
(a ``torch.distributed.checkpoint`` directory / DeepSpeed's files).

A checkpoint is first written to ``.tmp-<name>`` and renamed into place
(:func:`llmkit.core.atomic.replace`) only when every process has finished writing, so a crash,
Ctrl-C or a full disk mid-write leaves the previous checkpoints intact; ``trainer_state.json``
is written inside the temporary directory, so a checkpoint without it never exists under its
final name. A write that fails (disk full, no
permission) removes the temporary directory and ends the run with one line naming the
checkpoint and what to do.

**No code from a checkpoint.** accelerate's ``save_state`` / ``load_state`` pickle two things
with arbitrary Python objects: registered objects (``custom_checkpoint_<i>.pkl``, read back with
``torch.load(weights_only=False)``, i.e. plain ``pickle``, which calls whatever the file names)
and the RNG states (``random_states_<rank>.pkl``). llmkit therefore registers nothing with
accelerate: the LR scheduler's state (numbers and lists) goes into ``trainer_state.json``, and
each process writes its RNG states as JSON (:func:`rng_state`) and deletes accelerate's pickle.
What remains is weights (safetensors: no code by design), ``optimizer.bin`` and ``scaler.pt``
(``torch.save`` zip files of tensors and numbers). Before ``load_state`` runs,
:func:`verify_checkpoint` opens every file of the checkpoint the way it is safe to: JSON with
``json``, safetensors headers (which also catches truncation), every other pickle-bearing file
with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors, numbers,
strings and containers only; memory-mapped, so the tensors are not read twice), and the
``.metadata`` pickle of a ``torch.distributed.checkpoint`` directory (FSDP), which torch reads
with plain ``pickle``, with an unpickler that resolves only that format's own classes
(:func:`llmkit.security.check_pickle_globals`); the non-tensor ("bytes") items of its
``.distcp`` shards, which torch reads with ``torch.load(weights_only=False)``, are found through
that ``.metadata`` and each byte range is read with ``torch.load(weights_only=True)``
(:func:`_vet_dcp_bytes`; a shard no ``.metadata`` indexes is refused). A file that names
anything else, a damaged (truncated) file, or an accelerate pickle of registered objects
(checkpoints of llmkit before this format) ends ``--resume`` with one line naming the file;
nothing in it has run. accelerate's own ``load_state`` then reads the vetted files (it uses
``weights_only=True`` for all of them too). DeepSpeed's files are vetted the same way; a
DeepSpeed checkpoint holding a Python object outside PyTorch's allowed types is refused rather
than unpickled (DeepSpeed itself reads them with ``weights_only=False``; untested here: no GPU).

The data position needs no state beyond the step: the order of training blocks is a function
of (seed, epoch) (:func:`llmkit.training.batches.step_samples`), so step s always reads the
same blocks.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit.core import atomic, compat
from llmkit.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """``step-00000500``: zero-padded so that names sort in step order."""
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The finished step checkpoints of a run, oldest first (``best`` and temporaries not)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint.

    Raises:
        UserError: not a checkpoint written by ``llmkit train``.
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (OSError, ValueError, RecursionError) as err:
        if path.is_file():  # there, but truncated or edited: a damaged checkpoint
            raise _damaged(Path(checkpoint), path, f"cannot be read ({_why(err)})") from None
        raise UserError(
            f"{checkpoint} is not an llmkit checkpoint (no readable {STATE_FILE})",
            "pass --resume latest or a run_dir/checkpoints/step-N directory",
        ) from err


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """The checkpoint that ``--resume`` names: ``latest`` (newest under ``run_dir``), ``best``
    (the best validation's, kept beside them), a checkpoint directory, or a run directory (its
    newest).

    Raises:
        UserError: nothing to resume from.
    """
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(
                f"--resume latest: {run_dir / CHECKPOINTS} holds no checkpoint",
                "set train.save_interval to write checkpoints, or start without --resume",
            )
        return found[-1]
    if resume == BEST:
        best = run_dir / CHECKPOINTS / BEST
        if not (best / STATE_FILE).is_file():
            raise UserError(
                f"--resume best: {run_dir / CHECKPOINTS} holds no best checkpoint",
                "it is kept when validation improves (eval.interval); pass --resume latest",
            )
        return best
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        f"--resume {resume}: not a checkpoint or a run with checkpoints",
        "pass latest, best, a run directory or run_dir/checkpoints/step-N",
    )


def clean_temporaries(run_dir: Path) -> None:
    """Remove half-written ``.tmp-*`` checkpoints left by an interrupted run."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            # .tmp-NAME: written by every process (one name for all ranks, so not a
            # llmkit.core.atomic temporary); .NAME.old-HEX: atomic.replace's aside copy of best;
            # .old-NAME: the aside copy of llmkit before it
            if p.name.startswith((".tmp-", ".old-")) or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


RNG_FILE = "rng_state_{rank}.json"
#: accelerate's pickled RNG states (deleted after ``save_state``; vetted if present).
_ACCELERATE_RNG = re.compile(r"^random_states_\d+\.pkl$")
#: accelerate's pickles of registered objects, read back with plain pickle: never loaded.
_REGISTERED_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
#: Files whose content is parsed without any code: JSON, safetensors, text. (``.distcp`` shards
#: of a ``torch.distributed.checkpoint`` are not plain: torch reads their non-tensor items with
#: ``torch.load(weights_only=False)``; they are vetted through the ``.metadata`` that indexes
#: them, :func:`_vet_dcp_bytes`.)
_PLAIN_SUFFIXES = {".json", ".safetensors", ".txt", ".md"}
#: Files DeepSpeed's ``save_checkpoint`` writes that no loader unpickles or runs: ``latest`` (the
#: tag's name, text) and the conversion scripts it copies beside the shards (run by hand only).
_DEEPSPEED_PLAIN = {"latest", "zero_to_fp32.py", "zero_to_torch.py"}
#: DeepSpeed's model and optimizer state files (``torch.save`` pickles that name a few
#: DeepSpeed classes besides tensors and numbers; see :func:`_deepspeed_globals`).
_DEEPSPEED_STATE = re.compile(r"^(bf16_)?(zero_pp_rank_\d+_)?mp_rank_\d+_(model|optim)_states\.pt$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values: Python's ``random``, NumPy's global
    generator, torch's CPU generator and each CUDA device's (what accelerate's
    ``random_states_<rank>.pkl`` holds, without pickle)."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [t.tolist() for t in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when CUDA is available).

    Raises:
        KeyError, TypeError, ValueError: a malformed state.
    """
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in state["cuda"]])


def free_space(path: Path) -> str:
    """`` (N MB free on that disk)`` for a message, or "" when it cannot be told."""
    try:
        return f" ({shutil.disk_usage(path).free / 2**20:,.0f} MiB free on that disk)"
    except OSError:
        return ""


def write_failure(err: BaseException) -> bool:
    """True when ``err`` is a failed write rather than a bug: an ``OSError`` (ENOSPC, EDQUOT,
    EACCES, EROFS...), or what torch's and safetensors' writers raise for one (a
    ``RuntimeError`` / ``SafetensorError`` from their file writers)."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    markers = (
        "No space left",
        "StorageFull",
        "Disk quota",
        "file write failed",
        "unexpected pos",
        "Read-only file system",
        "Permission denied",
        "IoError",
        "os error",
    )
    return type(err).__name__ in ("RuntimeError", "SafetensorError") and any(
        m in text for m in markers
    )


def reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


@contextmanager
def _quiet_tied_weights() -> Iterator[None]:
    """Drop accelerate's "Removed shared tensor {'lm_head.weight'} while saving" warning.

    safetensors cannot hold two names for one storage, so accelerate (1.x,
    ``utils.other.clean_state_dict_for_safetensors``) saves a tied output matrix once and
    warns. The tie is part of the model's config and is restored when the checkpoint is
    loaded into the same model (resume is byte-identical,
    tests/training/test_train_resume.py), so the warning is noise on every checkpoint of a tied
    model.
    """

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Removed shared tensor" not in record.getMessage()

    loggers = [logging.getLogger("accelerate.utils.other"), logging.getLogger("accelerate")]
    quiet = _Filter()
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


def save_checkpoint(
    accelerator,
    run_dir: Path,
    name: str,
    state: dict[str, Any],
    model_config: Any = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint atomically; call on every process (each saves its RNG state).

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (its prepared model and optimizer,
            and the fp16 scaler, are saved; nothing may be registered for checkpointing).
        run_dir: the run directory.
        name: ``step-NNNNNNNN`` or ``best`` (replaced if it exists).
        state: JSON-able trainer state (step, tokens, early-stopping counters, the scheduler's
            ``state_dict()``...).
        model_config: a transformers config saved beside the weights, or None.
        keep_last: then delete all but this many newest step checkpoints
            (:func:`prune_checkpoints`, by the main process); None: delete none.

    Returns:
        The checkpoint's final path.

    Raises:
        UserError: the checkpoint could not be written (disk full, quota, permissions): one
            line naming it and the space left; the temporary directory is removed and the
            earlier checkpoints are untouched. Raised on every process.
    """
    if compat.accelerate_registered_objects(accelerator):  # accelerate would pickle them
        raise RuntimeError("objects registered for checkpointing would be pickled")
    root = run_dir / CHECKPOINTS
    final = root / name
    tmp = root / f".tmp-{name}"
    failure: BaseException | None = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as err:
        failure = err
    if not _anyone(accelerator, failure is not None):  # also the barrier before writing
        failure = _write_checkpoint(accelerator, tmp, state, model_config)
    if _anyone(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise _not_written(run_dir, final, failure)
    if accelerator.is_main_process:
        atomic.replace(tmp, final)  # only best is ever replaced: the old one moved aside first
        if keep_last is not None:
            prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(accelerator, tmp: Path, state, model_config) -> BaseException | None:
    """Write this process's part of a checkpoint into ``tmp``; the write failure (disk full,
    quota, permissions) if one happened, else None."""
    rank = accelerator.process_index
    try:
        with _quiet_tied_weights():
            accelerator.save_state(str(tmp))
        (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)
        _write_json(tmp / RNG_FILE.format(rank=rank), rng_state())
        if accelerator.is_main_process:
            if model_config is not None:
                model_config.to_json_file(str(tmp / "config.json"))
            _write_json(tmp / STATE_FILE, state, indent=2)
    except Exception as err:
        if not write_failure(err):
            raise
        return err
    return None


def _not_written(run_dir: Path, final: Path, failure: BaseException | None) -> UserError:
    """The one-line error for a checkpoint that could not be written (``failure`` None: it
    was another process's)."""
    why = reason(failure) if failure is not None else "another process failed to write"
    where = getattr(failure, "filename", None)
    what = f" ({Path(where).name})" if where else ""
    kept = list_checkpoints(run_dir)
    intact = f"; the earlier checkpoint {kept[-1].name} is intact" if kept else ""
    return UserError(
        f"cannot write checkpoint {final}{what}: {why}{free_space(final.parent)}{intact}",
        "free space on that disk or lower train.keep_last (checkpoints kept), then "
        + ("--resume latest" if kept else "start again"),
    )


def _anyone(accelerator, failed: bool) -> bool:
    """True on every process when ``failed`` is true on any (a sum over processes, which is
    also a barrier), so that no process waits for one that gave up."""
    if accelerator.num_processes == 1:
        return failed
    import torch

    flag = torch.tensor([int(failed)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def _write_json(path: Path, value: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(value, indent=indent), encoding="utf-8")


@functools.cache
def _dcp_metadata_globals() -> frozenset[str]:
    """The classes a ``torch.distributed.checkpoint`` ``.metadata`` pickle may name: that
    format's own dataclasses, ``torch.Size``, dtypes, layouts, paths."""
    import torch

    names = {
        "builtins.set",
        "builtins.frozenset",
        "collections.OrderedDict",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "torch.Size",
        "torch.serialization._get_layout",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
    }
    for cls in (
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    ):
        names.add(f"torch.distributed.checkpoint.metadata.{cls}")
    names.update(f"torch.{n}" for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype))
    return frozenset(names)


def _damaged(checkpoint: Path, file: Path, why: str) -> UserError:
    earlier = [p for p in list_checkpoints(checkpoint.parent.parent) if p != checkpoint]
    hint = (
        f"resume from an earlier checkpoint with --resume {earlier[-1]}"
        if earlier
        else "resume from an earlier checkpoint with --resume PATH, or start again with --overwrite"
    )
    rel = file.relative_to(checkpoint) if file.is_relative_to(checkpoint) else file
    return UserError(f"checkpoint {checkpoint.name} is damaged: file {rel} {why}", hint)


def _check_rng_files(ckpt: Path, world_size: int) -> None:
    """Each resuming process needs its ``rng_state_<rank>.json``.

    Raises:
        UserError: one is missing (naming accelerate's pickle when an older llmkit wrote it).
    """
    for rank in range(world_size):
        if not (ckpt / RNG_FILE.format(rank=rank)).is_file():
            legacy = ckpt / f"random_states_{rank}.pkl"
            raise _damaged(
                ckpt,
                legacy if legacy.exists() else ckpt / RNG_FILE.format(rank=rank),
                "is missing: written by an older llmkit (pickled RNG states) or not by "
                f"{world_size} process(es)",
            )


def verify_checkpoint(checkpoint: str | Path, world_size: int = 1) -> None:
    """Open every file of a checkpoint without running anything it could name (see the
    module docstring), before accelerate's ``load_state`` reads it.

    Args:
        checkpoint: the checkpoint directory.
        world_size: the number of processes resuming (each needs its ``rng_state_<rank>.json``).

    Raises:
        UserError: one line naming the first file that is truncated, unreadable, not valid
            JSON, or a pickle naming a class or function outside the allowed types (nothing
            of it was executed); an accelerate ``custom_checkpoint_*.pkl`` (never unpickled);
            a missing RNG state.
    """
    import pickle

    from llmkit.security import UnsafePickle

    ckpt = Path(checkpoint)
    _check_rng_files(ckpt, world_size)
    vetted_shards: set[Path] = set()
    # .metadata first: it names the .distcp items that hold pickles
    files = sorted(
        (p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: (p.name != ".metadata", str(p))
    )
    for f in files:
        if _REGISTERED_PICKLE.match(f.name):
            raise _damaged(
                ckpt,
                f,
                "is an accelerate pickle of Python objects, which llmkit never unpickles "
                "(a checkpoint of an older llmkit, or a crafted one)",
            )
        try:
            vetted_shards |= _open_file(ckpt, f)
        except UnsafePickle as err:
            raise _damaged(ckpt, f, f"is refused: {err}; nothing of it was run") from None
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise _damaged(ckpt, f, _why(err)) from None
        except Exception as err:  # safetensors' own error type
            if type(err).__name__ != "SafetensorError":
                raise
            raise _damaged(ckpt, f, _why(err)) from None
    for f in files:
        if f.suffix.lower() == ".distcp" and f.resolve() not in vetted_shards:
            raise _damaged(
                ckpt,
                f,
                "is not indexed by a .metadata beside it (torch would not read it as "
                "written); nothing of it was run",
            )


def _vet_dcp_bytes(ckpt: Path, metadata_file: Path, metadata: Any) -> set[Path]:
    """Vet the non-tensor items of a ``torch.distributed.checkpoint`` directory.

    torch (2.13, ``distributed/checkpoint/default_planner.py``, ``DefaultLoadPlanner.load_bytes``)
    reads each ``BYTE_IO`` item, a ``torch.save`` of a Python value kept in a ``.distcp`` shard,
    with ``torch.load(weights_only=False)``, i.e. plain pickle. The ``.metadata`` (already
    vetted) says which items are bytes and where they lie (``storage_data``: file, offset,
    length); each such byte range is read here with ``torch.load(weights_only=True)``.

    Args:
        ckpt: the checkpoint (for messages).
        metadata_file: the ``.metadata`` file; its directory holds the shards.
        metadata: its unpickled ``Metadata``.

    Returns:
        The resolved paths of the shards this metadata indexes.

    Raises:
        UserError: an item that holds more than tensors and numbers, an item transformed by a
            storage extension (compressed: not vetted, refused), a path outside the directory,
            or a range past the end of its file.
    """
    import io

    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from llmkit.security import quiet_torch_pickle_warnings

    root = metadata_file.parent
    kinds = getattr(metadata, "state_dict_metadata", None) or {}
    storage = getattr(metadata, "storage_data", None) or {}
    if not isinstance(kinds, dict) or not isinstance(storage, dict):
        raise _damaged(ckpt, metadata_file, "is not a torch.distributed.checkpoint index")
    shards: set[Path] = set()
    for index, info in storage.items():
        rel = str(getattr(info, "relative_path", ""))
        shard = (root / rel).resolve()
        if not rel or Path(rel).is_absolute() or shard.parent != root.resolve():
            raise _damaged(
                ckpt, metadata_file, f"points outside its directory ({rel[:80]!r}); refused"
            )
        shards.add(shard)
        fqn = getattr(index, "fqn", None)
        if not isinstance(kinds.get(fqn), BytesStorageMetadata):
            continue  # raw tensor bytes: read as tensors, no unpickling
        where = root / rel
        if getattr(info, "transform_descriptors", None):
            raise _damaged(
                ckpt,
                where,
                f"holds item {fqn!r} through a storage transform "
                f"({info.transform_descriptors}); llmkit cannot vet it, refused",
            )
        offset, length = int(info.offset), int(info.length)
        try:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except OSError as err:
            raise _damaged(ckpt, where, _why(err)) from None
        if len(data) != length:
            raise _damaged(ckpt, where, f"is truncated (item {fqn!r} ends past its end)")
        try:
            with quiet_torch_pickle_warnings():
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # the restricted unpickler's refusal, or garbage
            raise _damaged(ckpt, where, f"(item {fqn!r}) {_why(err)}") from None
    return shards


def _open_file(ckpt: Path, f: Path) -> set[Path]:
    """Read one checkpoint file by its kind, running nothing it names: JSON parsed,
    safetensors headers opened, a DCP ``.metadata`` pickle's globals checked against
    :func:`_dcp_metadata_globals` and the pickled items it indexes in ``.distcp`` shards vetted
    (:func:`_vet_dcp_bytes`), anything else through ``torch.load(weights_only=True)``.

    Returns:
        The ``.distcp`` shards a ``.metadata`` indexed (empty for any other file).
    """
    import pickle

    from llmkit.security import check_pickle_globals

    suffix = f.suffix.lower()
    if suffix == ".json":
        json.loads(f.read_text(encoding="utf-8"))
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as handle:
            handle.keys()
    elif f.name == ".metadata":
        data = f.read_bytes()
        check_pickle_globals(data, _dcp_metadata_globals())
        return _vet_dcp_bytes(ckpt, f, pickle.loads(data))
    elif suffix == ".distcp":
        pass  # checked by the caller: every one must be indexed by a .metadata
    elif f.name in _DEEPSPEED_PLAIN:
        pass  # text: read by no loader as a pickle, run by none
    elif suffix not in _PLAIN_SUFFIXES:  # optimizer.bin, scaler.pt, DeepSpeed's *.pt, ...
        _vet_torch_file(f)
    return set()


def _vet_torch_file(f: Path) -> None:
    """``torch.load(weights_only=True)`` of ``f``, memory-mapped (its tensors are not read);
    accelerate's RNG pickle may also hold NumPy arrays (its own allowed list)."""
    import torch

    safe: list[Any] = []
    if _ACCELERATE_RNG.match(f.name):
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        safe = list(TORCH_SAFE_GLOBALS)
    elif _DEEPSPEED_STATE.match(f.name):
        safe = _deepspeed_globals()
    from llmkit.security import quiet_torch_pickle_warnings

    with torch.serialization.safe_globals(safe), quiet_torch_pickle_warnings():
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(f, map_location="cpu", weights_only=True)  # not a zip file: no mmap


def _deepspeed_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoint files name (DeepSpeed 0.19, ZeRO stages 1-3): the
    loss scaler object (pickled even in float32), the ZeRO stage enum and the dataclass that
    addresses a parameter's fragment in the flat buffer. Plain data holders: unpickling them
    sets attributes, runs nothing else. Empty when deepspeed is not installed (the files are
    then refused, and DeepSpeed could not load them anyway)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except Exception:  # missing or broken install
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _why(err: BaseException) -> str:
    from llmkit.security import torch_pickle_refusal

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    refused = torch_pickle_refusal(err)  # torch's restricted unpickler said no
    if refused is not None:
        return (
            f"is refused: it holds more than tensors and numbers ({refused}); nothing of it was run"
        )
    if "central directory" in text or "incomplete metadata" in text or "header" in text:
        return f"is truncated or corrupt ({text[:120]})"
    return f"cannot be read ({text[:160]})"


def load_checkpoint(accelerator, checkpoint: str | Path, scheduler=None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into the prepared model,
    optimizer (and fp16 scaler), the LR ``scheduler`` and this process's RNGs; call on every
    process.

    Every file is vetted first (:func:`verify_checkpoint`); then accelerate's ``load_state``
    reads the weights and optimizer state, and llmkit restores the scheduler and the RNGs from
    its JSON files.

    Returns:
        The ``trainer_state.json`` of the checkpoint.

    Raises:
        UserError: a damaged or refused file (one line naming it); not an llmkit checkpoint.
    """
    ckpt = Path(checkpoint)
    state = read_state(ckpt)
    for key in ("step", "tokens"):
        value = state.get(key) if isinstance(state, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _damaged(ckpt, ckpt / STATE_FILE, f"has no valid {key!r} ({value!r})")
    verify_checkpoint(ckpt, accelerator.num_processes)
    try:
        accelerator.load_state(str(ckpt))
    except Exception as err:  # vetted, so: shapes that do not fit, a changed model...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot resume from {ckpt}: {first[:200]}",
            "resume with the recipe (model sizes, LoRA, precision) that wrote it",
        ) from None
    if scheduler is not None:
        try:
            scheduler.load_state_dict(dict(state["scheduler"]))
        except (KeyError, TypeError, ValueError) as err:
            raise _damaged(
                ckpt, ckpt / STATE_FILE, f"has no usable scheduler state ({err})"
            ) from None
    rng_file = ckpt / RNG_FILE.format(rank=accelerator.process_index)
    try:
        set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:  # RecursionError
        raise _damaged(ckpt, rng_file, _why(err)) from None
    return state


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints; returns those deleted."""
    found = list_checkpoints(run_dir)
    doomed = found[:-keep_last] if keep_last > 0 else found
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
