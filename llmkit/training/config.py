"""Training settings: a recipe is YAML with one section per settings class.

Precedence is defaults < recipe YAML < command-line ``section.key=value`` overrides. Unknown keys
are rejected naming the closest valid key; ill-typed values name the key and the expected type.
Every field carries its unit in its description.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llmkit.core.yamlfile import read_yaml, safe_load
from llmkit.errors import UserError


class _Section(BaseModel):
    # allow_inf_nan=False: NaN and infinity are refused for every number (train.epochs=.inf
    # was an OverflowError traceback, train.learning_rate=.inf passed the dry run)
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )


class DataConfig(_Section):
    """Where the training blocks come from."""

    path: str = Field("data/shakespeare", description="A directory written by `llmkit prepare`.")


class ModelConfig(_Section):
    """The model: built from scratch from ``type`` and sizes, or loaded from ``name_or_path``."""

    name_or_path: str | None = Field(
        None,
        description="A pretrained model to start from: a save_pretrained directory, a .gguf file "
        "(de-quantized by transformers) or a Hub id (online only). When set, type and sizes are "
        "ignored and the data must have been prepared with this model's tokenizer.",
    )
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
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout probability everywhere (also set on a pretrained model's config).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory, ~30% "
        "more compute (transformers' gradient_checkpointing_enable).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model with the inductor backend (minutes of compiling "
        "first; needs a C++ compiler on CPU), faster steps after.",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Other keyword arguments for the transformers config (e.g. "
        "intermediate_size, rope_theta).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let name_or_path (and the data's tokenizer) run Python code of its own "
        "(the auto_map of its config.json / tokenizer_config.json); off: such a model is "
        "refused and its code never runs (also: llmkit train --trust-remote-code).",
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
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Blocks per optimizer step over all processes; when set, "
        "gradient_accumulation_steps is derived as global / (micro_batch_size x processes).",
    )
    max_steps: int | None = Field(
        1000,
        ge=1,
        description="Optimizer steps to run. With max_tokens or epochs also set, the first "
        "limit reached stops the run (and sets the schedule's length); null: those decide.",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Stop after this many tokens of input, (block_size - 1) per block, labelled "
        "or not (rounded up to whole steps).",
    )
    epochs: float | None = Field(
        None, gt=0, description="Stop after this many passes over the training blocks."
    )
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
        "no",
        description="Autocast dtype; weights, gradients and optimizer state stay float32. "
        "fp16 adds a dynamic loss scaler (torch.amp.GradScaler) that skips overflowing steps.",
    )
    seed: int = Field(
        1337,
        ge=0,
        le=2**32 - 1,
        description="Seed for weights, dropout and data order (NumPy's seeds: 0 to 2**32 - 1).",
    )
    log_interval: int = Field(10, ge=1, description="Steps between metric lines.")
    save_interval: int = Field(
        500,
        ge=0,
        description="Optimizer steps between checkpoints (run_dir/checkpoints); 0: none.",
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (the newest); best is extra.")
    max_bad_steps: int = Field(
        5,
        ge=1,
        description="Consecutive steps with a non-finite loss or gradient norm (each skipped "
        "with a warning) after which training stops.",
    )
    trackers: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="accelerate trackers (tensorboard, wandb, mlflow, ...); skipped with a "
        "warning when not installed. [] for none.",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device for MFU; default: measured at start, the best "
        "rate of matmuls (a square and the model's own shapes) in the dtype the work runs in.",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` (recipe or `train.mixed_precision=no`) as False.
        return "no" if value is False else value

    @model_validator(mode="after")
    def _floor_below_peak(self) -> TrainConfig:
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})"
            )
        if self.max_steps is None and self.max_tokens is None and self.epochs is None:
            raise ValueError("set at least one of max_steps, max_tokens, epochs")
        return self


class EvalConfig(_Section):
    """Validation during training."""

    interval: int = Field(200, ge=1, description="Optimizer steps between validations.")
    max_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches per evaluation; default all."
    )
    batch_size: int = Field(32, ge=1, description="Blocks per validation forward pass.")
    patience: int | None = Field(
        None,
        ge=1,
        description="Early stopping: stop after this many validations in a row without an "
        "improvement of val_loss by more than min_delta; default never.",
    )
    min_delta: float = Field(
        0.0, ge=0, description="Smallest drop of val_loss (nats/token) that counts as better."
    )


class LoraConfig(_Section):
    """LoRA adapters through peft (Hu et al. 2021, "LoRA", §4): W + (alpha / r) B A."""

    r: int = Field(0, ge=0, description="Rank of the adapters; 0 trains the full model.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: updates are (alpha / r) B A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or peft's `all-linear`."
    )
    merge: bool = Field(
        True,
        description="Export the adapters merged into the weights (a plain model directory); "
        "the adapter alone is also saved under run_dir/adapter.",
    )


def tied_lora_targets(
    lcfg: LoraConfig, model_config: Any, trust_remote_code: bool = False
) -> list[str]:
    """The tied embedding modules that ``lcfg.target_modules`` would adapt, as full module
    names (``["lm_head"]``, ``["model.embed_tokens", "lm_head"]``), or ``[]``.

    A model ties its embeddings when its config says ``tie_word_embeddings`` (read from the
    loaded config: the default differs per architecture, True for GPT-2, False for Llama).
    Targets are matched the way peft matches them (``peft.tuners.tuners_utils.
    check_target_module_exists``: a list entry matches a name or its last components, a
    string is a full-match regex); peft's ``all-linear`` leaves the output layer out and
    embeddings are not linear, so it adapts neither. Names come from the model built on the
    meta device (no memory, no weights read), only when the config ties and the targets are
    not ``all-linear``.

    Raises:
        UserError: peft is not installed.
    """
    if lcfg.r == 0 or lcfg.target_modules == "all-linear":
        return []
    if not getattr(model_config, "tie_word_embeddings", False):
        return []
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError as err:
        raise UserError("lora.r > 0 needs peft", "pip install peft") from err
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    # the embeddings' names do not depend on the depth: one block (model.n_layer=100000 built
    # every block, for minutes)
    model_config = copy.deepcopy(model_config)
    model_config.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    tied = [model.get_input_embeddings(), model.get_output_embeddings()]
    peft_config = PeftLoraConfig(r=lcfg.r, target_modules=lcfg.target_modules)
    return [
        name
        for name, module in model.named_modules()
        if any(module is m for m in tied if m is not None)
        and check_target_module_exists(peft_config, name)
    ]


def check_lora_targets(
    lcfg: LoraConfig, model_config: Any, trust_remote_code: bool = False
) -> None:
    """Refuse LoRA targets on tied embeddings (:func:`tied_lora_targets`).

    Such an adapter trains one thing and exports another: the input and output embeddings
    are one matrix, LoRA adapts only the module named (its input or its output use), and
    peft's merge adds the update to the shared matrix, so the merged export changes both uses
    while its config still says tied, and its logits are not the trained model's
    (huggingface/peft #2018, huggingface/transformers #45127). llmkit refuses rather than
    untie: untying changes the exported architecture (a second vocabulary-sized matrix) and
    leaves ``run_dir/adapter`` unusable on the published base model.

    Raises:
        UserError: the targets adapt a tied embedding module (one line, before any weight is
            loaded); peft is not installed.
    """
    names = tied_lora_targets(lcfg, model_config, trust_remote_code)
    if names:
        raise UserError(
            f"lora.target_modules adapts {', '.join(names)}, whose weights are tied (the "
            "input and output embeddings are one matrix, tie_word_embeddings): the merged "
            "export would not be the model trained",
            "leave the embeddings and the output layer out of lora.target_modules (the "
            "default all-linear does), or train the full model with lora.r=0",
        )


class DistributedConfig(_Section):
    """How several processes share the work, through accelerate: DDP (a full copy of the model
    per process) or, for models too big for that, FSDP or DeepSpeed ZeRO (GPUs, or CPU
    processes over gloo under a launcher)."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp: replicate the model, average gradients (CPU or GPU); fsdp: PyTorch "
        "FSDP2, shards parameters, gradients and optimizer state; deepspeed: DeepSpeed ZeRO "
        "(pip install deepspeed).",
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free each block's gathered parameters after its forward (least "
        "memory, like ZeRO-3); false keeps them until the backward (like ZeRO-2, faster).",
    )
    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="deepspeed: ZeRO stage (1 optimizer state, 2 + gradients, 3 + parameters "
        "sharded; Rajbhandari et al. 2020, 'ZeRO', §5).",
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp / deepspeed: keep sharded parameters and optimizer state in CPU "
        "memory (slower, fits larger models).",
    )
    deepspeed_config: str | None = Field(
        None,
        description="deepspeed: a DeepSpeed JSON config file used as it is (zero_stage and "
        "cpu_offload are then ignored); batch sizes and clipping are filled in from train.",
    )


class Recipe(_Section):
    """A whole training recipe."""

    name: str = Field("run", description="Run name; the run is written to out_dir.")
    out_dir: str | None = Field(None, description="Run directory; default runs/<name>.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value.strip() or value in (".", "..") or "/" in value or "\\" in value:
            raise ValueError(
                "name must be a plain directory name (not empty, no / or \\, not . or ..); "
                "use out_dir=PATH to write the run elsewhere"
            )
        return value

    @property
    def run_dir(self) -> Path:
        """The run directory: ``out_dir`` or ``runs/<name>``."""
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    def ignored_settings(self) -> list[str]:
        """Warnings for ``distributed`` keys set explicitly (recipe or override) that the
        chosen strategy does not use: ``zero_stage`` and ``deepspeed_config`` without
        deepspeed, ``reshard_after_forward`` without fsdp, ``cpu_offload`` with ddp; and
        ``zero_stage`` / ``cpu_offload`` next to a ``deepspeed_config`` file (the file wins)."""
        d = self.distributed
        given = d.model_fields_set
        users = {
            "zero_stage": ("deepspeed",),
            "deepspeed_config": ("deepspeed",),
            "reshard_after_forward": ("fsdp",),
            "cpu_offload": ("fsdp", "deepspeed"),
        }
        out = []
        for key, strategies in users.items():
            if key in given and d.strategy not in strategies:
                out.append(
                    f"distributed.{key} is ignored with distributed.strategy={d.strategy} "
                    f"(it applies to {' and '.join(strategies)} only); remove it or set "
                    f"distributed.strategy={strategies[0]}"
                )
        if d.strategy == "deepspeed" and d.deepspeed_config is not None:
            for key in ("zero_stage", "cpu_offload"):
                if key in given:
                    out.append(
                        f"distributed.{key} is ignored: distributed.deepspeed_config "
                        f"{d.deepspeed_config} is used as it is; set it in that file"
                    )
        return out

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
        if guess:
            hint = f"did you mean `{guess}`?"
        elif "." in loc:
            section = loc.split(".", 1)[0]
            keys = [k.split(".", 1)[1] for k in valid_keys() if k.startswith(f"{section}.")]
            hint = (
                f"valid keys of {section}: {', '.join(keys)}"
                if keys
                else f"valid top-level keys: {', '.join(Recipe.model_fields)}"
            )
        else:
            hint = f"valid top-level keys: {', '.join(Recipe.model_fields)}"
        return UserError(f"unknown key `{loc}` in {source}", hint)
    got = first.get("input")
    where = f"`{loc}`" if loc else "the recipe"
    msg = first["msg"].removeprefix("Value error, ")
    if loc and not isinstance(got, dict):
        msg = f"{msg} (got {got!r})"
    return UserError(f"{where} in {source}: {msg}", _value_hint(loc, first, got))


def _field(loc: str) -> Any:
    """The pydantic FieldInfo of a dotted key such as ``distributed.strategy`` (None: unknown)."""
    model: Any = Recipe
    info = None
    for part in loc.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    return info


def _choices(annotation: Any) -> list[Any]:
    """The values of a ``Literal[...]`` annotation (inside ``X | None`` too), else []."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return []


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _value_hint(loc: str, error: dict, got: Any) -> str | None:
    """A hint for an ill-valued key: the closest valid value and the valid ones (a choice), or
    the valid range with the nearest value inside it (a number)."""
    info = _field(loc) if loc else None
    if info is None:
        return None
    choices = _choices(info.annotation)
    if error["type"] == "literal_error" and choices:
        names = [str(c) for c in choices]
        text = str(got)
        guess = next((n for n in names if n.lower() == text.strip().lower()), None)
        if guess is None:
            close = difflib.get_close_matches(text.lower(), names, n=1, cutoff=0.5)
            guess = close[0] if close else None
        valid = f"valid values: {', '.join(names)}"
        return f"did you mean `{loc}={guess}`? {valid}" if guess else valid
    bounds = {}
    for item in info.metadata:
        for name in _BOUNDS:
            value = getattr(item, name, None)
            if value is not None:
                bounds[name] = value
    if error["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        rule = " and ".join(f"{_BOUNDS[k]} {v}" for k, v in bounds.items())
        low, high = bounds.get("ge"), bounds.get("le")
        integer = info.annotation is int
        if integer and low is not None and high is not None and high - low <= 10:
            nearest = min(max(got, low), high) if isinstance(got, int | float) else None
            hint = f"valid values: {', '.join(str(v) for v in range(low, high + 1))}"
            if nearest is not None:
                hint = f"the closest valid value is {int(nearest)}; {hint}"
        else:
            hint = f"{loc} must be {rule}"
        described = (info.description or "").rstrip(".")
        return f"{hint} ({described})" if described else hint
    return _type_hint(loc, info, error)


def _type_hint(loc: str, info: Any, error: dict) -> str | None:
    """For an ill-typed value: what ``loc`` takes, with its default as an example."""
    takes = next((v for k, v in _TYPE_WORDS.items() if error["type"].startswith(k)), None)
    if takes is None:
        return None
    default = info.get_default(call_default_factory=True)
    if default is None:
        return f"{loc} takes {takes}"
    shown = json.dumps(default) if isinstance(default, list | bool) else default
    return f"{loc} takes {takes}, e.g. `{loc}={shown}` (the default)"


#: pydantic error types (prefixes) of an ill-typed value -> what the key takes, in words.
_TYPE_WORDS = {
    "int_": "an integer",
    "float_": "a number",
    "finite_number": "a finite number",
    "bool_": "true or false",
    "string_": "a string",
    "list_": "a list",
}


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
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _read_yaml(p: Path) -> dict[str, Any]:
    """The mapping of a recipe file (``{}`` for an empty one).

    Raises:
        UserError: a directory, a missing, unreadable or unparsable file, or not a mapping.
    """
    if p.is_dir():
        raise UserError(
            f"recipe {p} is a directory, not a YAML file",
            "pass a .yaml file, e.g. one of recipes/",
        )
    if not p.is_file():
        raise UserError(f"recipe {p} does not exist", "see recipes/ for examples")
    loaded = read_yaml(p)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(
            f"{p} must be a YAML mapping of sections (data, model, train, eval, lora, distributed)"
        )
    return loaded


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides, and validate.

    Args:
        path: a YAML file; None starts from the defaults.
        overrides: ``section.key=value`` strings, applied in order after the file.

    Raises:
        UserError: missing or unparsable file, unknown key (naming the closest valid one),
            ill-typed or out-of-range value.
    """
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    in_file = _dotted_keys(data)
    overridden: set[str] = set()
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
        overridden.add(".".join(keys))
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        loc = ".".join(str(p) for p in err.errors()[0]["loc"] if not isinstance(p, int))
        raise _format_error(err, _source(loc, path, in_file, overridden)) from None


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    """Every dotted key a recipe mapping sets, sections included (``train``,
    ``train.max_steps``)."""
    if not isinstance(data, dict):
        return set()
    keys = set()
    for key, value in data.items():
        keys.add(f"{prefix}{key}")
        keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _source(loc: str, path: str | Path | None, in_file: set[str], overridden: set[str]) -> str:
    """Where the value at ``loc`` (a dotted key, or a section for a check across its keys)
    was written, for an error's wording: the recipe file, the command-line overrides, or
    both when a section's keys come from each (an override wins over the file)."""

    def touches(keys: set[str]) -> bool:
        return any(k == loc or loc.startswith(k + ".") or k.startswith(loc + ".") for k in keys)

    by_override = touches(overridden)
    exact = any(k == loc or loc.startswith(k + ".") for k in overridden)
    if path is None or (by_override and (exact or not touches(in_file))):
        return "the command-line overrides"
    if by_override:
        return f"{path} or its overrides"
    return str(Path(path))
