"""DeepSeek-V4 over two ranks (gloo, CPU, fp32): tensor parallel (heads by output group, every routed expert split) and
expert parallel (four whole experts per rank) give transformers' greedy tokens on the tiny V4, and with its
in-checkpoint DSpark module the tokens, verify counts and confidences of one process, greedy and seeded at T > 0.
How each rank's share is cut is checked by hand on a model built on the meta device."""


import pytest
import torch
from test_parallel import local_ranks, restore_threads  # noqa: F401 (restore_threads: autouse here too)
from tiny_models import save_tiny_model, save_tiny_v4, save_tiny_v4_dspark

from engine import LLM, SamplingParams, distributed
from engine.config import EngineConfig
from engine.distributed import ParallelState
from engine.models.deepseek_v4.model import V4Model
from engine.models.deepseek_v4.moe import ElsewhereExpert
from engine.models.layers import ParallelEmbedding, ParallelLMHead, ReducedLinear
from engine.parallel import shard_state, whole_shapes

NEW_TOKENS = 20
MODES = {"tp": {}, "ep": {"expert_parallel": True}}


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-v4") / "tiny-v4"
    return path, save_tiny_v4(path, seed=3)


@pytest.fixture(scope="module")
def v4_dspark(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-v4d") / "tiny-v4-dspark"
    save_tiny_v4_dspark(path, seed=3, vocab_size=8, block_size=4)
    return path


def prompts(vocab: int) -> list[list[int]]:
    """Lengths inside and past the 4- and 8-token compression windows and the 8-token sliding window."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (13, 3, 16, 21)]


def v4_llm(path, tp: int, **options) -> LLM:
    return LLM(model=str(path), dtype="float32", device="cpu", kv_cache_gb=0.02, kv_block_size=8, num_threads=1,
               tensor_parallel_size=tp, tensor_parallel_timeout=30.0,
               **{"spec_method": "none", "enable_prefix_caching": False} | options)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_equal_transformers(v4, mode):
    """Twice, with the prefix cache on: the second time each prompt's full blocks are found in the cache and every
    rank restores its rings from the states saved at the hit's block end."""
    path, hf = v4
    llm = v4_llm(path, 2, enable_prefix_caching=True, **MODES[mode])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        outs = llm.generate(prompts(320), params, use_tqdm=False)
        again = llm.generate(prompts(320), params, use_tqdm=False)
    finally:
        llm.close()
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert [o.num_cached_tokens for o in again] == [8, 0, 8, 16]
    for prompt, out in zip(prompts(320), outs):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected


@pytest.mark.parametrize("mode", MODES)
def test_dspark_module_matches_one_process(v4_dspark, mode):
    """Greedy and T = 0.9: the same tokens, verify counts and confidence logits as one process."""
    for temperature in (0.0, 0.9):
        params = [SamplingParams(temperature=temperature, max_tokens=NEW_TOKENS, ignore_eos=True, seed=s)
                  for s in range(4)]
        results = {}
        for tp in (1, 2):
            llm = v4_llm(v4_dspark, tp, spec_method="dspark", verify_policy="full", **(MODES[mode] if tp > 1 else {}))
            records = llm.record_confidences()
            try:
                results[tp] = [o.token_ids for o in llm.generate(prompts(8), params, use_tqdm=False)], llm.spec_stats
            finally:
                llm.close()
            results[tp] += ([(r.drafted, r.verified, r.accepted) for r in records],
                            torch.tensor([x for r in records for x in r.logits]))
        (tokens1, stats1, rounds1, logits1), (tokens2, stats2, rounds2, logits2) = results[1], results[2]
        assert tokens2 == tokens1 and stats2 == stats1 and rounds2 == rounds1
        assert stats1.num_accepted_tokens > 0
        torch.testing.assert_close(logits2, logits1, atol=5e-3, rtol=1e-3)


@pytest.fixture
def rank1_of_2(monkeypatch):
    def as_rank(expert_parallel: bool):
        monkeypatch.setattr(distributed, "_STATE", ParallelState(1, 2, expert_parallel=expert_parallel))
    return as_rank


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_rank_shares_by_hand(v4, rank1_of_2, expert_parallel):
    """The tiny V4 (4 heads of 32 dims, 2 output groups of rank 16, 8 experts of 32 columns) as rank 1
    of 2 holds: output group 1 and its heads 2..3; the shared expert's columns 16..31; experts 4..7 whole (expert
    parallel) or every expert's columns 16..31; vocabulary rows 160..319."""
    path, _ = v4
    import json
    config = json.loads((path / "config.json").read_text())
    rank1_of_2(expert_parallel)
    with torch.device("meta"):
        model = V4Model(config)
    whole = whole_shapes(lambda: V4Model(config))
    attn, ffn = model.layers[1].attn, model.layers[1].ffn
    assert (attn.heads, attn.groups) == (2, 1) and isinstance(attn.wo_b, ReducedLinear)
    assert isinstance(model.embed, ParallelEmbedding) and isinstance(model.head, ParallelLMHead)
    state = {name: torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
             for name, shape in whole.items()}
    full = dict(state)
    cut = shard_state(state, model)
    assert set(cut) == set(model.state_dict())
    assert all(cut[n].shape == t.shape for n, t in model.state_dict().items())
    p = "layers.1.attn."
    assert torch.equal(cut[p + "wq_b.weight"], full[p + "wq_b.weight"][64:128])  # heads 2, 3 of 32 dims
    assert torch.equal(cut[p + "attn_sink"], full[p + "attn_sink"][2:4])
    assert torch.equal(cut[p + "wo_a.weight"], full[p + "wo_a.weight"][16:32])
    assert torch.equal(cut[p + "wo_b.weight"], full[p + "wo_b.weight"][:, 16:32])
    assert torch.equal(cut[p + "wkv.weight"], full[p + "wkv.weight"])  # the one K=V head: whole
    f = "layers.1.ffn."
    assert torch.equal(cut[f + "shared_experts.w2.weight"], full[f + "shared_experts.w2.weight"][:, 16:32])
    if expert_parallel:
        assert list(ffn.held) == [4, 5, 6, 7] and isinstance(ffn.experts[0], ElsewhereExpert)
        assert f + "experts.0.w1.weight" not in cut
        assert torch.equal(cut[f + "experts.5.w1.weight"], full[f + "experts.5.w1.weight"])
    else:
        assert list(ffn.held) == list(range(8))
        assert torch.equal(cut[f + "experts.0.w1.weight"], full[f + "experts.0.w1.weight"][16:32])
        assert torch.equal(cut[f + "experts.0.w2.weight"], full[f + "experts.0.w2.weight"][:, 16:32])
    assert torch.equal(cut["embed.weight"], full["embed.weight"][160:320])


def test_more_ranks_than_output_groups_is_refused(v4, monkeypatch):
    path, _ = v4
    import json
    config = json.loads((path / "config.json").read_text())
    monkeypatch.setattr(distributed, "_STATE", ParallelState(0, 4))
    with pytest.raises(ValueError, match="tensor_parallel_size 4 exceeds this DeepSeek-V4's 2 output groups"):
        with torch.device("meta"):
            V4Model(config)


def test_expert_parallel_needs_ranks_and_experts(v4, tmp_path):
    path, _ = v4
    with pytest.raises(ValueError, match="expert_parallel .* needs tensor_parallel_size > 1"):
        EngineConfig(model=str(path), device="cpu", expert_parallel=True)
    dense = tmp_path / "llama"
    save_tiny_model(dense, "llama")
    with pytest.raises(ValueError, match="expert_parallel shards DeepSeek-V4's routed experts; LlamaForCausalLM has"):
        v4_llm(dense, 2, expert_parallel=True)
    assert local_ranks() == []
