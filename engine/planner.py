"""Verify-length policies: how many of a request's drafted tokens the target checks this step."""
from engine.config import parse_verify_policy
from engine.sequence import Sequence


class Planner:
    def __init__(self, policy: str, max_model_len: int):
        self.kind, self.k = parse_verify_policy(policy)
        self.max_model_len = max_model_len

    def verify_length(self, seq: Sequence) -> int:
        drafted = len(seq.proposal.tokens)
        wanted = drafted if self.kind == "full" else min(self.k, drafted)
        return max(0, min(wanted, self.room(seq)))

    def room(self, seq: Sequence) -> int:
        """Drafts beyond what max_tokens or the context length could still keep are never worth verifying; the cap
        depends only on lengths, never on the draft tokens, so it keeps verification lossless."""
        left = seq.params.max_tokens - seq.num_completion_tokens
        return min(left, self.max_model_len - len(seq)) - 1
