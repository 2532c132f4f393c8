"""DeepSeek-V4's in-checkpoint DSpark module served with one flag: a tiny V4-Flash-DSpark-like checkpoint in the
released layout (tests/tiny_models.save_tiny_v4_dspark, an 8-token vocabulary so that a random draft is sometimes
right): the module is found without a draft path, its features are the target layers' outputs (checked against
transformers' own hidden states), greedy speculative output equals plain greedy output under every verify policy,
a draft made after rejections equals one made from scratch on the committed tokens, and the window is exactly
sliding_window positions wide."""
import pytest
import torch
from tiny_models import save_tiny_v4_dspark

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.drafter import Drafter
from engine.drafts.v4_dspark import V4DSparkDraft
from engine.sampler import SamplingTensors

VOCAB = 8
NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
POLICIES = ("full", "fixed:2", "sps", "sps-lagged")


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4d") / "tiny-v4-dspark"
    return path, save_tiny_v4_dspark(path, seed=3, vocab_size=VOCAB, block_size=4)


def prompts() -> list[list[int]]:
    """Lengths inside and past the 8-token sliding window (the draft's window too)."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (13, 3, 21, 9)]


def v4_llm(path, **options) -> LLM:
    return LLM(model=str(path), dtype="float32", kv_cache_gb=0.02, kv_block_size=8, enable_prefix_caching=False,
               **options)


def test_the_module_is_found_without_a_draft_path(v4):
    path, _ = v4
    for method in ("auto", "dspark"):
        config = EngineConfig(model=str(path), spec_method=method, device="cpu")
        assert (config.spec_method, config.draft) == ("dspark", str(path))
    with pytest.raises(ValueError, match="needs a draft directory"):
        EngineConfig(model=str(path), spec_method="dflash", device="cpu")
    assert isinstance(v4_llm(path, spec_method="dspark").speculator.drafter.draft, V4DSparkDraft)


def test_features_are_the_target_layers_outputs_averaged_over_the_streams(v4, monkeypatch):
    """What the module reads for each committed position: transformers' decoder-layer outputs (the hc streams; read
    with hooks, as its hidden_states stop before the last layer's) at dspark_target_layer_ids, averaged over the
    streams and concatenated."""
    path, hf = v4
    seen = []
    queue = Drafter.queue_context
    monkeypatch.setattr(Drafter, "queue_context",
                        lambda self, seqs, features, n: (seen.append(features[0][:n[0]].clone()),
                                                         queue(self, seqs, features, n))[1])
    prompt = prompts()[2]
    v4_llm(path, spec_method="dspark").generate([prompt], SamplingParams(temperature=0, max_tokens=1),
                                                use_tqdm=False)
    outputs = {}
    hooks = [hf.model.layers[i].register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
             for i in (1, 2, 3)]
    with torch.no_grad():
        hf(torch.tensor([prompt]))
    for hook in hooks:
        hook.remove()
    assert outputs[1].shape[-2] == hf.config.hc_mult  # each decoder layer's output: the hc streams
    expected = torch.cat([outputs[i][0].mean(-2) for i in (1, 2, 3)], -1)
    torch.testing.assert_close(seen[0], expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_speculative_output_equals_plain_greedy(v4, policy):
    path, _ = v4
    expected = [o.token_ids for o in v4_llm(path, spec_method="none").generate(prompts(), GREEDY, use_tqdm=False)]
    llm = v4_llm(path, spec_method="dspark", verify_policy=policy)
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    stats = llm.spec_stats.as_dict()
    if policy in ("full", "fixed:2"):  # drafts were accepted and rejected: rollback ran
        assert 0 < stats["num_accepted_tokens"] < stats["num_verified_tokens"]


def record_proposals(monkeypatch) -> list[tuple[list[int], int, torch.Tensor]]:
    """(the request's tokens, its rounds so far, its draft distributions) for every block drafted."""
    records, rounds = [], {}
    propose = Drafter.propose

    def recording(self, seqs, num_tokens=None):
        propose(self, seqs, num_tokens)
        for s in seqs:
            rounds[s.seq_id] = rounds.get(s.seq_id, -1) + 1
            records.append((list(s.token_ids), rounds[s.seq_id], s.proposal.probs.clone()))
    monkeypatch.setattr(Drafter, "propose", recording)
    return records


def test_a_draft_after_rejections_equals_one_from_scratch(v4, monkeypatch):
    """Each block drafted mid-generation (after rounds whose rejected drafts were rolled back) equals the first block
    a fresh engine drafts for the same committed tokens as its prompt (greedy: that engine commits the same next
    token, then drafts from it)."""
    path, _ = v4
    records = record_proposals(monkeypatch)
    v4_llm(path, spec_method="dspark", verify_policy="full").generate(prompts()[2:3], GREEDY, use_tqdm=False)
    later = [r for r in records if r[1] >= 3][:4]
    assert len(later) == 4
    for tokens, _, probs in later:
        del records[:]
        fresh = v4_llm(path, spec_method="dspark", verify_policy="full")
        fresh.generate([tokens[:-1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert records[0][0] == tokens
        torch.testing.assert_close(records[0][2], probs, atol=1e-5, rtol=1e-5)


def draft_probs(draft: V4DSparkDraft, n: int, anchor: int) -> torch.Tensor:
    slots = torch.arange(n)[None]
    sampling = SamplingTensors.from_params([GREEDY])
    _, probs, *_ = draft.draft_block(torch.tensor([anchor]), torch.tensor([n]), slots, torch.tensor([n]),
                                     draft.config.block_size, sampling, torch.rand(1, draft.config.block_size), True)
    return probs


def test_the_window_is_sliding_window_positions_wide(v4):
    """With the committed K=V of n positions in slots 0..n-1, a draft at position n reads exactly the last
    sliding_window of them: changing the one just outside changes nothing; the one just inside (negative control:
    the comparison can fail) changes the draft."""
    path, _ = v4
    draft = v4_llm(path, spec_method="dspark").speculator.drafter.draft
    window, n = draft.window, 20
    draft.allocate_kv_cache(32, torch.float32, torch.device("cpu"))
    features = torch.randn(n, len(draft.config.target_layer_ids) * draft.v4.hidden_size,
                           generator=torch.Generator().manual_seed(0))
    draft.extend_context(features, torch.arange(n), torch.arange(n))
    before = draft_probs(draft, n, anchor=3)
    for cache in draft.kv_caches:
        cache[n - window - 1] += 1.0
    torch.testing.assert_close(draft_probs(draft, n, anchor=3), before, atol=0, rtol=0)
    for cache in draft.kv_caches:
        cache[n - window] += 1.0
    assert (draft_probs(draft, n, anchor=3) - before).abs().max() > 1e-3
