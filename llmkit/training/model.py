"""The model of a run: built from scratch from a recipe's ``model`` section, or loaded
pretrained (a directory, a .gguf file, a Hub id), optionally with LoRA adapters (peft)."""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import UserError
from llmkit.training.config import ModelConfig

# Dropout attribute names across common transformers configs; each that a config has is set.
_DROPOUT_KEYS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
)


def build_config(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    block_size: int,
    eos_token_id: int,
    pad_token_id: int | None = None,
):
    """A transformers config of ``cfg.type`` at the recipe's sizes.

    Sizes use the generic names that every config maps (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``max_position_embeddings``; GPT-2 maps them to ``n_embd`` ...).
    Architectures with an MLP width get ``intermediate_size = 4 * n_embd`` unless ``extra`` says;
    GPT-2's ``gelu_new`` becomes the identical fused ``gelu_pytorch_tanh``.

    Raises:
        UserError: an unknown model type.
    """
    import copy

    from transformers import AutoConfig

    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "max_position_embeddings": block_size,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id if pad_token_id is not None else eos_token_id,
    }
    try:
        config = AutoConfig.for_model(cfg.type, **kwargs)
    except ValueError as err:
        raise UserError(
            f"model.type `{cfg.type}` is not a transformers model type",
            "use e.g. gpt2 or llama",
        ) from err
    if cfg.extra:
        # Given to the config's constructor, which reads some keys into others (transformers 5:
        # rope_theta goes into rope_parameters; set afterwards it was read by no model).
        _check_extra_keys(cfg, kwargs, config)
        try:
            config = AutoConfig.for_model(cfg.type, **{**kwargs, **copy.deepcopy(cfg.extra)})
        except (ValueError, TypeError, KeyError) as err:
            raise UserError(
                f"model.extra is refused by {type(config).__name__}: {str(err).splitlines()[0]}",
                "fix model.extra in the recipe",
            ) from None
    if hasattr(config, "intermediate_size") and "intermediate_size" not in cfg.extra:
        config.intermediate_size = 4 * cfg.n_embd
    if hasattr(config, "num_key_value_heads") and "num_key_value_heads" not in cfg.extra:
        config.num_key_value_heads = cfg.n_head
    if getattr(config, "activation_function", None) == "gelu_new" and (
        "activation_function" not in cfg.extra
    ):
        # GPT-2's tanh-approximated GELU, same formula (Hendrycks & Gimpel 2016, §2) as one
        # fused PyTorch kernel instead of six element-wise ops: 1.5x faster steps on CPU.
        config.activation_function = "gelu_pytorch_tanh"
    set_dropout(config, cfg.dropout)
    for key, value in cfg.extra.items():  # over the defaults above (dropout included)
        if key in config.to_dict() or key in getattr(config, "attribute_map", {}):
            setattr(config, key, value)
    _check_buildable(cfg, config)
    return config


def _check_extra_keys(cfg: ModelConfig, kwargs: dict, config) -> None:
    """Refuse a ``model.extra`` key that ``cfg.type``'s config neither has nor reads:
    transformers keeps any keyword as an attribute that no model reads, so a misspelt one
    (``intermediate_sise``) was ignored without a word. A key is read when it is a field of
    the config (or an alias of one), or when the config's constructor consumes it (kept as no
    attribute: ``rope_theta`` goes into ``rope_parameters``).

    Raises:
        UserError: the first unknown key, with the closest known one.
    """
    import copy
    import difflib

    from transformers import AutoConfig

    before = config.to_dict()
    known = set(before) | set(getattr(config, "attribute_map", {}))
    for key, value in cfg.extra.items():
        if key in known:
            continue
        try:
            after = AutoConfig.for_model(cfg.type, **{**kwargs, key: copy.deepcopy(value)})
            after = after.to_dict()
        except (ValueError, TypeError, KeyError):
            continue  # read, and refused: said when the whole extra is given
        if key not in after:
            continue  # consumed: read into another field (rope_theta -> rope_parameters)
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        raise UserError(
            f"model.extra.{key} is not a setting of {cfg.type}'s config "
            f"({type(config).__name__}), so no model would read it",
            f"did you mean model.extra.{close[0]}?"
            if close
            else f"see transformers' {type(config).__name__} for its settings",
        )


def _check_buildable(cfg: ModelConfig, config) -> None:
    """Build one block of ``config``'s model on the meta device (no memory, a fraction of a
    second), so that values no model can be built with (``model.extra`` ``n_inner: -5``, a
    head size the architecture refuses) are one line here, not a traceback from torch when
    the model is built (or counted by ``--dry-run``).

    Raises:
        UserError: transformers or torch refused to build it.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(small, trust_remote_code=False)
    except Exception as err:  # torch's RuntimeError, transformers' ValueError...
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        extra = ", ".join(f"{k}={v!r}" for k, v in cfg.extra.items())  # as the recipe says
        raise UserError(
            f"a {cfg.type} model cannot be built from these settings (n_layer={cfg.n_layer}, "
            f"n_head={cfg.n_head}, n_embd={cfg.n_embd}{', ' + extra if extra else ''}): "
            f"{text[:160]}",
            "fix the model section of the recipe (model.extra and the sizes)",
        ) from None


def build_model(config):
    """``AutoModelForCausalLM.from_config`` in float32 with PyTorch's SDPA attention (a config
    that llmkit built: a transformers model type, no code of its own)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", trust_remote_code=False
    )


def positions_of(config) -> int | None:
    """How many positions a model config supports, or None when it does not say."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def set_dropout(config, p: float) -> None:
    """Set every dropout probability a transformers config has (:data:`_DROPOUT_KEYS`) to p."""
    for key in _DROPOUT_KEYS:
        if hasattr(config, key) and isinstance(getattr(config, key), float):
            setattr(config, key, p)


def _source(name: str):
    """Where ``model.name_or_path`` is (:func:`llmkit.core.loading.resolve_source`: the one rule
    for a directory, a .gguf file or a Hub id, shared with generate, eval and export).

    Raises:
        UserError: a path that does not exist or is not a model.
    """
    from llmkit.core.loading import resolve_source

    return resolve_source(
        name, label="model.name_or_path ", hint_flag="model.name_or_path", use_cache=False
    )


def load_pretrained_config(name: str, trust_remote_code: bool = False):
    """The transformers config of a pretrained model, without loading its weights.

    ``trust_remote_code`` is always passed (transformers would otherwise ask on standard
    input): a config that needs its own Python code (``auto_map``) loads only with True.

    Raises:
        UserError: not found, not a model, offline for a Hub id, or it needs its own code and
            ``trust_remote_code`` is False.
    """
    from transformers import AutoConfig

    from llmkit.security import announce_remote_code, is_remote_code_error, remote_code_error

    source = _source(name)
    where = source.where
    if trust_remote_code:
        announce_remote_code(name, where)
    try:  # a .gguf's kwargs carry the config corrections of llmkit's GGUF reading
        return AutoConfig.from_pretrained(
            where, trust_remote_code=trust_remote_code, **source.kwargs
        )
    except Exception as err:  # OSError, ValueError, ImportError (gguf missing) ...
        if is_remote_code_error(err):
            raise remote_code_error(name, where) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the config of {name}: {first[:160]}") from err


def load_pretrained(name: str, config, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` in float32 with SDPA and ``config``'s dropout.

    A .gguf file (never its cached conversion: that copy holds the dtype of the load that wrote
    it, see :func:`llmkit.core.loading.resolve_source`) is de-quantized whole by transformers
    to float32 (``GgufConfig(dequantize=True)``: without it, transformers 5 keeps the weights
    in packed GGUF blocks wherever a GGUF matmul kernel is installed, and packed weights cannot
    train). The loaded model is then a plain dense model, and its GGUF quantizer marker is
    removed
    (``HfQuantizer.remove_quantization_config``) so that ``save_pretrained`` writes it
    (transformers refuses to serialize a model that carries a GGUF quantizer).

    ``trust_remote_code``: as for :func:`load_pretrained_config`.

    Raises:
        UserError: the model cannot be loaded (one line naming the cause).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.security import (
        is_remote_code_error,
        quiet_torch_pickle_warnings,
        refused_weights_error,
        remote_code_error,
    )

    source = _source(name)
    where, kwargs = source.where, {}
    if source.kind == "gguf":  # the config (its corrections included) is passed whole
        from transformers import GgufConfig

        kwargs["gguf_file"] = source.kwargs["gguf_file"]
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        with quiet_torch_pickle_warnings():
            model = AutoModelForCausalLM.from_pretrained(
                where,
                config=config,
                dtype=torch.float32,
                attn_implementation="sdpa",
                trust_remote_code=trust_remote_code,
                **kwargs,
            )
    except Exception as err:
        if is_remote_code_error(err):
            raise remote_code_error(name, where) from None
        refused = refused_weights_error(name, err)
        if refused is not None:
            raise refused from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {name}: {first[:160]}") from err
    quantizer = getattr(model, "hf_quantizer", None)
    if "gguf_file" in kwargs and quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def added_token_rows(tokenizer, model_vocab: int, model_name: str, data_path) -> list[int]:
    """The token ids the data's tokenizer adds beyond a pretrained model's embeddings.

    Chat data is often prepared with special tokens (role markers, end of turn) added to the
    model's tokenizer; such a vocabulary extends the model's, and the model can be trained on
    it after :func:`resize_embeddings`. A different tokenizer cannot.

    Args:
        tokenizer: the data's tokenizer (``len()`` is its size, ``added_tokens_decoder`` maps
            the ids of its added tokens).
        model_vocab: rows of the model's embedding matrix (``config.vocab_size``); 0: unknown.
        model_name, data_path: named in the error.

    Returns:
        ``[model_vocab, ..., len(tokenizer) - 1]`` when every one of those ids is an added
        token of the data's tokenizer; ``[]`` when the tokenizer fits the model.

    Raises:
        UserError: the data's tokenizer is larger and its extra ids are ordinary vocabulary
            (another tokenizer altogether): "vocabulary mismatch".
    """
    size = len(tokenizer)
    if not model_vocab or size <= model_vocab:
        return []
    extra = list(range(model_vocab, size))
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if all(i in added for i in extra):
        return extra
    raise UserError(
        f"vocabulary mismatch: {data_path} was tokenized with {size} tokens but {model_name} "
        f"has {model_vocab} embeddings",
        "prepare the data with --tokenizer pointing at the model's tokenizer",
    )


def _model_tokenizer_file(name_or_path: str) -> Path | None:
    """The ``tokenizer.json`` shipped with a pretrained model, when one is on disk: in its
    directory, or in the cached conversion of a ``.gguf`` file. None otherwise (Hub ids)."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from llmkit.core.cache import gguf_cache_dir

        for dtype in ("float32", "bfloat16", "float16"):  # any load's copy has the tokenizer
            cached = gguf_cache_dir(path, dtype)
            if cached is not None and (cached / "tokenizer.json").is_file():
                return cached / "tokenizer.json"
        return None
    candidate = path / "tokenizer.json"
    return candidate if candidate.is_file() else None


def check_same_tokenizer(
    tokenizer, model_vocab: int, model_name: str, data_path, data_tokenizer_trained: bool
) -> None:
    """Refuse data tokenized with another tokenizer than the pretrained model's.

    Equal or smaller sizes do not prove a match (a 512-token BPE fits into 49,152 embeddings
    and trains silently on meaningless ids). When the model's own ``tokenizer.json`` is on
    disk, every (token, id) of it must be in the data's tokenizer with the same id (the data's
    may add tokens after it, e.g. chat markers); otherwise a BPE that ``llmkit prepare``
    trained from scratch is refused unless its size equals the model's vocabulary.

    Args:
        tokenizer: the data's tokenizer.
        model_vocab: rows of the model's embeddings (``config.vocab_size``; 0: unknown).
        model_name: ``model.name_or_path``.
        data_path: the prepared directory (named in the error).
        data_tokenizer_trained: the manifest says prepare trained the tokenizer.

    Raises:
        UserError: "vocabulary mismatch", with the tokens or sizes that differ.
    """
    from llmkit.core.prepared import VOCAB_HINT, check_same_vocabulary

    hint = VOCAB_HINT
    file = _model_tokenizer_file(model_name)
    if file is not None:
        from tokenizers import Tokenizer

        theirs = Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
        check_same_vocabulary(tokenizer.get_vocab(), theirs, data_path, model_name)
        return
    if data_tokenizer_trained and model_vocab and len(tokenizer) != model_vocab:
        raise UserError(
            f"vocabulary mismatch: {data_path} was tokenized with a {len(tokenizer):,}-token BPE "
            f"trained by llmkit prepare, not with the tokenizer of {model_name} "
            f"({model_vocab:,} embeddings)",
            hint,
        )


def resize_embeddings(model, size: int) -> None:
    """Grow the input (and tied or untied output) embeddings of ``model`` to ``size`` rows.

    New rows start at the mean of the old ones with their covariance (transformers'
    ``resize_token_embeddings(mean_resizing=True)``, after Hewitt 2021, "Initializing New
    Word Embeddings for Pretrained Language Models"), so a new token's first logits are
    those of an average token rather than random.
    """
    model.resize_token_embeddings(size, mean_resizing=True)


def add_lora(model, lcfg, trainable_tokens: list[int] | None = None):
    """Wrap ``model`` with peft LoRA adapters of rank ``lcfg.r`` (only they train).

    Args:
        model: a transformers causal LM.
        lcfg: the recipe's ``lora`` section.
        trainable_tokens: ids of embedding rows that train too (tokens the data added, see
            :func:`added_token_rows`), through peft's ``trainable_token_indices``: only those
            rows of the input embedding (and of a tied output embedding; an untied output
            embedding gets the same rows) receive updates, and ``merge_and_unload`` writes them
            back into the plain model.

    Raises:
        UserError: peft is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise UserError("lora.r > 0 needs peft", "pip install peft") from err
    token_rows = None
    if trainable_tokens:
        inp = _module_name(model, model.get_input_embeddings())
        token_rows = {inp: list(trainable_tokens)}
        out = model.get_output_embeddings()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if out is not None and not tied:
            token_rows[_module_name(model, out)] = list(trainable_tokens)
    config = LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=lcfg.target_modules,
        task_type="CAUSAL_LM",
        trainable_token_indices=token_rows,
    )
    return get_peft_model(model, config)


def _module_name(model, module) -> str:
    """The last component of ``module``'s name inside ``model`` (``embed_tokens``, ``wte``)."""
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (transformers' switch)."""
    fn = getattr(model, "activation_checkpointing_enable", None)
    fn = fn or model.gradient_checkpointing_enable
    fn()
    if hasattr(model, "config"):
        model.config.use_cache = False
