"""Saved per-request state at block ends, for the prefix cache of a model whose step also reads state kept outside
the pages (DeepSeek-V4's rings: the sliding window's K=V, a compressor's tokens of unfinished windows). A cached
prefix may end at a block only where the state at that block's end was saved; its blocks before that need nothing.

A fixed pool of slots: a step saves the state at every block end it crosses into a slot taken for it (pending on
the sequence); the slot is attached to the block when the block is filed in the prefix cache, and dropped when the
positions before that end are rolled back. Attached states are reused least recently used first, and a slot a
waiting step will restore from is pinned until that step has run. SGLang's radix cache for hybrid (Mamba) models
keeps recurrent states at tree nodes alike; learned from, not copied."""
from collections import Counter, OrderedDict


class BlockEndStates:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.of_block: OrderedDict[int, int] = OrderedDict()  # block id -> slot, least recently used first
        self.pins: Counter[int] = Counter()  # slots a scheduled sequence restores from

    def take(self) -> int | None:
        """A slot to save into: a free one, else the least recently used attached state not pinned; None when every
        slot is pending or pinned (that block end is then not saved)."""
        if self.free:
            return self.free.pop()
        for block_id, slot in self.of_block.items():
            if not self.pins[slot]:
                del self.of_block[block_id]
                return slot
        return None

    def attach(self, block_id: int, slot: int):
        """The filed block block_id ends where slot's state was saved (a block holding one already keeps it)."""
        if block_id in self.of_block:
            self.release(slot)
        else:
            self.of_block[block_id] = slot

    def lookup(self, block_id: int) -> int | None:
        """The slot of the state at block_id's end, marked as just used; None when none was kept."""
        slot = self.of_block.get(block_id)
        if slot is not None:
            self.of_block.move_to_end(block_id)
        return slot

    def drop(self, block_id: int):
        """block_id is handed out again: its state no longer belongs to any cached prefix."""
        slot = self.of_block.pop(block_id, None)
        if slot is not None:
            self.release(slot)

    def release(self, slot: int):
        self.free.append(slot)

    def pin(self, slot: int):
        self.pins[slot] += 1

    def unpin(self, slot: int):
        self.pins[slot] -= 1
        if not self.pins[slot]:
            del self.pins[slot]
