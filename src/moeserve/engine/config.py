"""EngineConfig: what the serving engine can be asked to do, with its defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass

from moeserve import defaults
from moeserve.errors import MoeServeError


@dataclass(frozen=True)
class EngineConfig:
    """max_batch: most requests decoded together; max_queue: most waiting for a slot (then HTTP 429);
    max_prefill_tokens: prompt tokens admitted per step (at least one request); max_model_len: most tokens
    per request, prompt and output together (None: the model's context length)."""

    max_batch: int = defaults.MAX_BATCH
    max_queue: int = defaults.MAX_QUEUE
    max_prefill_tokens: int = defaults.MAX_PREFILL_TOKENS
    max_model_len: int | None = None

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 0 or self.max_prefill_tokens < 1:
            raise MoeServeError("max_batch and max_prefill_tokens must be >= 1 and max_queue >= 0")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise MoeServeError(f"max_model_len must be >= 2, got {self.max_model_len}")
