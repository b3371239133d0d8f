"""Write a model that llmkit trains or loads as one GGUF file for llama.cpp, Ollama and LM Studio.

Built on the PyPI ``gguf`` package (the writer, the reader, the tensor-name maps and the numpy
quantizer of ggml's own ``gguf-py``); what that package leaves to the caller — which tensor
becomes which, the layout changes, the metadata llama.cpp reads — is decided here, after llama.cpp's
``convert_hf_to_gguf.py`` (ggml-org/llama.cpp, ``LlamaModel`` and ``GPT2Model``, the tensor-type
rules of ``ModelBase.prepare_tensors``) and the GGUF key list of ``gguf-py/gguf/constants.py``.
No code is taken from them.

Supported: GPT-2 (``gpt2``) and the Llama family (``llama``: Llama 2/3-style, SmolLM, grouped-query
attention) with a byte-level BPE tokenizer (the one ``llmkit prepare`` trains, GPT-2's, SmolLM's,
Llama 3's). A run trained with LoRA is exported with its adapters merged into the weights.
Anything else is refused with one line rather than written in a form llama.cpp would misread:
another architecture, rope scaling, biases in a Llama's attention or MLP, another activation, a
SentencePiece/Unigram tokenizer, a pre-tokenizer llama.cpp has no name for.

Where llmkit departs from ``convert_hf_to_gguf.py`` on purpose:

- the pre-tokenizer name (``tokenizer.ggml.pre``) is read from the structure of the tokenizer's
  pre-tokenizer (GPT-2's regex → ``gpt-2``, digits split one by one + GPT-2's regex → ``smollm``,
  Llama 3's regex → ``llama-bpe``), not from a hash of the ids of a test text: a newly trained
  BPE has an unknown hash and the script refuses it, although it splits text exactly as GPT-2;
- GPT-2's context length is ``n_positions`` (the script reads ``n_ctx``, which transformers 5 no
  longer saves);
- the add-BOS / add-EOS flags are measured: what the tokenizer does to a text with
  ``add_special_tokens=True``, not what its config files say.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.core.atomic import atomic_output
from llmkit.errors import UserError, require

#: ``--outtype`` values: the type of the 2-D weights (see :func:`_tensor_type`). ``q8_0``: Q8_0
#: blocks of 32 (a weight whose rows are not a multiple of 32 falls back to F16, as llama.cpp's
#: converter does).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = ("gpt2", "llama")
#: GPT-2's transformers ``Conv1D`` layers store weights as (in, out); GGUF wants (out, in).
_GPT2_CONV1D = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)
#: GPT-2 pre-tokenization regex (openai/gpt-2 ``src/encoder.py``), as the ``tokenizers`` crate
#: spells it when a ``Split`` pre-tokenizer carries it.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Llama 3's pre-tokenization regex (meta-llama/llama3 ``tokenizer.py``, ``pat_str``).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class ExportResult:
    """What :func:`export_gguf` wrote."""

    path: Path
    modelfile: Path
    outtype: str
    architecture: str
    name: str
    n_tensors: int
    n_bytes: int
    context_length: int
    tensor_types: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Loading the model to export


def _run_name(path: Path) -> str:
    """``general.name``: the run's recipe ``name`` (``llmkit_config.yaml``), else the directory
    or file name without extension."""
    cfg = path / "llmkit_config.yaml"
    if path.is_dir() and cfg.is_file():
        try:
            import yaml

            name = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("name")
            if isinstance(name, str) and name.strip():
                return name.strip()
        except Exception:  # an unreadable recipe only loses the nicer name
            pass
    return path.stem if path.is_file() else path.name


def load_for_export(model: str, *, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """Load ``model`` in float32 on the CPU, LoRA adapters merged.

    ``model``: a run of ``llmkit train`` or a ``save_pretrained`` directory (a run saved with
    ``lora.merge: false`` holds only the adapter: its base model is loaded and the adapter
    merged), a ``.gguf`` file (through llmkit's loader and its cache) or a Hub id.

    Returns:
        ``(model, tokenizer, name)``; ``name`` becomes ``general.name``.

    Raises:
        UserError: nothing loadable at ``model`` (one line from the loader).
    """
    from llmkit.core.loading import load_model_and_tokenizer

    path = Path(model).expanduser()
    if (
        path.is_dir()
        and (path / "adapter_config.json").is_file()
        and not (path / "config.json").is_file()
    ):
        return (*_load_adapter_run(path, trust_remote_code), _run_name(path))
    mdl, tok, _ = load_model_and_tokenizer(
        model, device="cpu", dtype="float32", trust_remote_code=trust_remote_code
    )
    if hasattr(mdl, "merge_and_unload"):  # a peft model
        mdl = mdl.merge_and_unload()
    name = _run_name(path) if path.exists() else model.rstrip("/").rsplit("/", 1)[-1]
    return mdl, tok, name


def _load_adapter_run(path: Path, trust_remote_code: bool):
    """A LoRA run saved unmerged: base model (``base_model_name_or_path``) + adapter, merged."""
    from llmkit.core.loading import load_model_and_tokenizer
    from llmkit.core.tokenizer import load_tokenizer

    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))[
            "base_model_name_or_path"
        ]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise UserError(
            f"{path}/adapter_config.json names no base model ({err})",
            "export a run trained with lora.merge: true, or fix base_model_name_or_path",
        ) from None
    mdl, tok, _ = load_model_and_tokenizer(
        base, device="cpu", dtype="float32", trust_remote_code=trust_remote_code
    )
    from peft import PeftModel

    mdl = PeftModel.from_pretrained(mdl, str(path)).merge_and_unload()
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return mdl, tok


# --------------------------------------------------------------------------------------------
# Checks: what llama.cpp would run differently is refused


def _refuse(what: str, hint: str = "llmkit exports GPT-2 and Llama-family models") -> UserError:
    return UserError(f"cannot export to GGUF: {what}", hint)


def check_exportable(config: Any) -> str:
    """The GGUF architecture name for ``config``, or a :class:`UserError` saying why not.

    Refused: a ``model_type`` other than ``gpt2`` / ``llama``; rope scaling of any kind (llama.cpp
    reads it from other keys, and a wrong one silently changes every position); a Llama with
    attention or MLP biases or an activation other than SiLU; a GPT-2 with another activation
    than the tanh GELU, without attention scaling, or with per-layer attention scaling.
    """
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise _refuse(f"model type {kind!r} is not supported")
    rope = getattr(config, "rope_scaling", None) or {}
    params = getattr(config, "rope_parameters", None) or {}
    for spec in (rope, params):
        rtype = spec.get("rope_type", spec.get("type")) if isinstance(spec, dict) else None
        if rtype not in (None, "default"):
            raise _refuse(f"rope scaling ({rtype}) is not supported", "export a model without it")
    if kind == "llama":
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise _refuse("a Llama with attention or MLP biases is not supported")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise _refuse(f"a Llama with activation {config.hidden_act!r} is not supported")
    else:
        act = getattr(config, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _refuse(f"a GPT-2 with activation {act!r} (llama.cpp uses the tanh GELU)")
        if not getattr(config, "scale_attn_weights", True) or getattr(
            config, "scale_attn_by_inverse_layer_idx", False
        ):
            raise _refuse("a GPT-2 with non-standard attention scaling is not supported")
    return kind


# --------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizer of a ``tokenizer.json``.

    Recognised by structure (see the module docstring); the names are those of llama.cpp's
    ``src/llama-vocab.cpp`` (``LLAMA_VOCAB_PRE_TYPE_GPT2`` is ``gpt-2``; ``gpt2`` is refused).

    Raises:
        UserError: a pre-tokenizer llama.cpp has no name for.
    """
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]

    def regex(p: dict) -> str | None:
        pattern = p.get("pattern") or {}
        return pattern.get("Regex") if isinstance(pattern, dict) else None

    def byte_level(p: dict, use_regex: bool) -> bool:
        return (
            p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", False)
            and bool(p.get("use_regex", True)) == use_regex
        )

    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if len(parts) == 2 and kinds[0] == "Split" and byte_level(parts[1], False):
        if regex(parts[0]) == _GPT2_REGEX:
            return "gpt-2"
        if regex(parts[0]) == _LLAMA3_REGEX:
            return "llama-bpe"
    if (
        len(parts) == 2
        and kinds[0] == "Digits"
        and parts[0].get("individual_digits")
        and byte_level(parts[1], True)
    ):
        return "smollm"
    raise _refuse(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no "
        "llama.cpp name",
        "llmkit exports byte-level BPE tokenizers that split text like GPT-2, SmolLM or Llama 3",
    )


def _measured_add_flags(tokenizer: Any) -> tuple[bool, bool]:
    """``(add_bos, add_eos)``: whether the tokenizer puts its BOS before / its EOS after a
    text's tokens when asked for special tokens (``add_special_tokens=True``), measured on a
    short text rather than read from its config files."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    n = len(plain)
    add_bos = bos is not None and len(full) > n and full[0] == bos and full[1 : 1 + n] == plain
    start = 1 if add_bos else 0
    add_eos = (
        eos is not None
        and len(full) == start + n + 1
        and full[start : start + n] == plain
        and full[-1] == eos
    )
    return add_bos, add_eos


@dataclass
class Vocab:
    """The tokenizer as GGUF stores it (``tokenizer.ggml.*``)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def vocab_for_gguf(tokenizer: Any, vocab_size: int) -> Vocab:
    """Read a byte-level BPE tokenizer into GGUF's form.

    ``tokens[i]`` is the token of id ``i`` as ``tokenizer.json`` spells it (byte-level alphabet);
    ids the tokenizer does not use up to ``vocab_size`` (the model's embedding rows) become
    ``[PAD{i}]`` of type UNUSED, as llama.cpp's converter names them. Types (gguf ``TokenType``):
    an added token marked special is CONTROL, another added token USER_DEFINED, the rest NORMAL.

    Raises:
        UserError: not a fast tokenizer; not BPE with a byte-level decoder; a normalizer; a
            pre-tokenizer without a llama.cpp name; more tokens than the model has rows.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _refuse("the tokenizer is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(
            f"the tokenizer is {model.get('type')}, not a byte-level BPE",
            "llmkit exports byte-level BPE tokenizers (SentencePiece/Unigram are not supported)",
        )
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel" or spec.get("normalizer") is not None:
        raise _refuse("the tokenizer is not a plain byte-level BPE (decoder or normalizer)")
    pre = _pre_tokenizer_name(spec)
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    size = max(by_id) + 1
    if size > vocab_size:
        raise _refuse(
            f"the tokenizer has {size} tokens but the model only {vocab_size} embedding rows",
            "export the tokenizer the model was trained with",
        )
    tokens, kinds = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            kinds.append(types.get(i, int(gguf.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            kinds.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    add_bos, add_eos = _measured_add_flags(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: llama.cpp reads the default
        template = template.get("default")
    return Vocab(
        tokens=tokens,
        types=kinds,
        merges=merges,
        pre=pre,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        unk=tokenizer.unk_token_id,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template if isinstance(template, str) and template else None,
    )


# --------------------------------------------------------------------------------------------
# Tensors


def _permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Llama Q or K projection (or its bias) for llama.cpp's rotary layout.

    transformers rotates each head's halves (dims ``j`` and ``j + d/2``); llama.cpp (after Meta's
    original Llama) rotates interleaved pairs (``2j``, ``2j + 1``). Within each of the ``n_head``
    heads (for K: the key-value heads) the rows ``[a_0..a_{d/2-1}, b_0..b_{d/2-1}]`` become
    ``[a_0, b_0, a_1, b_1, ...]``. Shape is kept: (n_head * head_dim, ...). The layout change of
    ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``.
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model: Any, arch: str) -> list[tuple[str, np.ndarray]]:
    """``(GGUF name, float32 array in GGUF's row order)`` for every weight of ``model``.

    Names come from gguf-py's ``TensorNameMap`` for the architecture. The LM head is left out when
    it is tied to the token embedding (llama.cpp then uses ``token_embd`` for the output).

    Raises:
        UserError: a weight with no GGUF name (a layer llama.cpp would not load).
    """
    import gguf
    import torch

    cfg = model.config
    n_layer = cfg.num_hidden_layers
    gguf_arch = gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2
    names = gguf.get_tensor_name_map(gguf_arch, n_layer)
    tied = _is_tied(model)
    out: list[tuple[str, np.ndarray]] = []
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
                continue  # buffers (GPT-2's causal mask, rotary frequencies), not weights
            if tied and hf_name == "lm_head.weight":
                continue
            stem, _, suffix = hf_name.rpartition(".")
            new = names.get_name(stem)
            if new is None:
                raise _refuse(f"the weight {hf_name} has no GGUF name for {arch}")
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if arch == "gpt2" and hf_name.endswith(_GPT2_CONV1D):
                data = data.T
            if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
                data = _permute_rope_rows(data, cfg.num_attention_heads)
            elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
                data = _permute_rope_rows(data, _kv_heads(cfg))
            out.append((f"{new}.{suffix}", np.ascontiguousarray(data)))
    return out


def _kv_heads(cfg: Any) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _is_tied(model: Any) -> bool:
    """True when the LM head shares the token embedding's storage (tied weights), or the model
    has no separate LM head."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None:
        return True
    if head.weight.data_ptr() == emb.weight.data_ptr():
        return True
    return False


def _tensor_type(name: str, data: np.ndarray, outtype: str):
    """The GGML type of one tensor, by llama.cpp's converter rules: 1-D tensors, norms, biases
    and GPT-2's position embedding stay F32; other weights take ``outtype``; a Q8_0 weight whose
    rows are not a multiple of the block size (32) falls back to F16."""
    import gguf

    t = gguf.GGMLQuantizationType
    if (
        data.ndim <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or name.startswith("position_embd.")
    ):
        return t.F32
    if outtype == "f32":
        return t.F32
    if outtype == "f16":
        return t.F16
    if outtype == "bf16":
        return t.BF16
    block = gguf.GGML_QUANT_SIZES[t.Q8_0][0]
    return t.Q8_0 if data.shape[-1] % block == 0 else t.F16


# --------------------------------------------------------------------------------------------
# Metadata


def _context_length(cfg: Any, arch: str) -> int:
    value = getattr(cfg, "n_positions" if arch == "gpt2" else "max_position_embeddings", None)
    if not isinstance(value, int) or value <= 0:
        raise _refuse("the model config gives no context length")
    return value


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def _write_hparams(writer: Any, cfg: Any, arch: str) -> None:
    if arch == "gpt2":
        writer.add_block_count(cfg.n_layer)
        writer.add_context_length(_context_length(cfg, arch))
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(getattr(cfg, "n_inner", None) or 4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(float(cfg.layer_norm_epsilon))
        return
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(_context_length(cfg, arch))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(_kv_heads(cfg))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if head_dim * heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write_vocab(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for a byte-level BPE vocabulary
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for value, add in (
        (vocab.bos, writer.add_bos_token_id),
        (vocab.eos, writer.add_eos_token_id),
        (vocab.unk, writer.add_unk_token_id),
        (vocab.pad, writer.add_pad_token_id),
    ):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --------------------------------------------------------------------------------------------
# Ollama Modelfile

#: Ollama's Go-template form of ChatML (the ``.Messages`` loop of Ollama's docs, "Template").
_OLLAMA_CHATML = (
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}'
    "{{- end }}"
)


def _chatml_default_system(tokenizer: Any) -> tuple[bool, str | None]:
    """Whether the tokenizer's chat template renders ChatML, and the system message it adds when
    none is given (SmolLM2's does). Checked by rendering, not by comparing template text."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    try:
        got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bare = tokenizer.apply_chat_template(
            messages[1:2], tokenize=False, add_generation_prompt=True
        )
    except Exception:
        return False, None
    if got != chatml + "<|im_start|>assistant\n":
        return False, None
    tail = "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    head = bare[: -len(tail)] if bare.endswith(tail) else None
    prefix, suffix = "<|im_start|>system\n", "<|im_end|>\n"
    if head and head.startswith(prefix) and head.endswith(suffix):
        return True, head[len(prefix) : -len(suffix)]
    return True, None


def _go_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(gguf_name: str, tokenizer: Any, vocab: Vocab, context_length: int) -> str:
    """An Ollama ``Modelfile`` for the exported file (``ollama create NAME -f FILE``).

    ``FROM ./<file>`` (Ollama resolves it next to the Modelfile), ``PARAMETER num_ctx`` = the
    context length, one ``PARAMETER stop`` per end token (EOS; ``<|im_end|>`` for ChatML) and a
    ``TEMPLATE``: Ollama's ChatML template when the tokenizer's chat template renders ChatML (plus
    its default ``SYSTEM`` message if it adds one), ``{{ .Prompt }}`` (plain continuation) for a
    model without a chat template. Another chat template is left to Ollama, which reads
    ``tokenizer.chat_template`` from the GGUF (a comment says so).
    """
    lines = [
        "# Ollama Modelfile written by `llmkit export`; use: ollama create NAME -f THIS_FILE",
        f"FROM ./{gguf_name}",
        f"PARAMETER num_ctx {context_length}",
    ]
    stops: list[str] = []
    eos = tokenizer.eos_token
    if isinstance(eos, str) and eos:
        stops.append(eos)
    is_chatml, system = (False, None)
    if vocab.chat_template:
        is_chatml, system = _chatml_default_system(tokenizer)
        if is_chatml and "<|im_end|>" not in stops:
            stops.append("<|im_end|>")
    lines += [f"PARAMETER stop {_go_string(s)}" for s in stops]
    if vocab.chat_template is None:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif is_chatml:
        lines.append(f'TEMPLATE """{_OLLAMA_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append(
            "# chat template: not ChatML; Ollama reads it from the GGUF (tokenizer.chat_template)"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Export


def modelfile_path(output: Path) -> Path:
    """Where the Ollama Modelfile of ``output`` goes: ``<output without .gguf>.Modelfile``."""
    return output.with_name(f"{output.stem}.Modelfile")


def export_gguf(
    model: str,
    output: str | Path,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    loaded: tuple[Any, Any, str] | None = None,
) -> ExportResult:
    """Write ``model`` as a GGUF file at ``output`` and an Ollama Modelfile beside it.

    Args:
        model: a run of ``llmkit train``, a ``save_pretrained`` directory, a ``.gguf`` file or a
            Hub id (loaded with :func:`load_for_export`: float32, CPU, LoRA merged).
        output: the ``.gguf`` file to write.
        outtype: ``f32``, ``f16`` (default), ``bf16`` or ``q8_0``: the type of the 2-D weights
            (1-D tensors, norms, biases and GPT-2's position embedding stay F32).
        overwrite: replace an existing ``output`` (and Modelfile).
        loaded: ``(model, tokenizer, name)`` already in memory (tests, the Python API); then
            ``model`` is only used in messages.

    Returns:
        An :class:`ExportResult`.

    The file is written under a temporary name in the same directory, read back with
    ``gguf.GGUFReader`` (every tensor's name, shape and type, the architecture, the vocabulary
    size) and only then renamed to ``output``; on any failure nothing is left at ``output``.

    Raises:
        UserError: an unknown ``outtype``; ``output`` exists without ``overwrite`` or is a
            directory; the ``gguf`` package is missing; the model cannot be loaded or is not
            exportable (:func:`check_exportable`, :func:`vocab_for_gguf`); the disk write fails.
    """
    out, mf = _check_output(output, outtype, overwrite)
    require(
        "gguf", "llmkit export --format gguf needs the gguf package", "pip install 'llmkit[gguf]'"
    )
    mdl, tok, name = (
        loaded
        if loaded is not None
        else load_for_export(model, trust_remote_code=trust_remote_code)
    )
    cfg = mdl.config
    arch = check_exportable(cfg)
    vocab = vocab_for_gguf(tok, int(cfg.vocab_size))
    ctx = _context_length(cfg, arch)
    tensors = _gguf_tensors(mdl, arch)

    try:  # the Modelfile is renamed into place after the .gguf, each only when both are whole
        with atomic_output(mf) as mf_tmp, atomic_output(out) as tmp:
            expected = _write_gguf(tmp, name, cfg, arch, vocab, tensors, outtype)
            _verify(tmp, expected, arch, len(vocab.tokens))
            mf_tmp.write_text(modelfile_text(out.name, tok, vocab, ctx), encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    return ExportResult(
        path=out,
        modelfile=mf,
        outtype=outtype,
        architecture=arch,
        name=name,
        n_tensors=len(expected),
        n_bytes=out.stat().st_size,
        context_length=ctx,
        tensor_types={k: v[1] for k, v in expected.items()},
    )


def _check_output(output: str | Path, outtype: str, overwrite: bool) -> tuple[Path, Path]:
    """The GGUF file and the Modelfile :func:`export_gguf` will write, checked before the model
    loads.

    Raises:
        UserError: an unknown ``outtype``; ``output`` does not end in ``.gguf``, is a
            directory, exists (or its Modelfile does) without ``overwrite``, or its directory
            does not exist.
    """
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}", "use " + ", ".join(OUTTYPES))
    out = Path(output).expanduser()
    mf = modelfile_path(out)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--output {output} must end in .gguf", "e.g. --output model.gguf")
    if out.is_dir():
        raise UserError(f"--output {output} is a directory", "give a file name ending in .gguf")
    for existing in (out, mf):
        if existing.exists() and not overwrite:
            raise UserError(f"{existing} already exists", "pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"the directory of --output {output} does not exist", "create it first")
    return out, mf


def _write_gguf(
    path: Path,
    name: str,
    cfg: Any,
    arch: str,
    vocab: Vocab,
    tensors: list[tuple[str, np.ndarray]],
    outtype: str,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Write the GGUF file at ``path``: metadata, hyperparameters, vocabulary, then the tensors.

    Returns:
        Each tensor's shape and GGML type name, by tensor name (what :func:`_verify` expects to
        read back).
    """
    import gguf

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    gguf_arch = gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf_arch])
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, cfg, arch)
    _write_vocab(writer, vocab)
    expected = {tname: _add_tensor(writer, tname, data, outtype) for tname, data in tensors}
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _add_tensor(
    writer: Any, name: str, data: np.ndarray, outtype: str
) -> tuple[tuple[int, ...], str]:
    """Add one tensor to ``writer`` in its GGML type (:func:`_tensor_type`): F32 and F16 as
    numpy arrays, a quantized type packed by ``gguf.quants``. Returns its shape and type name."""
    import gguf

    qtype = _tensor_type(name, data, outtype)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
    return tuple(data.shape), qtype.name


def _verify(path: Path, expected: dict[str, tuple[tuple[int, ...], str]], arch: str, n_vocab: int):
    """Read the written file back: every tensor with its name, shape (GGUF lists dimensions
    innermost first, so reversed) and type; the architecture; the vocabulary size.

    Raises:
        RuntimeError: a mismatch (a bug in the exporter, never the user's input).
    """
    import gguf

    reader = gguf.GGUFReader(path)
    got = {
        t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
        for t in reader.tensors
    }
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise RuntimeError(f"GGUF read back differs from what was written: {diff}")
    if reader.fields["general.architecture"].contents() != arch:
        raise RuntimeError("GGUF read back: wrong general.architecture")
    if len(reader.fields["tokenizer.ggml.tokens"].data) != n_vocab:
        raise RuntimeError("GGUF read back: wrong vocabulary size")


def summary(result: ExportResult) -> str:
    """One line for stderr: what was written."""
    mb = result.n_bytes / 1e6
    return (
        f"wrote {result.path} ({result.architecture}, {result.outtype}, {result.n_tensors} "
        f"tensors, {mb:.1f} MB, context {result.context_length}) and {result.modelfile}"
    )
