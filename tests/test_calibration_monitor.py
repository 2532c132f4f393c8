"""The calibration monitor's windowed numbers against hand-computed cases and engine.calibration's offline ECE, its
drift flag (with a calibrated negative control), and the round log's rotation."""
import logging

import numpy as np
import pytest

from engine.calibration import ece
from engine.calibration_monitor import CalibrationMonitor, RoundLog, read_rounds

ROUNDS = [([0.9, 0.5, 0.8], 3, 2), ([0.6, 0.5, 0.5], 2, 0), ([0.2, 0.9, 0.9], 1, 1)]


def fed(rounds, **options) -> CalibrationMonitor:
    monitor = CalibrationMonitor(3, **({"window": 3, "threshold": 0.05, "bins": 4} | options))
    for args in rounds:
        monitor.record(*args)
    return monitor


def test_windowed_numbers_equal_a_hand_computed_case():
    """Survivals: round 1 [0.9, 0.45, 0.36] labels [1, 1, 0]; round 2 [0.6, 0.3] labels [0, 0]; round 3 [0.2]
    label [1]. Four bins of width 0.25."""
    s = fed(ROUNDS).snapshot()
    assert s.ece == pytest.approx([(0.1 + 0.6 + 0.8) / 3, abs(0.75 - 1) / 2, 0.36])
    assert s.predicted == pytest.approx([1.7 / 3, 0.375, 0.36])
    assert s.realised == pytest.approx([2 / 3, 0.5, 0.0])
    assert s.pooled_ece == pytest.approx((0.8 + 0.11 + 0.6 + 0.1) / 6)  # bins: {0.2}, {0.45, 0.36, 0.3}, {0.6}, {0.9}
    assert s.tokens_predicted == pytest.approx((2.71 + 1.9 + 1.2) / 3)
    assert s.tokens_realised == pytest.approx(2.0)
    assert (s.rounds, s.version) == (3, 1)


def test_the_window_forgets_old_rounds_exactly():
    """Five rounds through a window of three leave the sums of the last three alone."""
    later = ROUNDS + [([0.7, 0.7, 0.7], 3, 3), ([0.4, 0.1, 0.1], 1, 0)]
    a, b = fed(later), fed(later[2:])
    for name in ("count", "pred_sum", "label_sum", "token_sums"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-12)


def test_pooled_ece_equals_the_offline_measure():
    rng = np.random.default_rng(0)
    rounds = [(rng.uniform(0, 1, 3).tolist(), int(rng.integers(1, 4)), int(rng.integers(0, 4))) for _ in range(300)]
    rounds = [(c, v, min(a, v)) for c, v, a in rounds]
    monitor = fed(rounds, window=1000, bins=20)
    pairs = [(p, float(k < a)) for c, v, a in rounds for k, p in enumerate(np.cumprod(c[:v]))]
    assert monitor.snapshot().pooled_ece == pytest.approx(ece([p for p, _ in pairs], [y for _, y in pairs]))


def test_drift_is_flagged_and_logged_and_a_calibrated_head_is_not(caplog):
    """Seeded: positions accepted with exactly the predicted conditional probability give an ECE near 0 (negative
    control); the same rounds predicted overconfidently (the square root of each confidence) cross the threshold."""
    rng = np.random.default_rng(1)
    confidences = rng.uniform(0.2, 0.95, (4000, 3))
    accepted = [int(np.argmin(np.append(rng.uniform(size=3) < c, False))) for c in confidences]
    with caplog.at_level(logging.WARNING, logger="engine"):
        calibrated = fed([(c.tolist(), 3, a) for c, a in zip(confidences, accepted)], window=4000, bins=20)
    assert calibrated.snapshot().pooled_ece < 0.02 and not calibrated.drifting and not caplog.records
    with caplog.at_level(logging.WARNING, logger="engine"):
        overconfident = fed([(np.sqrt(c).tolist(), 3, a) for c, a in zip(confidences, accepted)], window=4000,
                            bins=20)
    assert overconfident.snapshot().pooled_ece > 0.15 and overconfident.drifting
    assert "calibration drifted" in caplog.text


def test_reset_starts_a_new_version_with_an_empty_window():
    monitor = fed(ROUNDS)
    monitor.reset(2)
    s = monitor.snapshot()
    assert (s.rounds, s.version, s.drifting) == (0, 2, False) and np.isnan(s.pooled_ece)


def test_round_log_rotates_and_reads_back_oldest_first(tmp_path):
    log = RoundLog(tmp_path / "rounds.jsonl", max_bytes=200)
    for i in range(12):
        log.write([0.5 * i, -1.0], 2, 2, i % 3)
    log.flush()
    rows = read_rounds(tmp_path / "rounds.jsonl")
    assert (tmp_path / "rounds.jsonl.1").is_file()
    assert [r["accepted"] for r in rows] == [i % 3 for i in range(12)][-len(rows):]
    assert rows[-1] == {"logits": [5.5, -1.0], "drafted": 2, "verified": 2, "accepted": 2}
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 2 * 200 + 60  # bounded: two files of ~the limit


def test_a_last_line_cut_short_is_skipped_and_a_bad_line_elsewhere_is_named(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"logits": [0.1], "drafted": 1, "verified": 1, "accepted": 1}\n{"logits": [0.')
    assert [r["accepted"] for r in read_rounds(path)] == [1]
    path.write_text('{"logits": [0.\n{"logits": [], "drafted": 0, "verified": 0, "accepted": 0}\n')
    with pytest.raises(ValueError, match="line 1 is not a logged round"):
        read_rounds(path)
