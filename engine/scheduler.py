from collections import deque

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Continuous batching: each step running sequences first (decode rows, unfinished prefill chunks), then new
    prefills with what is left of the token budget; when KV runs out the newest running sequence is preempted."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled = self.schedule_running(budget)
        budget -= sum(s.num_scheduled_tokens for s in scheduled)
        return scheduled + self.schedule_waiting(budget)

    def schedule_running(self, budget: int) -> list[Sequence]:
        scheduled = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            num_tokens = min(seq.num_pending_tokens, budget)
            if not self.make_room(seq, num_tokens):
                continue
            del seq.spec_token_ids[max(0, num_tokens - seq.num_uncomputed_tokens):]
            self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens)
            seq.num_scheduled_tokens = num_tokens
            budget -= num_tokens
            scheduled.append(seq)
        return scheduled

    def make_room(self, seq: Sequence, num_tokens: int) -> bool:
        while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def schedule_waiting(self, budget: int) -> list[Sequence]:
        scheduled = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.match_prefix(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, seq.num_computed_tokens + num_tokens):
                self.block_manager.free(seq)  # hand back the prefix it matched; it retries on a later step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.block_manager.count_prefix_lookup(seq)
            self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens)
            seq.status, seq.num_scheduled_tokens = SequenceStatus.RUNNING, num_tokens
            self.running.append(seq)
            budget -= num_tokens
            scheduled.append(seq)
        return scheduled

    def preempt(self, seq: Sequence):
        """Free seq's KV; it goes back to the front of the queue and its tokens are recomputed later (those in the
        prefix cache are found there again, unless evicted meanwhile)."""
        self.running.remove(seq)
        self.block_manager.cache_blocks(seq)
        self.block_manager.free(seq)
        seq.status, seq.num_computed_tokens, seq.num_scheduled_tokens = SequenceStatus.WAITING, 0, 0
        seq.clear_draft()
        seq.pending_context = []  # its rows get recomputed, and their draft K/V with them
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str):
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.cache_blocks(seq)
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.finish(seq, "abort")
                    return seq
        return None
