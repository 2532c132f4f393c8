"""Request and response bodies (msgspec): decoding validates types, the engine's SamplingParams validates ranges."""
import time
import uuid
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
# The ranges SamplingParams and the engine enforce, stated in the schema so the published contract says what is valid
Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Temperature = Annotated[float, Meta(ge=0)]
TopP = Annotated[float, Meta(gt=0, le=1)]
TopK = Annotated[int, Meta(ge=-1, le=2**31 - 1)]  # past the vocabulary it changes nothing
Fraction = Annotated[float, Meta(ge=0, le=1)]
StopText = Annotated[str, Meta(min_length=1)]
TokenIds = Annotated[list[NonNegative], Meta(min_length=1)]  # each below the vocabulary size (the document says it)


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
    max_tokens: Positive | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: Fraction | None = None
    seed: Seed | None = None
    stop: StopText | list[StopText] | None = None
    stop_token_ids: list[NonNegative] | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    max_verify_tokens: NonNegative | None = None  # ours: cap on drafts verified per step (0: no spec)

    def sampling_overrides(self) -> dict:
        """The sampling fields this request sets."""
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: Annotated[str, Meta(min_length=1)] | TokenIds
    echo: Literal[False] = False  # echoing the prompt back is not supported
    logprobs: TopLogprobs | None = None  # each token's log-probability and this many top alternatives


class ChatRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: Positive | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None  # with logprobs: this many top alternatives per token


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


class CompletionLogprobs(Struct):
    """OpenAI's legacy completions format: one entry per token of this choice (or chunk)."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprobEntry]


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class ChatChoice(Struct):
    index: int
    message: Delta
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class CompletionResponse(Struct):
    """A /v1/completions answer, and each chunk of its stream."""
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponse(Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatChunk(Struct):
    """One server-sent event of a streamed /v1/chat/completions answer."""
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(Struct):
    """OpenAI's error object."""
    error: ErrorDetail


class Health(Struct):
    status: str  # "ok", or "stopped" with 503


class ModelCard(Struct):
    id: str
    object: str
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(Struct):
    object: str
    data: list[ModelCard]


class ReloadResponse(Struct):
    calibration_version: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


encoder = msgspec.json.Encoder()
