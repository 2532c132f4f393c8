"""CUDA graphs (engine/graphs.py): steps padded into captured graphs give the eager path's tokens, padding writes no
KV, and steps the graphs do not cover run eagerly. On a GPU the graphs are real CUDA graphs; on CPU (Triton's
interpreter) a replay re-runs the captured step on the same static buffers, which checks the padding and buffer
logic but not the capture."""
import argparse
import json

import pytest
import torch
from tiny_models import save_tiny_draft

from engine.cli import add_engine_args, config_from_args
from engine.config import EngineConfig, uses_cuda_graphs
from engine.context import VarlenBatch
from engine.graphs import DraftGraphs, StepGraph, TargetGraphs
from engine.llm import LLM
from engine.sampling_params import SamplingParams

PROMPTS = [[1, 17, 33, 9, 250, 4], [1, 5] * 11, [1, 99]]  # 3 requests: padded to graphs for 4
SETTINGS = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.9, seed=11, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)]
TOP_K = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=5, ignore_eos=True)
CONFIGS = {"plain": ("none", "full"), "dspark-full": ("dspark", "full"),
           "dspark-sps-lagged": ("dspark", "sps-lagged"), "dflash": ("dflash", "full")}


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("graph_drafts")
    profile = root / "sps.json"
    profile.write_text(json.dumps({"step_cost_s": {"1": 1.0, "9": 1.0, "30": 10.0}}))
    return {"dspark": save_tiny_draft(root / "dspark", tiny_llama_dir, block_size=4, mask_token_id=5),
            "dflash": save_tiny_draft(root / "dflash", tiny_llama_dir, rank=0, confidence=False, block_size=4,
                                      mask_token_id=5),
            "profile": profile}


def make_llm(target, drafts, config: str, graphs: bool, **options) -> LLM:
    method, policy = CONFIGS[config]
    llm = LLM(model=str(target), dtype="float32", spec_method=method, draft=str(drafts.get(method, "")),
              verify_policy=policy, sps_profile=str(drafts["profile"]), kv_cache_gb=0.02, kv_block_size=8,
              kernels="triton", max_num_seqs=4, enforce_eager=not graphs, **options)
    if graphs and llm.model_runner.graphs is None:  # CPU: captured by hand (CUDA graphs need a GPU)
        llm.model_runner.capture_graphs(llm.max_model_len)
    return llm


def count_runs(monkeypatch, cls, calls: dict):
    real = cls.run

    def counted(self, *args, **kwargs):
        calls[cls.__name__] = calls.get(cls.__name__, 0) + 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, "run", counted)


def eager_and_graph_tokens(target, drafts, config, settings, monkeypatch) -> tuple[list, list, dict]:
    eager = make_llm(target, drafts, config, graphs=False)
    assert eager.model_runner.graphs is None
    expected = [c.token_ids for c in eager.generate(PROMPTS, settings, use_tqdm=False)]
    calls = {}
    count_runs(monkeypatch, TargetGraphs, calls)
    count_runs(monkeypatch, DraftGraphs, calls)
    llm = make_llm(target, drafts, config, graphs=True)
    return expected, [c.token_ids for c in llm.generate(PROMPTS, settings, use_tqdm=False)], calls


@pytest.mark.parametrize("config", list(CONFIGS))
def test_graph_replay_gives_the_eager_tokens(tiny_llama_dir, drafts, config, monkeypatch):
    expected, got, calls = eager_and_graph_tokens(tiny_llama_dir, drafts, config, SETTINGS, monkeypatch)
    assert got == expected
    assert calls.get("TargetGraphs", 0) > 5, "decode/verify steps should replay the target's graphs"
    if config.startswith("dspark"):  # a vanilla-Markov draft sampling with temperature only drafts in graphs
        assert calls.get("DraftGraphs", 0) > 5
    else:
        assert "DraftGraphs" not in calls


def test_top_k_batches_draft_eagerly(tiny_llama_dir, drafts, monkeypatch):
    """The fused Markov loop covers temperature only: a batch with a top-k request drafts eagerly, same tokens."""
    expected, got, calls = eager_and_graph_tokens(tiny_llama_dir, drafts, "dspark-full", SETTINGS[:2] + [TOP_K],
                                                  monkeypatch)
    assert got == expected
    assert calls.get("TargetGraphs", 0) > 5 and "DraftGraphs" not in calls
    assert SETTINGS[1].temperature_only(320) and not TOP_K.temperature_only(320)
    assert SamplingParams(top_k=320).temperature_only(320) and not SamplingParams(min_p=0.1).temperature_only(320)


def test_graph_tiers_cover_the_step_shapes(tiny_llama_dir, drafts):
    llm = make_llm(tiny_llama_dir, drafts, "dspark-full", graphs=True)
    graphs = llm.model_runner.graphs
    # max_num_seqs 4 x (1 + 4 drafts) = 20 tokens at most in a decode/verify step: the largest graph
    assert graphs.tiers == [1, 2, 4, 8, 16, 20]
    assert graphs.max_q_len == 5
    assert graphs.tier_for([1, 1, 1], [9, 9, 9], graphs.capture_layers) == 4
    assert graphs.tier_for([5, 5, 5, 2], [9, 9, 9, 9], graphs.capture_layers) == 20
    assert graphs.tier_for([5, 5, 5, 5, 1], [9] * 5, graphs.capture_layers) is None  # past the largest tier
    assert graphs.tier_for([6], [40], graphs.capture_layers) is None  # a prefill chunk longer than a verify row
    assert graphs.tier_for([1, 1], [9, llm.max_model_len + 1], ()) is None
    assert graphs.tier_for([1] * 5, [9] * 5, ()) is None  # more requests than a graph has seats (max_num_seqs)
    assert graphs.tier_for([1, 1], [9, 9], (0,)) is None  # other captured layers than the graphs return
    assert llm.model_runner.drafter.graphs.buckets == [1, 2, 4]


def changed_slots(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    """KV slots (axis 3 of the [2, layers, heads, slots, D] cache) whose contents differ."""
    return set(torch.nonzero((before != after).flatten(0, 2).any(-1).any(0)).flatten().tolist())


def test_padding_rows_store_no_kv(tiny_llama_dir, drafts):
    llm = make_llm(tiny_llama_dir, drafts, "plain", graphs=True)
    runner = llm.model_runner
    for prompt in PROMPTS[:3]:
        llm.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    while not all(s.num_computed_tokens for s in llm.scheduler.running) or len(llm.scheduler.running) < 3:
        llm.step()
    seqs = list(llm.scheduler.running)
    for s in seqs:
        s.num_scheduled_tokens = 1
    bs = runner.block_size
    real = {s.block_table[s.num_computed_tokens // bs] * bs + s.num_computed_tokens % bs for s in seqs}
    before = runner.kv_cache.clone()
    assert runner.graph_tier(seqs, ()) == 4  # 3 rows padded to 4
    runner.forward(seqs, [1, 1, 1])
    assert changed_slots(before, runner.kv_cache) == real
    # the check can fail: a padding row written to slot 0 shows up
    runner.kv_cache[:, :, :, 0] += 1.0
    assert changed_slots(before, runner.kv_cache) == real | {0}


def test_graph_replay_returns_copies_of_the_features(tiny_llama_dir, drafts):
    """Captured features are queued for the draft's context; they must survive the next replay."""
    llm = make_llm(tiny_llama_dir, drafts, "dspark-full", graphs=True)
    graphs = llm.model_runner.graphs
    dev = graphs.input_ids.device
    ids = torch.tensor([3, 4], device=dev)
    batch = VarlenBatch(torch.tensor([0, 1, 2], dtype=torch.int32, device=dev),
                        torch.tensor([[0], [8]], device=dev), torch.tensor([1, 1], dtype=torch.int32, device=dev), 1)
    slots = torch.tensor([0, 8], device=dev)
    _, first = graphs.run(2, ids, torch.zeros(2, dtype=torch.long, device=dev), slots, batch)
    kept = [f.clone() for f in first]
    graphs.run(2, ids + 5, torch.zeros(2, dtype=torch.long, device=dev), slots, batch)
    assert all(torch.equal(a, b) for a, b in zip(first, kept))


def test_step_graph_replays_the_captured_step():
    buffer = torch.zeros(3)
    graph = StepGraph(lambda: buffer * 2 + 1, torch.device("cpu"))
    buffer.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert graph.replay().tolist() == [3.0, 5.0, 7.0]


def test_enforce_eager_option(tiny_llama_dir):
    parser = add_engine_args(argparse.ArgumentParser())
    assert config_from_args(parser.parse_args(["--enforce-eager"])).enforce_eager is True
    assert config_from_args(parser.parse_args([])).enforce_eager is False
    with pytest.raises(TypeError, match="enforce_eager must be True or False"):
        EngineConfig(enforce_eager="yes")
    assert not uses_cuda_graphs(EngineConfig(device="cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need the Triton kernels"):
        LLM(model=str(tiny_llama_dir), device="cpu", kernels="torch", kv_cache_gb=0.02).model_runner.capture_graphs(64)
