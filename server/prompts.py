"""From a validated request body to what the engine takes: prompt token ids and SamplingParams. The engine thread
checks the prompt against the model and the KV cache when it admits the request."""
from transformers import PreTrainedTokenizerBase

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from server.errors import APIError, from_value_error
from server.schemas import ChatRequest, CompletionRequest, SamplingFields


class PromptBuilder:
    """Owns its own tokenizer: the engine's is used by the engine thread and HF tokenizers are not shared safely. Reads
    only what the engine fixed at start-up (context length, KV capacity, the model's sampling defaults)."""

    def __init__(self, engine: LLMEngine, tokenizer: PreTrainedTokenizerBase, served_model_name: str):
        self.max_model_len = engine.max_model_len
        self.kv_capacity_tokens = engine.kv_capacity_tokens
        self.vocab_size = engine.vocab_size
        self.sampling_defaults = dict(engine.sampling_defaults)
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name

    def completion(self, body: CompletionRequest) -> tuple[list[int], SamplingParams]:
        self.check_common(body)
        if isinstance(body.prompt, str):
            token_ids = self.tokenizer.encode(body.prompt)
        else:
            token_ids = body.prompt
        return token_ids, self.params(body, token_ids, body.max_tokens, body.logprobs)

    def chat(self, body: ChatRequest) -> tuple[list[int], SamplingParams]:
        self.check_common(body)
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if self.tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # templates raise their own errors (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from e
        token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return token_ids, self.params(body, token_ids, max_tokens, logprobs)

    def check_common(self, body: SamplingFields):
        if body.model is not None and body.model != self.served_model_name:
            raise APIError(404, f"the model {body.model!r} does not exist here; this server serves "
                                f"{self.served_model_name!r}", "model", code="model_not_found",
                           kind="invalid_request_error")
        if body.n != 1:
            raise APIError(400, f"n must be 1, got {body.n}", "n")

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def params(self, body: SamplingFields, token_ids: list[int], max_tokens: int | None,
               logprobs: int | None = None) -> SamplingParams:
        room = self.max_model_len - len(token_ids)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens} but the prompt has {len(token_ids)} tokens and the "
                                f"context length is {self.max_model_len}", "max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(room, self.kv_capacity_tokens - len(token_ids)))
        try:
            return SamplingParams(**(self.sampling_defaults | body.sampling_overrides()), seed=body.seed,
                                  max_tokens=max_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
                                  ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens,
                                  max_verify_tokens=body.max_verify_tokens, logprobs=logprobs)
        except ValueError as e:
            raise from_value_error(e) from e
