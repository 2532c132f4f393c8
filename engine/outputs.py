"""What the engine reports: each step's per-request outputs, speculative decoding counters, engine-wide stats for
metrics, and the typed error for a request it refuses."""
from dataclasses import dataclass, field

from engine.calibration_monitor import CalibrationSnapshot


@dataclass
class SpecStats:
    """Speculative decoding counters, per request and engine-wide. A round is one verify step of a request that had a
    drafted block; tau = accepted + 1 per round (the bonus token included)."""
    num_drafts: int = 0
    num_draft_tokens: int = 0       # drafted (the whole block)
    num_verified_tokens: int = 0    # sent to the target
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # rounds with more than i accepted
    verified_per_pos: list[int] = field(default_factory=list)  # rounds with more than i verified

    def record(self, drafted: int, verified: int, accepted: int):
        if not 0 <= accepted <= verified <= drafted:
            raise ValueError(f"inconsistent round: drafted {drafted}, verified {verified}, accepted {accepted}")
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_verified_tokens += verified
        self.num_accepted_tokens += accepted
        for counts, n in ((self.accepted_per_pos, accepted), (self.verified_per_pos, verified)):
            counts.extend([0] * (n - len(counts)))
            for i in range(n):
                counts[i] += 1

    def copy(self) -> "SpecStats":
        return SpecStats(self.num_drafts, self.num_draft_tokens, self.num_verified_tokens, self.num_accepted_tokens,
                         list(self.accepted_per_pos), list(self.verified_per_pos))

    @property
    def mean_acceptance_length(self) -> float:
        """tau: tokens produced per round."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def conditional_acceptance(self) -> list[float]:
        """#(a > i) / #(a > i - 1) for each position i (the paper's position-wise conditional acceptance)."""
        before = [self.num_drafts] + self.accepted_per_pos[:-1]
        return [a / b if b else 0.0 for a, b in zip(self.accepted_per_pos, before)]

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_verified_tokens": self.num_verified_tokens, "num_accepted_tokens": self.num_accepted_tokens,
                "accepted_per_pos": list(self.accepted_per_pos), "verified_per_pos": list(self.verified_per_pos),
                "mean_acceptance_length": self.mean_acceptance_length,
                "conditional_acceptance": self.conditional_acceptance}


@dataclass
class ConfidenceRecord:
    """One verify round of a draft with a confidence head: the uncalibrated confidence logits of the drafted block
    and how much of it was verified / accepted. Position k's label is accepted > k, defined for k < verified."""
    logits: list[float]
    drafted: int
    verified: int
    accepted: int


@dataclass
class TokenLogprob:
    """An emitted token's log-probability under the distribution it was drawn from (the target's, after the request's
    temperature / top-k / top-p / min-p; the unprocessed one for greedy requests), and the top alternatives there."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Emitted:
    """What one step gave a request: its new tokens, and their log-probabilities when it asked for them."""
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int = 0    # prompt tokens whose K/V came from the prefix cache
    num_verified_tokens: int = 0  # drafts this request sent to the target so far (speculative decoding)
    num_accepted_tokens: int = 0  # of which accepted
    delta_logprobs: list[TokenLogprob] | None = None  # one per delta token, when the request asked for logprobs


@dataclass
class EngineStats:
    """A snapshot for metrics: counters are cumulative since the engine started."""
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_preemptions: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    spec: SpecStats | None = None       # None without speculative decoding
    planner_budget: int = 0             # drafts the planner let the target verify in the last step
    planner_theta: float = 0.0          # the sps planners' predicted tokens per second for the last step
    planner_skipped_steps: int = 0      # steps run plainly because drafting looked futile
    calibration: CalibrationSnapshot | None = None  # with a confidence head: the monitor's window

    @property
    def kv_usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks


class RequestError(ValueError):
    """A request the engine cannot take; `field` names the offending input (OpenAI's `param`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field
