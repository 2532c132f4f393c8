import math
import random

import pytest
import torch

from engine.sampler import SamplingTensors, make_generator, probs_from_logits, sample
from engine.sampling_params import SamplingParams

torch.set_num_threads(2)

# token -> probability; by rank: 1 (.40), 3 (.25), 5 (.15), 0 (.10), 4 (.06), 2 (.04)
P = [0.10, 0.40, 0.04, 0.25, 0.06, 0.15]
LOGITS = [math.log(p) + 3.0 for p in P]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_k", -2),
    ("min_p", -0.1), ("min_p", 1.5), ("max_tokens", 0), ("stop", ""), ("stop", ["a", ""]),
    ("stop_token_ids", [3, -1]),
])
def test_params_validation(field, value):
    with pytest.raises(ValueError, match=field) as e:
        SamplingParams(**{field: value})
    assert repr(value) in str(e.value)


def test_params_normalisation():
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams().stop == []
    a, b = SamplingParams(), SamplingParams()
    a.stop_token_ids.append(1)
    assert b.stop_token_ids == []
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy
    SamplingParams(top_k=0), SamplingParams(top_k=-1), SamplingParams(min_p=1.0), SamplingParams(top_p=1.0)


def probs_row(logits=LOGITS, t=1.0, k=-1, p=1.0, m=0.0):
    return probs_from_logits(torch.tensor([logits]), torch.tensor([t]), torch.tensor([k]),
                             torch.tensor([p]), torch.tensor([m]))[0]


def expected(support, t=1.0, logits=LOGITS):
    """float64 oracle: softmax(logits / t) renormalised over `support`."""
    w = [math.exp(x / t) if i in support else 0.0 for i, x in enumerate(logits)]
    return torch.tensor([x / sum(w) for x in w], dtype=torch.float64)


@pytest.mark.parametrize("kw,support", [
    ({}, {0, 1, 2, 3, 4, 5}),
    ({"k": 2}, {1, 3}), ({"k": 1}, {1}), ({"k": 0}, {0, 1, 2, 3, 4, 5}), ({"k": 6}, {0, 1, 2, 3, 4, 5}),
    ({"k": 100}, {0, 1, 2, 3, 4, 5}),
    ({"p": 0.3}, {1}), ({"p": 0.5}, {1, 3}), ({"p": 0.7}, {1, 3, 5}), ({"p": 0.85}, {0, 1, 3, 5}),
    ({"m": 0.2}, {0, 1, 3, 5}), ({"m": 0.3}, {1, 3, 5}), ({"m": 1.0}, {1}),
    ({"k": 3, "p": 0.5}, {1, 3}), ({"k": 2, "p": 0.5}, {1, 3}),   # top-p on the full p, not top-k's
    ({"k": 3, "m": 0.2}, {1, 3, 5}), ({"k": 4, "p": 0.85, "m": 0.5}, {1, 3}),
    ({"p": 0.6}, {1, 3}), ({"p": 0.6, "t": 2.0}, {1, 3, 5}),        # top-p after temperature
    ({"m": 0.35, "t": 2.0}, {0, 1, 3, 4, 5}), ({"k": 2, "t": 0.5}, {1, 3}),
])
def test_support_and_values(kw, support):
    probs = probs_row(**kw)
    assert probs.dtype == torch.float32
    assert set(probs.nonzero().flatten().tolist()) == support
    assert torch.allclose(probs.double(), expected(support, kw.get("t", 1.0)), atol=1e-6)
    assert abs(probs.sum().item() - 1) < 1e-6


@pytest.mark.parametrize("t", [0.0, 1e-6])
def test_greedy_one_hot(t):
    probs = probs_row(t=t, k=3, p=0.5, m=0.5)
    assert probs.tolist() == [0, 1, 0, 0, 0, 0]


def test_ties_break_towards_lower_ids():
    logits = [0.0, 1.0, 1.0, 1.0, -5.0]
    assert set(probs_row(logits, k=2).nonzero().flatten().tolist()) == {1, 2}
    assert set(probs_row(logits, p=0.5).nonzero().flatten().tolist()) == {1, 2}
    assert probs_row(logits, t=0).tolist() == [0, 1, 0, 0, 0]
    many = [1.0 if i % 7 == 0 else 0.0 for i in range(5000)]          # large enough for unstable sorts to reorder
    assert set(probs_row(many, k=3).nonzero().flatten().tolist()) == {0, 7, 14}


def ref_support(logits, t, k, p, m):
    """Independent pure-Python (float64) support computation."""
    w = [math.exp(x / t) for x in logits]
    probs = [x / sum(w) for x in w]
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    topk = set(order[:k]) if 0 < k < len(probs) else set(order)
    topp, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        topp.add(i)
        mass += probs[i]
    return topk & topp & {i for i in order if probs[i] >= m * max(probs)}


def test_batched_rows_match_reference():
    rng = random.Random(0)
    V, rows = 40, []
    for _ in range(64):
        rows.append(([rng.gauss(0, 2) for _ in range(V)], rng.choice([0.0, 0.5, 1.0, 1.7]),
                     rng.choice([-1, 0, 1, 5, 20, V]), rng.choice([1.0, 0.3, 0.8, 0.95]),
                     rng.choice([0.0, 0.05, 0.3])))
    probs = probs_from_logits(*(torch.tensor(col) for col in zip(*rows)))
    for row, (lg, t_, k_, p_, m_) in zip(probs, rows):
        support = {max(range(V), key=lambda i: lg[i])} if t_ == 0 else ref_support(lg, t_, k_, p_, m_)
        assert set(row.nonzero().flatten().tolist()) == support
        assert torch.allclose(row.double(), expected(support, t_ or 1.0, lg), atol=1e-6)


def test_fast_paths_are_row_wise():
    # a batch in which no row needs sorting / min-p gives the same rows as when mixed with rows that do
    logits = torch.tensor([LOGITS, LOGITS, LOGITS])
    mixed = probs_from_logits(logits, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([-1, 2, -1]),
                              torch.tensor([1.0, 0.5, 1.0]), torch.tensor([0.0, 0.3, 0.0]))
    plain = probs_from_logits(logits[:1], torch.ones(1), torch.tensor([-1]), torch.ones(1), torch.zeros(1))
    assert torch.equal(mixed[0], plain[0]) and mixed[2].tolist() == [0, 1, 0, 0, 0, 0]
    assert torch.allclose(plain[0].double(), expected(set(range(6))), atol=1e-6)


def test_sampling_tensors_repeats():
    st = SamplingTensors.from_params([SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1),
                                      SamplingParams(temperature=1e-6)], repeats=[3, 2])
    assert st.temperature.tolist() == pytest.approx([0.7] * 3 + [0.0] * 2)
    assert st.top_k.tolist() == [5, 5, 5, -1, -1] and st.top_k.dtype == torch.long
    assert st.top_p.tolist() == pytest.approx([0.9] * 3 + [1.0] * 2)
    assert st.min_p.tolist() == pytest.approx([0.1] * 3 + [0.0] * 2)
    assert st.probs(torch.tensor([LOGITS] * 5))[4].tolist() == [0, 1, 0, 0, 0, 0]


def draws(probs, seed, steps=40, row=0):
    g = make_generator(seed)
    out = []
    for _ in range(steps):
        gs = [make_generator(None) for _ in range(len(probs))]
        gs[row] = g
        out.append(sample(probs, gs)[row].item())
    return out


def test_seeded_reproducible_across_batches():
    uniform = torch.full((1, 1000), 1e-3)
    batch = torch.cat([torch.softmax(torch.randn(3, 1000, generator=make_generator(7)), -1), uniform])
    alone = draws(uniform, 123)
    assert alone == draws(uniform, 123)
    assert alone == draws(batch, 123, row=3)                        # other rows use other generators
    assert alone != draws(uniform, 124)
    assert draws(uniform, None) != draws(uniform, None)


def test_greedy_rows_return_argmax():
    logits = torch.randn(8, 300, generator=make_generator(0))
    probs = probs_from_logits(logits, torch.zeros(8), torch.full((8,), -1), torch.ones(8), torch.zeros(8))
    assert torch.equal(sample(probs, [make_generator(i) for i in range(8)]), logits.argmax(-1))


def chi2(samples, p):
    n, obs = len(samples), torch.bincount(samples, minlength=len(p)).double()
    exp = n * torch.tensor(p, dtype=torch.float64)
    assert obs[exp == 0].sum() == 0
    return ((obs - exp) ** 2 / exp)[exp > 0].sum().item()


def many_samples(probs_row, n=20000, seed=0):
    g = make_generator(seed)
    return torch.cat([sample(probs_row.expand(1000, -1).contiguous(), [g] * 1000) for _ in range(n // 1000)])


def test_sample_matches_distribution():
    # df = 5: P(chi2 > 30) ~ 1.5e-5; a 0.03 mass shift gives chi2 ~ 20000 * (.03^2/.25 + .03^2/.15) ~ 190
    s = many_samples(torch.tensor([P]))
    assert chi2(s, P) < 30
    wrong = [0.10, 0.40, 0.04, 0.22, 0.06, 0.18]
    assert chi2(many_samples(torch.tensor([wrong])), P) > 150
    tv = 0.5 * sum(abs(c / len(s) - q) for c, q in zip(torch.bincount(s, minlength=6).tolist(), P))
    assert tv < 0.015


def test_sample_respects_support():
    probs = probs_row(k=3, m=0.5)                                   # support {1, 3}
    s = many_samples(probs[None], n=5000)
    assert set(s.unique().tolist()) == {1, 3}
    assert chi2(s, expected({1, 3}).tolist()) < 30
