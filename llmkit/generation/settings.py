"""Decoding settings of ``generate``, ``chat`` and ``serve``, validated on construction.

Flags (and a server request's fields) become settings in one place,
:meth:`GenerationSettings.from_flags`, over the defaults of the command: the class's own for
``generate`` and the library, :data:`CHAT_DEFAULTS` for ``chat``.

No torch here: the CLI builds and checks them before torch is imported, so a bad flag is one
line within a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llmkit.errors import UserError

GREEDY_BELOW = 1e-5
"""A temperature below this decodes greedily, as temperature 0 does: the logits divided by
it overflow to inf and the sampling distribution becomes NaN. vLLM uses the same threshold
(``_SAMPLING_EPS`` in its sampler)."""

MAX_RETURN_SEQUENCES = 1024
"""The most completions per prompt: they are rows of one ``model.generate`` call, whose memory
grows with them (``-n 1000000`` on a 23k-parameter model ran 4 minutes and took 9.8 GB)."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""The seeds ``torch.manual_seed`` takes (a larger one was an OverflowError traceback)."""


@dataclass
class GenerationSettings:
    """How to pick each next token."""

    max_new_tokens: int = 100
    """Most tokens to generate after the prompt (the prompt is not counted)."""
    temperature: float = 0.8
    """Divides the logits before sampling; 0 (or below :data:`GREEDY_BELOW`) means greedy
    (always the most likely token)."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens; None or 0 for no limit."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability adds up to p; 1 = all."""
    seed: int | None = None
    """Seeds torch before each batch of prompts: the same seed gives the same text."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens already in the sequence, prompt
    included (Keskar et al. 2019, "CTRL", §4.1); 1 = off, 1.1-1.3 usual."""
    num_return_sequences: int = 1
    """Completions sampled per prompt (needs sampling: temperature > 0)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a completion ends just before the first one it produces (None: none)."""

    @classmethod
    def from_flags(
        cls, defaults: GenerationSettings | None = None, /, **flags: Any
    ) -> GenerationSettings:
        """The settings a command's flags ask for: the one place where flags (``generate``,
        ``chat``, the library's :func:`llmkit.generate` arguments, a ``serve`` request's
        fields) become settings.

        Args:
            defaults: the values of the flags not given (default: the class's defaults, those
                of ``llmkit generate``; :data:`CHAT_DEFAULTS` for ``llmkit chat``).
            flags: values by field name; ``stop`` may be None (no stop string), ``top_k`` 0 or
                None (no limit).

        Raises:
            UserError: a value out of its range (see the fields).
            TypeError: a name that is not a field (a programming error, not a user's).
        """
        unknown = sorted(set(flags) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(unknown)}")
        values = {**asdict(defaults if defaults is not None else cls()), **flags}
        return cls(**values)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(
                f"--max-new-tokens {self.max_new_tokens} must be at least 1", "e.g. 100"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(
                f"--temperature {self.temperature} is "
                + ("negative" if self.temperature < 0 else "not a finite number"),
                "use 0 for greedy, or e.g. 0.8",
            )
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} is negative", "use 0 for no limit, or e.g. 200")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} is outside (0, 1]", "use 1 for no limit")
        if not self.repetition_penalty > 0:
            raise UserError(
                f"--repetition-penalty {self.repetition_penalty} must be positive",
                "use 1 for none, or e.g. 1.2",
            )
        self._check_sequences_and_seed()
        self.stop = [str(x) for x in self.stop or []]
        if any(x == "" for x in self.stop):
            raise UserError("--stop '' is empty", "give a non-empty stop string, e.g. --stop '\\n'")

    def _check_sequences_and_seed(self) -> None:
        if self.num_return_sequences < 1:
            raise UserError(
                f"--num-return-sequences {self.num_return_sequences} must be at least 1"
            )
        if self.num_return_sequences > MAX_RETURN_SEQUENCES:
            raise UserError(
                f"--num-return-sequences {self.num_return_sequences} is more than "
                f"{MAX_RETURN_SEQUENCES}",
                "run the command again with another --seed for more",
            )
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise UserError(f"--seed {self.seed} is outside torch's range", "use e.g. 0 to 2**32")
        if self.num_return_sequences > 1 and self.greedy:
            raise UserError(
                f"--num-return-sequences {self.num_return_sequences} with --temperature 0 would "
                "give the same text each time",
                "sample with --temperature > 0",
            )

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0, or below :data:`GREEDY_BELOW`)."""
        return self.temperature < GREEDY_BELOW

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``.

        Greedy passes ``do_sample=False`` and no sampling argument (so transformers does not warn
        that they are unused); sampling passes all three, ``top_k=0`` meaning no limit (the
        model's ``generation_config`` would otherwise fill in its own).
        """
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(
                do_sample=True,
                temperature=float(self.temperature),
                top_k=int(self.top_k or 0),
                top_p=float(self.top_p),
            )
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = float(self.repetition_penalty)
        if self.num_return_sequences > 1:
            kwargs["num_return_sequences"] = int(self.num_return_sequences)
        return kwargs


CHAT_DEFAULTS = GenerationSettings(max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.95)
"""``llmkit chat``'s defaults: longer replies and nucleus sampling, as chat models' own
generation configs usually ask; ``llmkit generate`` uses the class's defaults."""
