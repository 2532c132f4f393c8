"""Verify-length policies: how many of each request's drafted tokens the target checks this step.
full / fixed:k ignore confidences; threshold:c cuts at the first confidence below c; sps runs the paper's
Algorithm 1 on live survivals (lossless by its early stop); sps-lagged picks the global budget K from survivals at
least one step old and gives it to the live top-K (lossless because K does not depend on the current drafts)."""
import torch

from engine.config import parse_verify_policy
from engine.sequence import Sequence
from engine.sps import best_budget, drafting_pays, early_stop_lengths, top_k_lengths
from kernels import triton_support

NEEDS_CONFIDENCE = ("threshold", "sps", "sps-lagged")
PRIOR_SURVIVAL = 0.5  # per-position survival assumed before any request has drafted
PRIOR_MOMENTUM = 0.9  # a request with no history of its own gets this running mean of all requests' past survivals
SURVIVAL_MOMENTUM = 0.5  # a request's own running mean of its blocks' survivals
REFRESH_STEPS = 16    # after this many steps without drafting, draft once anyway so the survivals stay current;
MAX_REFRESH_STEPS = 256  # the wait doubles after each refresh that still finds drafting futile, up to this


def check_policy(policy: str, has_confidence: bool):
    """The policies that read confidences need a draft with a confidence head."""
    if parse_verify_policy(policy)[0] in NEEDS_CONFIDENCE and not has_confidence:
        raise ValueError(f"verify_policy={policy!r} needs a DSpark draft with a confidence head (spec_method='dspark')")


class Planner:
    def __init__(self, policy: str, max_model_len: int, sps=None, draft_len: int = 0):
        self.kind, self.arg = parse_verify_policy(policy)
        self.max_model_len = max_model_len
        self.draft_len = draft_len  # tokens per drafted block
        self.sps = sps  # SpsCurve; None: the sps policies verify the full block (the safe default)
        self.last_budget = 0
        self.last_theta = 0.0
        self.prior = [PRIOR_SURVIVAL ** (j + 1) for j in range(draft_len)]
        self.steps_without_drafts = 0
        self.refresh_steps = REFRESH_STEPS
        self.num_skipped_steps = 0  # steps run plainly because drafting looked futile (sps, threshold)

    def drafters(self, seqs: list[Sequence]) -> list[Sequence]:
        """The requests that draft this step (the others decode plainly): all of them, or none when drafting looks
        futile. Every so often one request drafts anyway so that survivals stay current: the one with the least draft
        context queued, so a refresh costs a batch-1 draft step instead of writing every request's queued context. A
        refresh that finds drafting still futile doubles the wait for the next one. The choice looks only at survivals
        at least one step old and at queue lengths, never at this step's drafts, so it is lossless."""
        if not self.drafting_futile(seqs):
            self.steps_without_drafts, self.refresh_steps = 0, REFRESH_STEPS
            return seqs
        if self.steps_without_drafts >= self.refresh_steps:
            self.steps_without_drafts = 0
            self.refresh_steps = min(2 * self.refresh_steps, MAX_REFRESH_STEPS)
            return [min(seqs, key=queued_context_rows)]
        self.steps_without_drafts += 1
        self.num_skipped_steps += 1
        self.last_budget = 0
        self.last_theta = len(seqs) * self.sps.plain_steps_per_second(len(seqs)) if self.sps else 0.0
        return []

    def drafting_futile(self, seqs: list[Sequence]) -> bool:
        """sps: even the best budget cannot pay for the draft; threshold:c: every request's last first-position
        confidence was below c, so its block would likely be cut to nothing."""
        if self.kind == "threshold":
            return all(not row or row[0] < self.arg for row in self.stale_survivals(seqs))
        if self.kind.startswith("sps") and self.sps is not None:
            return not drafting_pays(self.stale_survivals(seqs), self.sps)
        return False

    def positions_to_draft(self, seqs: list[Sequence]) -> int:
        """Block positions worth drafting this step: none of these requests can verify more than its room, nor more
        than k under fixed:k, nor more than the whole step's budget K, plus one, under sps-lagged (K comes from the
        lagged survivals, so it is known before drafting; the extra position keeps a survival beyond K current, so K
        can grow, and lets a refresh draft when K is 0). Known before drafting, so the sequential head, LM head and
        sampling skip the rest."""
        most = max(min(self.draft_len, self.room(s)) for s in seqs)
        if self.kind == "fixed":
            return min(most, int(self.arg))
        if self.kind == "sps-lagged" and self.sps is not None and most:
            budget = best_budget(self.stale_survivals(seqs), self.sps.for_requests(len(seqs)))
            return min(most, budget + 1)
        return most

    def stale_survivals(self, seqs: list[Sequence]) -> list[list[float]]:
        rooms = [max(0, min(self.draft_len, self.room(s))) for s in seqs]
        return [(s.mean_survival or self.prior)[:n] for s, n in zip(seqs, rooms)]

    def keep_survivals(self, seqs: list[Sequence], survivals: list[list[float]]):
        """This step's live survivals are folded into each request's lagged ones (a running mean from the prior on,
        used from the next step), and into the prior that requests with no history of their own start from. A mean,
        not the last block alone: one block drafted with low confidence would otherwise stop a request drafting
        until the next refresh."""
        for seq, row in zip(seqs, survivals):
            seq.mean_survival = blend(seq.mean_survival or self.prior, row, SURVIVAL_MOMENTUM)
        self.remember(survivals)

    def remember(self, survivals: list[list[float]]):
        """Fold live survivals into the prior that new requests start from (used from the next step)."""
        for row in survivals:
            self.prior = blend(self.prior, row, PRIOR_MOMENTUM)

    @property
    def drafts_at_all(self) -> bool:
        return self.draft_len > 0 and not (self.kind == "fixed" and int(self.arg) == 0)

    def plan(self, seqs: list[Sequence]) -> list[int]:
        rooms = [max(0, min(len(s.proposal.tokens), self.room(s))) for s in seqs]
        if self.kind == "full" or (self.kind.startswith("sps") and self.sps is None):
            lengths = rooms
        elif self.kind == "fixed":
            lengths = [min(int(self.arg), n) for n in rooms]
        elif self.kind == "threshold":
            confidences = [s.proposal.confidence.tolist()[:n] for s, n in zip(seqs, rooms)]
            lengths = [self.first_below(c, self.arg) for c in confidences]
            self.keep_survivals(seqs, [self.survival(c) for c in confidences])
        else:
            live = [self.survival(s.proposal.confidence.tolist()[:n]) for s, n in zip(seqs, rooms)]
            lengths = self.plan_sps(seqs, live, rooms)
            self.keep_survivals(seqs, live)
            expected = sum(1 + sum(row[:n]) for row, n in zip(live, lengths))
            self.last_theta = expected * self.sps.steps_per_second(len(seqs) + sum(lengths), len(seqs))
        self.last_budget = sum(lengths)
        return lengths

    def plan_sps(self, seqs: list[Sequence], live: list[list[float]], rooms: list[int]) -> list[int]:
        sps = self.sps.for_requests(len(seqs))
        if self.kind == "sps":
            return early_stop_lengths(live, sps)
        stale = [row[:n] for row, n in zip(self.stale_survivals(seqs), rooms)]
        budget = best_budget(stale, sps)
        if triton_support.enabled():  # the GPU path: survivals and allocation in one kernel, beside the drafts
            from kernels.triton_budget import allocate_budget
            confidences = torch.stack([s.proposal.confidence for s in seqs])
            return allocate_budget(confidences, torch.tensor(rooms, device=confidences.device), budget)[1].tolist()
        return top_k_lengths(live, budget)

    @staticmethod
    def survival(confidences: list[float]) -> list[float]:
        out, acc = [], 1.0
        for c in confidences:
            acc *= c
            out.append(acc)
        return out

    @staticmethod
    def first_below(confidences: list[float], threshold: float) -> int:
        return next((k for k, c in enumerate(confidences) if c < threshold), len(confidences))

    def room(self, seq: Sequence) -> int:
        """Drafts beyond what max_tokens or the context length could still keep are never worth verifying, nor beyond
        the request's own max_verify_tokens; the cap never depends on the draft tokens, so verification stays
        lossless."""
        left = seq.params.max_tokens - seq.num_completion_tokens
        room = min(left, self.max_model_len - len(seq)) - 1
        cap = seq.params.max_verify_tokens
        return room if cap is None else min(room, cap)


def queued_context_rows(seq: Sequence) -> int:
    return sum(len(rows) for _, rows in seq.pending_context)


def blend(old: list[float], new: list[float], momentum: float) -> list[float]:
    """Running mean, position by position: where the new row is shorter (fewer positions drafted), the old values
    stay."""
    return [momentum * a + (1 - momentum) * b for a, b in zip(old, new)] + list(old[len(new):])
