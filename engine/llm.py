"""Offline API: LLM().generate(...), .chat(...), .stream(...)."""
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per token, when SamplingParams.logprobs asked for them


class LLM(LLMEngine):
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[Completion]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if isinstance(params, list) else [params or self.default_sampling_params()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results = {i: Completion(i, list(self.sequences[i].token_ids), [], "", None) for i in ids}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while self.has_unfinished():
                for out in self.step():
                    self.collect(results[out.request_id], out)
                    bar.update(out.finished)
        return [results[i] for i in ids]

    @staticmethod
    def collect(result: Completion, out: RequestOutput):
        result.token_ids += out.delta_token_ids
        result.text += out.delta_text
        result.finish_reason = out.finish_reason
        result.num_cached_tokens = out.num_cached_tokens
        if out.delta_logprobs is not None:
            result.logprobs = (result.logprobs or []) + out.delta_logprobs

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, conversations: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[Completion]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.chat_prompt(m) for m in conversations], params, use_tqdm)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield this request's deltas as they are produced (other requests in flight advance too)."""
        request_id = self.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort(request_id)
