"""Verify-length planning: Algorithm 1 and the lagged global budget on hand-made inputs, the paper's Appendix A
counterexample as a statistical test, SPS profiles, and greedy identity of every policy in the engine."""
import json
import random
from itertools import pairwise

import pytest
import torch
from tiny_models import save_tiny_draft, save_tiny_model

from engine import LLM, SamplingParams
from engine.planner import REFRESH_STEPS, Planner
from engine.sps import SpsCurve, admission_order, best_budget, drafting_pays, early_stop_lengths, top_k_lengths
from kernels.sampling import rejection_sample


def table(values: dict[int, float]):
    return lambda b: values[b]


def test_admission_order_respects_prefixes():
    survivals = [[0.9, 0.5, 0.5], [0.9, 0.8], [0.95, 0.0]]
    order = admission_order(survivals)
    assert order == [(2, 0), (0, 0), (1, 0), (1, 1), (0, 1), (0, 2)]  # ties: position, then request; zero dropped
    for k in range(len(order) + 1):
        lengths = top_k_lengths(survivals, k)
        assert sum(lengths) == k and all(0 <= n <= len(row) for n, row in zip(lengths, survivals))


def test_early_stop_finds_the_maximum_of_a_unimodal_curve():
    survivals = [[0.9, 0.72, 0.5], [0.8, 0.4]]
    sps = table({2: 1.0, 3: 0.95, 4: 0.9, 5: 0.8, 6: 0.5, 7: 0.45})
    ranked = [survivals[r][j] for r, j in admission_order(survivals)]
    theta = [(2 + sum(ranked[:k])) * sps(2 + k) for k in range(6)]
    best = max(range(6), key=theta.__getitem__)
    assert 0 < best < 5
    assert early_stop_lengths(survivals, sps) == top_k_lengths(survivals, best)


def test_lagged_budget_finds_the_best_point_of_a_jagged_curve():
    survivals = [[0.9, 0.8, 0.7, 0.6]]
    sps = table({1: 1.0, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5})  # a cliff after B = 1, then flat: Θ is not unimodal
    assert early_stop_lengths(survivals, sps) == [0]        # the early stop is trapped before the cliff
    assert best_budget(survivals, sps) == 4                 # (1 + 3.0) * 0.5 = 2.0 > 1.0


def test_sps_curve_is_monotone_and_reproduces_its_points(tmp_path):
    points = {1: 0.010, 8: 0.012, 16: 0.011, 64: 0.040}  # a noisy dip at 16 is smoothed away
    path = tmp_path / "sps.json"
    path.write_text(json.dumps({"step_cost_s": points, "draft_cost_s": {1: 0.002, 8: 0.004}}))
    curve = SpsCurve.load(path)
    assert curve.steps_per_second(8, 1) == pytest.approx(1 / (0.002 + 0.012))
    assert curve.steps_per_second(64, 8) == pytest.approx(1 / (0.004 + 0.040))
    values = [curve.steps_per_second(b, 4) for b in range(1, 200)]
    assert all(a >= b for a, b in pairwise(values))


def test_a_graph_tier_curve_is_a_step_function(tmp_path):
    """Graphs up to 16 tokens, measured at tiers 1, 8, 16 and eagerly at 32: 9..16 tokens pad to the 16-token graph
    and cost what it costs; past the largest graph (eager) costs are interpolated. It round-trips through its JSON."""
    curve = SpsCurve({1: 0.010, 8: 0.012, 16: 0.020, 32: 0.036}, graph_tokens=16)
    assert [curve.plain_steps_per_second(b) for b in (1, 2, 8, 9, 16)] == \
        pytest.approx([100, 1 / 0.012, 1 / 0.012, 50, 50])
    assert curve.plain_steps_per_second(24) == pytest.approx(1 / 0.028)  # halfway from 16 to 32
    assert curve.plain_steps_per_second(40) == pytest.approx(1 / 0.044)  # past the last point: its segment extended
    assert SpsCurve({1: 0.010, 8: 0.012, 16: 0.020}).plain_steps_per_second(12) == pytest.approx(1 / 0.016)
    path = tmp_path / "graphs.json"
    path.write_text(json.dumps(curve.to_json()))
    assert SpsCurve.load(path).graph_tokens == 16 and SpsCurve.load(path).plain_steps_per_second(9) == pytest.approx(50)


def test_drafting_pays_only_when_the_best_budget_beats_a_plain_step():
    """Hand-computed: one request, verify costs 10 ms for 1 token and 11 ms for 2, the draft costs 2 ms.
    Θ(plain) = 1/0.010 = 100; Θ(K=1) = (1 + a)/(0.002 + 0.011), which beats 100 only for a > 0.3."""
    curve = SpsCurve({1: 0.010, 2: 0.011}, {1: 0.002})
    assert drafting_pays([[0.35]], curve) and not drafting_pays([[0.25]], curve)
    assert not drafting_pays([[0.0]], curve)
    free = SpsCurve({1: 0.010, 2: 0.011})  # a free draft: any survival that gains more than the 10% cost pays
    assert drafting_pays([[0.15]], free) and not drafting_pays([[0.05]], free)


def test_skipped_drafting_refreshes_its_survivals_periodically():
    planner = Planner("sps-lagged", 1000, SpsCurve({1: 0.010, 2: 0.011}, {1: 0.002}), draft_len=4)

    class Seq:
        params = SamplingParams(max_tokens=100)
        num_completion_tokens = 0

        def __init__(self, queued_rows: int = 0):
            self.mean_survival = [0.1, 0.01, 0.001, 0.0001]  # a history that says drafting does not pay
            self.pending_context = [(0, [None] * queued_rows)]

        def __len__(self):
            return 10
    decisions = [bool(planner.drafters([Seq()])) for _ in range(200)]
    refreshes = [REFRESH_STEPS, 3 * REFRESH_STEPS + 1, 7 * REFRESH_STEPS + 2]  # waits of 16, 32, 64 skipped steps
    assert [i for i, d in enumerate(decisions) if d] == refreshes
    assert planner.num_skipped_steps == 200 - len(refreshes)
    paying = Seq()
    paying.mean_survival = [0.9, 0.8, 0.7, 0.6]
    assert planner.drafters([paying]) == [paying]  # drafting pays again: the wait goes back to 16
    decisions = [bool(planner.drafters([Seq()])) for _ in range(REFRESH_STEPS + 1)]
    assert decisions == [False] * REFRESH_STEPS + [True]
    assert Planner("full", 1000).drafters([paying]) == [paying]  # full and fixed:k never skip
    planner.steps_without_drafts = planner.refresh_steps
    batch = [Seq(300), Seq(12), Seq(40)]
    assert planner.drafters(batch) == [batch[1]]  # a refresh drafts only for the request with the least queued context


class LaggedSeq:
    """A decoding request as the planner sees it: its lagged survivals and plenty of room."""
    params = SamplingParams(max_tokens=100)
    num_completion_tokens = 0

    def __init__(self, last):
        self.mean_survival = last

    def __len__(self):
        return 10


def test_threshold_skips_drafting_when_every_lagged_first_confidence_is_below_it():
    planner = Planner("threshold:0.5", 1000, draft_len=3)

    Seq = LaggedSeq
    assert not planner.drafters([Seq([0.3, 0.2, 0.1]), Seq([0.49, 0.4, 0.3])])
    assert planner.drafters([Seq([0.3, 0.2, 0.1]), Seq([0.6, 0.1, 0.01])])  # one request would verify a token
    assert planner.drafters([Seq(None)])  # no history: the prior 0.5 is not below 0.5
    planner.remember([[0.2, 0.1, 0.05]] * 50)
    assert not planner.drafters([Seq(None)])  # ... until the running mean says blocks get cut to nothing
    assert planner.num_skipped_steps == 2 and planner.last_budget == 0


def test_new_requests_start_from_the_running_mean_of_past_survivals():
    planner = Planner("sps-lagged", 1000, SpsCurve({1: 0.010, 2: 0.011}, {1: 0.002}), draft_len=2)
    assert planner.prior == [0.5, 0.25]
    for _ in range(100):
        planner.remember([[0.1, 0.01], [0.1]])
    assert planner.prior == pytest.approx([0.1, 0.01], abs=1e-3)
    assert not drafting_pays([planner.prior], planner.sps)  # a new request would now skip drafting too


# ------------------------------------------------------------------------------------------ Appendix A

P_TARGET = torch.tensor([0.7, 0.3])
P_DRAFT = torch.tensor([0.5, 0.5])
APPENDIX_SPS = table({1: 1.0, 2: 0.5, 3: 0.45})
N = 20_000


def survivals_for(x1: int) -> list[list[float]]:
    """a_1 = 0.8; the Markov confidence of position 2 depends on the sampled x_1: 0.9 after A, 0 after B."""
    return [[0.8, 0.8 * (0.9 if x1 == 0 else 0.0)]]


def retrospective(live, stale):
    return top_k_lengths(live, best_budget(live, APPENDIX_SPS))   # global search on live confidences: biased


def algorithm_1(live, stale):
    return early_stop_lengths(live, APPENDIX_SPS)


def lagged(live, stale):
    return top_k_lengths(live, best_budget(stale, APPENDIX_SPS))  # budget from a previous step's draft


def first_tokens(planner, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.multinomial(P_DRAFT, N, replacement=True, generator=g)
    previous = torch.multinomial(P_DRAFT, N, replacement=True, generator=g)
    admitted = torch.tensor([min(planner(survivals_for(a), survivals_for(b))[0], 1)
                             for a, b in zip(x1.tolist(), previous.tolist())])
    drafts = x1[admitted == 1]
    target = P_TARGET.repeat(int((admitted + 1).sum()), 1)  # [anchor, draft] rows of each request
    accepted, bonus = rejection_sample(target, P_DRAFT.repeat(len(drafts), 1), drafts, admitted,
                                       torch.rand(len(drafts), generator=g), torch.rand(N, generator=g))
    first = bonus.clone()
    first[admitted == 1] = torch.where(accepted[admitted == 1] == 1, drafts, bonus[admitted == 1])
    return first


def p_value(tokens: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=2).double()
    expected = P_TARGET.double() * len(tokens)
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(0.5, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("planner", [algorithm_1, lagged])
def test_appendix_a_causal_planners_are_lossless(planner):
    tokens = first_tokens(planner, seed=0)
    assert p_value(tokens) > 1e-3
    assert abs(tokens.eq(0).double().mean() - 0.7) < 0.015


def test_appendix_a_retrospective_search_is_biased():
    tokens = first_tokens(retrospective, seed=0)
    assert p_value(tokens) < 1e-6
    assert abs(tokens.eq(0).double().mean() - 0.85) < 0.015  # the paper's (0.85, 0.15)


# ------------------------------------------------------------------------------------------ in the engine

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner")
    target = save_tiny_model(root / "target", "qwen3")
    return target, save_tiny_draft(root / "draft", target, block_size=5)


@pytest.mark.parametrize("policy", ["threshold:0.5", "sps", "sps-lagged"])
def test_every_policy_greedy_identical_with_preemption(models, tmp_path, policy):
    target, draft = models
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randrange(2, 50))] for _ in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = [o.token_ids for o in LLM(model=str(target), dtype="float32", kv_cache_gb=0.01)
             .generate(prompts, greedy, use_tqdm=False)]
    profile = tmp_path / "sps.json"
    profile.write_text(json.dumps({"step_cost_s": {"1": 1.0, "10": 1.0, "11": 3.0}}))  # room for ~4 drafts
    block_bytes = 4 * 2 * 2 * 32 * 4 * (3 + 2)
    llm = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy=policy,
              sps_profile=str(profile), kv_block_size=4, kv_cache_gb=40 * block_bytes / 2**30,
              max_num_batched_tokens=24)
    assert [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == plain
    assert llm.scheduler.num_preemptions > 0
    s = llm.spec_stats
    assert s.num_verified_tokens < s.num_draft_tokens  # the policy did cut blocks


def test_steps_that_skip_drafting_stay_greedy_identical(models, tmp_path):
    """Plain steps between drafted ones (as when speculation does not pay) leave the output exact."""
    target, draft = models
    prompts = [[5, 6, 7], list(range(20, 60)), [9] * 12]
    greedy = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    plain = [o.token_ids for o in LLM(model=str(target), dtype="float32").generate(prompts, greedy, use_tqdm=False)]
    profile = tmp_path / "sps.json"
    profile.write_text(json.dumps({"step_cost_s": {"1": 1.0, "40": 1.0}}))
    llm = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="sps-lagged",
              sps_profile=str(profile), kv_cache_gb=0.01)
    decisions = []
    planner = llm.speculator.planner
    planner.drafters = lambda seqs: seqs if decisions.append(len(decisions) % 3 != 1) or decisions[-1] else []
    assert [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == plain
    assert decisions.count(False) >= 5 and llm.spec_stats.num_drafts >= 3 * decisions.count(True) - 6


def test_quick_profile_is_measured_once_and_cached(models, tmp_path, monkeypatch):
    from engine import sps_profile
    monkeypatch.setattr(sps_profile, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(sps_profile, "measured_beside_other_work", lambda *a: False)
    target, draft = models
    llm = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="sps",
              kv_cache_gb=0.05)
    [cached] = list(tmp_path.glob("*.json"))
    data = json.loads(cached.read_text())
    assert data["key"]["draft"] and set(map(int, data["step_cost_s"])) >= {1, 8, 64}
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    again = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="sps",
                kv_cache_gb=0.05)
    assert again.speculator.planner.sps.to_json() == SpsCurve.load(cached).to_json()


def test_quick_profile_from_a_busy_machine_is_not_cached(models, tmp_path, monkeypatch):
    """Step times measured beside other work would mislead every later run, so such a profile serves this run only."""
    from engine import sps_profile
    monkeypatch.setattr(sps_profile, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(sps_profile, "measured_beside_other_work", lambda *a: True)
    target, draft = models
    with pytest.warns(UserWarning, match="busy machine"):
        llm = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="sps",
                  kv_cache_gb=0.05)
    assert llm.speculator.planner.sps is not None and not list(tmp_path.glob("*.json"))


def test_other_work_during_a_profile_is_seen_at_once():
    """The check reads CPU time used while the profile ran, so a machine that was busy a minute ago but is quiet now
    (the load average's lag) profiles and caches; a process spinning beside it is caught."""
    import subprocess
    import sys
    import time

    from engine import sps_profile

    def others_busy_during(seconds: float) -> bool:
        before, start = sps_profile.cpu_snapshot(), time.monotonic()
        time.sleep(seconds)
        return sps_profile.measured_beside_other_work(before, sps_profile.cpu_snapshot(), time.monotonic() - start)
    assert sps_profile.cpu_snapshot() is not None  # Linux: /proc/stat
    assert not others_busy_during(1.0)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert others_busy_during(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    own_work_start, start = sps_profile.cpu_snapshot(), time.monotonic()
    sum(i * i for i in range(3_000_000))  # this process's own CPU time does not count
    assert not sps_profile.measured_beside_other_work(own_work_start, sps_profile.cpu_snapshot(),
                                                      time.monotonic() - start)


def test_policy_errors(models):
    target, draft = models
    dflash = save_tiny_draft(draft.parent / "dflash", target, rank=0, confidence=False, block_size=5)
    with pytest.raises(ValueError, match="confidence"):
        LLM(model=str(target), spec_method="dflash", draft=str(dflash), verify_policy="sps")
    with pytest.raises(ValueError, match="verify_policy"):
        LLM(model=str(target), spec_method="dspark", draft=str(draft), verify_policy="threshold:2")
    assert Planner("sps", 100).sps is None  # no curve: the sps policies fall back to verifying the full block


def test_profiler_writes_a_monotone_table_the_engine_reproduces(models, tmp_path, monkeypatch):
    import sys

    from profiler.__main__ import main
    target, draft = models
    out = tmp_path / "sps.json"
    monkeypatch.setattr(sys, "argv", ["profiler", "--model", str(target), "--dtype", "float32", "--kv-cache-gb", "0.05",
                                      "--spec-method", "dspark", "--draft", str(draft), "--tokens", "1", "4", "16",
                                      "--requests", "1", "2", "--context-lens", "16", "32", "--repeats", "1",
                                      "--out", str(out)])
    main()
    data = json.loads(out.read_text())
    costs = [data["step_cost_s"][b] for b in sorted(data["step_cost_s"], key=int)]
    assert len(costs) == 3 and costs == sorted(costs) and set(data["by_context_len"]) == {"16", "32"}
    assert out.with_suffix(".png").stat().st_size > 0
    llm = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="sps",
              sps_profile=str(out), kv_cache_gb=0.05)
    for b, cost in data["step_cost_s"].items():
        draft_cost = data["draft_cost_s"]["1"]
        assert llm.speculator.planner.sps.steps_per_second(int(b), 1) == pytest.approx(1 / (cost + draft_cost))


def test_profile_points_take_turns_so_a_slow_spell_bends_no_point(models, monkeypatch):
    """A slow spell of the machine shorter than a round reaches each point at most once, which the median drops; timed
    one point after another (the negative control) the same spell lands on one or two points whole."""
    from engine import cost_model
    target, draft = models
    llm = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="sps",
              sps_profile="none", kv_cache_gb=0.05)
    calls = []

    def slowed(seconds: float) -> float:
        calls.append(seconds)
        return seconds * (3 if 8 <= len(calls) < 13 else 1)  # calls 8-12: the machine at a third of its speed
    monkeypatch.setattr(cost_model, "forward_seconds", lambda runner, seqs, sizes: slowed(sum(sizes) * 1e-3))
    monkeypatch.setattr(cost_model, "draft_seconds", lambda runner, seqs: slowed(len(seqs) * 1e-4))
    tokens, requests = (1, 2, 4, 8), (1, 2)
    curve = cost_model.measure_curve(llm.model_runner, llm.block_manager, tokens, requests, context_len=8, repeats=4)
    assert len(calls) == 5 * 6
    assert dict(zip(*curve.step_cost)) == pytest.approx({b: b * 1e-3 for b in tokens})
    assert dict(zip(*curve.draft_cost)) == pytest.approx({r: r * 1e-4 for r in requests})
    calls.clear()
    seqs = cost_model.fake_requests(llm.model_runner, llm.block_manager, 1, 8)
    one_after_another = {b: cost_model.time_forward(llm.model_runner, seqs, [b], 4) for b in tokens}
    assert max(one_after_another[b] / (b * 1e-3) for b in tokens) > 2


def test_sps_lagged_drafts_only_one_position_beyond_its_lagged_budget():
    """The lagged budget K is known before drafting, so positions past K + 1 are never drafted (no request can
    verify more than K); fixed:k drafts k, full the whole block. One position beyond K keeps a survival there
    current, so K can grow; a budget of 0 still drafts one position (a refresh)."""
    curve = SpsCurve({1: 0.010, 2: 0.0105, 3: 0.011, 8: 0.030}, {1: 0.002})

    Seq = LaggedSeq
    planner = Planner("sps-lagged", 1000, curve, draft_len=7)
    good = Seq([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    budget = best_budget(planner.stale_survivals([good]), curve.for_requests(1))
    assert 0 < budget < 6 and planner.positions_to_draft([good]) == budget + 1
    assert planner.positions_to_draft([Seq([0.01] * 7)]) == 1  # K = 0: one position
    assert Planner("fixed:2", 1000, curve, draft_len=7).positions_to_draft([good]) == 2
    assert Planner("full", 1000, curve, draft_len=7).positions_to_draft([good]) == 7
    assert Planner("sps-lagged", 1000, None, draft_len=7).positions_to_draft([good]) == 7  # no curve: full block


def test_lagged_survivals_are_a_running_mean_over_a_requests_blocks():
    """One block drafted with low confidence halves a request's lagged survivals instead of replacing them; positions
    it did not draft keep their values; a request without history blends with the prior."""
    planner = Planner("sps-lagged", 1000, SpsCurve({1: 0.010, 2: 0.011}, {1: 0.002}), draft_len=3)
    seen = LaggedSeq([0.9, 0.8, 0.7])
    planner.keep_survivals([seen], [[0.1, 0.0]])
    assert seen.mean_survival == pytest.approx([0.5, 0.4, 0.7])
    new = LaggedSeq(None)
    prior = list(planner.prior)
    planner.keep_survivals([new], [[1.0, 1.0, 1.0]])
    assert new.mean_survival == pytest.approx([(p + 1.0) / 2 for p in prior])
