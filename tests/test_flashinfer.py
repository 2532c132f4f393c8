"""The FlashInfer attention backend (kernels/flashinfer_attention.py). In CI flashinfer is absent, so a stand-in written
from FlashInfer's documented contract (tests/fake_flashinfer.py) checks how the engine drives it: page tables,
the HND view of our cache, padding to a CUDA graph's fixed request count, planning once per step. Where a GPU has the
real flashinfer (the Docker image), the same attention is checked against our torch twin on CUDA."""
import inspect
import json
import sys

import fake_flashinfer
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import save_tiny_draft

from engine.config import EngineConfig
from engine.graphs import TargetGraphs
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels import attention as twin
from kernels import flashinfer_attention
from kernels.flashinfer_attention import FlashInferAttention, page_table, paged_view

PAGE = 8


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    return fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper


def test_page_table_by_hand():
    table = page_table([3, 1, 2], [19, 16, 2], [[7, 2, 9, 1], [4, 5], [3]], PAGE, num_requests=5)
    assert table.qo_indptr.tolist() == [0, 3, 4, 6, 6, 6]
    assert table.kv_indptr.tolist() == [0, 3, 5, 6, 6, 6]      # 19 keys: 3 pages, the table's 4th page unused
    assert table.kv_indices.tolist() == [7, 2, 9, 4, 5, 3]
    assert table.last_page_len.tolist() == [3, 8, 2, 0, 0]    # a full last page: 8; padding requests: no keys
    assert table.num_requests == 5 and table.qo_indptr.dtype == torch.int32
    with pytest.raises(ValueError, match="needs 3 pages"):
        page_table([1], [17], [[0, 1]], PAGE)


def test_paged_view_is_the_hnd_layout_of_our_cache():
    cache = torch.arange(2 * 4 * PAGE * 3, dtype=torch.float32).view(2, 4 * PAGE, 3)  # [Hkv, slots, D]
    view = paged_view(cache, PAGE)
    assert view.shape == (4, 2, PAGE, 3) and view.data_ptr() == cache.data_ptr()
    slot = 2 * PAGE + 5
    assert torch.equal(view[2, 1, 5], cache[1, slot])


def ragged_step(device, dtype, q_lens, kv_lens, heads=4, kv_heads=2, dim=16, pages=12, seed=0):
    """Random caches and a ragged batch whose requests own shuffled pages -> (q, k_cache, v_cache, tables)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(kv_heads, pages * PAGE, dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(kv_heads, pages * PAGE, dim, generator=gen).to(device, dtype)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen).to(device, dtype)
    order = torch.randperm(pages, generator=gen).tolist()
    tables, used = [], 0
    for n in kv_lens:
        count = -(-n // PAGE)
        tables.append(order[used:used + count])
        used += count
    return q, k_cache, v_cache, tables


def twin_attention(q, k_cache, v_cache, q_lens, kv_lens, tables, scale):
    """Our torch twin on the same step, keys addressed by slot."""
    width = max(kv_lens)
    kv_slots = [[t[p // PAGE] * PAGE + p % PAGE for p in range(n)] + [0] * (width - n) for t, n in zip(tables, kv_lens)]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return twin.varlen_paged_attention(q.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu(), cu,
                                       torch.tensor(kv_slots), torch.tensor(kv_lens), None, scale)


# prefill (q = kv), chunked prefill, a verify row, decode, a last page that is exactly full, a single key
Q_LENS, KV_LENS = [5, 3, 5, 1, 1, 1], [5, 19, 13, 16, 8, 1]


def attention_error(device, dtype, graph_requests=0, corrupt=False, dim=16):
    q, k_cache, v_cache, tables = ragged_step(device, dtype, Q_LENS, KV_LENS, dim=dim)
    scale = dim ** -0.5
    workspace = torch.empty(flashinfer_attention.WORKSPACE_BYTES if device == "cuda" else 1024, dtype=torch.uint8,
                            device=device)
    attention = FlashInferAttention(device, 4, 2, dim, PAGE, dtype, scale, workspace, graph_requests,
                                    graph_requests * 4)
    table = page_table(Q_LENS, KV_LENS, tables, PAGE, graph_requests)
    if corrupt:  # request 2 loses its newest key: its rows must change
        table.last_page_len[2] -= 1
    attention.plan(table)
    out = attention.run(q, k_cache, v_cache)
    return (out.float().cpu() - twin_attention(q, k_cache, v_cache, Q_LENS, KV_LENS, tables, scale)).abs().max()


def test_wrapper_matches_the_torch_twin_on_a_ragged_step(fake):
    assert attention_error("cpu", torch.float32) < 1e-5
    assert attention_error("cpu", torch.float32, graph_requests=8) < 1e-5  # padded to a graph's 8 requests
    assert attention_error("cpu", torch.float32, corrupt=True) > 1e-2   # the comparison sees a wrong page table


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only swaps the module in
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 30)), min_size=1, max_size=5), st.integers(0, 3),
       st.integers(0, 2**16))
def test_random_ragged_steps_match_the_twin(fake, requests, extra_seats, seed):
    """Any mix of prefill chunks, verify rows and decodes (q new tokens after c cached ones), padded or not."""
    q_lens = [q for q, _ in requests]
    kv_lens = [q + cached for q, cached in requests]
    pages = sum(-(-n // PAGE) for n in kv_lens)
    q, k_cache, v_cache, tables = ragged_step("cpu", torch.float32, q_lens, kv_lens, pages=pages, seed=seed)
    seats = len(requests) + extra_seats if extra_seats else 0
    attention = FlashInferAttention("cpu", 4, 2, 16, PAGE, torch.float32, 0.25, torch.empty(8), seats, pages)
    attention.plan(page_table(q_lens, kv_lens, tables, PAGE, seats))
    out = attention.run(q, k_cache, v_cache)
    assert torch.allclose(out, twin_attention(q, k_cache, v_cache, q_lens, kv_lens, tables, 0.25), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real FlashInfer runs on a GPU")
def test_real_flashinfer_matches_the_torch_twin():
    real_flashinfer()
    for graph_requests in (0, 8):  # a head size FlashInfer is built for
        assert attention_error("cuda", torch.bfloat16, graph_requests, dim=128) < 3e-2


def real_flashinfer():
    """The installed flashinfer package (its Python API imports without a GPU), else skip."""
    if flashinfer_attention.unavailable_reason():
        pytest.skip("flashinfer is not installed (make setup installs its Python API)")
    import flashinfer
    return flashinfer


def test_calls_bind_to_the_installed_flashinfer_api(monkeypatch):
    """Our constructor, plan and run calls fit the real signatures, FlashInfer's own helpers read our page table as
    the right key counts and our cache view as HND pages (no GPU needed for either)."""
    real = real_flashinfer()
    cls, calls = real.BatchPrefillWithPagedKVCacheWrapper, []

    class Recorder:
        def __init__(self, *args, **kwargs):
            calls.append(inspect.signature(cls.__init__).bind(self, *args, **kwargs).arguments)

        def plan(self, *args, **kwargs):
            calls.append(inspect.signature(cls.plan).bind(self, *args, **kwargs).arguments)

        def run(self, *args, **kwargs):
            calls.append(inspect.signature(cls.run).bind(self, *args, **kwargs).arguments)
            return args[0]
    monkeypatch.setattr(real, "BatchPrefillWithPagedKVCacheWrapper", Recorder)
    q, k_cache, v_cache, tables = ragged_step("cpu", torch.bfloat16, Q_LENS, KV_LENS)
    workspace = torch.empty(8, dtype=torch.uint8)
    for graph_requests in (0, 8):
        attention = FlashInferAttention("cpu", 4, 2, 16, PAGE, torch.bfloat16, 0.25, workspace, graph_requests, 32)
        table = page_table(Q_LENS, KV_LENS, tables, PAGE, graph_requests)
        attention.plan(table)
        attention.run(q, k_cache, v_cache)
        assert real.page.get_seq_lens(table.kv_indptr, table.last_page_len, PAGE).tolist() == (
            KV_LENS + [0] * (graph_requests - len(KV_LENS)))
    init, plan, run = calls[3:]
    assert init["kv_layout"] == "HND" and init["use_cuda_graph"] and len(init["qo_indptr_buf"]) == 9
    assert plan["causal"] and plan["sm_scale"] == 0.25 and plan["q_data_type"] == torch.bfloat16
    k_pages, _ = real.utils._unpack_paged_kv_cache(run["paged_kv_cache"], "HND")
    assert k_pages.shape == (12, 2, PAGE, 16)  # [pages, Hkv, page_size, D]


PROMPTS = [[1, 17, 33, 9, 250, 4], [1, 5] * 11, [1, 99]]
SETTINGS = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0.9, seed=11, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0.7, seed=3, ignore_eos=True)]


@pytest.fixture(scope="module")
def draft(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("flashinfer_draft")
    (root / "sps.json").write_text(json.dumps({"step_cost_s": {"1": 1.0, "9": 1.0, "30": 10.0}}))
    return save_tiny_draft(root / "dspark", tiny_llama_dir, block_size=4, mask_token_id=5), root / "sps.json"


def make_llm(target, draft, method: str, graphs: bool = False, **options) -> LLM:
    llm = LLM(model=str(target), dtype="float32", spec_method=method, draft=str(draft[0]) if method != "none" else "",
              sps_profile=str(draft[1]), verify_policy="full", kv_cache_gb=0.02, kv_block_size=PAGE, max_num_seqs=4,
              enforce_eager=not graphs, **options)
    if graphs and llm.model_runner.graphs is None:  # CPU: captured by hand (CUDA graphs need a GPU)
        llm.model_runner.capture_graphs(llm.max_model_len)
    return llm


def generate(target, draft, method: str, graphs: bool = False, **options) -> tuple[list, LLM]:
    llm = make_llm(target, draft, method, graphs, **options)
    return [c.token_ids for c in llm.generate(PROMPTS, SETTINGS, use_tqdm=False)], llm


def count(monkeypatch, name: str, calls: dict):
    real = getattr(fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper, name)

    def counted(self, *args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper, name, counted)


@pytest.mark.parametrize("method", ["none", "dspark"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_flashinfer_path_gives_the_torch_path_tokens(tiny_llama_dir, draft, fake, monkeypatch, method, graphs):
    if graphs and torch.cuda.is_available():
        pytest.skip("the stand-in reads page tables on the host, which a real CUDA graph cannot capture")
    expected, _ = generate(tiny_llama_dir, draft, method, device="cpu", kernels="torch")
    calls = {}
    count(monkeypatch, "plan", calls)
    count(monkeypatch, "run", calls)
    replay = TargetGraphs.run
    monkeypatch.setattr(TargetGraphs, "run", lambda *a, **k: calls.update(replays=calls.get("replays", 0) + 1)
                        or replay(*a, **k))
    got, llm = generate(tiny_llama_dir, draft, method, graphs, kernels="triton", attention="flashinfer")
    runner = llm.model_runner
    assert got == expected
    assert runner.attention == "flashinfer"
    layers = len(runner.model.layers)
    assert calls["plan"] > 5 and calls["run"] >= layers * calls["plan"] - layers  # planned once a step, run per layer
    if graphs:
        assert calls["replays"] > 5 and set(runner.graphs.attention) == set(runner.graphs.tiers)
        assert not hasattr(runner.graphs, "kv_slots")  # no varlen buffers: FlashInfer reads the page tables


@pytest.mark.parametrize("method", ["none", "dspark"])
def test_prefill_chunks_and_prefix_hits_through_flashinfer(tiny_llama_dir, draft, fake, method):
    """Prefill in chunks (fewer queries than keys) and a prompt whose first blocks come from the prefix cache give
    the torch path's tokens."""
    shared = [1] + list(range(7, 7 + 3 * PAGE))  # three full blocks and a bit, in both prompts
    prompts = [shared + [40, 41, 42], shared + [50]]
    tokens = {}
    for path, options in [("torch", {"device": "cpu", "kernels": "torch"}),
                          ("flashinfer", {"kernels": "triton", "attention": "flashinfer"})]:
        llm = make_llm(tiny_llama_dir, draft, method, max_num_batched_tokens=8, **options)  # chunks of <= 8 tokens
        tokens[path] = [llm.generate([p], SETTINGS[1:2], use_tqdm=False)[0].token_ids for p in prompts]
        assert llm.block_manager.num_hit_tokens >= 3 * PAGE  # the second prompt found the shared blocks
    assert tokens["flashinfer"] == tokens["torch"]


def test_tokens_comparison_sees_a_wrong_page_table(tiny_llama_dir, draft, fake, monkeypatch):
    """Negative control: the last page of every request one key short changes the tokens."""
    expected, _ = generate(tiny_llama_dir, draft, "none", device="cpu", kernels="torch")
    real = flashinfer_attention.page_table

    def short(*args, **kwargs):
        table = real(*args, **kwargs)
        table.last_page_len.clamp_(max=PAGE - 1)
        return table
    monkeypatch.setattr(flashinfer_attention, "page_table", short)
    got, _ = generate(tiny_llama_dir, draft, "none", kernels="triton", attention="flashinfer")
    assert got != expected


def test_attention_option_is_checked(tiny_llama_dir, monkeypatch):
    with pytest.raises(ValueError, match="attention must be one of"):
        EngineConfig(model=str(tiny_llama_dir), spec_method="none", attention="flash")
    with pytest.raises(ValueError, match="runs on the Triton path"):
        EngineConfig(model=str(tiny_llama_dir), spec_method="none", kernels="torch", attention="flashinfer")
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # not installed: importing it raises ImportError
    with pytest.raises(ValueError, match="needs FlashInfer"):
        EngineConfig(model=str(tiny_llama_dir), spec_method="none", kernels="triton", attention="flashinfer")
    for kernels, chosen in [("triton", "triton"), ("torch", "torch")]:  # auto without FlashInfer
        llm = LLM(model=str(tiny_llama_dir), dtype="float32", spec_method="none", kv_cache_gb=0.02, kernels=kernels,
                  enforce_eager=True, device="cpu")
        assert llm.model_runner.attention == chosen and llm.model_runner.flashinfer is None


def broken_flashinfer(error: Exception):
    """FlashInfer installed but unable to run (e.g. no CUDA toolkit for its first-use compile)."""
    fake = fake_flashinfer.module()

    class Broken(fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper):
        def plan(self, *args, **kwargs):
            raise error
    fake.BatchPrefillWithPagedKVCacheWrapper = Broken
    return fake


def test_a_flashinfer_that_cannot_run_is_an_error_by_name_and_passed_over_by_auto(tiny_llama_dir, monkeypatch,
                                                                                  caplog):
    def llm(**options):
        return LLM(model=str(tiny_llama_dir), dtype="float32", spec_method="none", kv_cache_gb=0.02, device="cpu",
                   kernels="triton", enforce_eager=True, **options)
    monkeypatch.setitem(sys.modules, "flashinfer", broken_flashinfer(RuntimeError("nvcc not found")))
    with pytest.raises(ValueError, match="cannot run here: RuntimeError: nvcc not found"):
        llm(attention="flashinfer")
    monkeypatch.setattr(flashinfer_attention, "has_kernels_for", lambda *args: True)  # as on a GPU
    with caplog.at_level("WARNING", logger="engine"):
        assert llm().model_runner.attention == "triton"
    assert "cannot run here (RuntimeError: nvcc not found)" in caplog.text
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    assert llm().model_runner.attention == "flashinfer"  # auto takes a FlashInfer that runs

