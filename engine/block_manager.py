import hashlib
import heapq
from array import array
from collections import OrderedDict

from engine.block_end_states import BlockEndStates
from engine.sequence import Sequence


def slots(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Cache slots of token positions start..end-1 of a sequence with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def chain_hash(previous: bytes, token_ids: list[int]) -> bytes:
    """Content key of a full block: a collision-resistant digest of the block's tokens and every token before it."""
    return hashlib.blake2b(previous + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """Paged KV bookkeeping: fixed-size blocks, one block table per sequence, rollback by truncation.

    With prefix caching, every full block whose K/V is complete is filed under the hash of its token prefix. A new
    request starts from the longest run of filed blocks matching its prompt; blocks are reference-counted, and a
    freed block keeps its K/V (and its entry) until the free list hands it out again, least recently freed first.

    A sequence holding blocks also holds a request slot, the lowest free one: the index of its per-request KV state
    (DeepSeek-V4's rings), reserved by the model for every request that can run at once. With num_state_slots, a
    cached prefix also needs the rings' state saved at its last block's end (BlockEndStates), and a hit ends at the
    last matched block that has one."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_state_slots: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.cached_blocks: dict[bytes, int] = {}  # prefix hash -> block holding that prefix's last full block
        self.block_hash: dict[int, bytes] = {}     # the inverse, for eviction
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0      # of which found
        self.free_request_slots: list[int] = []  # a heap of released slots, below num_request_slots
        self.num_request_slots = 0
        self.states = BlockEndStates(num_state_slots) if enable_prefix_caching and num_state_slots else None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int):
        """Grow seq's block table so it covers num_tokens tokens."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"KV cache exhausted: need {missing} blocks, {self.num_free_blocks} free")
        if seq.request_slot is None:
            seq.request_slot = self.take_request_slot()
        for _ in range(missing):
            block_id, _ = self.free_block_ids.popitem(last=False)
            self.evict(block_id)
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        if self.states:
            self.take_state_slots(seq, num_tokens)

    def take_state_slots(self, seq: Sequence, num_tokens: int):
        """A state slot for each block end among seq's next positions (up to num_tokens); a prefix hit's restore
        lets go of its slot once seq has moved past it."""
        if seq.state_restore and seq.state_restore[0] != seq.num_computed_tokens:
            self.states.unpin(seq.state_restore[1])
            seq.state_restore = None
        bs = self.block_size
        for end in range((seq.num_computed_tokens // bs + 1) * bs, num_tokens + 1, bs):
            if end not in seq.state_saves and (slot := self.states.take()) is not None:
                seq.state_saves[end] = slot

    def evict(self, block_id: int):
        key = self.block_hash.pop(block_id, None)
        if key is not None:
            del self.cached_blocks[key]
        if self.states:
            self.states.drop(block_id)

    def release(self, block_id: int):
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_block_ids[block_id] = None

    def truncate(self, seq: Sequence, num_tokens: int):
        """Keep only the blocks covering the first num_tokens tokens (speculative rollback, shrinking). Blocks are
        released last first, so a sequence's deepest blocks are reused before its shareable prefix."""
        keep = self.blocks_for(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            self.release(block_id)
        del seq.block_table[keep:]
        seq.num_filed_blocks = min(seq.num_filed_blocks, keep)
        for end in [end for end in seq.state_saves if end > num_tokens]:  # saved after rolled-back positions
            self.states.release(seq.state_saves.pop(end))

    def free(self, seq: Sequence):
        self.truncate(seq, 0)
        if seq.state_restore:
            self.states.unpin(seq.state_restore[1])
            seq.state_restore = None
        if seq.request_slot is not None:
            heapq.heappush(self.free_request_slots, seq.request_slot)
            seq.request_slot = None

    def take_request_slot(self) -> int:
        if self.free_request_slots:
            return heapq.heappop(self.free_request_slots)
        self.num_request_slots += 1
        return self.num_request_slots - 1

    def rollback(self, seq: Sequence, num_tokens: int):
        """Forget the KV of seq's last num_tokens computed tokens (rejected speculative positions)."""
        seq.num_computed_tokens -= num_tokens
        self.truncate(seq, seq.num_computed_tokens)

    def prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of seq's first num_blocks full blocks (memoised on the sequence)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else b"", seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the filed blocks of its longest cached prefix (always leaving its last
        token to compute, so the step yields its logits); returns the number of tokens they cover."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        for block_id in self.usable_prefix(seq):
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_filed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        return seq.num_computed_tokens

    def usable_prefix(self, seq: Sequence) -> list[int]:
        """The filed blocks of seq's longest cached prefix; with block-end states, cut back to the last one whose
        state was kept (seq restores its rings from it, pinned until its step has run)."""
        matched = []
        for key in self.prefix_hashes(seq, (len(seq) - 1) // self.block_size):
            if (block_id := self.cached_blocks.get(key)) is None:
                break
            matched.append(block_id)
        if self.states is None:
            return matched
        for count in range(len(matched), 0, -1):
            if (slot := self.states.lookup(matched[count - 1])) is not None:
                self.states.pin(slot)
                seq.state_restore = (count * self.block_size, slot)
                return matched[:count]
        return []

    def count_prefix_lookup(self, seq: Sequence):
        """Count an admitted sequence's lookup (a lookup retried because KV was short is counted once)."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += len(seq) - 1
            self.num_hit_tokens += seq.num_computed_tokens

    def cache_blocks(self, seq: Sequence):
        """File seq's full blocks whose K/V is complete in every cache (seq.num_complete_tokens)."""
        full = min(seq.num_complete_tokens // self.block_size, len(seq.block_table))
        if not self.enable_prefix_caching or full <= seq.num_filed_blocks:
            return
        hashes = self.prefix_hashes(seq, full)
        for i in range(seq.num_filed_blocks, full):
            block_id, key = seq.block_table[i], hashes[i]
            if block_id not in self.block_hash and key not in self.cached_blocks:
                self.cached_blocks[key] = block_id
                self.block_hash[block_id] = key
            if self.states and (slot := seq.state_saves.pop((i + 1) * self.block_size, None)) is not None:
                if (filed := self.cached_blocks.get(key)) is not None:
                    self.states.attach(filed, slot)
                else:
                    self.states.release(slot)
        seq.num_filed_blocks = full
