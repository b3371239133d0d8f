"""Training settings: a recipe is YAML with one section per settings class.

Precedence is defaults < recipe YAML < command-line ``section.key=value`` overrides. Unknown keys
are rejected naming the closest valid key; ill-typed values name the key and the expected type.
Every field carries its unit in its description.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmkit.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Section):
    """Where the training blocks come from."""

    path: str = Field("data/shakespeare", description="A directory written by `llmkit prepare`.")


class ModelConfig(_Section):
    """The model: built from scratch from ``type`` and sizes."""

    type: str = Field(
        "gpt2", description="A transformers model_type (gpt2, llama, ...) built from scratch."
    )
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: int = Field(128, ge=1, description="Width of the residual stream (hidden_size).")
    block_size: int | None = Field(
        None,
        ge=2,
        description="Positions the model can attend over, in tokens; default: the data's "
        "block_size. Must be at least the data's block_size.",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability everywhere.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Other keyword arguments for the transformers config (e.g. "
        "intermediate_size, rope_theta).",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class TrainConfig(_Section):
    """Optimisation: AdamW, warmup then a decay to a floor, gradient accumulation."""

    micro_batch_size: int = Field(16, ge=1, description="Blocks per forward pass per process.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches summed into one optimizer step."
    )
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to run.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(
        2e-4, ge=0, description="Floor of the schedule (cosine decays to it), absolute."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warmup from 0, in optimizer steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup: cosine (to min_lr), linear (to 0), constant."
    )
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW decoupled weight decay; not applied to biases and norms."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.99, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient L2 norm; 0 disables.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast dtype; weights and optimizer state stay float32."
    )
    seed: int = Field(1337, description="Seed for weights, dropout and data order.")
    log_interval: int = Field(10, ge=1, description="Steps between metric lines.")

    @model_validator(mode="after")
    def _floor_below_peak(self) -> TrainConfig:
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})"
            )
        return self


class EvalConfig(_Section):
    """Validation during training."""

    interval: int = Field(200, ge=1, description="Optimizer steps between validations.")
    max_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches per evaluation; default all."
    )
    batch_size: int = Field(32, ge=1, description="Blocks per validation forward pass.")


class Recipe(_Section):
    """A whole training recipe."""

    name: str = Field("run", description="Run name; the run is written to out_dir.")
    out_dir: str | None = Field(None, description="Run directory; default runs/<name>.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory: ``out_dir`` or ``runs/<name>``."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    def to_yaml(self) -> str:
        """The resolved config as YAML (every field, defaults included)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def valid_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe accepts, e.g. ``train.learning_rate``."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(valid_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def closest_key(key: str) -> str | None:
    """The valid dotted key closest to ``key`` (compared whole, then by last component)."""
    keys = valid_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[match[0]] if match else None


def _format_error(err: ValidationError, source: str) -> UserError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
    if first["type"] == "extra_forbidden":
        if isinstance(first.get("input"), dict) and first["input"]:
            # A misspelt section: compare its keys whole (`trian.max_steps` ~ `train.max_steps`).
            loc = f"{loc}.{next(iter(first['input']))}"
        guess = closest_key(loc)
        hint = f"did you mean `{guess}`?" if guess else "see `llmkit train --help` for the keys"
        return UserError(f"unknown key `{loc}` in {source}", hint)
    got = first.get("input")
    where = f"`{loc}`" if loc else "the recipe"
    msg = first["msg"].removeprefix("Value error, ")
    if loc and not isinstance(got, dict):
        msg = f"{msg} (got {got!r})"
    return UserError(f"{where} in {source}: {msg}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and the YAML-parsed value.

    Raises:
        UserError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(
            f"override `{text}` is not of the form key=value",
            "write e.g. train.learning_rate=3e-4",
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides, and validate.

    Args:
        path: a YAML file; None starts from the defaults.
        overrides: ``section.key=value`` strings, applied in order after the file.

    Raises:
        UserError: missing or unparsable file, unknown key (naming the closest valid one),
            ill-typed or out-of-range value.
    """
    data: dict[str, Any] = {}
    source = "the defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"recipe {p} does not exist", "see recipes/ for examples")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise UserError(f"cannot parse {p}: {str(err).splitlines()[0]}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p} must be a YAML mapping of sections (data, model, train, eval)")
        data = loaded
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = value
        source = "the command-line overrides" if path is None else f"{path} or its overrides"
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise _format_error(err, source) from None
