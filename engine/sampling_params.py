import math
from dataclasses import dataclass, field

from kernels.sampling import GREEDY_EPS

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p")  # a model's generation_config may set them


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 or 0 = disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] | str | None = None  # normalised to a list
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    max_verify_tokens: int | None = None  # at most this many drafts verified per step for this request (0: no spec)
    logprobs: int | None = None          # return each emitted token's log-probability and this many top alternatives

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = (
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, ">= 0 and finite"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", -1 <= self.top_k < 2**31, ">= -1 (-1 or 0 = disabled) and < 2**31"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("max_verify_tokens", self.max_verify_tokens is None or self.max_verify_tokens >= 0, ">= 0 or None"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"in [0, {MAX_LOGPROBS}] or None"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty str, got {self.stop!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def temperature_only(self, vocab_size: int) -> bool:
        """No top-k, top-p or min-p (what the fused Markov sampler covers), decided on the host."""
        return (self.top_k <= 0 or self.top_k >= vocab_size) and self.top_p >= 1 and self.min_p <= 0
