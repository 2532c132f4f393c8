"""Block manager and scheduler invariants under random operation sequences."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.attention_inputs import key_slots, window_slots
from engine.block_manager import BlockManager, slots
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

NUM_BLOCKS, BLOCK_SIZE = 12, 4


def check_invariants(bm: BlockManager, seqs: list[Sequence]):
    owned = [b for s in seqs for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert not set(owned) & set(bm.free_block_ids), "a block is both owned and free"
    assert len(owned) + bm.num_free_blocks == NUM_BLOCKS, "a block leaked"


ops = st.lists(st.tuples(st.sampled_from(["allocate", "rollback", "free"]), st.integers(0, 5),
                         st.integers(0, 20)), max_size=60)


@given(ops)
@settings(max_examples=200, deadline=None)
def test_block_manager_random_ops(operations):
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    seqs = [Sequence([1] * 3, SamplingParams()) for _ in range(6)]
    for op, i, n in operations:
        seq = seqs[i]
        if op == "allocate" and bm.can_allocate(seq, seq.num_computed_tokens + n):
            bm.allocate(seq, seq.num_computed_tokens + n)
            seq.num_computed_tokens += n
        elif op == "rollback":
            bm.rollback(seq, min(n, seq.num_computed_tokens))
        elif op == "free":
            bm.free(seq)
            seq.num_computed_tokens = 0
        assert len(seq.block_table) == bm.blocks_for(seq.num_computed_tokens)
        check_invariants(bm, seqs)
        for s in seqs:
            for pos, slot in enumerate(slots(s.block_table, BLOCK_SIZE, 0, s.num_computed_tokens)):
                assert slot // BLOCK_SIZE == s.block_table[pos // BLOCK_SIZE] and slot % BLOCK_SIZE == pos % BLOCK_SIZE
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == NUM_BLOCKS


@given(st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 30), st.integers(0, 9)),
                max_size=80))
@settings(max_examples=150, deadline=None)
def test_scheduler_never_loses_a_request(operations):
    """Simulated steps (no model): every request finishes or is aborted, blocks never leak, budgets hold."""
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    config = EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=16)
    sched = Scheduler(config, bm)
    live: list[Sequence] = []
    for op, n, k in operations + [("step", 0, 0)] * 400:
        if op == "add":
            seq = Sequence(list(range(n)), SamplingParams(max_tokens=1 + k))
            sched.add(seq)
            live.append(seq)
        elif op == "abort" and live:
            sched.abort(live[k % len(live)].request_id)
        else:
            simulate_step(sched)
        live = [s for s in live if not s.is_finished]
        check_invariants(bm, live)
        if not sched.has_unfinished():
            break
    assert not live and bm.num_free_blocks == NUM_BLOCKS


def simulate_step(sched: Scheduler):
    scheduled = sched.schedule()
    assert len(scheduled) <= sched.max_num_seqs
    assert sum(s.num_scheduled_tokens for s in scheduled) <= sched.max_num_batched_tokens
    for seq in scheduled:
        assert seq.status is SequenceStatus.RUNNING and seq.num_scheduled_tokens >= 1
        assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens + seq.num_scheduled_tokens
        seq.num_computed_tokens += seq.num_scheduled_tokens
        seq.num_scheduled_tokens = 0
        if seq.num_computed_tokens == len(seq):
            seq.token_ids.append(7)
            if seq.num_completion_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")


def test_key_slots_expand_the_block_tables_as_slots_does():
    """attention_inputs.key_slots builds each sequence's key slots on the device from its block table; they are
    block_manager.slots' per-token list, padded with 0 to the longest (ragged lengths, tables longer than needed and
    shorter than the longest); window_slots, the slots of the last 12 positions (0 before position 0). Negative
    control: a table shifted by one block differs."""
    g = torch.Generator().manual_seed(0)
    seqs, lengths = [], [37, 1, 16, 64]
    for n in lengths:
        seq = Sequence([1] * 4, SamplingParams())
        seq.block_table = torch.randperm(100, generator=g)[:n // 8 + 3].tolist()
        seqs.append(seq)
    expected = [slots(s.block_table, 8, 0, n) + [0] * (64 - n) for s, n in zip(seqs, lengths)]
    assert key_slots(seqs, lengths, 8).tolist() == expected
    window = [[slots(s.block_table, 8, p, p + 1)[0] if p >= 0 else 0 for p in range(n - 12, n)]
              for s, n in zip(seqs, lengths)]  # the last 12 positions before each length (a window draft's)
    assert window_slots(seqs, lengths, 12, 8).tolist() == window
    assert window_slots(seqs[:1], [0], 4, 8).tolist() == [[0, 0, 0, 0]]  # nothing committed yet
    seqs[0].block_table = seqs[0].block_table[1:]
    assert key_slots(seqs, lengths, 8).tolist() != expected
    assert window_slots(seqs, lengths, 12, 8).tolist() != window
