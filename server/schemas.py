"""Request and response bodies (msgspec): decoding validates types, the engine's SamplingParams validates ranges."""
import time
import uuid
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class StreamOptions(Struct):
    include_usage: bool = False


class TextPart(Struct):
    type: str
    text: str = ""


class ChatMessage(Struct):
    role: str
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class SamplingFields(Struct, kw_only=True):
    """Fields shared by both routes (OpenAI names plus vLLM's top_k, min_p, ignore_eos, stop_token_ids). Sampling
    fields left out (None) take the model's generation_config.json defaults, else OpenAI's."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    max_verify_tokens: int | None = None  # ours: cap on drafts verified per step for this request (0: no spec)

    def sampling_overrides(self) -> dict:
        """The sampling fields this request sets."""
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None


class ChatRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False


class PromptTokensDetails(Struct):
    cached_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class ChatChoice(Struct):
    index: int
    message: Delta
    finish_reason: str | None
    logprobs: None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: None = None


class CompletionBody(Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Usage | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


encoder = msgspec.json.Encoder()
