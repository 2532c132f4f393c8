from engine.sampling_params import SamplingParams

PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output, for tokenizers whose text depends on context


class IncrementalDetokenizer:
    """Streams text for one request: never emits a partial UTF-8 character, cuts at stop strings
    (stop string excluded) and holds back a tail that might still become a stop string."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        skip = params.skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=skip)
        else:
            self._decode = lambda ids: tokenizer.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        self.stop = params.stop
        self.hold = max(map(len, self.stop), default=1) - 1
        ctx = list(prompt_token_ids[-PROMPT_CONTEXT:])
        if self._decode(ctx).endswith("\ufffd"):
            ctx = []  # prompt ends mid-character: decode the output on its own
        self._ids = ctx                                  # decode window source: context + output
        self._prefix, self._read = 0, len(ctx)           # vLLM-style prefix_offset / read_offset
        self._prefix_text = self._decode(ctx)
        self._done = len(self._prefix_text)              # chars of the window text already read
        self.token_ids: list[int] = []
        self.text = ""                                   # released + held-back output text
        self._sent = 0                                   # chars of self.text already released
        self.stop_reason: str | None = None
        self.finished_by_stop = False

    def add_tokens(self, new_ids: list[int]) -> str:
        for tid in new_ids:
            if self.finished_by_stop:
                break
            self.token_ids.append(tid)
            self._ids.append(tid)
            self._append(self._read_window(final=False))
        return self._release(self._safe_end())

    def flush(self) -> str:
        if not self.finished_by_stop:
            self._append(self._read_window(final=True))
        return self._release(len(self.text))

    def _read_window(self, final: bool) -> str:
        text = self._decode(self._ids[self._prefix:])
        partial = text.endswith("\ufffd") and not final
        if partial:
            text = text.rstrip("\ufffd")  # a token ended mid-character: release whole characters only
        delta, self._done = text[self._done:], max(self._done, len(text))
        if not partial and len(text) > len(self._prefix_text):
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix:])
            self._done = len(self._prefix_text)
        return delta

    def _append(self, delta: str):
        if not delta:
            return
        start = max(len(self.text) - self.hold, 0)
        self.text += delta
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits, key=lambda h: h[0])  # earliest match; ties: first listed stop
            self.text, self.stop_reason, self.finished_by_stop = self.text[:i], s, True

    def _safe_end(self) -> int:
        if self.finished_by_stop or not self.hold:
            return len(self.text)
        tail = self.text[-self.hold:]
        keep = max((k for s in self.stop for k in range(1, min(len(s) - 1, len(tail)) + 1)
                    if tail.endswith(s[:k])), default=0)
        return len(self.text) - keep

    def _release(self, end: int) -> str:
        delta, self._sent = self.text[self._sent:end], max(self._sent, end)
        return delta
