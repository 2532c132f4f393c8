"""The Triton rejection sampler and fused Markov draft sampler against their torch twins (on CPU under Triton's
interpreter when there is no GPU: vocabularies and batches are small, but span several vocabulary blocks)."""
from types import SimpleNamespace

import pytest
import test_rejection_sampling as exact
import torch

from engine.drafts.dspark import DSparkDraft
from engine.drafts.heads import VanillaMarkov
from engine.sampler import SamplingTensors
from kernels import markov, sampling, triton_markov
from kernels.triton_markov import markov_sample
from kernels.triton_rejection import rejection_sample

REJECTION_V = 2500  # three 1024-wide blocks, the last partial
MARKOV_V, RANK = 1000, 16  # rank 16 gives 512-wide blocks: two, the last partial


def random_rows(n: int, V: int, g: torch.Generator, zeros: float = 0.3) -> torch.Tensor:
    """Peaked distributions with a share of exact zeros."""
    logits = torch.randn(n, V, generator=g) * 3
    return torch.softmax(logits.masked_fill(torch.rand(n, V, generator=g) < zeros, -float("inf")), -1)


def one_hot(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.zeros(tokens.shape[0], V).scatter_(1, tokens[:, None], 1.0)


def ragged_batch(seed: int = 0):
    """Special requests first (their rows in order), then random ones; returns the rejection_sample arguments."""
    g, V = torch.Generator().manual_seed(seed), REJECTION_V
    shared = random_rows(3, V, g)
    zero = int((shared[0] == 0).nonzero()[0])  # a token neither p nor q allows
    best = torch.randint(V - 1, (3,), generator=g).tolist()
    never = random_rows(4, V, g).index_fill_(1, torch.tensor([zero]), 0.0)
    cases = [  # (num_drafts, target rows, draft rows, draft tokens)
        (0, random_rows(1, V, g), torch.zeros(0, V), []),
        (2, shared, shared[:2], [int(shared[0].argmax()), int(shared[1].argmax())]),  # p == q: all accepted
        (3, never / never.sum(-1, keepdim=True), one_hot(torch.tensor([zero] * 3), V), [zero] * 3),  # p(x) = 0
        (2, one_hot(torch.tensor(best), V), one_hot(torch.tensor([best[0], best[1] + 1]), V),
         [best[0], best[1] + 1]),  # greedy: the second draft is wrong
        (1, shared[:2], shared[:1], [zero]),  # rejected while p == q: residual 0, so resample from p
    ]
    for n in torch.randint(0, 5, (11,), generator=g).tolist():
        q = random_rows(n, V, g)
        cases.append((n, random_rows(n + 1, V, g), q, sampling.sample_inverse_cdf(q, torch.rand(n, generator=g))))
    num_drafts = torch.tensor([c[0] for c in cases])
    target = torch.cat([c[1] for c in cases])
    draft = torch.cat([c[2] for c in cases])
    tokens = torch.cat([torch.as_tensor(c[3], dtype=torch.long).reshape(-1) for c in cases])
    Nd, R = draft.shape[0], len(cases)
    return target, draft, tokens, num_drafts, torch.rand(Nd, generator=g), torch.rand(R, generator=g)


def test_rejection_kernel_matches_twin(kernel_device):
    args = ragged_batch()
    accepted, next_token = rejection_sample(*(a.to(kernel_device) for a in args))
    assert accepted.dtype == next_token.dtype == torch.int64 and accepted.device.type == kernel_device.type
    want_accepted, want_token = sampling.rejection_sample(*args)
    assert accepted.cpu().tolist() == want_accepted.tolist()
    assert next_token.cpu().tolist() == want_token.tolist()
    target = args[0]
    assert want_accepted[:5].tolist() == [0, 2, 0, 1, 0]
    assert want_token[3] == target[9].argmax()  # greedy: the target's argmax where the draft went wrong
    assert target[11, want_token[4]] > 0  # the residual-free fallback sampled p, not the empty residual


def kernel_verifier(device: torch.device):
    def verify(*args):
        return tuple(t.cpu() for t in rejection_sample(*(a.to(device) for a in args)))
    return verify


def emitted(verifier, seed: int):
    """test_rejection_sampling's seeded run: the target p and the first / second tokens emitted, drafts accepted."""
    p, q = exact.distributions(seed)
    return p, *exact.run_verifier(verifier, p, q, seed)


def p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    return exact.chi_square_p_value(torch.bincount(tokens[tokens >= 0], minlength=exact.V).float(), probs)


@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_kernel_emits_the_target_distribution(seed, kernel_device):
    p, first, second, accepted = emitted(kernel_verifier(kernel_device), seed)
    assert 0.1 * exact.N < int((accepted == 0).sum()) < 0.9 * exact.N and int((accepted == 2).sum()) > 0
    assert p_value(first, p[0]) > 1e-3 and p_value(second, p[1]) > 1e-3
    assert int((first == 2).sum()) == 0, "a token the target gives zero probability was emitted"


@pytest.mark.parametrize("biased", [exact.accept_everything, exact.skip_residual])
def test_the_distribution_check_detects_biased_verifiers(biased):
    p, first, _, _ = emitted(biased, 0)
    assert p_value(first, p[0]) < 1e-6


def markov_case(temperatures: list[float], G: int, seed: int = 0):
    """markov_sample arguments: B = len(temperatures) requests, G steps."""
    g, B = torch.Generator().manual_seed(seed), len(temperatures)
    w1 = torch.randn(MARKOV_V, RANK, generator=g)
    w2 = torch.randn(MARKOV_V, RANK, generator=g) * 0.5
    base = torch.randn(B, G, MARKOV_V, generator=g) * 2
    w2[[10, 700]] = 0.0  # no bias, so the top logits of request 0's first (greedy) step tie across blocks
    base[0, 0, [10, 700]] = 50.0
    anchors = torch.randint(MARKOV_V, (B,), generator=g)
    return base, anchors, w1, w2, torch.tensor(temperatures), torch.rand(B, G, generator=g)


@pytest.fixture(scope="module")
def markov_run(kernel_device):
    args = markov_case([0.0, 0.7, 1.0], G=7)
    tokens, probs = markov_sample(*(a.to(kernel_device) for a in args))
    return args, tokens.cpu(), probs.cpu()


def test_markov_kernel_matches_twin(markov_run):
    args, tokens, probs = markov_run
    want_tokens, want_probs = markov.markov_sample(*args)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 7) and probs.shape == (3, 7, MARKOV_V)
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)
    assert tokens[0, 0] == 10 and probs[0, 0, 10] == 1.0  # ties go to the first index


def test_markov_kernel_matches_twin_across_many_blocks_and_stat_chunks(kernel_device, monkeypatch):
    """Small tiles: 63 vocabulary blocks (the last partial), their statistics combined 16 at a time, so the per-request
    pass carries its max, mass and cdf across chunks as it must for a 150k-token vocabulary."""
    monkeypatch.setattr(triton_markov, "TILE", 16 * RANK)
    monkeypatch.setattr(triton_markov, "STATS_CHUNK", 16)
    args = markov_case([0.0, 0.7, 1.0], G=4, seed=3)
    tokens, probs = markov_sample(*(a.to(kernel_device) for a in args))
    want_tokens, want_probs = markov.markov_sample(*args)
    assert tokens.cpu().tolist() == want_tokens.tolist()
    torch.testing.assert_close(probs.cpu(), want_probs, atol=1e-6, rtol=1e-5)
    assert tokens[0, 0] == 10  # the greedy tie across blocks still goes to the first index


def test_markov_twin_differs_when_bias_or_prev_is_wrong(markov_run):
    """Negative controls: the kernel's match above would fail for a sampler without the Markov bias, or one that
    kept biasing by the anchor instead of the previous token."""
    (base, anchors, w1, w2, temperature, uniforms), tokens, _ = markov_run
    without_bias, _ = markov.markov_sample(base, anchors, w1, torch.zeros_like(w2), temperature, uniforms)
    stuck = torch.cat([markov.markov_sample(base[:, k:k + 1], anchors, w1, w2, temperature, uniforms[:, k:k + 1])[0]
                       for k in range(base.shape[1])], 1)
    assert (without_bias != tokens).any() and (stuck != tokens).any()
    assert (stuck[:, 0] == tokens[:, 0]).all()  # the first step agrees: the difference is prev alone


@pytest.mark.parametrize("temperatures", [[0.0, 0.7, 1.0, 0.3], [0.0, 0.0]])
def test_markov_twin_is_the_dspark_sequential_sampler(temperatures):
    B, G = len(temperatures), 5
    base, anchors, _, _, temperature, uniforms = markov_case(temperatures, G, seed=1)
    head = VanillaMarkov(MARKOV_V, RANK, hidden_size=8)
    torch.nn.init.normal_(head.markov_w2.weight, std=0.5)
    sampling_tensors = SamplingTensors(temperature, torch.zeros(B, dtype=torch.long), torch.ones(B), torch.zeros(B))
    with torch.no_grad():
        torch_path = SimpleNamespace(markov_head=head, token_ids=lambda indices: indices)
        want = DSparkDraft.sample_sequentially(torch_path, torch.zeros(B, G, 8), base, anchors, sampling_tensors,
                                               uniforms)
        tokens, probs = markov.markov_sample(base, anchors, head.markov_w1.weight, head.markov_w2.weight,
                                             temperature, uniforms)
    assert tokens.tolist() == want[0].tolist()
    torch.testing.assert_close(probs, want[1], atol=1e-7, rtol=1e-6)


def vocab_case(temperatures: list[float], G: int, size: int, seed: int = 2, ordered: bool = False):
    """markov_case restricted to a draft vocabulary of `size` token ids (shuffled unless ordered): base logits and
    W2 rows of those columns, W1 whole (the previous token is any token id), and the ids."""
    base, anchors, w1, w2, temperature, uniforms = markov_case(temperatures, G, seed)
    ids = torch.randperm(MARKOV_V, generator=torch.Generator().manual_seed(seed))[:size]
    ids = ids.sort().values if ordered else ids
    return (base[:, :, ids].contiguous(), anchors, w1, w2[ids].contiguous(), temperature, uniforms, ids), base, w2


def test_markov_kernel_matches_twin_on_a_draft_vocabulary(kernel_device):
    args, _, _ = vocab_case([0.0, 0.7, 1.0], G=6, size=600)  # 600 of 1000 ids: two blocks, the last partial
    tokens, probs = markov_sample(*(a.to(kernel_device) for a in args))
    want_tokens, want_probs = markov.markov_sample(*args)
    assert tokens.cpu().tolist() == want_tokens.tolist()
    torch.testing.assert_close(probs.cpu(), want_probs, atol=1e-6, rtol=1e-5)
    assert set(want_tokens.flatten().tolist()) <= set(args[-1].tolist())  # token ids, not column indices


@pytest.mark.parametrize("ordered", [True, False])
def test_draft_vocabulary_twin_is_the_masked_full_vocabulary(ordered):
    """Oracle: drafting among ids is drafting over the whole vocabulary with every other logit at -inf. Same
    distributions (as columns of ids) always; same tokens when the ids keep the vocabulary's order, since the
    inverse CDF walks the columns in order (in another order the same uniforms pick other, equally distributed,
    tokens: compared in the engine's statistical test)."""
    (base_v, anchors, w1, w2_v, temperature, uniforms, ids), base, w2 = vocab_case([0.0, 0.7, 1.0, 0.4], G=5,
                                                                                  size=300, ordered=ordered)
    masked = torch.full_like(base, -float("inf"))
    masked[:, :, ids] = base[:, :, ids]
    tokens, probs = markov.markov_sample(base_v, anchors, w1, w2_v, temperature, uniforms, ids)
    prevs = torch.cat([anchors[:, None], tokens[:, :-1]], 1)
    for k in range(base.shape[1]):  # step k of the full vocabulary, after the same previous token
        _, want = markov.markov_sample(masked[:, k:k + 1], prevs[:, k], w1, w2, temperature, uniforms[:, k:k + 1])
        torch.testing.assert_close(probs[:, k], want[:, 0, ids], atol=1e-7, rtol=1e-6)
        assert want[:, 0, ids].sum(-1).allclose(torch.ones(4))  # nothing outside ids
    want_tokens, _ = markov.markov_sample(masked, anchors, w1, w2, temperature, uniforms)
    greedy = temperature == 0
    assert tokens[greedy].tolist() == want_tokens[greedy].tolist()
    if ordered:
        assert tokens.tolist() == want_tokens.tolist()
    # negative control: feeding the column index (not the token id) back into the Markov bias changes the draft
    as_index, _ = markov.markov_sample(base_v, anchors, w1, w2_v, temperature, uniforms)
    assert (ids[as_index] != tokens).any()


def test_bad_input_names_the_problem(kernel_device):
    target, draft, tokens, num_drafts, u, bonus = (a.to(kernel_device) for a in ragged_batch())
    with pytest.raises(ValueError, match="same V"):
        rejection_sample(target, draft[:, :-1], tokens, num_drafts, u, bonus)
    with pytest.raises(ValueError, match="rows"):
        rejection_sample(target[1:], draft, tokens, num_drafts, u, bonus)
    with pytest.raises(ValueError, match="float32"):
        rejection_sample(target.double(), draft.double(), tokens, num_drafts, u, bonus)
    with pytest.raises(ValueError, match="bonus_uniforms"):
        rejection_sample(target, draft, tokens, num_drafts, u, bonus[1:])
    base, anchors, w1, w2, temperature, uniforms = (a.to(kernel_device) for a in markov_case([1.0, 0.0], G=3))
    with pytest.raises(ValueError, match="uniforms"):
        markov_sample(base, anchors, w1, w2, temperature, uniforms[:, :2])
    with pytest.raises(ValueError, match="w2"):
        markov_sample(base, anchors, w1, w2[:, :-1], temperature, uniforms)
    with pytest.raises(ValueError, match="base_logits"):
        markov_sample(base.half(), anchors, w1, w2, temperature, uniforms)
    with pytest.raises(ValueError, match="vocab_ids"):
        markov_sample(base, anchors, w1, w2, temperature, uniforms, torch.arange(5, device=kernel_device))
    ids = torch.arange(0, MARKOV_V, 2, device=kernel_device)
    with pytest.raises(ValueError, match="w2"):  # a draft vocabulary needs W2's rows of those ids
        markov_sample(base[:, :, ids].contiguous(), anchors, w1, w2, temperature, uniforms, ids)


def test_empty_batches(kernel_device):
    no_rows, no_ids, no_u = torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    args = (no_rows, no_rows, no_ids, no_ids, no_u, no_u)
    accepted, next_token = rejection_sample(*(a.to(kernel_device) for a in args))
    assert accepted.shape == next_token.shape == (0,)
    tokens, probs = markov_sample(torch.zeros(2, 0, 5, device=kernel_device),
                                  torch.zeros(2, dtype=torch.long, device=kernel_device),
                                  *(torch.zeros(5, 3, device=kernel_device) for _ in range(2)),
                                  torch.ones(2, device=kernel_device), torch.zeros(2, 0, device=kernel_device))
    assert tokens.shape == (2, 0) and probs.shape == (2, 0, 5)
