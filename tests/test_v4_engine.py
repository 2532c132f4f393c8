"""DeepSeek-V4 served by our engine (continuous batching, chunked prefill, paged caches, prefix caching) from a tiny
checkpoint in the released layout: greedy tokens equal transformers' generate, and every way of batching or chunking
the same requests gives the same tokens as the whole-sequence reference (itself equal to transformers' logits,
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
    return LLM(model=str(path), dtype="float32", kv_cache_gb=0.02, kv_block_size=4, **options)


@torch.no_grad()
def test_greedy_tokens_equal_transformers_generate(v4):
    path, hf = v4
    llm = engine(path)
    for prompt, out in zip(prompts(), llm.generate(prompts(), GREEDY, use_tqdm=False)):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected


def test_batching_chunking_and_the_prefix_cache_change_nothing(v4):
    """The same requests one at a time, all at once, in prefill chunks of 5 tokens, and again with their prompts'
    blocks in the prefix cache: the same tokens every time."""
    path, _ = v4
    alone = engine(path)
    expected = [alone.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts()]
    together = engine(path, max_num_batched_tokens=5)
    assert [o.token_ids for o in together.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    again = together.generate(prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == expected
    assert sum(o.num_cached_tokens for o in again) >= 40, "the second round should start from cached blocks"


def test_kv_budget_counts_every_cache(v4):
    """Per token: each layer's K=V (32) plus each compressor's wkv|wgate (CSA: 2 x 64 and the indexer's 2 x 32; HCA:
    2 x 32), in the fp32 cache the CPU path keeps: (32 + 32+128+64 + 32+64 + 32+128+64) x 4 bytes."""
    path, _ = v4
    llm = engine(path)
    assert llm.model_runner.model.kv_bytes_per_token(torch.float32) == (32 + 224 + 96 + 224) * 4
    assert llm.model_runner.kv_bytes_per_block() == 4 * (32 + 224 + 96 + 224) * 4


def test_speculative_decoding_is_refused_until_its_dspark_module_lands(v4, tmp_path):
    path, _ = v4
    with pytest.raises(ValueError, match="needs its own DSpark module"):
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
    config = EngineConfig(model=str(path), dtype="float32", kv_cache_gb=0.02, kv_block_size=4)
    with BackgroundServer(create_app(config, "tiny-v4")) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
    assert r.json()["choices"][0]["text"] == engine(path).tokenizer.decode(expected)


def test_the_plan_states_what_the_engine_allocates_today(v4):
    """The plan's 'this engine today' line is the bytes the V4 caches really take per token (bf16)."""
    from engine.models.deepseek_v4.config import read_v4_config
    from engine.models.deepseek_v4.model import V4Model
    from engine.models.deepseek_v4.plan import engine_today_per_token
    path, _ = v4
    model = V4Model(json.loads((path / "config.json").read_text()))
    model.allocate_kv_cache(64, torch.bfloat16, torch.device("cpu"))
    caches = [layer.attn.kv_cache for layer in model.layers] + [c.cache for layer in model.layers
                                                                for c in layer.attn.caches()]
    assert sum(t.numel() * t.element_size() for t in caches) == 64 * engine_today_per_token(read_v4_config(path))
