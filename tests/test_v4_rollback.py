"""DeepSeek-V4's rollback in the engine: verify steps of an anchor and 6 drafts, of which a random prefix is accepted
and the rest rolled back (engine/block_manager.py rollback, as engine/speculator.py accept calls it). The rejected
tokens complete compressed windows (ratio 4 and 8) and cross the 8-token sliding window, yet every committed row's
logits equal transformers' forward over the committed tokens alone. Negative controls: rings without the rollback
margin (the window's K=V, or the compressors' partial windows) lose rows a later step needs, and the comparison
fails."""
import pytest
import torch
from tiny_models import save_tiny_v4

from engine import LLM
from engine.models.deepseek_v4.model import V4Model

TOLERANCE = 2e-5  # as tests/test_v4_model.py: fp32, summation order differs
DRAFTS = 6


@pytest.fixture(params=["fixed-shapes", "per-sequence"])
def path_kind(request, monkeypatch):
    """Both step paths: a lone request's verify steps in fixed shapes (as in a CUDA graph, or eagerly beside other
    requests) and one sequence at a time (eagerly, alone)."""
    monkeypatch.setattr(V4Model, "eager_rows_from", 1 if request.param == "fixed-shapes" else 2)
    return request.param


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4") / "tiny-v4"
    return path, save_tiny_v4(path, seed=3)


def engine(path) -> LLM:
    return LLM(model=str(path), dtype="float32", kv_cache_gb=0.02, kv_block_size=8, enable_prefix_caching=False,
               num_draft_tokens=DRAFTS)


def step(llm: LLM, drafts: list[int]) -> torch.Tensor:
    """One scheduled forward of the only request with these drafts: the logits of its anchor and drafts."""
    (seq,) = llm.scheduler.running or llm.scheduler.waiting
    seq.spec_token_ids = drafts
    scheduled = llm.scheduler.schedule()
    logits, _ = llm.model_runner.forward(scheduled, [1 + len(drafts)])
    seq.advance()
    return logits[0]


@torch.no_grad()
def worst_gap(llm: LLM, hf, rounds: int = 10) -> float:
    """Prefill a 13-token prompt, then verify rounds that accept a random prefix of random drafts; the largest gap
    between a committed row's logits and transformers' over the committed tokens."""
    g = torch.Generator().manual_seed(7)
    llm.add_request(torch.randint(2, 320, (13,), generator=g).tolist())
    seq = llm.scheduler.waiting[0]
    seq.token_ids.append(step(llm, [])[-1].argmax().item())
    gaps = []
    for _ in range(rounds):
        drafts = torch.randint(2, 320, (DRAFTS,), generator=g).tolist()
        accepted = torch.randint(0, DRAFTS + 1, (1,), generator=g).item()
        logits = step(llm, drafts)[:accepted + 1]
        llm.block_manager.rollback(seq, DRAFTS - accepted)
        seq.spec_token_ids = []
        seq.token_ids += drafts[:accepted] + [logits[-1].argmax().item()]
        expected = hf(torch.tensor([seq.token_ids[:-1]]), use_cache=False).logits[0]
        gaps.append((logits - expected[-accepted - 1:]).abs().max().item())
    return max(gaps)


def test_rolled_back_tokens_leave_no_trace(v4, path_kind):
    path, hf = v4
    assert worst_gap(engine(path), hf) < TOLERANCE


@pytest.mark.parametrize("rings", ["window", "compressors"])
def test_without_the_rollback_margin_the_logits_differ(v4, rings, path_kind, monkeypatch):
    """The same rounds with one kind of ring cut to what a step reads back (no room for rejected rows), its guard
    off: rejected rows overwrite rows the next step needs."""
    path, hf = v4
    llm = engine(path)
    for layer in llm.model_runner.model.layers:
        attn = layer.attn
        for ring in [attn.ring] if rings == "window" else [c.ring for c in attn.caches()]:
            ring.allocate(ring.buffer.shape[0] - 1, 0, ring.buffer.dtype, ring.buffer.device)
    monkeypatch.setattr(V4Model, "guard_rings", lambda self, ends: None)
    assert worst_gap(llm, hf) > 100 * TOLERANCE


def test_a_ring_refuses_a_rollback_beyond_its_margin(v4, path_kind):
    path, hf = v4
    llm = engine(path)
    for layer in llm.model_runner.model.layers:
        layer.attn.ring.allocate(layer.attn.ring.buffer.shape[0] - 1, 0, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="rolled back more than the 0 positions it keeps"):
        worst_gap(llm, hf)
