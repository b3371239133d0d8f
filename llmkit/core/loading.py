"""Find and load a causal language model and its tokenizer (SPEC §4 "Models").

A model is named by one string, tried in this order of kinds:

- a local directory holding ``config.json`` (``save_pretrained`` output, a run of ``llmkit train``);
- a ``.gguf`` file (loaded and de-quantized by transformers; needs the ``gguf`` package). The
  first load converts it and saves the result as safetensors under
  ``$LLMKIT_CACHE/gguf/`` (default ``~/.cache/llmkit``; ``LLMKIT_CACHE=off`` disables it), one
  copy per dtype the weights were de-quantized to; later loads in that dtype read that copy,
  about 20× faster on a CPU (transformers' GGUF reader parses the file, its 49k-entry
  vocabulary included, twice per load);
- otherwise a Hugging Face Hub id (works when online or already in the local cache). Before
  asking the Hub, :func:`hub_status` checks within about 2 s whether it can be reached
  (``HF_HUB_OFFLINE`` set, or a TCP connection to ``HF_ENDPOINT`` or its proxy); when it
  cannot, only the local cache is read, so an offline machine gets its one-line answer at once
  instead of after huggingface_hub's retries (~50 s). A model that is not cached yet is
  downloaded with huggingface_hub's progress bars.

Two corrections to transformers' GGUF reading (transformers 5.x) are applied before the copy
is cached: a GPT-2 file's ``gpt2.context_length`` becomes ``n_positions`` (transformers puts it
in ``n_ctx``, keeps 1024 positions and fails on any other size), and a vocabulary whose
pre-tokenizer llama.cpp calls ``smollm`` splits digits one by one as SmolLM's own tokenizer
does (transformers falls back to GPT-2's split, which merges digit runs).

Without a name, :func:`load_model_and_tokenizer` tries ``$LLMKIT_MODEL``, then the newest finished
run under ``./runs/``, then ``gpt2`` from the Hub, and when none loads raises one
:class:`~llmkit.errors.UserError` that lists what was tried and why each failed.

A model's own Python code (the ``modeling_*.py`` / ``tokenization_*.py`` files that the
``auto_map`` of its ``config.json`` or ``tokenizer_config.json`` names) runs only with
``trust_remote_code=True`` (``--trust-remote-code``). The flag is always passed to transformers,
which otherwise asks "run the custom code? [y/N]" on standard input (where a piped chat line
could answer it); without it such a model is refused with one line
(:func:`llmkit.security.remote_code_error`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit.core.cache import cache_root, gguf_cache_dir  # noqa: F401 - one rule, torch-free
from llmkit.core.compat import quiet_gguf_conversion
from llmkit.errors import UserError, require

ENV_MODEL = "LLMKIT_MODEL"
DEFAULT_HUB_MODEL = "gpt2"
FIX_HINT = (
    "pass --model DIR (a save_pretrained directory or a .gguf file), set LLMKIT_MODEL, "
    "or train one with `llmkit train`"
)
#: Version of a converted copy, in its ``llmkit_gguf_cache.json``; a copy of another version
#: (or none: written before v2) is converted again. v2: GPT-2 n_positions, SmolLM digit split.
_GGUF_CACHE_VERSION = 2
_GGUF_CACHE_MARKER = "llmkit_gguf_cache.json"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class Candidate:
    """One place a model may come from: ``name`` as given, ``origin`` says why it was chosen."""

    name: str
    origin: str  # "--model", "LLMKIT_MODEL", "newest finished run", "default"

    def chosen(self) -> str:
        """How the model was picked, for ``using ...`` on stderr when not given explicitly."""
        if self.origin == ENV_MODEL:
            return f"${ENV_MODEL}={self.name}"
        if self.origin == "default":
            return f"{self.name} (default: no {ENV_MODEL} and no finished run under ./runs)"
        return f"{self.name} ({self.origin})"

    def describe(self) -> str:
        if self.origin == "--model":
            return self.name
        if self.origin == "default":
            return f"{self.name} from the Hub"
        if self.origin == "LLMKIT_MODEL":
            return f"LLMKIT_MODEL={self.name}"
        return f"{self.origin} {self.name}"


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``device``: ``auto`` is cuda if available, else mps, else cpu.

    Raises:
        UserError: an unknown device string, or cuda / mps asked for but not available.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here", "use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here", "use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``dtype``: ``auto`` is bfloat16 on a CUDA device that supports it,
    else float32. Names: float32/fp32, bfloat16/bf16, float16/fp16.

    On a CPU ``auto`` loads float32. ``generate``, ``chat`` and ``serve`` then let
    :func:`llmkit.generation.cpu_path.auto_cpu_path` switch to bfloat16 only where a
    calibration of the model on this machine finds it greedy-equal to float32 and faster
    (measured on SmolLM2-135M here: bfloat16 changed the greedy text of 3 of 8 prompts, so it
    stays float32). ``--dtype bfloat16`` still selects it.

    Raises:
        UserError: an unknown dtype name.
    """
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise UserError(
            f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16"
        ) from None


#: The variable DeepSpeed reads to choose its accelerator instead of detecting one.
DS_ACCELERATOR = "DS_ACCELERATOR"


def quiet_deepspeed() -> None:
    """Keep DeepSpeed from printing ``[WARNING] [real_accelerator.py:...] Setting accelerator
    to CPU`` when something imports it on a machine with neither CUDA nor MPS.

    llmkit's generate, chat, serve, eval and export never use DeepSpeed, but where it is
    installed transformers imports it anyway: ``save_pretrained`` (the first load of a
    ``.gguf`` caches its conversion with it) calls accelerate's ``extract_model_from_parallel``,
    which imports ``deepspeed`` to check for a ``DeepSpeedEngine``; at import DeepSpeed looks
    for an accelerator and, finding none, logs that line on **stdout** (its logger's handler),
    so it even landed in ``llmkit generate --json``'s output. Setting ``DS_ACCELERATOR=cpu``
    (DeepSpeed's documented override of the detection) gives DeepSpeed the answer its detection
    would reach on such a machine, without the line. Nothing is set when the variable is
    already set, when DeepSpeed is already imported (too late), or when CUDA or MPS is
    available (DeepSpeed detects those silently and ``train`` may use them). Children of this
    process inherit the variable, with the same meaning.
    """
    if DS_ACCELERATOR in os.environ or "deepspeed" in sys.modules:
        return
    if resolve_device("auto").type == "cpu":
        os.environ[DS_ACCELERATOR] = "cpu"


def model_max_positions(model: Any) -> int | None:
    """The number of positions (tokens of context) the model was built for, or None when its
    config does not say (``max_position_embeddings``, or GPT-2's ``n_positions``)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_SILENCED: weakref.WeakSet = weakref.WeakSet()


def silence_padding_warning(model: Any) -> None:
    """Turn off transformers' "pass an attention_mask" warning on ``model`` (and the module it
    wraps): llmkit always builds the mask itself (generation's ``left_pad``; scoring of packed
    blocks passes none on purpose). Once per model: walking its modules costs several
    milliseconds, which every ``generate`` call would pay."""
    try:
        if model in _SILENCED:
            return
    except TypeError:  # not weak-referenceable: silence it each time
        pass
    for m in model.modules() if hasattr(model, "modules") else ():
        if hasattr(m, "warn_if_padding_and_no_attention_mask"):
            m.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
    try:
        _SILENCED.add(model)
    except TypeError:
        pass


def _candidates(model: str | None) -> list[Candidate]:
    if model is not None:
        return [Candidate(str(model), "--model")]
    from llmkit.runs import newest_finished_run

    found: list[Candidate] = []
    env = os.environ.get(ENV_MODEL, "").strip()
    if env:
        return [Candidate(env, ENV_MODEL)]
    run = newest_finished_run("runs")
    if run is not None:
        found.append(Candidate(str(run), "newest finished run"))
    found.append(Candidate(DEFAULT_HUB_MODEL, "default"))
    return found


def _looks_like_path(name: str) -> bool:
    """True when ``name`` is meant as a local path rather than a Hub id ``org/name``: it starts
    with ``/ . ~``, ends in ``.gguf``, holds a backslash or more than one ``/`` (a Hub id has
    at most one), or its first component is an existing directory."""
    if name.startswith(("/", ".", "~")) or name.endswith(".gguf") or "\\" in name:
        return True
    if name.count("/") > 1:
        return True
    first = Path(name).parts[0] if Path(name).parts else ""
    return "/" in name and Path(first).is_dir()


@dataclass
class ModelSource:
    """Where the model named by one string lives: the one rule for "is this a directory, a
    ``.gguf`` file or a Hub id" (generate, chat, eval, serve, export and train use it).

    ``from_pretrained(where, **kwargs)`` loads it: for a ``.gguf`` file ``where`` is its
    directory and ``kwargs`` holds ``gguf_file`` and the config corrections of
    :func:`_gguf_fixes`; for a ``.gguf`` file whose conversion is cached (current version),
    ``where`` is the cached ``save_pretrained`` directory and ``kwargs`` is empty.
    """

    name: str  # as given
    kind: str  # "directory", "gguf" or "hub"
    where: str
    kwargs: dict[str, Any]
    gguf_pre: str | None = None  # the .gguf's pre-tokenizer (tokenizer.ggml.pre)
    gguf_cache: Path | None = None  # where the .gguf's conversion is (or will be) cached
    cached: bool = False  # where is that cached conversion


def resolve_source(
    name: str,
    *,
    label: str = "",
    hint_flag: str = "--model",
    use_cache: bool = True,
    dtype: torch.dtype | str = torch.float32,
) -> ModelSource:
    """Classify ``name`` as a model directory, a ``.gguf`` file or a Hub id (no loading).

    Args:
        name: as the user gave it (``~`` expanded).
        label: put before ``name`` in errors (``"model.name_or_path "`` for a recipe).
        hint_flag: what the hints tell the user to point at a model.
        use_cache: read a ``.gguf`` from its cached conversion when there is a current one.
            Training passes False: the copy holds the weights in the dtype of the load that
            wrote it (bfloat16 after an ``auto`` load on a GPU), not the file's exact values.
        dtype: the dtype of the load: a ``.gguf``'s cached conversion is kept per dtype
            (:func:`~llmkit.core.cache.gguf_cache_dir`), so a float32 load never reads the
            rounded weights of a bfloat16 one.

    Raises:
        UserError: a directory without ``config.json``; a file that is not ``.gguf``; a
            ``.gguf`` file without the ``gguf`` package; a path (:func:`_looks_like_path`) that
            does not exist; a cached conversion that names Python code (altered).
    """
    from llmkit.security import auto_map_files

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{label}{name} is not a model directory (no config.json)",
                f"point {hint_flag} at a save_pretrained directory, a run of `llmkit train` "
                "or a .gguf file",
            )
        return ModelSource(name, "directory", str(path), {})
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(
                f"{label}{name} is a file but not a .gguf model",
                f"point {hint_flag} at a save_pretrained directory or a .gguf file",
            )
        require(
            "gguf",
            f"{name} is a GGUF file and reading it needs the gguf package",
            "pip install 'llmkit[gguf]' (or pip install gguf)",
        )
        cache = gguf_cache_dir(path, _dtype_name(dtype))
        if use_cache and cache is not None and _is_current_gguf_cache(cache, _dtype_name(dtype)):
            planted = auto_map_files(cache)
            if planted:  # llmkit writes no auto_map: someone altered the cached conversion
                raise UserError(
                    f"the cached conversion of {name} in {cache} was altered: it names Python "
                    f"code ({', '.join(planted)}) that llmkit never writes there",
                    "delete it (`llmkit cache clear --gguf`, or remove that directory) and "
                    "load the .gguf again",
                )
            return ModelSource(name, "gguf", str(cache), {}, gguf_cache=cache, cached=True)
        overrides, pre = _gguf_fixes(path)
        return ModelSource(
            name,
            "gguf",
            str(path.parent),
            {"gguf_file": path.name, **overrides},
            gguf_pre=pre,
            gguf_cache=cache,
        )
    if _looks_like_path(name):
        raise UserError(f"{label}{name} does not exist", "check the path")
    return ModelSource(name, "hub", name, {})


def _short(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened, for a one-line error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, UserError):
        text = err.message
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_saved_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _dtype_name(dtype: torch.dtype | str) -> str:
    """``float32`` for ``torch.float32`` (or ``"float32"``): how cache names spell a dtype."""
    return str(dtype).removeprefix("torch.")


def _is_current_gguf_cache(path: Path, dtype: str = "float32") -> bool:
    """A converted copy written by this version of the conversion (see ``_GGUF_CACHE_VERSION``)
    with its weights in ``dtype`` (the marker says which)."""
    import json

    if not _is_saved_model(path):
        return False
    try:
        marker = json.loads((path / _GGUF_CACHE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("version") == _GGUF_CACHE_VERSION
        and marker.get("dtype") == dtype
    )


def _gguf_fixes(path: Path) -> tuple[dict[str, Any], str | None]:
    """What transformers' GGUF reader gets wrong for this file: config overrides for
    ``from_pretrained`` and the file's pre-tokenizer name (``tokenizer.ggml.pre``).

    GPT-2: ``gpt2.context_length`` → ``n_positions`` (transformers maps it to ``n_ctx`` and keeps
    the default 1024 positions, so a GPT-2 of any other context fails to load).
    Reads only the metadata (memory-mapped); an unreadable file gives no fixes (transformers
    then reports the problem itself).
    """
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else None
        overrides: dict[str, Any] = {}
        if arch == "gpt2" and "gpt2.context_length" in fields:
            overrides["n_positions"] = int(fields["gpt2.context_length"].contents())
        return overrides, pre
    except Exception:  # the metadata is transformers' to judge
        return {}, None


def _fix_gguf_tokenizer(tokenizer: Any, pre: str | None) -> None:
    """Give a tokenizer read from a GGUF the pre-tokenizer its file names, where transformers
    falls back to GPT-2's: ``smollm`` (SmolLM, SmolLM2) splits every digit on its own before
    GPT-2's byte-level split, as ``HuggingFaceTB/SmolLM2-*``'s ``tokenizer.json`` and llama.cpp's
    ``LLAMA_VOCAB_PRE_TYPE_SMOLLM`` do. Modifies ``tokenizer`` in place."""
    if pre != "smollm" or getattr(tokenizer, "backend_tokenizer", None) is None:
        return
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


_HUB_STATUS: dict[str, tuple[bool, str]] = {}


def hub_status(timeout: float = 2.0) -> tuple[bool, str]:
    """Whether the Hugging Face Hub can be reached, and how it was decided (for messages).

    Unreachable when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, or when no TCP
    connection to the host of ``HF_ENDPOINT`` (default ``https://huggingface.co``) — or to the
    proxy the environment names for it — opens within ``timeout`` seconds (name resolution
    included: the check runs in a thread that is abandoned after ``timeout``). Answered once
    per process and endpoint.

    Returns:
        ``(reachable, reason)``, e.g. ``(False, "http://127.0.0.1:9: connection refused")``.
    """
    import socket
    import threading
    import urllib.parse
    import urllib.request

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return False, f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"
    if endpoint in _HUB_STATUS:
        return _HUB_STATUS[endpoint]
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname or "", purl.port or 80
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append((True, f"{endpoint} is reachable"))
        except OSError as err:
            why = err.strerror or type(err).__name__
            result.append((False, f"{endpoint}: {why.lower()}"))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    status = result[0] if result else (False, f"{endpoint}: no answer within {timeout:g} s")
    _HUB_STATUS[endpoint] = status
    return status


def _hub_offline() -> None:
    """Put huggingface_hub (and so transformers) in offline mode for the rest of the process,
    as ``HF_HUB_OFFLINE=1`` would: ``local_files_only`` alone still lets side lookups (a
    LoRA ``adapter_config.json``, ...) ask the Hub and wait through its retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _hub_cached(name: str) -> bool:
    """True when the Hub model ``name`` has a ``config.json`` in the local Hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def save_gguf_cache(model: Any, tokenizer: Any, cache: Path) -> bool:
    """Save a model loaded from GGUF as a safetensors ``save_pretrained`` directory at ``cache``.

    ``save_pretrained`` refuses a model that still carries transformers' GGUF quantizer
    (``hf_quantizer``; GGUF is not serializable), although its weights are already de-quantized
    to ``model.dtype``: the marker and the config's ``quantization_config`` are cleared first.
    Written through :func:`llmkit.core.atomic.atomic_output`, so a crash leaves no half cache.

    Returns:
        True when saved; False (a warning on stderr) when it could not be, e.g. a read-only disk.
    """
    import json

    from llmkit.core.atomic import atomic_output

    try:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache, directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            marker = {"version": _GGUF_CACHE_VERSION, "dtype": _dtype_name(model.dtype)}
            (tmp / _GGUF_CACHE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        return True
    except Exception as err:  # a cache is an optimisation: never fail the load over it
        sys.stderr.write(f"warning: could not cache the converted GGUF in {cache}: {_short(err)}\n")
        return False


_TOKEN_ID_FIELDS = ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id")


def _check_generation_config(model: Any, name: str, where: str) -> None:
    """Refuse token ids in ``generation_config.json`` that are not integers (a string, a
    float): transformers loads them as they are, and generation failed later with a
    traceback. Negative or out-of-range ids are left alone (some configs carry
    ``pad_token_id: -1``; an EOS that never occurs only never stops a row).

    Raises:
        UserError: naming the file, the field and the value.
    """
    config = getattr(model, "generation_config", None)
    for field in _TOKEN_ID_FIELDS:
        value = getattr(config, field, None)
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            continue
        where_file = Path(where) / "generation_config.json"
        raise UserError(
            f"{name}: generation_config.json has {field} = {value!r}, which is not a token id "
            "(an integer or a list of integers)",
            f"fix or delete {where_file}" if Path(where).is_dir() else "fix the model's config",
        )


def _load_one(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load the model and tokenizer named ``name``; see the module docstring for the kinds.

    Raises:
        UserError: a local path that is not a model; a model that needs its own code without
            ``trust_remote_code``; or anything transformers raised while loading, one line.
            A cached GGUF conversion that cannot be loaded is not an error: it is deleted
            with a one-line warning and the ``.gguf`` converted again
            (:func:`discard_gguf_cache`).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise on stderr for a CLI
    source = resolve_source(name, dtype=dtype)
    if not source.cached:
        return _load_resolved(name, source, device, dtype, trust_remote_code)
    try:
        return _load_resolved(name, source, device, dtype, trust_remote_code)
    except UserError as err:  # a damaged cached conversion: convert the .gguf again
        discard_gguf_cache(name, source.gguf_cache, err)
    source = resolve_source(name, use_cache=False, dtype=dtype)
    return _load_resolved(name, source, device, dtype, trust_remote_code)


def discard_gguf_cache(name: str, cache: Path | None, err: BaseException) -> None:
    """A cached GGUF conversion at ``cache`` could not be read (``err``; e.g. a truncated
    ``model.safetensors``: "incomplete metadata"): warn on stderr in one line and delete it,
    so the ``.gguf`` is converted (and cached) again. A cache that cannot be deleted is left,
    and the ``.gguf`` is read directly this time."""
    import shutil

    sys.stderr.write(
        f"warning: the cached conversion of {name} in {cache} cannot be read "
        f"({_short(err)}); converting the .gguf again\n"
    )
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


def _load_resolved(
    name: str,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
):
    """:func:`_load_one` for a resolved ``source``: ``(model, tokenizer)``."""
    from llmkit.core.tokenizer import load_tokenizer
    from llmkit.security import announce_remote_code

    trust_remote_code = trust_remote_code and not source.cached  # never code from a cache
    kwargs, tok_kwargs = _load_kwargs(name, source, device, dtype, trust_remote_code)
    if trust_remote_code:
        announce_remote_code(name, source.where)
    model = _from_pretrained(name, source.where, kwargs)
    _check_generation_config(model, name, source.where)
    if device.type != "cuda":
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(source.where, trust_remote_code=trust_remote_code, **tok_kwargs)
    if "gguf_file" in kwargs:
        _fix_gguf_tokenizer(tokenizer, source.gguf_pre)
        if source.gguf_cache is not None:
            save_gguf_cache(model, tokenizer, source.gguf_cache)
    return model, tokenizer


def _load_kwargs(
    name: str,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keyword arguments of ``from_pretrained``, those of ``load_tokenizer``) for
    ``source``: weights straight onto a CUDA device, the ``.gguf`` file, and for a Hub id
    the local cache only when the Hub is not reachable (:func:`_prepare_hub`)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)  # load the weights straight onto the GPU
    kwargs.update(source.kwargs)
    if source.cached:  # a cached conversion: a save_pretrained directory
        return kwargs, {}
    if source.kind == "gguf":
        return kwargs, {"gguf_file": source.kwargs["gguf_file"]}
    if source.kind == "hub" and not _prepare_hub(name):
        kwargs["local_files_only"] = True
        return kwargs, {"local_files_only": True}
    return kwargs, {}


def _prepare_hub(name: str) -> bool:
    """Get ready to load the Hub model ``name``: True when the Hub is reachable (a first
    download announced on stderr, with its progress bars); False when it is not and ``name``
    is in the local cache (the Hub libraries switched offline: no retries, an answer at once).

    Raises:
        UserError: the Hub is not reachable and ``name`` is not in the local cache.
    """
    reachable, why = hub_status()
    if not reachable:
        _hub_offline()
        if not _hub_cached(name):
            raise UserError(
                f"cannot load {name}: the Hub is not reachable ({why}) and {name} is not "
                "in the local Hugging Face cache",
                "connect to the network, or pass --model DIR (a save_pretrained directory "
                "or a .gguf file)",
            )
        return False
    if not _hub_cached(name):
        from huggingface_hub.utils import enable_progress_bars

        sys.stderr.write(f"downloading {name} from the Hub ({why})\n")
        enable_progress_bars()  # the first download shows its progress
    return True


#: The start of transformers' notice on a ``.gguf`` loaded in another dtype than float32
#: (transformers 5.x, ``quantizers/quantizer_gguf.py``, ``GgufHfQuantizer.update_dtype``).
_GGUF_DTYPE_NOTICE = "Loading a GGUF checkpoint with its weights packed is fastest in float32"
_GGUF_QUANTIZER_LOGGER = "transformers.quantizers.quantizer_gguf"


class _DropGgufDtypeNotice(logging.Filter):
    """Drops transformers' :data:`_GGUF_DTYPE_NOTICE`, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_GGUF_DTYPE_NOTICE)


@contextlib.contextmanager
def quiet_gguf_dtype_notice() -> Iterator[None]:
    """Within the block, transformers' "[transformers] Loading a GGUF checkpoint with its
    weights packed is fastest in float32 ... Pass `dtype=torch.float32` to avoid it" is not
    shown. transformers logs it when a ``.gguf`` is loaded in another dtype (``--dtype
    bfloat16``), and its advice is a Python keyword a CLI user cannot pass (the CLI's own
    way is ``--dtype float32``, which the user has just chosen not to give). A filter on that
    one logger, for that one message, removed when the block ends: every other transformers
    warning still shows."""
    logger = logging.getLogger(_GGUF_QUANTIZER_LOGGER)
    drop = _DropGgufDtypeNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _from_pretrained(name: str, where: str, kwargs: dict[str, Any]) -> Any:
    """``AutoModelForCausalLM.from_pretrained(where, **kwargs)``, its errors as one line.

    Raises:
        UserError: a model that needs its own code without ``trust_remote_code``; anything
            transformers raised while loading.
    """
    from transformers import AutoModelForCausalLM

    from llmkit.security import (
        is_remote_code_error,
        quiet_torch_pickle_warnings,
        refused_weights_error,
        remote_code_error,
    )

    try:
        with quiet_gguf_conversion(), quiet_gguf_dtype_notice(), quiet_torch_pickle_warnings():
            return AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except UserError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ImportError...
        if is_remote_code_error(err):
            raise remote_code_error(name, where) from None
        raise refused_weights_error(name, err) or UserError(
            f"cannot load {name}: {_short(err)}"
        ) from err


def load_source_tokenizer(name: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the model (or tokenizer) named ``name``, read as
    :func:`load_model_and_tokenizer` reads it, without the weights.

    A ``.gguf`` file goes through :func:`resolve_source`: its current cached conversion when
    there is one, else its metadata with llmkit's corrections (:func:`_fix_gguf_tokenizer`:
    SmolLM's digit split). Anything else (a directory, which may hold only a tokenizer; a Hub
    id) is :func:`llmkit.core.tokenizer.load_tokenizer`.

    Raises:
        UserError: as :func:`resolve_source` for a ``.gguf``; as ``load_tokenizer`` otherwise.
    """
    from llmkit.core.tokenizer import load_tokenizer

    path = Path(name).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return load_tokenizer(name, trust_remote_code=trust_remote_code)
    source = resolve_source(name)
    if source.cached:  # never code from a cache
        try:
            return load_tokenizer(source.where, trust_remote_code=False)
        except UserError as err:  # a damaged cached conversion: read the .gguf again
            discard_gguf_cache(name, source.gguf_cache, err)
            source = resolve_source(name, use_cache=False)
    tokenizer = load_tokenizer(
        source.where, gguf_file=source.kwargs["gguf_file"], trust_remote_code=trust_remote_code
    )
    _fix_gguf_tokenizer(tokenizer, source.gguf_pre)
    return tokenizer


def load_model_and_tokenizer(
    model: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Any, str]:
    """Load a causal LM and its tokenizer, ready for inference (``model.eval()``).

    Args:
        model: a local ``save_pretrained`` directory, a ``.gguf`` file or a Hub id. None tries
            ``$LLMKIT_MODEL`` (when set, it is the only candidate, like ``model``), else the newest
            finished run under ``./runs/``, then ``gpt2`` from the Hub, taking the first that
            loads (a warning on stderr names any that failed before it).
        device: ``auto`` (cuda, else mps, else cpu) or a torch device string. torch's thread
            count is left as it is: the commands choose it from the machine's load before
            loading (:func:`llmkit.runtime.apply_threads`; ``--threads`` / ``OMP_NUM_THREADS``).
        dtype: ``auto`` (bfloat16 on CUDA when supported, else float32), ``float32``,
            ``bfloat16`` or ``float16``.
        trust_remote_code: let a model (or tokenizer) that ships Python code of its own run
            it; False (default) refuses such a model and runs none of its code.

    Returns:
        ``(model, tokenizer, source)``: the model on ``device``, the tokenizer (its pad token
        set to EOS when it had none) and the name it was loaded from.

    Raises:
        UserError: a bad device or dtype; an explicit ``model`` that is not a model or fails
            to load (one that needs its own code without ``trust_remote_code`` included);
            without ``model``, no candidate loads (the one line lists each candidate
            and why it failed, and how to fix it).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quiet_deepspeed()
    candidates = _candidates(model)
    failures: list[str] = []
    for cand in candidates:
        try:
            mdl, tok = _load_one(cand.name, dev, dt, trust_remote_code)
        except UserError as err:
            if cand.origin == ENV_MODEL:  # named by the environment: say so, guess no other
                from llmkit.security import TRUST_HINT

                raise UserError(
                    f"{ENV_MODEL}={cand.name}: {err.message}",
                    err.hint
                    if err.hint == TRUST_HINT
                    else f"fix or unset {ENV_MODEL}, or pass --model",
                ) from None
            if cand.origin == "--model":
                raise  # the user named this model: say why it failed, do not guess another
            reason = _short(err).removeprefix(f"cannot load {cand.name}: ")
            failures.append(f"{cand.describe()} ({reason})")
            continue
        for failed in failures:
            sys.stderr.write(f"warning: could not load {failed}; using {cand.name}\n")
        if cand.origin != "--model" and not failures:
            sys.stderr.write(f"using {cand.chosen()}\n")
        return mdl, tok, cand.name
    tried = list(failures)
    if not os.environ.get(ENV_MODEL, "").strip():
        tried.insert(0, "LLMKIT_MODEL (not set)")
    if not any(c.origin == "newest finished run" for c in candidates):
        tried.insert(1, "./runs (no finished run)")
    raise UserError("no model could be loaded; tried " + "; ".join(tried), FIX_HINT)
