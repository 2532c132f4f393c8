from dataclasses import dataclass, field


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
