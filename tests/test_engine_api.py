"""Offline API behaviour: seeds, sampling defaults, stop conditions, streaming, abort."""
import json
import shutil

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.01, kv_block_size=4)


PROMPT = [5, 6, 7, 8, 9]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], params, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    batched = llm.generate([[9, 9], PROMPT, [3] * 20, [4]], [others[0], params, *others[1:]], use_tqdm=False)
    assert batched[1].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPT], other_seed, use_tqdm=False)[0].token_ids != alone


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate([PROMPT], SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert top1[0].token_ids == greedy[0].token_ids


def test_stop_string_truncates_exactly(llm):
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    stop = free.text[len(free.text) // 2:][:3]
    assert len(stop) == 3 and stop in free.text
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert out.text == free.text[:free.text.index(stop)] and out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(free.token_ids)


def test_stop_token_and_max_tokens(llm):
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop_id = free.token_ids[5]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1] and out.finish_reason == "stop"


def test_stream_yields_the_same_as_generate_and_abort_frees_blocks(llm):
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    full = llm.generate([PROMPT], params, use_tqdm=False)[0]
    deltas = list(llm.stream(PROMPT, params))
    assert "".join(d.delta_text for d in deltas) == full.text
    assert [t for d in deltas for t in d.delta_token_ids] == full.token_ids and deltas[-1].finished
    stream = llm.stream(PROMPT, params)
    next(stream)
    assert llm.block_manager.num_free_blocks < llm.block_manager.num_blocks
    stream.close()  # the client went away: the request is aborted and its KV freed at once
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks and not llm.has_unfinished()


def test_abort_waiting_and_running(llm):
    a = llm.add_request(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    b = llm.add_request(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    llm.step()
    assert llm.abort(a) and llm.abort(b) and not llm.abort("no-such-request")
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks and not llm.has_unfinished()


def test_the_default_model_speculates_with_its_draft_and_the_lagged_planner(tmp_path):
    from engine.config import DEFAULT_DRAFT, DEFAULT_MODEL_VERIFY_POLICY, EngineConfig
    default = EngineConfig()
    assert (default.spec_method, default.draft) == ("dspark", str(DEFAULT_DRAFT))
    assert default.verify_policy == DEFAULT_MODEL_VERIFY_POLICY == "sps-lagged"
    assert EngineConfig(verify_policy="full").verify_policy == "full"  # a chosen policy stays
    plain = EngineConfig(spec_method="none")
    assert (plain.spec_method, plain.draft, plain.verify_policy) == ("none", "", "full")
    # a draft given explicitly, or another model: the safe default, every position verified
    assert EngineConfig(draft=str(DEFAULT_DRAFT)).verify_policy == "full"
    assert EngineConfig(model=str(tmp_path)).spec_method == "none"
    assert EngineConfig(dtype="float32").spec_method == "none"  # measured to pay in bf16 only


def sampled(llm: LLM, n: int = 3) -> list[list[int]]:
    """Unseeded sampled answers of n copies of PROMPT."""
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    return [c.token_ids for c in llm.generate([PROMPT] * n, params, use_tqdm=False)]


def test_engine_seed_makes_unseeded_requests_reproducible(tiny_llama_dir):
    """The engine's seed seeds each request that has none (vLLM's --seed): the same seed, the same answers; each
    request its own stream (the copies differ); another seed, other answers; -1, fresh entropy every run."""
    options = {"model": str(tiny_llama_dir), "dtype": "float32", "kv_cache_gb": 0.01, "kv_block_size": 4}
    first, again = sampled(LLM(seed=7, **options)), sampled(LLM(seed=7, **options))
    assert first == again and len({tuple(t) for t in first}) == 3
    assert sampled(LLM(seed=8, **options)) != first
    assert sampled(LLM(seed=-1, **options)) != sampled(LLM(seed=-1, **options))


def test_requests_without_params_take_the_models_generation_config(tiny_llama_dir, tmp_path):
    """generate() with no SamplingParams samples as the model's generation_config.json says (here greedily); the
    negative control, the same model without those fields, samples at OpenAI's temperature 1.0."""
    greedy = SamplingParams(temperature=0)  # and the other defaults, as generate() without params
    plain = LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.01)
    assert "temperature" not in plain.sampling_defaults
    expected = plain.generate([PROMPT], greedy, use_tqdm=False)[0].token_ids
    assert [c.token_ids for c in plain.generate([PROMPT] * 4, use_tqdm=False)] != [expected] * 4
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = model / "generation_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"temperature": 0.0, "top_k": 5}))
    llm = LLM(model=str(model), dtype="float32", kv_cache_gb=0.01)
    assert llm.sampling_defaults == {"temperature": 0.0, "top_k": 5}
    assert [c.token_ids for c in llm.generate([PROMPT] * 4, use_tqdm=False)] == [expected] * 4
    assert llm.default_sampling_params(temperature=0.5).temperature == 0.5
