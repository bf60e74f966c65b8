"""The OpenAI-compatible request bodies, validated by pydantic (unknown fields ignored, as OpenAI clients
send many). Extensions: `return_routed_experts`, `return_token_ids`, `ignore_eos`, `repetition_penalty`.

What is not supported is refused with a 400 that names the field, never silently ignored: structured
output (`response_format` other than text), `tools` / function calling, `logit_bias`, `echo`, `suffix`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeserve.engine.sampling import SamplingParams
from moeserve.errors import MoeServeError


class Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 17)  # n <= 16 sequences use seed + j
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=16)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=2.0)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    logit_bias: dict | None = None
    return_routed_experts: bool = False
    return_token_ids: bool = False
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _unsupported(self):
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise ValueError(f"response_format: {kind!r} (structured output) is not supported; only {{'type': 'text'}}")
        if self.tools:
            raise ValueError("tools: function calling is not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: function calling is not supported by this server")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    @property
    def top_n(self) -> int | None:
        """Alternatives per token asked for (None: no logprobs; each endpoint spells it its own way)."""
        return None

    @property
    def wants_logprobs(self) -> bool:
        return self.top_n is not None

    def params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              logprobs=self.top_n)


class CompletionRequest(Sampling):
    """/v1/completions: one prompt (text or token ids) or a list of them; `logprobs`: alternatives per token."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if not v or (isinstance(v, list) and isinstance(v[0], str | list) and any(not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @property
    def top_n(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: a text, token ids, or a list of either."""
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str | list):
            return list(self.prompt)
        return [self.prompt]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = ""

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MoeServeError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Sampling):
    """/v1/chat/completions: `logprobs` true for per-token logprobs, `top_logprobs` alternatives."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """/tokenize: a prompt, or chat messages (rendered with the chat template)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
