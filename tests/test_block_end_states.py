"""The prefix cache's block-end states (DeepSeek-V4's rings saved where a block ends), by hand on the block manager:
a hit ends at the last matched block whose state was kept; a step saves one state per block end it crosses while
slots last; a rolled-back end's state is let go; a state being restored is pinned against reuse; kept states are
reused least recently used first. The engine-level check (the same tokens with hits) is in tests/test_v4_engine.py."""
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def step(bm: BlockManager, seq: Sequence, num_tokens: int):
    """Schedule seq up to num_tokens computed tokens, run it, file its blocks."""
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.cache_blocks(seq)


def test_a_hit_ends_where_a_state_was_kept():
    bm = BlockManager(16, BS, enable_prefix_caching=True, num_state_slots=2)
    first = Sequence(list(range(1, 15)), SamplingParams())
    bm.allocate(first, 13)
    assert sorted(first.state_saves) == [4, 8]  # two slots: the end at 12 is not saved
    first.num_computed_tokens = 13
    bm.cache_blocks(first)
    assert first.state_saves == {} and set(bm.states.of_block) == set(first.block_table[:2])
    second = Sequence(list(range(1, 15)) + [99], SamplingParams())
    assert bm.match_prefix(second) == 8  # three blocks match, the third has no state
    end, slot = second.state_restore
    assert end == 8 and slot == bm.states.of_block[first.block_table[1]] and bm.states.pins[slot] == 1
    bm.allocate(second, 15)
    assert second.state_restore == (8, slot)  # its first step restores from it
    second.num_computed_tokens = 15
    bm.allocate(second, 16)
    assert second.state_restore is None and not bm.states.pins  # moved past it: unpinned


def test_a_pinned_state_is_not_reused_and_the_least_recently_used_one_is():
    bm = BlockManager(16, BS, enable_prefix_caching=True, num_state_slots=2)
    first = Sequence(list(range(1, 11)), SamplingParams())
    step(bm, first, 9)
    block0, block1 = first.block_table[:2]
    slot0, slot1 = bm.states.of_block[block0], bm.states.of_block[block1]
    hit = Sequence(list(range(1, 6)) + [50], SamplingParams())
    assert bm.match_prefix(hit) == 4 and hit.state_restore == (4, slot0)  # block 0: now the most recently used
    other = Sequence([7] * 9, SamplingParams())
    bm.allocate(other, 9)  # ends 4 and 8: block 1's slot is reused; block 0's is pinned by the hit
    assert list(other.state_saves.values()) == [slot1] and block1 not in bm.states.of_block
    bm.free(hit)
    assert not bm.states.pins
    assert bm.states.take() == slot0  # unpinned: reusable again


def test_rolled_back_block_ends_let_their_slots_go():
    bm = BlockManager(16, BS, enable_prefix_caching=True, num_state_slots=4)
    seq = Sequence(list(range(1, 4)), SamplingParams())
    step(bm, seq, 2)
    bm.allocate(seq, 10)  # a verify row of 8 positions crosses the ends at 4 and 8
    assert sorted(seq.state_saves) == [4, 8]
    seq.num_computed_tokens = 10
    bm.rollback(seq, 5)  # positions 5.. rejected: the end at 8 saw them, the end at 4 did not
    assert sorted(seq.state_saves) == [4] and len(bm.states.free) == 3
    slot = seq.state_saves[4]
    bm.cache_blocks(seq)  # block 0 is filed with the state at its end
    assert bm.states.of_block == {seq.block_table[0]: slot} and seq.state_saves == {}
    bm.free(seq)
    assert len(bm.states.free) == 3 and len(bm.states.of_block) == 1  # the filed block keeps its state


def test_dense_models_keep_no_states():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    first = Sequence(list(range(1, 15)), SamplingParams())
    step(bm, first, 13)
    second = Sequence(list(range(1, 15)), SamplingParams())
    assert bm.states is None and bm.match_prefix(second) == 12 and second.state_restore is None
