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
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta}")

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
        raw = _read_json(path)
        required = ("dim", "n_layers", "n_heads", "hidden_dim", "norm_eps", "vocab_size")
        missing = [key for key in required if key not in raw]
        if missing:
            raise ModelFileError(path, f"params.json is missing field(s) {', '.join(missing)}")
        n_heads = _int(raw, "n_heads", path)
        dim = _int(raw, "dim", path)
        window = raw.get("sliding_window")
        window = None if window in (None, 0) else int(window)
        theta = raw.get("rope_theta")
        if theta is None:
            theta = _THETA_WITH_WINDOW if window is not None else _THETA_WITHOUT_WINDOW
        return _build(
            path,
            dim=dim,
            n_layers=_int(raw, "n_layers", path),
            head_dim=int(raw.get("head_dim") or dim // n_heads),
            hidden_dim=_int(raw, "hidden_dim", path),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("n_kv_heads") or n_heads),
            norm_eps=float(raw["norm_eps"]),
            vocab_size=_int(raw, "vocab_size", path),
            rope_theta=float(theta),
            sliding_window=window,
            max_seq_len=int(raw.get("max_seq_len") or raw.get("max_position_embeddings") or 32768),
            tied_embeddings=bool(raw.get("tied_embeddings", False)),
        )

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelConfig:
        """An HF `config.json` (MistralForCausalLM / LlamaForCausalLM)."""
        raw = _read_json(path)
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "vocab_size")
        missing = [key for key in required if key not in raw]
        if missing:
            raise ModelFileError(path, f"config.json is missing field(s) {', '.join(missing)}")
        archs = raw.get("architectures") or []
        supported = {"MistralForCausalLM", "LlamaForCausalLM"}
        if archs and not supported.intersection(archs):
            raise ModelFileError(
                path, f"architecture {archs} is not supported; mistral7b runs "
                      "MistralForCausalLM and LlamaForCausalLM checkpoints")
        n_heads = _int(raw, "num_attention_heads", path)
        dim = _int(raw, "hidden_size", path)
        # Newer transformers write rope settings under `rope_parameters`; older ones top-level.
        rope_params = raw.get("rope_parameters") or {}
        theta = rope_params.get("rope_theta", raw.get("rope_theta"))
        scaling = raw.get("rope_scaling") or {}
        scaling_type = scaling.get("rope_type") or scaling.get("type")
        param_type = rope_params.get("rope_type")
        for kind in (scaling_type, param_type):
            if kind not in (None, "default"):
                raise ModelFileError(path, f"rope scaling {kind!r} is not supported yet")
        window = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False:
            window = None
        window = None if window in (None, 0) else int(window)
        if theta is None:
            theta = _THETA_WITH_WINDOW if window is not None else _THETA_WITHOUT_WINDOW
        return _build(
            path,
            dim=dim,
            n_layers=_int(raw, "num_hidden_layers", path),
            head_dim=int(raw.get("head_dim") or dim // n_heads),
            hidden_dim=_int(raw, "intermediate_size", path),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            vocab_size=_int(raw, "vocab_size", path),
            rope_theta=float(theta),
            sliding_window=window,
            max_seq_len=int(raw.get("max_position_embeddings") or 32768),
            tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], path: str | Path,
                           vocab_size: int | None, tied_embeddings: bool) -> ModelConfig:
        """GGUF key/values (`{arch}.embedding_length`, ...), already decoded into plain values."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "mistral"):
            raise ModelFileError(path, f"GGUF architecture {arch!r} is not supported; "
                                       "mistral7b runs 'llama' and 'mistral' GGUF models")

        def key(name: str, default: Any = ...) -> Any:
            full = f"{arch}.{name}"
            if full in meta:
                return meta[full]
            if default is ...:
                raise ModelFileError(path, f"GGUF metadata is missing {full!r}")
            return default

        dim = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        n_kv = key("attention.head_count_kv", n_heads)
        head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0)
                       or dim // n_heads)
        window = key("attention.sliding_window", None)
        window = None if window in (None, 0) else int(window)
        theta = key("rope.freq_base", None)
        if theta is None:
            theta = _THETA_WITH_WINDOW if window is not None else _THETA_WITHOUT_WINDOW
        vocab = key("vocab_size", None) or vocab_size
        if vocab is None:
            raise ModelFileError(path, "GGUF file gives no vocabulary size")
        return _build(
            path,
            dim=dim,
            n_layers=int(key("block_count")),
            head_dim=head_dim,
            hidden_dim=int(key("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            vocab_size=int(vocab),
            rope_theta=float(theta),
            sliding_window=window,
            max_seq_len=int(key("context_length", 32768)),
            tied_embeddings=tied_embeddings,
        )


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(path, "expected a JSON object at the top level")
    return raw


def _int(raw: dict[str, Any], key: str, path: str | Path) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFileError(path, f"field {key!r} must be an integer, got {value!r}")
    return value


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
