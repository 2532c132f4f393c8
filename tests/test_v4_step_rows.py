"""DeepSeek-V4's fixed-shape decode / verify step (engine/models/deepseek_v4/step_rows.py), its sync-free grouped MoE
and its CUDA graphs. Decode and verify steps take the fixed-shape path and give transformers' tokens (a negative
control breaks the rings' writes); the row map of a padded batch by hand; the grouped MoE against each token's experts
summed by hand, with the experts of another rank left out; and graph replays (on CPU: the captured step re-run on the
static buffers, under Triton's interpreter) give the eager tokens, target and DSpark module alike."""
import json

import pytest
import torch
from tiny_models import save_tiny_v4, save_tiny_v4_dspark

from engine import LLM, SamplingParams, graphs
from engine.cost_model import measure_curve
from engine.graphs import DraftGraphs, TargetGraphs
from engine.models.deepseek_v4.config import v4_config
from engine.models.deepseek_v4.model import V4Model
from engine.models.deepseek_v4.moe import MoE
from engine.models.deepseek_v4.rings import Ring
from engine.models.deepseek_v4.step_rows import step_rows

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4rows") / "tiny-v4"
    return path, save_tiny_v4(path, seed=3)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in (13, 3, 21)]


def engine(path, **options) -> LLM:
    return LLM(model=str(path), **{"dtype": "float32", "kv_cache_gb": 0.02, "kv_block_size": 8,
                                   "enable_prefix_caching": False, "max_num_seqs": 4} | options)


def transformers_tokens(hf, prompt: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def test_decode_steps_run_in_fixed_shapes(v4, monkeypatch):
    path, hf = v4
    calls = []
    real = V4Model.forward_rows
    monkeypatch.setattr(V4Model, "forward_rows", lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    outs = engine(path).generate(prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [transformers_tokens(hf, p) for p in prompts()]
    assert len(calls) >= GREEDY.max_tokens - 1 and 3 in calls  # the three requests' decode rows in one step


@torch.no_grad()
def test_fixed_shapes_without_ring_writes_go_wrong(v4, monkeypatch):
    """Negative control: a fixed-shape step whose rings keep nothing changes the tokens."""
    path, hf = v4
    monkeypatch.setattr(Ring, "put", lambda *args: None)
    outs = engine(path).generate(prompts(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] != [transformers_tokens(hf, p) for p in prompts()]


def test_rows_of_a_padded_batch_by_hand():
    """Sequences of 2, 3 and 0 rows (a padding request), then 2 padding rows: each row's sequence, ring and page."""
    cu = torch.tensor([0, 2, 5, 5], dtype=torch.int32)
    kv_slots = torch.arange(3 * 16).view(3, 16)
    rows = step_rows(cu, kv_slots, torch.tensor([6, 1, 4]), scratch=9, num_rows=7)
    assert rows.seq.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert rows.valid.tolist() == [True] * 5 + [False] * 2
    assert rows.ring_row.tolist() == [6, 6, 1, 1, 1, 9, 9]
    assert rows.pages(4)[2].tolist() == [16 // 4, 20 // 4, 24 // 4, 28 // 4]


def hand_moe(moe: MoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, held: range) -> torch.Tensor:
    """Each token's chosen experts, computed one by one from their weights: w2(silu(clamp(w1 x)) * clamp(w3 x))."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in held:
                expert = moe.experts[e]
                gate = (expert.w1.weight @ x[t]).clamp(max=expert.limit)
                up = (expert.w3.weight @ x[t]).clamp(min=-expert.limit, max=expert.limit)
                out[t] += weights[t, k] * (expert.w2.weight @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("held", [None, range(2, 6)], ids=["all", "experts-2-5"])
@torch.inference_mode()
def test_grouped_moe_equals_experts_by_hand(v4, held):
    path, _ = v4
    config = v4_config(json.loads((path / "config.json").read_text()))
    torch.manual_seed(0)
    moe = MoE(config, config.num_hash_layers)  # a routed (not hashed) layer
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.requires_grad_(False)
    if held is not None:  # expert parallelism: this rank holds experts 2..5 only
        moe.held = held
    x = torch.randn(29, config.hidden_size)
    ids, weights = moe.gate(x, torch.zeros(29, dtype=torch.long))
    assert moe.stack()
    expected = hand_moe(moe, x, ids, weights, moe.held)
    torch.testing.assert_close(moe.grouped(x, ids, weights), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.every_expert(x, ids, weights), expected, atol=1e-5, rtol=1e-5)
    wrong = hand_moe(moe, x, ids.roll(1, 0), weights, moe.held)  # negative control: other tokens' experts
    assert (moe.grouped(x, ids, weights) - wrong).abs().max() > 0.1


def graph_engine(path, graphs: bool, **options) -> LLM:
    llm = engine(path, kernels="triton", enforce_eager=True, **options)
    if graphs:  # CPU: captured by hand (CUDA graphs need a GPU); a replay re-runs the step on the static buffers
        llm.model_runner.capture_graphs(llm.max_model_len)
        assert llm.model_runner.graphs is not None
    return llm


def count_runs(monkeypatch, cls, calls: dict):
    real = cls.run
    monkeypatch.setattr(cls, "run", lambda self, *a, **k: calls.__setitem__(cls.__name__, calls.get(cls.__name__, 0)
                                                                             + 1) or real(self, *a, **k))


def test_graph_replays_give_the_eager_tokens(v4, monkeypatch):
    path, _ = v4
    expected = [o.token_ids for o in graph_engine(path, False).generate(prompts(), GREEDY, use_tqdm=False)]
    calls = {}
    count_runs(monkeypatch, TargetGraphs, calls)
    got = [o.token_ids for o in graph_engine(path, True).generate(prompts(), GREEDY, use_tqdm=False)]
    assert got == expected
    assert calls["TargetGraphs"] >= GREEDY.max_tokens - 1


def test_graphs_per_context_tier(v4, monkeypatch):
    """DeepSeek-V4's graphs per context tier (here 16 and 32 tokens below the model's maximum, and V4_GRAPH_SLOTS so
    that the 4-token tier has only those two): three requests decode in the 16-token graph, then the 32-token one,
    then eagerly past 32 tokens of context, with the eager tokens."""
    path, _ = v4
    monkeypatch.setattr(graphs, "CONTEXT_TIERS", (16, 32))
    monkeypatch.setattr(graphs, "V4_GRAPH_SLOTS", 1024)
    g = torch.Generator().manual_seed(7)
    short = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (4, 6, 9)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = [o.token_ids for o in graph_engine(path, False).generate(short, params, use_tqdm=False)]
    llm = graph_engine(path, True)
    captured = llm.model_runner.graphs
    assert captured.contexts(4) == [16, 32] and captured.contexts(1)[-1] == llm.max_model_len
    replayed = []
    for key, graph in captured.graphs.items():
        real = graph.replay
        monkeypatch.setattr(graph, "replay", lambda key=key, real=real: replayed.append(key) or real())
    assert [o.token_ids for o in llm.generate(short, params, use_tqdm=False)] == expected
    decoded = [key for key in replayed if key[0] == 4]
    assert decoded == [(4, 16)] * 7 + [(4, 32)] * 16  # the longest context 10..16, then 17..32
    assert len(replayed) < params.max_tokens  # the steps past 32 tokens of context ran eagerly


def test_graph_replays_with_the_dspark_module_give_plain_tokens(tmp_path, monkeypatch):
    """The in-checkpoint DSpark module's draft step in its graphs, the target's verify steps in theirs: the tokens of
    plain greedy decoding (eager), seeded sampling the same with graphs as without."""
    path = tmp_path / "tiny-v4-dspark"
    save_tiny_v4_dspark(path, seed=3, vocab_size=320, block_size=4)
    profile = tmp_path / "sps.json"  # a given curve: profiling more requests than max_num_seqs has no ring slots
    profile.write_text(json.dumps({"step_cost_s": {"1": 1.0, "9": 1.0, "30": 10.0}}))
    expected = [o.token_ids for o in graph_engine(path, False, spec_method="none").generate(prompts(), GREEDY,
                                                                                               use_tqdm=False)]
    calls = {}
    count_runs(monkeypatch, TargetGraphs, calls)
    count_runs(monkeypatch, DraftGraphs, calls)
    llm = graph_engine(path, True, spec_method="dspark", verify_policy="full", sps_profile=str(profile))
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    assert calls["TargetGraphs"] > 3 and calls["DraftGraphs"] > 3
    sampled = SamplingParams(temperature=0.8, seed=11, max_tokens=12, ignore_eos=True)
    eager = graph_engine(path, False, spec_method="dspark", verify_policy="full", sps_profile=str(profile))
    assert ([o.token_ids for o in llm.generate(prompts(), sampled, use_tqdm=False)] ==
            [o.token_ids for o in eager.generate(prompts(), sampled, use_tqdm=False)])


def test_profiling_asks_for_no_more_requests_than_the_rings_hold(tmp_path):
    """With no SPS profile given, the quick profile of a V4 + DSpark engine times steps of at most max_num_seqs
    requests: the rings hold that many."""
    path = tmp_path / "tiny-v4-dspark"
    save_tiny_v4_dspark(path, seed=3, vocab_size=320, block_size=4)
    profile = tmp_path / "sps.json"  # to build the engine; the profile is measured below
    profile.write_text(json.dumps({"step_cost_s": {"1": 1.0}}))
    llm = engine(path, spec_method="dspark", max_num_seqs=2, sps_profile=str(profile))
    curve = measure_curve(llm.model_runner, llm.block_manager, repeats=1)
    rows = llm.model_runner.max_rollback  # the profiler's verify rows: the anchor and the module's drafts
    assert max(curve.step_cost[0]) <= 2 * rows and max(curve.draft_cost[0]) <= 2  # (points, costs)
