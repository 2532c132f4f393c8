"""Speculative sampling is lossless: a seeded statistical test against an exact, independent oracle.

A tiny target with an 8-token vocabulary is decoded through the engine with a random DSpark / DFlash draft for
thousands of seeded requests (max_tokens=4, gamma=3). x1 comes from the prefill; the first verification round checks
2 drafts (the planner caps it by max_tokens), so x2 and x3 are accepted drafts or residual resamples and x4 the bonus
token after a full block; after an early rejection, later rounds verify 1 draft (x3 draft / residual, x4 bonus) or
none (x4 plainly sampled). The joint distribution of (x2, x3, x4) is compared with the exact one, enumerated with
transformers' own model loaded from the same directory and temperature / top-k / top-p written here (not engine
code): chi-square goodness of fit (sparse cells pooled) and total variation must accept, and the same statistics must
reject when the verifier is swapped for a biased one (negative controls)."""
import json
import math
from collections import Counter

import pytest
import torch
from tiny_models import save_tiny_draft, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

import engine.speculator
from engine import LLM, SamplingParams
from engine.drafts.dspark import DSparkDraft
from kernels.sampling import rejection_sample as true_rejection_sample
from kernels.sampling import sample_inverse_cdf

VOCAB = 8
PROMPT = [3, 1, 4, 1, 5]
NUM_SAMPLES = 3000
NUM_CONTROL_SAMPLES = 1000  # the biased verifiers are rejected by far with a third of the samples
MAX_TOKENS = 4      # the first verification round checks 2 drafts (x2, x3) + a bonus (x4): see the docstring
GAMMA = 3
MIN_EXPECTED = 5.0  # chi-square cells with fewer expected counts are pooled
POLICIES = ("threshold:0.5", "sps", "sps-lagged")
DRAFT_VOCAB = [6, 2, 0, 3, 7]
CASES = {"t1": {"temperature": 1.0}, "t08_topk_topp": {"temperature": 0.8, "top_k": 5, "top_p": 0.8}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny per-request prefill attention calls: with 2 intra-op threads on a busy 2-core machine they
    run ~10x slower (thread oversubscription), so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """tiny_models.save_tiny_model cannot override vocab_size (it passes the tokenizer's size positionally), so the
    small-vocabulary target is built here with the same config and init; its tokenizer is the usual 320-token one
    (the engine only ever sees ids < VOCAB)."""
    path = tmp_path_factory.mktemp("target_v8")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", VOCAB), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llms(tmp_path_factory, target_dir):
    root = tmp_path_factory.mktemp("drafts_v8")
    drafts = {"dspark": save_tiny_draft(root / "dspark", target_dir, block_size=4, mask_token_id=5),
              "dflash": save_tiny_draft(root / "dflash", target_dir, rank=0, confidence=False, block_size=4,
                                        mask_token_id=5),
              "dspark-vocab": save_tiny_draft(root / "dspark-vocab", target_dir, block_size=4, mask_token_id=5)}
    # FR-Spec: the draft proposes 5 of the 8 tokens, listed out of order; the other 3 come from residuals only
    (drafts["dspark-vocab"] / "draft_vocab.json").write_text(json.dumps({"token_ids": DRAFT_VOCAB}))
    # an SPS curve that is flat up to ~1.5 draft tokens per request and then steep: the sps planners must cut
    # blocks by confidence, which is where a planner could leak the draft tokens into the admission
    profile = root / "sps.json"
    profile.write_text(json.dumps({"step_cost_s": {"1": 1.0, str(NUM_SAMPLES * 5 // 2): 1.0,
                                                   str(NUM_SAMPLES * 5 // 2 + 100): 10.0}}))
    engines = {m: (m.split("-")[0], d, "full") for m, d in drafts.items()}
    engines |= {f"dspark-{p}": ("dspark", drafts["dspark"], p) for p in POLICIES}
    engines["dspark-skipping"] = ("dspark", drafts["dspark"], "sps-lagged")
    llms = {name: LLM(model=str(target_dir), dtype="float32", spec_method=m, draft=str(d), num_draft_tokens=GAMMA,
                      verify_policy=policy, sps_profile=str(profile), kv_cache_gb=0.15, kv_block_size=8,
                      max_num_seqs=NUM_SAMPLES, max_num_batched_tokens=100_000)
            for name, (m, d, policy) in engines.items()}
    # threshold:c skips drafting once the lagged confidences are all below c (tests/test_planner.py); here every step
    # drafts so that its cut is what gets verified ("dspark-skipping" covers steps without drafts)
    llms["dspark-threshold:0.5"].speculator.planner.drafting_futile = lambda seqs: False
    steps = iter(range(10**9))

    def some_draft(seqs):
        """Every fourth step plain (the planner judges drafting would not pay); otherwise four requests in five draft,
        a different fifth sitting out each step (as when a refresh drafts for some requests only)."""
        step = next(steps)
        return [] if step % 4 == 3 else [s for s in seqs if (s.seq_id + step) % 5]
    llms["dspark-skipping"].speculator.planner.drafters = some_draft
    return llms


@pytest.fixture(scope="module")
def oracle_model(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------- the exact oracle

def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """fp64 sampling distribution per row, with the engine's documented semantics (tests/test_sampling.py): softmax
    of logits / temperature; keep the top_k most likely tokens and the most-likely-first tokens whose preceding mass
    is < top_p, both judged on that full tempered distribution (top-p is not re-normalised after top-k); renormalise.
    Boundaries must not be near-ties (the engine works in fp32 and its logits differ from transformers' by ~1e-6)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_p, dtype=torch.bool)
    V = probs.shape[-1]
    if 0 < top_k < V:
        assert (sorted_p[:, top_k - 1] - sorted_p[:, top_k]).min() > 5e-6, "top-k boundary near-tie"
        keep_sorted[:, top_k:] = False
    if top_p < 1:
        mass_before = sorted_p.cumsum(-1) - sorted_p
        assert (mass_before - top_p).abs().min() > 5e-6, "top-p boundary near-tie"
        keep_sorted &= mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def exact_joint(model, prompt: list[int], **params) -> torch.Tensor:
    """P(x2, x3, x4) [V, V, V] in fp64, x1 marginalised: one forward over every prompt + (x1, x2, x3) gives all four
    conditionals (position L - 1 + i sees x1..x_{i-1} only)."""
    V, L = model.config.vocab_size, len(prompt)
    prefixes = torch.cartesian_prod(*[torch.arange(V)] * 3)  # [V^3, 3], row-major in (x1, x2, x3)
    ids = torch.cat([torch.tensor(prompt).expand(V ** 3, L), prefixes], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [V^3, L + 3, V]
    p1 = warp(logits[:1, L - 1], **params)[0]                            # [x1]
    p2 = warp(logits[:, L], **params).view(V, V, V, V)[:, 0, 0]          # [x1, x2]
    p3 = warp(logits[:, L + 1], **params).view(V, V, V, V)[:, :, 0]      # [x1, x2, x3]
    p4 = warp(logits[:, L + 2], **params).view(V, V, V, V)               # [x1, x2, x3, x4]
    joint = (p1[:, None, None, None] * p2[:, :, None, None] * p3[:, :, :, None] * p4).sum(0)
    assert abs(joint.sum().item() - 1) < 1e-9
    return joint


# ---------------------------------------------------------------------------------------------- the statistics

def gof(counts: torch.Tensor, probs: torch.Tensor) -> dict:
    """Chi-square goodness of fit of counts to probs (flat, same shape), pooling cells with expected count below
    MIN_EXPECTED into one (itself folded into the smallest remaining cell if still too small), and total variation.
    Any count on a zero-probability cell makes the chi-square infinite (p = 0)."""
    n = counts.sum().item()
    counts, probs = counts.double().flatten(), probs.double().flatten()
    tv = 0.5 * (counts / n - probs).abs().sum().item()
    # Under H0 E[TV] <= sum sqrt(p(1-p)/n) / 2 (Jensen) and TV moves by <= 1/n per sample, so by McDiarmid
    # P(TV > that + 3/sqrt(n)) <= exp(-18).
    tv_bound = 0.5 * (probs * (1 - probs) / n).sqrt().sum().item() + 3 / math.sqrt(n)
    if (counts[probs == 0] > 0).any():
        return {"chi2": math.inf, "dof": 0, "p": 0.0, "tv": tv, "tv_bound": tv_bound, "n": n,
                    "off_support": int(counts[probs == 0].sum().item())}
    expected = probs * n
    big = expected >= MIN_EXPECTED
    obs, exp = list(counts[big]), list(expected[big])
    pooled_obs, pooled_exp = counts[~big].sum(), expected[~big].sum()
    if pooled_exp >= MIN_EXPECTED:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    elif pooled_exp > 0:
        i = min(range(len(exp)), key=lambda j: exp[j])
        obs[i], exp[i] = obs[i] + pooled_obs, exp[i] + pooled_exp
    obs, exp = torch.stack(obs), torch.stack(exp)
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2).item()
    return {"chi2": chi2.item(), "dof": dof, "p": p, "tv": tv, "tv_bound": tv_bound, "n": n, "off_support": 0}


def sample_counts(llm: LLM, params: dict, seed_base: int, n: int = NUM_SAMPLES) -> tuple[torch.Tensor, dict]:
    """Counts of (x2, x3, x4) over n seeded requests, and the spec counters this batch added."""
    before = llm.spec_stats.as_dict()
    sps = [SamplingParams(**params, seed=seed_base + i, max_tokens=MAX_TOKENS, ignore_eos=True)
           for i in range(n)]
    outs = llm.generate([PROMPT] * n, sps, use_tqdm=False)
    assert all(len(o.token_ids) == MAX_TOKENS for o in outs)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.long)
    for cell, c in Counter(tuple(o.token_ids[1:4]) for o in outs).items():
        counts[cell] = c
    after = llm.spec_stats.as_dict()
    delta = {k: after[k] - before[k] for k in ("num_drafts", "num_verified_tokens", "num_accepted_tokens")}
    delta["accepted_at_pos2"] = (after["accepted_per_pos"] + [0, 0])[1] - (before["accepted_per_pos"] + [0, 0])[1]
    return counts, delta


# ---------------------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["dspark", "dflash", "dspark-vocab", "dspark-skipping"]
                         + [f"dspark-{p}" for p in POLICIES])
def test_speculative_sampling_matches_target(llms, oracle_model, method, case):
    params = CASES[case]
    joint = exact_joint(oracle_model, PROMPT, **params)
    counts, spec = sample_counts(llms[method], params, seed_base=1_000_000 * (1 + list(CASES).index(case)))
    stats = gof(counts, joint)
    print(f"\n{method}/{case}: {stats} spec={spec}")
    # both verification outcomes are exercised, including acceptance of a second draft in one round
    assert spec["num_accepted_tokens"] > 0.05 * spec["num_verified_tokens"]
    assert spec["num_accepted_tokens"] < 0.95 * spec["num_verified_tokens"]
    assert spec["accepted_at_pos2"] > 30
    assert stats["off_support"] == 0
    assert stats["dof"] >= 20
    assert stats["p"] > 1e-3, stats
    assert stats["tv"] < stats["tv_bound"], stats


def accept_everything(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms):
    """Biased: every draft the target gives any mass is accepted (u = 0), so x2, x3 follow the draft."""
    return true_rejection_sample(target_probs, draft_probs, draft_tokens, num_drafts, torch.zeros_like(uniforms),
                                 bonus_uniforms)


def no_residual(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms):
    """Biased: the accept / reject decisions are right, but after a rejection the next token is drawn from p itself
    instead of norm(max(p - q, 0))."""
    num_accepted, _ = true_rejection_sample(target_probs, draft_probs, draft_tokens, num_drafts, uniforms,
                                            bonus_uniforms)
    first_row = (num_drafts + 1).cumsum(0) - (num_drafts + 1)
    return num_accepted, sample_inverse_cdf(target_probs[first_row + num_accepted], bonus_uniforms)


@pytest.mark.parametrize("biased", [accept_everything, no_residual], ids=lambda f: f.__name__)
def test_negative_control_biased_verifier_is_rejected(llms, oracle_model, monkeypatch, biased):
    """The same test has power: a verifier that is not lossless is rejected overwhelmingly."""
    params = CASES["t1"]
    joint = exact_joint(oracle_model, PROMPT, **params)
    monkeypatch.setattr(engine.speculator, "rejection_sample", biased)
    counts, spec = sample_counts(llms["dspark"], params, seed_base=1_000_000, n=NUM_CONTROL_SAMPLES)
    stats = gof(counts, joint)
    print(f"\n{biased.__name__}: {stats} spec={spec}")
    assert spec["num_verified_tokens"] > 0
    assert stats["p"] < 1e-6, stats


def test_negative_control_draft_vocabulary_misplaced_is_rejected(llms, oracle_model, monkeypatch):
    """A draft vocabulary whose distributions reach the verifier in the wrong columns (column j read as token j,
    not as DRAFT_VOCAB[j]) is rejected overwhelmingly, while the drafted token ids stay right."""
    params = CASES["t1"]
    joint = exact_joint(oracle_model, PROMPT, **params)
    def misplaced(self, probs, vocab_size):
        return torch.nn.functional.pad(probs, (0, vocab_size - probs.shape[1]))
    monkeypatch.setattr(DSparkDraft, "full_vocab_probs", misplaced)
    counts, spec = sample_counts(llms["dspark-vocab"], params, seed_base=1_000_000, n=NUM_CONTROL_SAMPLES)
    stats = gof(counts, joint)
    print(f"\nmisplaced draft vocabulary: {stats} spec={spec}")
    assert spec["num_verified_tokens"] > 0
    assert stats["p"] < 1e-6, stats
