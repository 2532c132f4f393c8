"""Prefix caching: a request reuses the K/V blocks of a token prefix computed before. Checked against a simulated
cache whose every slot records the token prefix that produced it, against transformers' logits, and, for drafts,
against an engine that caches nothing (the draft's context K/V of a reused block must be there too)."""
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine_parity import recording_llm, reference_logits
from tiny_models import save_tiny_draft, save_tiny_model
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager, slots
from engine.config import EngineConfig
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculator import Speculator

NUM_BLOCKS, BS = 16, 4
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def computed(bm: BlockManager, tokens: list[int], pending_from: int | None = None) -> Sequence:
    """A sequence whose tokens all but the last have K/V (draft context queued from pending_from on), filed."""
    seq = Sequence(tokens, SamplingParams())
    bm.allocate(seq, len(tokens) - 1)
    seq.num_computed_tokens = len(tokens) - 1
    if pending_from is not None:
        seq.pending_context = [(pending_from, None)]
    bm.cache_blocks(seq)
    return seq


def test_match_takes_whole_blocks_of_the_same_prefix_and_leaves_the_last_token():
    bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
    first = computed(bm, list(range(1, 15)))  # 13 computed tokens: blocks 0-2 full
    cases = [(list(range(1, 15)), 12), (list(range(1, 13)), 8),      # 12 tokens: 12 would leave none to compute
             (list(range(1, 10)) + [99] * 6, 8), ([99] + list(range(2, 15)), 0),
             ([5, 6, 7, 8] + list(range(1, 11)), 0)]                 # block 2 of `first` at position 0: no match
    for tokens, hit in cases:
        seq = Sequence(tokens, SamplingParams())
        assert bm.match_prefix(seq) == hit == seq.num_computed_tokens
        assert seq.block_table == first.block_table[:hit // BS]
        bm.count_prefix_lookup(seq)
        bm.free(seq)
    assert bm.num_hit_tokens == 28 and bm.num_queried_tokens == 13 + 11 + 14 + 13 + 13


def test_shared_blocks_are_reference_counted_and_evicted_deepest_first():
    bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
    tokens = list(range(1, 18))  # 16 computed tokens: 4 full blocks
    first = computed(bm, tokens)
    second = Sequence(tokens, SamplingParams())
    assert bm.match_prefix(second) == 16
    bm.free(first)
    assert bm.num_free_blocks == NUM_BLOCKS - 4, "blocks still used by the second request must not be freed"
    bm.free(second)
    assert bm.num_free_blocks == NUM_BLOCKS
    filler = Sequence([0] * 4 * (NUM_BLOCKS - 2), SamplingParams())
    bm.allocate(filler, len(filler))  # takes the 12 never-used blocks, then the cached ones, deepest first
    assert bm.match_prefix(Sequence(tokens, SamplingParams())) == 8


def test_only_blocks_complete_in_the_draft_context_too_are_filed():
    bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
    computed(bm, list(range(1, 15)), pending_from=6)  # draft context from position 6 on is still queued
    assert bm.match_prefix(Sequence(list(range(1, 15)), SamplingParams())) == 4


def test_a_lookup_retried_for_want_of_blocks_is_counted_once():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    sched = Scheduler(EngineConfig(model="unused", max_num_batched_tokens=64), bm)
    bm.free(computed(bm, list(range(1, 15))))  # 3 filed blocks, now free but still cached
    filler = Sequence([0] * 12, SamplingParams())
    bm.allocate(filler, 12)  # leaves only the 3 cached blocks free
    waiting = Sequence(list(range(1, 15)) + [50] * 8, SamplingParams())
    sched.add(waiting)
    assert sched.schedule() == [] and not waiting.block_table and bm.num_free_blocks == 3
    bm.free(filler)
    assert sched.schedule() == [waiting] and waiting.num_computed_tokens == 12
    assert (bm.num_hit_tokens, bm.num_queried_tokens) == (12, 21)


def test_caching_off_matches_nothing():
    bm = BlockManager(NUM_BLOCKS, BS)
    computed(bm, list(range(1, 15)))
    assert bm.match_prefix(Sequence(list(range(1, 15)), SamplingParams())) == 0 and not bm.cached_blocks


PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9, 5, 5, 5, 5], [3] * 12]


@given(st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(0, 2), st.integers(2, 12),
                          st.integers(0, 6)), max_size=60))
@settings(max_examples=150, deadline=None)
def test_scheduler_with_prefix_caching_only_reuses_what_the_same_tokens_computed(operations):
    """Simulated steps write, into each slot, the token prefix whose K/V it would hold; every computed position of
    every running request must then hold its own prefix, whoever computed it. Blocks never leak."""
    bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
    sched = Scheduler(EngineConfig(model="unused", max_num_seqs=3, max_num_batched_tokens=10), bm)
    kv: dict[int, tuple] = {}
    live: list[Sequence] = []
    for op, p, n, k in operations + [("step", 0, 0, 0)] * 300:
        if op == "add":
            seq = Sequence(PREFIXES[p][:n], SamplingParams(max_tokens=1 + k))
            sched.add(seq)
            live.append(seq)
        elif op == "abort" and live:
            sched.abort(live[k % len(live)].request_id)
        else:
            step_writing_prefixes(sched, kv)
        live = [s for s in live if not s.is_finished]
        check_shared_blocks(bm, live)
        for seq in sched.running:
            for pos, slot in enumerate(slots(seq.block_table, BS, 0, seq.num_computed_tokens)):
                assert kv[slot] == tuple(seq.token_ids[:pos + 1]), "a reused slot holds another prefix's K/V"
        if not sched.has_unfinished():
            break
    assert not live and bm.num_free_blocks == NUM_BLOCKS


def step_writing_prefixes(sched: Scheduler, kv: dict):
    for seq in sched.schedule():
        start = seq.num_computed_tokens
        for pos, slot in enumerate(slots(seq.block_table, BS, start, start + seq.num_scheduled_tokens), start):
            kv[slot] = tuple(seq.token_ids[:pos + 1])
        seq.num_computed_tokens += seq.num_scheduled_tokens
        seq.num_scheduled_tokens = 0
        sched.block_manager.cache_blocks(seq)
        if seq.num_computed_tokens == len(seq):
            seq.token_ids.append(5)  # a shared alphabet, so that generated blocks get reused as well
            if seq.num_completion_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")


def check_shared_blocks(bm: BlockManager, seqs: list[Sequence]):
    owners = Counter(b for s in seqs for b in s.block_table)
    assert all(len(set(s.block_table)) == len(s.block_table) for s in seqs)
    for block_id in range(NUM_BLOCKS):
        assert bm.ref_counts[block_id] == owners[block_id], "reference count differs from the owners"
        assert (block_id in bm.free_block_ids) == (owners[block_id] == 0)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), "qwen3")


def test_reused_prefix_gives_transformers_logits(target_dir):
    """A second turn (first prompt + its answer + more) starts from the cached K/V, and every logit it samples from
    equals transformers' on the full sequence."""
    reference = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    llm, recorded = recording_llm(target_dir, kv_cache_gb=0.01, kv_block_size=BS)
    first = list(range(3, 40))
    [out] = llm.generate([first], GREEDY, use_tqdm=False)
    second = first + out.token_ids + [7, 8, 9]
    queried, hit = llm.block_manager.num_queried_tokens, llm.block_manager.num_hit_tokens
    [out2] = llm.generate([second], GREEDY, use_tqdm=False)
    assert llm.block_manager.num_hit_tokens - hit == (len(first) + len(out.token_ids) - 1) // BS * BS
    assert llm.block_manager.num_queried_tokens - queried == len(second) - 1
    assert out2.num_cached_tokens == llm.block_manager.num_hit_tokens - hit
    ref = reference_logits(reference, second + out2.token_ids)
    for pos in range(len(second) - 1, len(second) + len(out2.token_ids) - 1):
        torch.testing.assert_close(recorded[(out2.request_id, pos)], ref[pos], atol=2e-4, rtol=0)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, target_dir):
    return save_tiny_draft(tmp_path_factory.mktemp("draft"), target_dir, block_size=4)


def confidences_over_two_turns(target_dir, draft_dir, **options) -> tuple[LLM, list[list[float]]]:
    """Draft confidences of every round over a first turn and a second one that extends it, with drafting skipped
    on seven of every eight steps (so several blocks of draft context are still queued when a request finishes)."""
    llm = LLM(model=str(target_dir), dtype="float32", spec_method="dspark", draft=str(draft_dir),
              verify_policy="full", kv_cache_gb=0.01, kv_block_size=BS, **options)
    steps = iter(range(10**6))
    llm.speculator.planner.drafters = lambda seqs: seqs if next(steps) % 8 == 0 else []
    records = llm.record_confidences()
    firsts = [list(range(3, 30)), list(range(50, 90))]
    outs = llm.generate(firsts, GREEDY, use_tqdm=False)
    llm.generate([f + o.token_ids + [7, 8] for f, o in zip(firsts, outs)], GREEDY, use_tqdm=False)
    return llm, [r.logits for r in records]


def test_reused_blocks_carry_the_draft_context(target_dir, draft_dir, monkeypatch):
    _, uncached = confidences_over_two_turns(target_dir, draft_dir, enable_prefix_caching=False)
    llm, cached = confidences_over_two_turns(target_dir, draft_dir)
    assert llm.block_manager.num_hit_tokens > 80
    assert len(cached) == len(uncached)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(uncached), atol=1e-5, rtol=0)
    # negative control: filing blocks whose draft context was still queued reuses garbage draft K/V
    monkeypatch.setattr(Sequence, "num_complete_tokens", property(lambda s: s.num_computed_tokens))
    monkeypatch.setattr(Speculator, "finish", lambda self, seq: None)
    _, naive = confidences_over_two_turns(target_dir, draft_dir)
    assert len(naive) == len(uncached) and not torch.allclose(torch.tensor(naive), torch.tensor(uncached), atol=1e-3)


def test_prefix_caching_flag_is_checked():
    with pytest.raises(TypeError, match="enable_prefix_caching"):
        EngineConfig(model="unused", enable_prefix_caching="yes")


def test_prefix_cache_benchmark_serves_the_second_turn_from_the_cache(tmp_path):
    from argparse import Namespace

    from test_server import CHAT_TEMPLATE

    from bench import prefix_cache
    model = save_tiny_model(tmp_path / "chat", "llama")
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    args = Namespace(model=str(model), dtype="float32", num_threads=1, num_prompts=2, max_tokens=6, dataset="sharegpt",
                     seed=0)
    result = prefix_cache.run(args)
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert 0 < row["turn2_cached_tokens"] < row["turn2_prompt_tokens"] and row["turn2_cached_tokens"] % 16 == 0
        assert row["same_answers"] and row["turn2_ttft_on_s"] > 0 and row["turn2_ttft_off_s"] > 0
    prefix_cache.report(result, tmp_path)
    assert (tmp_path / "prefix_cache.json").is_file() and (tmp_path / "prefix_cache.png").stat().st_size > 0
