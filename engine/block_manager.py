from collections import deque

from engine.sequence import Sequence


def slots(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Cache slots of token positions start..end-1 of a sequence with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class BlockManager:
    """Paged KV bookkeeping: fixed-size blocks, one block table per sequence, rollback by truncation."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))

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
        seq.block_table.extend(self.free_block_ids.popleft() for _ in range(missing))

    def truncate(self, seq: Sequence, num_tokens: int):
        """Keep only the blocks covering the first num_tokens tokens (speculative rollback, shrinking)."""
        keep = self.blocks_for(num_tokens)
        self.free_block_ids.extend(seq.block_table[keep:])
        del seq.block_table[keep:]

    def free(self, seq: Sequence):
        self.truncate(seq, 0)

    def rollback(self, seq: Sequence, num_tokens: int):
        """Forget the KV of seq's last num_tokens computed tokens (rejected speculative positions)."""
        seq.num_computed_tokens -= num_tokens
        self.truncate(seq, seq.num_computed_tokens)
