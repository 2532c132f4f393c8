"""Speculative decoding, one owner for the whole round: the drafter proposes a block per decoding request, the planner
chooses how much of each the target verifies, the target runs anchors and drafts in the step's one forward, rejection
sampling accepts a prefix losslessly, the rejected K/V is rolled back, the draft's context follows what was committed,
and every round is counted."""
import torch

from engine.block_manager import BlockManager
from engine.calibration_monitor import CalibrationMonitor, RoundLog
from engine.context import TIMINGS
from engine.drafter import Drafter
from engine.model_runner import ModelRunner
from engine.outputs import ConfidenceRecord, Emitted, SpecStats
from engine.planner import Planner
from engine.sampler import SamplingTensors, emit
from engine.sequence import Sequence
from kernels.dispatch import rejection_sample


class Speculator:
    def __init__(self, drafter: Drafter, runner: ModelRunner, block_manager: BlockManager, planner: Planner,
                 monitor: CalibrationMonitor | None = None, round_log: RoundLog | None = None):
        self.drafter, self.runner, self.block_manager, self.planner = drafter, runner, block_manager, planner
        self.monitor, self.round_log = monitor, round_log  # both need a draft with a confidence head
        self.stats = SpecStats()
        self.confidence_records: list[ConfidenceRecord] | None = None  # a list while recording

    def draft_and_plan(self, running: list[Sequence]):
        """Draft a block for every decoding request that lacks one and could still use drafts, then choose what each
        verifies this step."""
        decoding = [s for s in running if s.is_decoding and self.planner.room(s) > 0]
        if not decoding:
            return
        drafting = self.planner.drafters(decoding) if self.planner.drafts_at_all else []
        for seq in set(decoding) - set(drafting):  # plain this step; an unverified old block is dropped (lossless)
            seq.clear_draft()
        if not drafting:
            return
        self.drafter.propose([s for s in drafting if s.proposal is None], self.planner.positions_to_draft(drafting))
        for seq, n in zip(drafting, self.planner.plan(drafting)):
            seq.spec_token_ids = seq.proposal.tokens[:n]

    def run(self, seqs: list[Sequence]) -> dict[int, Emitted]:
        """The step's target forward over prefill chunks and [anchor, drafts] rows, then verification (or plain
        sampling for requests without drafts); returns the new tokens of each seq whose scheduled tokens reach its
        end, with the computed counts advanced past what was committed."""
        at_end = [s.reaches_end for s in seqs]
        num_logits = [1 + len(s.spec_token_ids) if e else 0 for s, e in zip(seqs, at_end)]
        with TIMINGS.section("target"):
            logits, features = self.runner.forward(seqs, num_logits, self.drafter.capture_layers)
        drafted = [i for i, e in enumerate(at_end) if e and seqs[i].spec_token_ids]
        plain = [i for i, e in enumerate(at_end) if e and not seqs[i].spec_token_ids]
        with TIMINGS.section("verify"):
            verified = self.verify([seqs[i] for i in drafted], [logits[i] for i in drafted]) if drafted else []
        with TIMINGS.section("sampling"):
            plain_logits = torch.cat([logits[i] for i in plain]) if plain else None
            sampled = self.runner.sample(plain_logits, [seqs[i] for i in plain])
        outcomes = {i: result for i, result in zip(drafted, verified)} | {i: (0, t) for i, t in zip(plain, sampled)}
        rejected = [len(s.spec_token_ids) - outcomes[i][0] if i in outcomes else 0 for i, s in enumerate(seqs)]
        with TIMINGS.section("draft_context"):
            self.drafter.queue_context(seqs, features, [s.num_scheduled_tokens - r for s, r in zip(seqs, rejected)])
        for seq in seqs:
            seq.advance()
        emitted = {}
        for i, outcome in outcomes.items():
            tokens = self.accept(seqs[i], *outcome)
            emitted[seqs[i].seq_id] = emit(logits[i][:len(tokens)], tokens, seqs[i].params)
        return emitted

    def accept(self, seq: Sequence, accepted: int, next_token: int) -> list[int]:
        """Keep the first `accepted` verified drafts and the target's next token; forget the rest's K/V."""
        self.block_manager.rollback(seq, len(seq.spec_token_ids) - accepted)
        if seq.proposal is not None:
            self.record_round(seq, accepted)
        tokens = seq.spec_token_ids[:accepted] + [next_token]
        seq.clear_draft()
        return tokens

    def verify(self, seqs: list[Sequence], logits: list[torch.Tensor]) -> list[tuple[int, int]]:
        """logits[i]: the target's [1 + l_i, V] rows for [anchor, d_1..d_l] of seqs[i] (l_i = its spec tokens).
        Returns (accepted drafts, next token) per seq."""
        if all(s.params.greedy for s in seqs):
            return verify_greedy(seqs, logits)
        return self.verify_by_rejection(seqs, logits)

    def verify_by_rejection(self, seqs: list[Sequence], logits: list[torch.Tensor]) -> list[tuple[int, int]]:
        device, vocab_size = self.drafter.device, self.drafter.vocab_size
        num_drafts = [len(s.spec_token_ids) for s in seqs]
        target_probs = SamplingTensors.from_params([s.params for s in seqs], [n + 1 for n in num_drafts],
                                                   device).probs(torch.cat(logits))
        drafted = [s for s, n in zip(seqs, num_drafts) if n]
        draft_probs = (torch.cat([s.proposal.probs[:len(s.spec_token_ids)] for s in drafted]) if drafted
                       else target_probs.new_zeros(0, vocab_size))
        draft_probs = self.drafter.draft.full_vocab_probs(draft_probs, vocab_size)
        draft_tokens = self.drafter.on_device([t for s in drafted for t in s.spec_token_ids])
        uniforms = [torch.rand(n + 1, generator=s.generator) for s, n in zip(seqs, num_drafts)]
        accepted, next_tokens = rejection_sample(
            target_probs, draft_probs, draft_tokens, self.drafter.on_device(num_drafts),
            torch.cat([u[:-1] for u in uniforms]).to(device), torch.stack([u[-1] for u in uniforms]).to(device))
        return list(zip(accepted.tolist(), next_tokens.tolist()))

    def record_round(self, seq: Sequence, accepted: int):
        args = (len(seq.proposal.tokens), len(seq.spec_token_ids), accepted)
        seq.spec_stats.record(*args)
        self.stats.record(*args)
        if seq.proposal.confidence_logits is None:
            return
        if self.monitor is not None:
            self.monitor.record(seq.proposal.confidence.tolist(), *args[1:])
        if self.confidence_records is None and self.round_log is None:
            return
        logits = seq.proposal.confidence_logits.tolist()
        if self.round_log is not None:
            self.round_log.write(logits, *args)
        if self.confidence_records is not None:
            self.confidence_records.append(ConfidenceRecord(logits, *args))

    def set_calibration(self, temperatures: torch.Tensor, biases: torch.Tensor) -> int:
        """A new STS scaling for the confidence head, copied in place (the draft's CUDA graphs read these tensors);
        the monitor starts a window for it. Returns the calibration's version."""
        head = self.drafter.draft.confidence_head
        head.temperatures.copy_(temperatures)
        head.biases.copy_(biases)
        self.monitor.reset(self.monitor.version + 1)
        if self.round_log is not None:
            self.round_log.flush()
        return self.monitor.version

    def record_confidences(self, enabled: bool = True) -> list[ConfidenceRecord] | None:
        """Start (with a fresh list) or stop recording one ConfidenceRecord per verify round; returns the list."""
        self.confidence_records = [] if enabled else None
        return self.confidence_records

    def finish(self, seq: Sequence):
        """Write a finishing request's queued draft context, so its blocks enter the prefix cache whole."""
        if self.block_manager.enable_prefix_caching and seq.pending_context:
            self.drafter.write_context([seq])


def verify_greedy(seqs: list[Sequence], logits: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Rejection sampling when every request is greedy: q is one-hot at each draft and p one-hot at the target's
    argmax, so a draft is accepted exactly when it is that argmax, and the next token is the argmax of the first
    row that disagrees (or of the bonus row). Same result, without building any distribution."""
    best = torch.cat(logits).argmax(-1).tolist()
    results, start = [], 0
    for seq in seqs:
        drafts = seq.spec_token_ids
        accepted = next((i for i, t in enumerate(drafts) if t != best[start + i]), len(drafts))
        results.append((accepted, best[start + accepted]))
        start += len(drafts) + 1
    return results
