"""DeepSeek-V4 served by our engine (continuous batching, chunked prefill, paged entries and per-request rings) from a
tiny checkpoint in the released layout: greedy tokens equal transformers' generate, and every way of batching or
chunking the same requests gives the same tokens as the whole-sequence reference (itself equal to transformers' logits,
tests/test_v4_model.py)."""
import json

import pytest
import torch
from tiny_models import save_tiny_v4

from engine import LLM, SamplingParams

NEW_TOKENS = 48
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4") / "tiny-v4"
    return path, save_tiny_v4(path, seed=3)


def prompts() -> list[list[int]]:
    """Lengths that end inside, and exactly at, a 4- and 8-token compression window, and cross the 8-token window."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in (13, 3, 16, 21, 8)]


def engine(path, **options) -> LLM:
    return LLM(model=str(path), **{"dtype": "float32", "kv_cache_gb": 0.02, "kv_block_size": 8,
                                   "enable_prefix_caching": False} | options)


@torch.no_grad()
def test_greedy_tokens_equal_transformers_generate(v4):
    path, hf = v4
    llm = engine(path)
    for prompt, out in zip(prompts(), llm.generate(prompts(), GREEDY, use_tqdm=False)):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected


def test_batching_and_chunking_change_nothing(v4):
    """The same requests one at a time, and all at once in prefill chunks of 5 tokens (requests join while others
    decode): the same tokens every time."""
    path, _ = v4
    alone = engine(path)
    expected = [alone.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts()]
    together = engine(path, max_num_batched_tokens=5)
    assert [o.token_ids for o in together.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    assert [o.token_ids for o in together.generate(prompts(), GREEDY, use_tqdm=False)] == expected


def test_partial_windows_in_a_block_are_fitted(v4):
    """A block size that does not suit V4 is fitted to it: blocks of 12 tokens become 16 (whole windows of its largest
    ratio, 8); the model itself refuses one when asked directly."""
    path, _ = v4
    llm = LLM(model=str(path), dtype="float32", kv_cache_gb=0.02, kv_block_size=12)
    assert (llm.config.kv_block_size, llm.block_manager.block_size, llm.config.enable_prefix_caching) == (16, 16, True)
    assert llm.generate(prompts()[:1], GREEDY, use_tqdm=False)[0].token_ids == \
        engine(path).generate(prompts()[:1], GREEDY, use_tqdm=False)[0].token_ids
    with pytest.raises(ValueError, match="kv_block_size must be a multiple of 8"):
        llm.model_runner.model.set_kv_layout(4, 1, 0)


def shared_prefix_prompts() -> list[list[int]]:
    """A 43-token prefix (5 blocks of 8, crossing windows of 4 and 8 and the 8-token sliding window) with different
    tails, and one that shares only 27 of its tokens."""
    g = torch.Generator().manual_seed(11)
    base = torch.randint(2, 320, (43,), generator=g).tolist()
    tail = lambda n: torch.randint(2, 320, (n,), generator=g).tolist()  # noqa: E731
    return [base + tail(5), base + tail(2), base[:27] + tail(9), base + tail(13)]


@pytest.mark.parametrize("states, chunk", [(0, 1024), (1, 1024), (0, 5)])
def test_prefix_cache_hits_change_no_token(v4, states, chunk):
    """Requests that find their prefix in the cache start from its pages and from the rings saved at its last block's
    end: the same greedy tokens as without a prefix cache, with most of each prompt found. With a single state slot
    (states=1) only the latest block end is kept, most hits are lost, and the tokens are still the same. In prefill
    chunks of 5 tokens (chunk=5) a block end's rows come partly from the ring, partly from the step."""
    path, _ = v4
    first, *rest = shared_prefix_prompts()
    expected = [o.token_ids for o in engine(path).generate([first, *rest], GREEDY, use_tqdm=False)]
    llm = engine(path, enable_prefix_caching=True, prefix_cache_states=states, max_num_batched_tokens=chunk)
    outs = llm.generate([first], GREEDY, use_tqdm=False) + llm.generate(rest, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    cached = [o.num_cached_tokens for o in outs]
    print("cached prompt tokens", cached)
    assert cached[0] == 0
    if not states:
        assert all(c > 0 for c in cached[1:]) and max(cached) >= 40


def test_prefix_cache_through_preemption(v4):
    """A KV cache too small for the four requests at once: the newest are preempted, and readmitted from the prefix
    cache, their own blocks' states included; the same tokens as one request at a time without a cache."""
    path, _ = v4
    prompts = shared_prefix_prompts()
    expected = [engine(path).generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts]
    llm = engine(path, enable_prefix_caching=True, max_num_seqs=4, kv_cache_gb=0.000199)  # 9 blocks of 8 tokens
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert llm.scheduler.num_preemptions > 0 and llm.block_manager.num_hit_tokens > 0


def test_prefix_cache_without_the_saved_rings_goes_wrong(v4, monkeypatch):
    """Negative control: hits whose rings are not restored (states never saved, so the rings start from zeros)
    change the tokens, so the test above would see a restore that went wrong."""
    from engine.models.deepseek_v4.rings import Ring
    path, _ = v4
    first, *rest = shared_prefix_prompts()
    expected = [o.token_ids for o in engine(path).generate(rest, GREEDY, use_tqdm=False)]
    monkeypatch.setattr(Ring, "save", lambda *args: None)
    llm = engine(path, enable_prefix_caching=True)
    llm.generate([first], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in llm.generate(rest, GREEDY, use_tqdm=False)] != expected


def test_kv_budget_counts_every_cache(v4):
    """By hand, in the fp32 cache the CPU path keeps. Per token (paged): a CSA layer's entries 32 / 4 and its
    indexer's keys 16 / 4, the HCA layer's entries 32 / 8: 2 * 12 + 4 = 28 values, 112 B; a block of 8 tokens 896 B.
    Per request, with 3 tokens of rollback (a verify row: the anchor and 2 drafts): every layer's window ring (8 + 3)
    * 32, each CSA compressor's ring of 2 windows (2 * 4 + 3) * 128 and its indexer's (2 * 4 + 3) * 64, the HCA
    compressor's (8 + 3) * 64: 4 * 352 + 2 * (1408 + 704) + 704 = 6336 values, 25344 B; five requests and the scratch
    rings padding rows write to, 6 * 25344 = 152064 B; and a scratch entry per paged cache, 2 * (32 + 16) + 32 = 128
    values, 512 B: 152576 B. The blocks get what is left of 0.02 GiB."""
    path, _ = v4
    llm = engine(path, num_draft_tokens=2, max_num_seqs=5)
    runner = llm.model_runner
    assert runner.model.kv_bytes_per_token(torch.float32) == 112 and runner.kv_bytes_per_block() == 896
    assert runner.kv_fixed_bytes() == 152576
    assert runner.num_blocks == (int(0.02 * 2**30) - 152576) // 896
    assert allocated_bytes(runner.model) == runner.num_blocks * 896 + 152576


def test_kv_budget_counts_the_prefix_cache_states(v4):
    """A saved state holds what a step starting at a block end reads from before it: every layer's last 7 window
    rows 7 * 32, each CSA compressor's previous window 4 * 128 and its indexer's 4 * 64, nothing of the HCA layer's
    (its windows end at the block end): 4 * 224 + 2 * (512 + 256) = 2432 values, 9728 B. Two per request by default."""
    path, _ = v4
    runner = engine(path, num_draft_tokens=2, max_num_seqs=5, enable_prefix_caching=True).model_runner
    assert runner.kv_fixed_bytes() == 152576 + 10 * 9728
    assert allocated_bytes(runner.model) == runner.num_blocks * 896 + 152576 + 10 * 9728


def allocated_bytes(model) -> int:
    attns = [layer.attn for layer in model.layers]
    tensors = ([r.buffer for a in attns for r in a.rings()] + [r.states for a in attns for r in a.rings()] +
               [c.entries for a in attns for c in a.caches()])
    return sum(t.numel() * t.element_size() for t in tensors)


def test_a_separate_draft_is_refused(v4, tmp_path):
    """V4 drafts with the DSpark module of its own checkpoint only (tests/test_v4_dspark.py); this one has none."""
    path, _ = v4
    with pytest.raises(ValueError, match="only with the DSpark module in its own checkpoint"):
        LLM(model=str(path), dtype="float32", spec_method="dspark", draft=str(tmp_path))


def test_the_server_serves_it(v4):
    """The OpenAI server on the tiny V4: a completion over HTTP is the offline engine's greedy answer."""
    import httpx

    from engine.config import EngineConfig
    from server.background import BackgroundServer
    from server.factory import create_app
    path, _ = v4
    prompt = prompts()[0]
    expected = engine(path).generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                     use_tqdm=False)[0].token_ids
    config = EngineConfig(model=str(path), dtype="float32", kv_cache_gb=0.02, kv_block_size=8,
                          enable_prefix_caching=False)
    with BackgroundServer(create_app(config, "tiny-v4")) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
    assert r.json()["choices"][0]["text"] == engine(path).tokenizer.decode(expected)


def test_the_plan_states_what_the_engine_allocates(v4):
    """The plan's 'this engine' line is the bytes the V4 caches really take (bf16): per token, per request (one more
    for the scratch rings) and per prefix-cache state, besides one scratch entry per paged cache (2 * (32 + 16) + 32
    values)."""
    from engine.models.deepseek_v4.config import read_v4_config
    from engine.models.deepseek_v4.model import V4Model
    from engine.models.deepseek_v4.plan import engine_kv_bytes
    path, _ = v4
    model = V4Model(json.loads((path / "config.json").read_text()))
    model.set_kv_layout(8, 3, 5, 7)
    model.allocate_kv_cache(64, torch.bfloat16, torch.device("cpu"))
    per_token, per_request, per_state = engine_kv_bytes(read_v4_config(path), 5)
    assert allocated_bytes(model) == 64 * per_token + 4 * per_request + 7 * per_state + 128 * 2
