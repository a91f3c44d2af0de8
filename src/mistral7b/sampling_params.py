"""SamplingParams: how one sequence picks its tokens, checked on creation.

Torch-free on purpose: the command line checks its sampling flags with this class before
anything heavy is imported (a client of a running `mistral7b serve` never imports torch).
The functions that apply the parameters to logits are in sampling.py.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from mistral7b.errors import InputError

# Temperatures below this are greedy (as in vLLM): dividing by them would overflow float32.
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}", param=name)
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}", param=name)
    return value


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}", param=name)
    return int(value)


def _normalise_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r}",
                         param="stop")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InputError(f"each stop string must be a non-empty string, got {s!r}",
                             param="stop")
    return tuple(stop)


def _normalise_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({token id: bias}; JSON keys are strings) as sorted pairs. A bias of
    -100 bans the token and +100 all but forces it, as OpenAI describes."""
    if not bias:
        return ()
    items: Any = bias.items() if isinstance(bias, dict) else bias
    out = {}
    try:
        for key, value in items:
            token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            token = _check_int("logit_bias", token)
            value = _check_real("logit_bias", value)
            if token < 0 or not -100 <= value <= 100:
                raise InputError(f"logit_bias maps token ids >= 0 to biases in [-100, 100], "
                                 f"got {key!r}: {value}", param="logit_bias")
            out[token] = value
    except (TypeError, ValueError):
        raise InputError("logit_bias must map token ids to numbers, e.g. {\"50256\": -100}",
                         param="logit_bias") from None
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. Ranges follow the OpenAI API; checked on creation.

    ``temperature`` 0 is greedy. ``top_k`` 0, ``top_p`` 1, ``min_p`` 0, ``repetition_penalty``
    1 and the frequency/presence penalties 0 disable those steps. ``stop`` may be given as a
    string or a list; it is stored as a tuple. ``top_logprobs`` needs ``logprobs=True``.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()   # OpenAI's {token id: bias in [-100, 100]}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InputError naming the first out-of-range value; normalise types in place."""
        put = object.__setattr__  # frozen: normalised values are written once, here
        max_tokens = _check_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        put(self, "max_tokens", max_tokens)

        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 means greedy), got {temperature}",
                             param="temperature")
        put(self, "temperature", temperature)

        top_p = _check_real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 disables it), got {top_p}", param="top_p")
        put(self, "top_p", top_p)

        top_k = _check_int("top_k", self.top_k)
        if top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {top_k}", param="top_k")
        put(self, "top_k", top_k)

        min_p = _check_real("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise InputError(f"min_p must be in [0, 1] (0 disables it), got {min_p}", param="min_p")
        put(self, "min_p", min_p)

        rep = _check_real("repetition_penalty", self.repetition_penalty)
        if rep <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 disables it), got {rep}",
                             param="repetition_penalty")
        put(self, "repetition_penalty", rep)

        for name in ("frequency_penalty", "presence_penalty"):
            value = _check_real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise InputError(f"{name} must be in [-2, 2] (0 disables it), got {value}",
                                 param=name)
            put(self, name, value)

        if self.seed is not None:
            seed = _check_int("seed", self.seed)
            if not _SEED_MIN <= seed <= _SEED_MAX:
                raise InputError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX}], got {seed}",
                                 param="seed")
            put(self, "seed", seed)

        put(self, "stop", _normalise_stop(self.stop))

        for name in ("logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}",
                                 param=name)

        top_logprobs = _check_int("top_logprobs", self.top_logprobs)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}",
                param="top_logprobs")
        if top_logprobs and not self.logprobs:
            raise InputError("top_logprobs needs logprobs=True", param="top_logprobs")
        put(self, "top_logprobs", top_logprobs)
        put(self, "logit_bias", _normalise_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )
