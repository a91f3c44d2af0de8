"""ModelConfig: the shape of a Mistral/Llama decoder, read from params.json, config.json or GGUF.

Field names mirror Mistral's params.json (`dim`, `n_kv_heads`, `sliding_window`), so a
consolidated checkpoint's file maps onto it one to one; other formats translate here, in one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mistral7b.errors import ModelFileError

# Mistral's params.json of v0.1 carries no rope_theta: the authors' runtime then used 10000.
# v0.2/v0.3 (no window) use 1e6 (DESIGN §2.5).
_THETA_WITH_WINDOW = 10_000.0
_THETA_WITHOUT_WINDOW = 1_000_000.0

# What a config may say, whatever the file. Files are checked against these before anything
# is sized from them (a crafted `block_count: 2**31` must fail here, not after a loop over
# 2**31 layers); the readers then check the config against the tensors the file holds.
MAX_WIDTH = 1 << 20           # dim, head_dim, hidden_dim (Mistral 7B: 4096, 128, 14336)
MAX_HEADS = 1 << 14           # n_heads, n_kv_heads (32, 8)
MAX_LAYERS = 1 << 14          # n_layers (32; the largest open models have ~130)
MAX_VOCAB = 1 << 24           # vocab_size (32000; the largest vocabularies hold ~256k)
MAX_SEQ_LEN = 1 << 24         # context and window: positions stay exact in float32 rotary
MIN_NORM_EPS, MAX_NORM_EPS = 1e-30, 1.0     # RMSNorm epsilon: positive in float32
MIN_ROPE_THETA, MAX_ROPE_THETA = 1.0, 1e30  # a base below 1 makes theta^(-2i/d) overflow
MAX_JSON_BYTES = 16 << 20     # params.json / config.json are a few kB


@dataclass(frozen=True)
class ModelConfig:
    dim: int                        # model width (4096 for Mistral 7B)
    n_layers: int                   # decoder blocks (32)
    head_dim: int                   # per-head width (128)
    hidden_dim: int                 # SwiGLU inner width (14336)
    n_heads: int                    # query heads (32)
    n_kv_heads: int                 # key/value heads (8): each serves n_heads // n_kv_heads queries
    norm_eps: float                 # RMSNorm epsilon (1e-5)
    vocab_size: int                 # 32000 (v0.1/v0.2) or 32768 (v0.3)
    rope_theta: float               # rotary base (10000 for v0.1, 1e6 for v0.2/v0.3)
    sliding_window: int | None      # W: a query at i sees keys i-W+1 .. i; None = full causal
    max_seq_len: int = 32768        # longest context the checkpoint was trained for
    tied_embeddings: bool = False   # output projection shares tok_embeddings.weight

    def __post_init__(self) -> None:
        limits = {"dim": MAX_WIDTH, "n_layers": MAX_LAYERS, "head_dim": MAX_WIDTH,
                  "hidden_dim": MAX_WIDTH, "n_heads": MAX_HEADS, "n_kv_heads": MAX_HEADS,
                  "vocab_size": MAX_VOCAB, "max_seq_len": MAX_SEQ_LEN}
        for name, limit in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"ModelConfig.{name} must be an integer from 1 to {limit}, "
                                 f"got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and not (
                isinstance(self.sliding_window, int) and 0 < self.sliding_window):
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.sliding_window is not None and self.sliding_window > self.max_seq_len:
            raise ValueError(f"sliding_window ({self.sliding_window}) is longer than the "
                             f"context (max_seq_len {self.max_seq_len})")
        if not MIN_ROPE_THETA <= self.rope_theta <= MAX_ROPE_THETA:
            raise ValueError(f"rope_theta must be a number from {MIN_ROPE_THETA:g} to "
                             f"{MAX_ROPE_THETA:g}, got {self.rope_theta}")
        if not MIN_NORM_EPS <= self.norm_eps <= MAX_NORM_EPS:
            raise ValueError(f"norm_eps must be a number from {MIN_NORM_EPS:g} to "
                             f"{MAX_NORM_EPS:g}, got {self.norm_eps}")

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)
        return self.n_layers * per_layer + embeddings + self.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_params_json(self) -> dict[str, Any]:
        """This config as a Mistral `params.json`, which `from_params_json` and
        mistral-inference (`TransformerArgs.from_dict`) both read back as this model.

        The rule: every field is written except those that are None, left out as Mistral's
        own files leave them (v0.2/v0.3 have no `sliding_window`); both readers take a missing
        key as None. `rope_theta` is never left to a default, as the readers' defaults differ
        (here 10000 with a window, in mistral-inference 1e6 always). `max_seq_len` and
        `tied_embeddings` are ours: mistral-inference drops keys it does not know.
        """
        return {key: value for key, value in asdict(self).items() if value is not None}

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    # ----------------------------------------------------------------- readers

    @classmethod
    def from_params_json(cls, path: str | Path) -> ModelConfig:
        """Mistral's consolidated `params.json` (mistral-inference's field names)."""
        f = _Fields(_read_json(path), path)
        f.require("dim", "n_layers", "n_heads", "hidden_dim", "norm_eps", "vocab_size")
        n_heads = f.integer("n_heads", hi=MAX_HEADS)
        dim = f.integer("dim", hi=MAX_WIDTH)
        window = f.window("sliding_window")
        theta = f.number("rope_theta", None, lo=MIN_ROPE_THETA, hi=MAX_ROPE_THETA)
        max_seq_len = f.integer("max_seq_len", None, hi=MAX_SEQ_LEN) or f.integer(
            "max_position_embeddings", 32768, hi=MAX_SEQ_LEN)
        return _build(
            path,
            dim=dim,
            n_layers=f.integer("n_layers", hi=MAX_LAYERS),
            head_dim=f.integer("head_dim", None, hi=MAX_WIDTH) or _head_dim(dim, n_heads, path),
            hidden_dim=f.integer("hidden_dim", hi=MAX_WIDTH),
            n_heads=n_heads,
            n_kv_heads=f.integer("n_kv_heads", None, hi=MAX_HEADS) or n_heads,
            norm_eps=f.number("norm_eps", lo=MIN_NORM_EPS, hi=MAX_NORM_EPS),
            vocab_size=f.integer("vocab_size", hi=MAX_VOCAB),
            rope_theta=_default_theta(theta, window),
            sliding_window=window,
            max_seq_len=max_seq_len,
            tied_embeddings=f.flag("tied_embeddings", False),
        )

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelConfig:
        """An HF `config.json` (MistralForCausalLM / LlamaForCausalLM)."""
        f = _Fields(_read_json(path), path)
        f.require("hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "vocab_size")
        archs = f.strings("architectures")
        supported = {"MistralForCausalLM", "LlamaForCausalLM"}
        if archs and not supported.intersection(archs):
            raise ModelFileError(
                path, f"architecture {archs} is not supported; mistral7b runs "
                      "MistralForCausalLM and LlamaForCausalLM checkpoints")
        n_heads = f.integer("num_attention_heads", hi=MAX_HEADS)
        dim = f.integer("hidden_size", hi=MAX_WIDTH)
        # Newer transformers write rope settings under `rope_parameters`; older ones top-level.
        rope = _Fields(f.mapping("rope_parameters"), path, label="rope_parameters.")
        scaling = _Fields(f.mapping("rope_scaling"), path, label="rope_scaling.")
        for kind in (scaling.string("rope_type") or scaling.string("type"),
                     rope.string("rope_type")):
            if kind not in (None, "default"):
                raise ModelFileError(path, f"rope scaling {kind!r} is not supported yet")
        theta = rope.number("rope_theta", None, lo=MIN_ROPE_THETA, hi=MAX_ROPE_THETA)
        if theta is None:
            theta = f.number("rope_theta", None, lo=MIN_ROPE_THETA, hi=MAX_ROPE_THETA)
        window = f.window("sliding_window")
        if f.flag("use_sliding_window", True) is False:
            window = None
        return _build(
            path,
            dim=dim,
            n_layers=f.integer("num_hidden_layers", hi=MAX_LAYERS),
            head_dim=f.integer("head_dim", None, hi=MAX_WIDTH) or _head_dim(dim, n_heads, path),
            hidden_dim=f.integer("intermediate_size", hi=MAX_WIDTH),
            n_heads=n_heads,
            n_kv_heads=f.integer("num_key_value_heads", None, hi=MAX_HEADS) or n_heads,
            norm_eps=f.number("rms_norm_eps", 1e-5, lo=MIN_NORM_EPS, hi=MAX_NORM_EPS),
            vocab_size=f.integer("vocab_size", hi=MAX_VOCAB),
            rope_theta=_default_theta(theta, window),
            sliding_window=window,
            max_seq_len=f.integer("max_position_embeddings", 32768, hi=MAX_SEQ_LEN),
            tied_embeddings=f.flag("tie_word_embeddings", False),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], path: str | Path,
                           vocab_size: int | None, tied_embeddings: bool) -> ModelConfig:
        """GGUF key/values (`{arch}.embedding_length`, ...), already decoded into plain values."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "mistral"):
            shown = _show(arch)
            raise ModelFileError(path, f"GGUF architecture {shown} is not supported; "
                                       "mistral7b runs 'llama' and 'mistral' GGUF models")
        f = _Fields(meta, path, f"{arch}.", missing="GGUF metadata is missing {key!r}")
        dim = f.integer("embedding_length", hi=MAX_WIDTH)
        n_heads = f.integer("attention.head_count", hi=MAX_HEADS)
        head_dim = (f.integer("attention.key_length", None, hi=MAX_WIDTH)
                    or f.integer("rope.dimension_count", None, hi=MAX_WIDTH)
                    or _head_dim(dim, n_heads, path))
        window = f.window("attention.sliding_window")
        theta = f.number("rope.freq_base", None, lo=MIN_ROPE_THETA, hi=MAX_ROPE_THETA)
        vocab = f.integer("vocab_size", None, hi=MAX_VOCAB) or vocab_size
        if vocab is None:
            raise ModelFileError(path, "GGUF file gives no vocabulary size")
        return _build(
            path,
            dim=dim,
            n_layers=f.integer("block_count", hi=MAX_LAYERS),
            head_dim=head_dim,
            hidden_dim=f.integer("feed_forward_length", hi=MAX_WIDTH),
            n_heads=n_heads,
            n_kv_heads=f.integer("attention.head_count_kv", None, hi=MAX_HEADS) or n_heads,
            norm_eps=f.number("attention.layer_norm_rms_epsilon", 1e-5, lo=MIN_NORM_EPS,
                             hi=MAX_NORM_EPS),
            vocab_size=vocab,
            rope_theta=_default_theta(theta, window),
            sliding_window=window,
            max_seq_len=f.integer("context_length", 32768, hi=MAX_SEQ_LEN),
            tied_embeddings=tied_embeddings,
        )


def _default_theta(theta: float | None, window: int | None) -> float:
    if theta is not None:
        return theta
    return _THETA_WITH_WINDOW if window is not None else _THETA_WITHOUT_WINDOW


def _head_dim(dim: int, n_heads: int, path: str | Path) -> int:
    if dim < n_heads:
        raise ModelFileError(path, f"no head_dim given and dim ({dim}) is smaller than the "
                                   f"number of heads ({n_heads})")
    return dim // n_heads


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (a crafted file may hold megabytes),
    with lone surrogates and other unprintables escaped by repr."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed, range-checked reads of one file's key/values: every failure is a ModelFileError
    naming the file, the field and what was expected."""

    def __init__(self, raw: Any, path: str | Path, prefix: str = "", *, label: str = "",
                 missing: str = "missing field {key!r}") -> None:
        self.raw: dict[str, Any] = raw if isinstance(raw, dict) else {}
        self.path = path
        self.prefix = prefix            # of the keys looked up (GGUF: "llama.")
        self.label = label or prefix    # of the fields named in messages ("rope_scaling.")
        self.missing = missing

    def _fail(self, key: str, expected: str, value: Any) -> ModelFileError:
        return ModelFileError(self.path, f"field {self.label + key!r} must be {expected}, "
                                         f"got {_show(value)}")

    def require(self, *keys: str) -> None:
        absent = [key for key in keys if self.prefix + key not in self.raw]
        if absent:
            raise ModelFileError(self.path, f"missing field(s) {', '.join(absent)}")

    def get(self, key: str, default: Any) -> Any:
        full = self.prefix + key
        if full in self.raw:
            return self.raw[full]
        if default is ...:
            raise ModelFileError(self.path, self.missing.format(key=full))
        return default

    def integer(self, key: str, default: Any = ..., *, hi: int, lo: int = 1) -> Any:
        """An integer in [lo, hi] (an integral float such as 32.0 counts); `default` when
        absent or null."""
        value = self.get(key, default)
        if value is None and default is not ...:
            return default
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._fail(key, f"an integer from {lo} to {hi}", value)
        return value

    def number(self, key: str, default: Any = ..., *, lo: float, hi: float) -> Any:
        """A finite number in [lo, hi]; `default` when absent or null."""
        value = self.get(key, default)
        if value is None and default is not ...:
            return default
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not lo <= value <= hi):
            raise self._fail(key, f"a number from {lo:g} to {hi:g}", value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def window(self, key: str) -> int | None:
        """A sliding window: None (absent, null or 0) or a positive token count."""
        value = self.get(key, None)
        if value == 0 and not isinstance(value, bool):
            return None
        return self.integer(key, None, hi=MAX_SEQ_LEN)

    def string(self, key: str) -> str | None:
        value = self.get(key, None)
        if value is not None and not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def strings(self, key: str) -> list[str]:
        value = self.get(key, None) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings", value)
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.get(key, None) or {}
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return value


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_JSON_BYTES:
        raise ModelFileError(path, f"{len(data)} bytes is too big for a model config "
                                   f"(at most {MAX_JSON_BYTES})")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelFileError(path, f"not UTF-8 text ({exc})") from None
    except RecursionError:
        raise ModelFileError(path, "not a model config: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ModelFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(path, "expected a JSON object at the top level")
    return raw


def _build(path: str | Path, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(path, f"inconsistent model configuration: {exc}") from None


_MISTRAL_7B: dict[str, Any] = {"dim": 4096, "n_layers": 32, "head_dim": 128,
                               "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
                               "norm_eps": 1e-5}

PRESETS: dict[str, ModelConfig] = {
    "mistral-7b-v0.1": ModelConfig(**_MISTRAL_7B, vocab_size=32000, rope_theta=10_000.0,
                                   sliding_window=4096, max_seq_len=32768),
    "mistral-7b-v0.2": ModelConfig(**_MISTRAL_7B, vocab_size=32000, rope_theta=1_000_000.0,
                                   sliding_window=None, max_seq_len=32768),
    "mistral-7b-v0.3": ModelConfig(**_MISTRAL_7B, vocab_size=32768, rope_theta=1_000_000.0,
                                   sliding_window=None, max_seq_len=32768),
}
