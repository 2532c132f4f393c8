"""Calibration metrics, Sequential Temperature Scaling, sts.json in the engine, and the engine's confidence recorder."""
import json
import math
import random

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_draft, save_tiny_model

from engine import LLM, SamplingParams
from engine.calibration import (
    Rounds,
    Scaling,
    auroc,
    brier,
    cumulative,
    ece,
    load_scaling,
    pooled_metrics,
    position_metrics,
    rounds_from_records,
    save_scaling,
    sigmoid,
)
from engine.drafts.loader import CALIBRATION_FILE, read_calibration
from train import sts


def test_ece_hand_computed():
    # bin 2 holds two 0.1s with labels {0, 1}: |0.1 - 0.5| * 2; bin 18 holds two 0.9s with labels 1: |0.9 - 1| * 2
    assert ece([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx((0.8 + 0.2) / 4)
    assert ece([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.0)
    assert ece([1.0, 0.0], [1, 0]) == pytest.approx(1e-8)  # clamped to [1e-8, 1 - 1e-8]
    assert math.isnan(ece([], []))


def test_auroc_hand_computed():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: pairs (0.5 > 0.2), (0.5 = 0.5), (0.9 > 0.2), (0.9 > 0.5) -> 3.5 / 4
    assert auroc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc([0.3, 0.3, 0.3], [1, 0, 1]) == pytest.approx(0.5)
    assert auroc([0.9, 0.1], [0, 1]) == pytest.approx(0.0)
    assert math.isnan(auroc([0.2, 0.4], [1, 1]))


def test_brier():
    assert brier([0.25, 1.0], [0, 1]) == pytest.approx((0.0625 + 1e-16) / 2)


def synthetic_rounds(n: int, scales: list[float], seed: int = 0, shifts: list[float] | None = None) -> Rounds:
    """True conditional logits z; the head reports z * scale_k + shift_k. A round accepts its drafts up to the first
    failure of independent Bernoulli(σ(z_k)) draws; verified lengths vary so some positions carry no label."""
    rng = np.random.default_rng(seed)
    G = len(scales)
    z = rng.normal(1.0, 1.5, size=(n, G))
    ok = rng.random((n, G)) < sigmoid(z)
    verified = rng.integers(1, G + 1, size=n)
    first_fail = np.where(ok.all(1), G, np.argmin(ok, axis=1))
    shift = np.zeros(G) if shifts is None else np.array(shifts)
    return Rounds(z * np.array(scales) + shift, verified, np.minimum(first_fail, verified))


def test_sts_recovers_known_miscalibration():
    scales = [3.0, 0.5, 1.0]
    rounds = synthetic_rounds(30000, scales)
    before, scaling = position_metrics(rounds), sts.fit_sts(rounds)
    after = position_metrics(rounds, scaling)
    assert scaling.temps == pytest.approx(scales, rel=0.15) and not scaling.biases.any()
    assert before[0]["ece"] > 0.05 and before[1]["ece"] > 0.02  # negative control: the raw head is off
    assert all(m["ece"] < 0.02 for m in after)
    assert after[0]["auroc"] == before[0]["auroc"]  # one position: temperature scaling keeps the order exactly
    assert all(a["auroc"] >= b["auroc"] - 0.005 for a, b in zip(after, before))
    assert [m["n"] for m in after] == [int((rounds.verified > k).sum()) for k in range(3)]
    assert pooled_metrics(rounds, scaling)["ece"] < pooled_metrics(rounds)["ece"]


def test_affine_sts_recovers_a_shifted_head_that_temperatures_cannot():
    rounds = synthetic_rounds(30000, [1.5, 1.0], shifts=[1.0, -0.8])
    before, temperature_only, affine = position_metrics(rounds), sts.fit_sts(rounds), sts.fit_sts(rounds, True)
    assert affine.temps == pytest.approx([1.5, 1.0], rel=0.15)
    assert affine.biases == pytest.approx([-1.0, 0.8], abs=0.2)
    after = position_metrics(rounds, affine)
    assert all(m["ece"] < 0.015 for m in after)
    assert position_metrics(rounds, temperature_only)[0]["ece"] > 0.03  # negative control: a shift stays
    assert after[0]["auroc"] == before[0]["auroc"]  # an increasing map keeps the order
    held_out = sts.cross_validated(rounds, with_bias=True)
    assert [m["n"] for m in held_out] == [m["n"] for m in after] and all(m["ece"] < 0.02 for m in held_out)


def test_positions_without_data_keep_unit_temperature():
    rounds = rounds_from_records([{"logits": [2.0, 1.0, 0.0], "drafted": 3, "verified": 1, "accepted": 1}] * 50,
                                 num_positions=4)
    scaling = sts.fit_sts(rounds, with_bias=True)
    assert len(scaling.temps) == 4 and list(scaling.temps[1:]) == [1.0, 1.0, 1.0] and list(scaling.biases[1:]) == [0] * 3


@pytest.mark.parametrize("data", [{"temperatures": []}, {"temperatures": [1.0, 0.0]}, {"temperatures": "x"}, [1.0],
                                  {"temperatures": [1.0, 2.0], "biases": [0.5]}])
def test_load_scaling_refuses_bad_files(tmp_path, data):
    """One reader for sts.json (bench, train, and the engine's draft loader): bad contents are refused, whatever the
    caller."""
    path = tmp_path / CALIBRATION_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=CALIBRATION_FILE):
        load_scaling(path)
    assert load_scaling(tmp_path / "missing.json") is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sts")
    target = save_tiny_model(root / "target", "llama")
    return target, save_tiny_draft(root / "dspark", target, rank=8, block_size=4)


def spec_llm(target, draft, **options) -> LLM:
    return LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), kv_cache_gb=0.01,
               **options)


def prompts(n: int = 4) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(2, 300) for _ in range(rng.randrange(3, 20))] for _ in range(n)]


def test_sts_json_round_trip_and_engine_applies_it(tiny, tmp_path):
    target, draft = tiny
    calibrated = tmp_path / "calibrated"
    calibrated.mkdir()
    for f in draft.iterdir():
        (calibrated / f.name).write_bytes(f.read_bytes())
    temps, biases = [2.0, 0.5, 1.0, 4.0], [-1.0, 0.0, 0.5, 0.25]
    save_scaling(calibrated / CALIBRATION_FILE, Scaling(np.array(temps), np.array(biases)), ece_before=[0.1] * 4,
                 num_rounds=7)
    loaded = load_scaling(calibrated / CALIBRATION_FILE)
    assert (loaded.temps.tolist(), loaded.biases.tolist()) == (temps, biases)
    assert [t.tolist() for t in read_calibration(calibrated, 4)] == [temps, biases]
    assert json.loads((calibrated / CALIBRATION_FILE).read_text())["num_rounds"] == 7
    llm = spec_llm(target, calibrated)
    head = llm.model_runner.drafter.draft.confidence_head
    assert (head.temperatures.tolist(), head.biases.tolist()) == (temps, biases)
    seen = []
    record_round = llm.speculator.record_round
    llm.speculator.record_round = lambda seq, accepted: (seen.append(seq.proposal), record_round(seq, accepted))
    records = llm.record_confidences()
    llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert seen and len(records) == len(seen)
    for p, r in zip(seen, records):
        g = len(p.tokens)
        expected = torch.sigmoid((p.confidence_logits + torch.tensor(biases[:g])) / torch.tensor(temps[:g]))
        torch.testing.assert_close(p.confidence, expected)
        assert r.logits == p.confidence_logits.tolist()  # records hold the uncalibrated logits
    uncalibrated = spec_llm(target, draft)
    raw_records = uncalibrated.record_confidences()
    uncalibrated.generate(prompts(), SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert [r.logits for r in raw_records] == [r.logits for r in records]  # sts.json does not change the records


@pytest.mark.parametrize("policy", ["full", "fixed:2"])
def test_recorder_matches_spec_stats(tiny, policy):
    target, draft = tiny
    llm = spec_llm(target, draft, verify_policy=policy)
    assert llm.speculator.confidence_records is None  # off by default
    records = llm.record_confidences()
    llm.generate(prompts(6), SamplingParams(temperature=1.0, max_tokens=12, seed=1), use_tqdm=False)
    stats = llm.spec_stats
    assert len(records) == stats.num_drafts > 0
    assert sum(r.accepted for r in records) == stats.num_accepted_tokens
    assert all(len(r.logits) == r.drafted and 0 <= r.accepted <= r.verified <= r.drafted for r in records)
    rounds = rounds_from_records(records)
    for k in range(rounds.num_positions):
        _, label = cumulative(rounds, None, k)
        assert len(label) == (stats.verified_per_pos + [0] * 4)[k]
        assert int(label.sum()) == (stats.accepted_per_pos + [0] * 4)[k]
    if policy == "fixed:2":
        assert all(r.verified <= 2 for r in records)
    assert llm.record_confidences(False) is None and llm.speculator.confidence_records is None
