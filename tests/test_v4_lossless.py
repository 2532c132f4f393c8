"""Speculative sampling through DeepSeek-V4 and its in-checkpoint DSpark module is lossless: the seeded statistical
test of tests/test_spec_lossless.py (its exact oracle and statistics, imported) on the tiny V4-Flash-DSpark-like
checkpoint with an 8-token vocabulary. Thousands of seeded requests of 4 tokens are decoded with the module drafting
3 tokens a round; the joint distribution of (x2, x3, x4) must match the one enumerated with transformers' own
DeepseekV4ForCausalLM from the same directory, and the same statistics must reject a biased verifier (negative
control)."""
import pytest
from test_spec_lossless import (  # noqa: F401 (one_thread: its module-wide single thread, autouse here too)
    CASES,
    PROMPT,
    accept_everything,
    exact_joint,
    gof,
    one_thread,
    sample_counts,
)
from tiny_models import save_tiny_v4_dspark

import engine.speculator
from engine import LLM

VOCAB = 8
NUM_SAMPLES = 2000
NUM_CONTROL_SAMPLES = 800


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4l") / "tiny-v4-dspark"
    hf = save_tiny_v4_dspark(path, seed=3, vocab_size=VOCAB, block_size=4)
    llm = LLM(model=str(path), dtype="float32", spec_method="dspark", verify_policy="full", kv_cache_gb=0.5,
              kv_block_size=8, enable_prefix_caching=False, max_num_seqs=NUM_SAMPLES, max_num_batched_tokens=100_000)
    return llm, hf.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_matches_the_target(v4, case):
    llm, hf = v4
    params = CASES[case]
    joint = exact_joint(hf, PROMPT, **params)
    counts, spec = sample_counts(llm, params, seed_base=2_000_000 * (1 + list(CASES).index(case)), n=NUM_SAMPLES)
    stats = gof(counts, joint)
    print(f"\nV4 DSpark/{case}: {stats} spec={spec}")
    assert spec["num_accepted_tokens"] > 0.05 * spec["num_verified_tokens"]
    assert spec["num_accepted_tokens"] < 0.95 * spec["num_verified_tokens"]
    assert stats["off_support"] == 0 and stats["dof"] >= 15
    assert stats["p"] > 1e-3, stats
    assert stats["tv"] < stats["tv_bound"], stats


def test_negative_control_a_biased_verifier_is_rejected(v4, monkeypatch):
    llm, hf = v4
    params = CASES["t1"]
    joint = exact_joint(hf, PROMPT, **params)
    monkeypatch.setattr(engine.speculator, "rejection_sample", accept_everything)
    counts, spec = sample_counts(llm, params, seed_base=2_000_000, n=NUM_CONTROL_SAMPLES)
    stats = gof(counts, joint)
    print(f"\nV4 DSpark, accept everything: {stats} spec={spec}")
    assert spec["num_verified_tokens"] > 0
    assert stats["p"] < 1e-6, stats
