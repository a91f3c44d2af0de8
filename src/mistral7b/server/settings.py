"""What a server is allowed to do: limits, security and naming, set by `mistral7b serve` flags."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL_NAME = "default"


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = DEFAULT_MODEL_NAME     # the id clients pass as `model`
    api_key: str | None = None               # None: no authentication
    max_concurrency: int = 8                 # cache rows = sequences decoded together
    max_queue: int = 64                      # requests waiting for a row; more -> 503
    max_model_len: int | None = None         # prompt + completion; None = the model's
    max_n: int = 16                          # most choices per request
    max_body_bytes: int = 8 * 2**20          # larger bodies -> 413
    timeout: float | None = 600.0            # seconds a request may take; None = no limit
    cors_origins: tuple[str, ...] = ()       # empty: CORS off
    prefill_chunk: int = 256                 # prompt tokens fed per step
    prefix_cache: bool = True                # reuse the KV of earlier requests' prefixes
    shutdown_grace: float = 10.0             # seconds in-flight requests get on SIGTERM
    retry_after: int = 1                     # seconds, in 503 answers
    sse_keepalive: float | None = 15.0       # seconds without an event before a comment
    moderate: str | None = None              # "input" | "output" | "both": screen requests
                                             # and/or answers with self-reflection moderation

    def __post_init__(self) -> None:
        checks = {
            "max_concurrency": self.max_concurrency >= 1,
            "max_queue": self.max_queue >= 0,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 2,
            "max_n": self.max_n >= 1,
            "max_body_bytes": self.max_body_bytes >= 1024,
            "timeout": self.timeout is None or self.timeout > 0,
            "prefill_chunk": self.prefill_chunk >= 1,
            "shutdown_grace": self.shutdown_grace >= 0,
            "sse_keepalive": self.sse_keepalive is None or self.sse_keepalive > 0,
            "moderate": self.moderate in (None, "input", "output", "both"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid server setting(s): {', '.join(bad)}")
