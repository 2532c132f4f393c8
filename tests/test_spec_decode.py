"""Speculative decoding in the engine: greedy output is token-identical to plain greedy decoding whatever the drafter,
policy, batch mix and preemption; stop conditions cut an accepted block exactly; counters are consistent."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
from tiny_models import save_tiny_draft, save_tiny_model

from engine import LLM, SamplingParams
from engine.drafts.dspark import Proposal
from engine.speculator import verify_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), "qwen3")


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, target_dir):
    root = tmp_path_factory.mktemp("drafts")
    drafts = {"dspark": save_tiny_draft(root / "dspark", target_dir, block_size=5),
              "dspark-rnn": save_tiny_draft(root / "rnn", target_dir, head_type="rnn", block_size=5),
              "dflash": save_tiny_draft(root / "dflash", target_dir, rank=0, confidence=False, block_size=5)}
    ids = json.dumps({"token_ids": random.Random(1).sample(range(320), 150)})  # FR-Spec: 150 of 320 tokens
    for name in ("dspark", "dflash"):
        drafts[f"{name}-vocab"] = save_tiny_draft(root / f"{name}-vocab", target_dir, block_size=5,
                                                  **({"rank": 0, "confidence": False} if name == "dflash" else {}))
        (drafts[f"{name}-vocab"] / "draft_vocab.json").write_text(ids)
    return drafts


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(2, 300) for _ in range(rng.randrange(2, 60))] for _ in range(6)]


@pytest.fixture(scope="module")
def plain_outputs(target_dir, prompts):
    llm = LLM(model=str(target_dir), dtype="float32", kv_cache_gb=0.01)
    return [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def spec_llm(target_dir, draft_dir, method="dspark", **options) -> LLM:
    options = {"kv_cache_gb": 0.01, **options}
    return LLM(model=str(target_dir), dtype="float32", spec_method=method, draft=str(draft_dir), **options)


def oracle_drafter(llm: LLM, continuations: dict[tuple, list[int]], error_rate: float, seed: int = 0):
    """Replace the draft with one that proposes the true greedy continuation, corrupting each token with
    probability error_rate (one-hot q), so that blocks are accepted in part, in full, or not at all."""
    rng = random.Random(seed)
    drafter = llm.model_runner.drafter
    vocab = drafter.vocab_size

    def propose(seqs, num_tokens=None):
        for seq in seqs:
            truth = continuations[tuple(seq.token_ids[:seq.num_prompt_tokens])]
            done = seq.num_completion_tokens
            tokens = [(truth[i] if i < len(truth) and rng.random() > error_rate else rng.randrange(vocab))
                      for i in range(done, done + (num_tokens or drafter.num_draft_tokens))]
            seq.proposal = Proposal(tokens, torch.eye(vocab)[tokens], None)
    drafter.propose = propose


@pytest.mark.parametrize("method", ["dspark", "dspark-rnn", "dflash", "dspark-vocab", "dflash-vocab"])
@pytest.mark.parametrize("policy", ["full", "fixed:2"])
def test_random_drafts_greedy_identical(target_dir, drafts, prompts, plain_outputs, method, policy):
    llm = spec_llm(target_dir, drafts[method], method.split("-")[0] if "dflash" in method else "dspark",
                   verify_policy=policy)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == plain_outputs
    assert llm.spec_stats.num_drafts > 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("error_rate", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("gamma,policy", [(5, "full"), (3, "full"), (5, "fixed:1"), (5, "fixed:0")])
def test_oracle_and_bad_drafters_with_preemption(target_dir, drafts, prompts, plain_outputs, error_rate, gamma,
                                                 policy):
    block_bytes = 4 * 2 * 2 * 32 * 4 * (3 + 2)  # 4 tokens x K,V x 2 KV heads x head_dim 32 x fp32 x (3 + 2 layers)
    llm = spec_llm(target_dir, drafts["dspark"], num_draft_tokens=gamma, verify_policy=policy, kv_block_size=4,
                   max_num_batched_tokens=24, kv_cache_gb=40 * block_bytes / 2**30)
    assert llm.block_manager.num_blocks == 40, "target and draft KV share one budget"
    oracle_drafter(llm, {tuple(p): o for p, o in zip(prompts, plain_outputs)}, error_rate)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == plain_outputs
    assert llm.scheduler.num_preemptions > 0, "the KV budget should force preemption"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    stats = llm.spec_stats
    k = {"full": gamma, "fixed:1": 1, "fixed:0": 0}[policy]
    if error_rate == 0.0 and k:
        # every verified draft is right; only the last round of a request (capped by max_tokens) verifies fewer
        assert stats.num_accepted_tokens == stats.num_verified_tokens
        assert stats.mean_acceptance_length > 1 + 0.8 * k
    if error_rate == 1.0:
        assert stats.num_accepted_tokens < 0.1 * stats.num_verified_tokens + 1


def test_stop_inside_accepted_block(target_dir, drafts, prompts, plain_outputs):
    llm = spec_llm(target_dir, drafts["dspark"])
    oracle_drafter(llm, {tuple(p): o for p, o in zip(prompts, plain_outputs)}, 0.0)
    prompt, truth = prompts[0], plain_outputs[0]
    stop_at = 7  # the 8th token is a stop token: it must end the output even in the middle of an accepted block
    params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[truth[stop_at]], ignore_eos=True)
    [out] = llm.generate([prompt], params, use_tqdm=False)
    first = truth.index(truth[stop_at])
    assert out.token_ids == truth[:first + 1] and out.finish_reason == "stop"
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), use_tqdm=False)
    assert out.token_ids == truth[:9] and out.finish_reason == "length"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_counters_consistent(target_dir, drafts, prompts):
    llm = spec_llm(target_dir, drafts["dspark"])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True) for i in range(len(prompts))]
    llm.generate(prompts, params, use_tqdm=False)
    s = llm.spec_stats
    assert 0 < s.num_accepted_tokens <= s.num_verified_tokens <= s.num_draft_tokens
    assert 4 * s.num_drafts < s.num_draft_tokens <= 5 * s.num_drafts  # fewer only near max_tokens (no room)
    assert s.mean_acceptance_length >= 1
    assert all(a >= b for a, b in zip(s.accepted_per_pos, s.accepted_per_pos[1:]))
    assert all(a <= v for a, v in zip(s.accepted_per_pos, s.verified_per_pos))
    assert sum(s.accepted_per_pos) == s.num_accepted_tokens
    assert all(0 <= c <= 1 for c in s.conditional_acceptance)
    engine = llm.stats()
    assert engine.spec.as_dict() == s.as_dict() and engine.num_running == engine.num_waiting == 0


def test_final_outputs_carry_each_requests_verified_and_accepted_counts(target_dir, drafts, prompts):
    """The last RequestOutput of a request counts its own drafts; over all requests they add up to the engine's."""
    llm = spec_llm(target_dir, drafts["dspark"])
    for i, prompt in enumerate(prompts):
        llm.add_request(prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=20, ignore_eos=True))
    finals = []
    while llm.has_unfinished():
        finals += [out for out in llm.step() if out.finished]
    assert len(finals) == len(prompts)
    assert sum(o.num_verified_tokens for o in finals) == llm.spec_stats.num_verified_tokens > 0
    assert sum(o.num_accepted_tokens for o in finals) == llm.spec_stats.num_accepted_tokens
    assert all(o.num_accepted_tokens <= o.num_verified_tokens for o in finals)


def test_seeded_sampling_reproducible(target_dir, drafts, prompts):
    params = [SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=20) for i in range(len(prompts))]
    runs = [[o.token_ids for o in spec_llm(target_dir, drafts["dspark"]).generate(prompts, params, use_tqdm=False)]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_config_errors(target_dir, drafts):
    with pytest.raises(ValueError, match="needs a draft"):
        LLM(model=str(target_dir), spec_method="dspark")
    with pytest.raises(ValueError, match="spec_method"):
        LLM(model=str(target_dir), spec_method="eagle", draft=str(drafts["dspark"]))
    with pytest.raises(ValueError, match="verify_policy"):
        spec_llm(target_dir, drafts["dspark"], verify_policy="fixed:x")
    with pytest.raises(ValueError, match="block_size"):
        spec_llm(target_dir, drafts["dspark"], num_draft_tokens=9)
    with pytest.raises(ValueError, match="DFlash"):
        spec_llm(target_dir, drafts["dflash"], "dspark")


def test_draft_vocab_size_chooses_among_the_drafts_token_list(target_dir, drafts, tmp_path):
    ids = json.loads((drafts["dspark-vocab"] / "draft_vocab.json").read_text())["token_ids"]

    def draft_of(**options):
        return spec_llm(target_dir, drafts["dspark-vocab"], **options).model_runner.drafter.draft
    assert draft_of().vocab_ids.tolist() == ids
    assert draft_of(draft_vocab_size=40).vocab_ids.tolist() == ids[:40]  # the 40 most frequent: the file's head
    assert draft_of(draft_vocab_size=-1).vocab_ids is None
    assert spec_llm(target_dir, drafts["dspark"]).model_runner.drafter.draft.vocab_ids is None
    with pytest.raises(ValueError, match="draft_vocab_size must be >= -1"):
        spec_llm(target_dir, drafts["dspark-vocab"], draft_vocab_size=-2)
    with pytest.raises(ValueError, match="exceeds the 150 token ids"):
        spec_llm(target_dir, drafts["dspark-vocab"], draft_vocab_size=151)
    with pytest.raises(ValueError, match="needs the draft's token list"):
        spec_llm(target_dir, drafts["dspark"], draft_vocab_size=10)
    bad = save_tiny_draft(tmp_path / "bad", target_dir, block_size=5)
    for token_ids in ([3, 3], [5, 320], [], "12"):
        (bad / "draft_vocab.json").write_text(json.dumps({"token_ids": token_ids}))
        with pytest.raises(ValueError, match="distinct token ids in"):
            spec_llm(target_dir, bad)


def test_fixed_k_drafts_only_the_positions_it_can_verify(target_dir, drafts, prompts, plain_outputs):
    """fixed:2 under a gamma-5 draft: the sequential head, LM head and sampling run for 2 positions only, and greedy
    output is still plain greedy's. Near max_tokens the block shrinks to the room left."""
    llm = spec_llm(target_dir, drafts["dspark-vocab"], verify_policy="fixed:2")
    drafted = []
    real = llm.model_runner.drafter.draft.draft_block
    llm.model_runner.drafter.draft.draft_block = lambda *a, **k: drafted.append(a[4]) or real(*a, **k)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == plain_outputs
    assert set(drafted) == {1, 2} and drafted.count(2) > 10 * drafted.count(1)
    assert llm.spec_stats.num_draft_tokens <= 2 * llm.spec_stats.num_drafts


def test_greedy_verification_shortcut_equals_rejection_sampling(target_dir, drafts):
    """All-greedy steps compare drafts with the target's argmax instead of rejection sampling one-hot distributions:
    the same (accepted, next token) on every case, including ties in the target's logits and a draft vocabulary."""
    speculator = spec_llm(target_dir, drafts["dspark-vocab"]).speculator
    ids = speculator.drafter.draft.vocab_ids
    g = torch.Generator().manual_seed(0)
    seqs, logits = [], []
    for case in range(40):
        n = case % 6
        rows = torch.randn(n + 1, 320, generator=g).round()  # rounding makes ties in the argmax common
        rows[:, ids[:3]] += 3.0  # the argmax is usually a token the draft may propose
        best = rows.argmax(-1)
        drafts_ = [int(best[i]) if torch.rand(1, generator=g) < 0.7 else int(ids[i]) for i in range(n)]
        columns = [int((ids == t).nonzero()[0]) if (ids == t).any() else 0 for t in drafts_]
        proposal = Proposal(drafts_, torch.eye(len(ids))[columns], None)
        seqs.append(SimpleNamespace(spec_token_ids=drafts_, params=SamplingParams(temperature=0), proposal=proposal,
                                    generator=torch.Generator().manual_seed(case)))
        logits.append(rows)
    fast, slow = verify_greedy(seqs, logits), speculator.verify_by_rejection(seqs, logits)
    assert fast == slow
    assert {a for a, _ in fast} >= {0, 1, 2} and any(a == len(s.spec_token_ids) > 0 for (a, _), s in zip(fast, seqs))
