"""Log-probabilities of emitted tokens: against transformers' own logits, the same whether a token was decoded plainly
or accepted from a draft, and under the request's sampling processing."""
import pytest
import torch
from test_spec_decode import oracle_drafter
from tiny_models import save_tiny_draft, save_tiny_model
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    target = save_tiny_model(root / "target", "qwen3")
    return target, save_tiny_draft(root / "dspark", target, rank=8, block_size=4)


def reference(target, ids: list[int]) -> torch.Tensor:
    """transformers' fp32 logits of every position of ids."""
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_greedy_logprobs_equal_transformers(models):
    target, _ = models
    out = LLM(model=str(target), dtype="float32", spec_method="none", kv_cache_gb=0.02).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3), use_tqdm=False)[0]
    assert len(out.logprobs) == len(out.token_ids) == 12
    logp = torch.log_softmax(reference(target, PROMPT + out.token_ids), -1)[len(PROMPT) - 1:-1]
    for row, entry, token in zip(logp, out.logprobs, out.token_ids):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_tokens_accepted_from_drafts_carry_the_plain_logprobs(models):
    """Greedy output is the same with and without the draft, and so is every token's log-probability: an accepted
    draft's comes from the verify row that checked it. The draft proposes the true continuation with 30 % of its
    tokens corrupted, so blocks are accepted in part, whole, or not at all."""
    target, draft = models
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    prompts = [PROMPT, [11, 12, 13], [20] * 9]
    plain = LLM(model=str(target), dtype="float32", spec_method="none", kv_cache_gb=0.02).generate(
        prompts, params, use_tqdm=False)
    spec = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="full",
               kv_cache_gb=0.02)
    oracle_drafter(spec, {tuple(p): o.token_ids for p, o in zip(prompts, plain)}, error_rate=0.3)
    drafted = spec.generate(prompts, params, use_tqdm=False)
    assert spec.spec_stats.num_accepted_tokens > 0, "some tokens must come from accepted drafts"
    for a, b in zip(plain, drafted):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor([e.logprob for e in b.logprobs]),
                                   torch.tensor([e.logprob for e in a.logprobs]), atol=1e-4, rtol=0)
        assert [[t for t, _ in e.top] for e in b.logprobs] == [[t for t, _ in e.top] for e in a.logprobs]


def test_sampled_logprobs_are_those_of_the_processed_distribution(models):
    """temperature 0.7 and top_k 4: the token's log-probability under softmax(logits / 0.7) renormalised over the
    4 most likely tokens (so the 4 alternatives hold all the mass); without processing they would not."""
    target, _ = models
    params = SamplingParams(temperature=0.7, top_k=4, max_tokens=8, ignore_eos=True, seed=3, logprobs=4)
    out = LLM(model=str(target), dtype="float32", spec_method="none", kv_cache_gb=0.02).generate(
        [PROMPT], params, use_tqdm=False)[0]
    logits = reference(target, PROMPT + out.token_ids)[len(PROMPT) - 1:-1] / 0.7
    for row, entry in zip(logits, out.logprobs):
        kept = row.topk(4)
        expected = torch.log_softmax(kept.values, -1)[kept.indices.tolist().index(entry.token_id)].item()
        assert entry.logprob == pytest.approx(expected, abs=1e-4)
        assert sum(torch.tensor([v for _, v in entry.top]).exp()).item() == pytest.approx(1.0, abs=1e-4)
        assert entry.logprob != pytest.approx(torch.log_softmax(row, -1)[entry.token_id].item(), abs=1e-3)
