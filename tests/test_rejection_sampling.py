"""The ragged rejection sampler against exact distributions: whatever q the drafts come from, the emitted tokens are
distributed as p. One call verifies many independent requests, so large seeded samples are cheap."""
import pytest
import torch

from kernels.sampling import rejection_sample, sample_inverse_cdf

V, N = 6, 60_000


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), stat / 2))


def distributions(seed: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(3, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    p[0, 2] = 0  # a token the target never emits but the draft proposes often
    q[0, 2] = 0.5
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def run_verifier(verifier, p, q, seed: int):
    """N requests, each with 2 drafts from q; returns the first and second emitted tokens (second: -1 if none)."""
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[k], N, replacement=True, generator=g) for k in range(2)], 1)
    accepted, bonus = verifier(p.repeat(N, 1), q.repeat(N, 1), drafts.reshape(-1), torch.full((N,), 2),
                               torch.rand(2 * N, generator=g), torch.rand(N, generator=g))
    first = torch.where(accepted >= 1, drafts[:, 0], bonus)
    second = torch.where(accepted >= 2, drafts[:, 1], torch.where(accepted == 1, bonus, -1))
    return first, second, accepted


def accept_everything(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms):
    """Negative control: a verifier that trusts every draft (bonus from the last row)."""
    last_rows = (num_drafts + 1).cumsum(0) - 1
    return num_drafts.clone(), sample_inverse_cdf(target_probs[last_rows], bonus_uniforms)


def skip_residual(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms):
    """Negative control: resample a rejected position from p instead of norm(max(p - q, 0))."""
    accepted, _ = rejection_sample(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms)
    rows = (num_drafts + 1).cumsum(0) - (num_drafts + 1) + accepted
    return accepted, sample_inverse_cdf(target_probs[rows], bonus_uniforms)


@pytest.mark.parametrize("seed", [0, 1])
def test_emitted_tokens_follow_target(seed):
    p, q = distributions(seed)
    first, second, accepted = run_verifier(rejection_sample, p, q, seed)
    assert 0.1 * N < int((accepted == 0).sum()) < 0.9 * N and int((accepted == 2).sum()) > 0
    assert chi_square_p_value(torch.bincount(first, minlength=V).float(), p[0]) > 1e-3
    assert chi_square_p_value(torch.bincount(second[second >= 0], minlength=V).float(), p[1]) > 1e-3
    assert int((first == 2).sum()) == 0, "a token the target gives zero probability was emitted"


@pytest.mark.parametrize("biased", [accept_everything, skip_residual])
def test_negative_controls_are_detected(biased):
    p, q = distributions(0)
    first, _, _ = run_verifier(biased, p, q, 0)
    assert chi_square_p_value(torch.bincount(first, minlength=V).float(), p[0]) < 1e-6


def test_greedy_is_exact_argmax_matching():
    logits = torch.randn(4 + 3, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    one_hot = torch.zeros_like(logits).scatter_(1, best[:, None], 1.0)
    # request 0: 3 drafts, the first two right; request 1: 2 drafts, both right (bonus from its last row)
    drafts = torch.tensor([best[0], best[1], (best[2] + 1) % 50, best[4], best[5]])
    q = torch.zeros(5, 50).scatter_(1, drafts[:, None], 1.0)
    accepted, bonus = rejection_sample(one_hot, q, drafts, torch.tensor([3, 2]), torch.rand(5), torch.rand(2))
    assert accepted.tolist() == [2, 2]
    assert bonus.tolist() == [best[2].item(), best[6].item()]


def test_requests_without_drafts_sample_from_p():
    p = torch.tensor([[0.0, 0.25, 0.75, 0.0]]).repeat(N, 1)
    accepted, bonus = rejection_sample(p, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                       torch.zeros(N, dtype=torch.long), torch.zeros(0),
                                       torch.rand(N, generator=torch.Generator().manual_seed(0)))
    assert accepted.eq(0).all()
    assert chi_square_p_value(torch.bincount(bonus, minlength=4).float(), p[0]) > 1e-3


def test_inverse_cdf_never_picks_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    u = torch.tensor([0.0, 0.4999, 0.5, 0.99999994])
    assert set(sample_inverse_cdf(probs.repeat(4, 1), u).tolist()) <= {1, 3}
