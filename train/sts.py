"""Confidence-head calibration (paper §3.2.1): ECE / AUROC / Brier of the cumulative product Π_{i<=k} c_i against
prefix acceptance, and Sequential Temperature Scaling (one temperature per position, fitted left to right).

Data are the engine's ConfidenceRecords (engine.record_confidences): the uncalibrated logits of each drafted block and
how many of its tokens were verified / accepted. Position k (0-based) of a round is labelled accepted > k, and only
if k < verified."""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_BINS = 20  # DeepSpec's CONFIDENCE_NUM_BINS
EPS = 1e-8
GRID = np.geomspace(0.05, 20.0, 121)  # coarse temperature grid; a finer one follows around its best point
FINE_POINTS = 41


@dataclass
class Rounds:
    logits: np.ndarray    # [N, G] float64 uncalibrated confidence logits (nan past a round's drafted length)
    verified: np.ndarray  # [N]
    accepted: np.ndarray  # [N]

    @property
    def num_positions(self) -> int:
        return self.logits.shape[1]


def rounds_from_records(records, num_positions: int = 0) -> Rounds:
    """ConfidenceRecords (or their dicts) -> arrays; num_positions pads to the draft's block size."""
    rows = [r if isinstance(r, dict) else vars(r) for r in records]
    width = max([num_positions] + [len(r["logits"]) for r in rows])
    logits = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        logits[i, :len(r["logits"])] = r["logits"]
    verified = np.array([r["verified"] for r in rows], dtype=np.int64)
    accepted = np.array([r["accepted"] for r in rows], dtype=np.int64)
    return Rounds(logits, verified, accepted)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow for large |z|


def clamp(pred) -> np.ndarray:
    return np.clip(np.asarray(pred, dtype=np.float64), EPS, 1 - EPS)


def bin_stats(pred, label, bins: int = NUM_BINS):
    """Per equal-width bin of the prediction: count, mean prediction, mean label (nan where empty)."""
    pred, label = clamp(pred), np.asarray(label, dtype=np.float64)
    idx = np.minimum((pred * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (count, np.bincount(idx, pred, bins) / count, np.bincount(idx, label, bins) / count)


def ece(pred, label, bins: int = NUM_BINS) -> float:
    count, mean_pred, mean_label = bin_stats(pred, label, bins)
    if not count.sum():
        return float("nan")
    full = count > 0
    return float((count[full] * np.abs(mean_pred[full] - mean_label[full])).sum() / count.sum())


def auroc(pred, label) -> float:
    """Exact Mann-Whitney AUROC; tied predictions share their average rank. nan if one class is absent."""
    pred, label = clamp(pred), np.asarray(label, dtype=bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if not pos or not neg:
        return float("nan")
    _, inverse, counts = np.unique(pred, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def brier(pred, label) -> float:
    pred, label = clamp(pred), np.asarray(label, dtype=np.float64)
    return float(np.mean((pred - label) ** 2)) if pred.size else float("nan")


def survival(logits: np.ndarray, temps: np.ndarray) -> np.ndarray:
    """Π_i σ(z_i / T_i) over the last axis."""
    return np.prod(sigmoid(logits / temps), axis=-1)


def cumulative(rounds: Rounds, temps, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true survival of the first k+1 drafts, over the rounds that verified position k."""
    rows = rounds.verified > k
    pred = survival(rounds.logits[rows, :k + 1], np.asarray(temps, dtype=np.float64)[:k + 1])
    return pred, rounds.accepted[rows] > k


def fit_sts(rounds: Rounds) -> np.ndarray:
    """Temperatures T_1..T_G, each minimising the ECE of the cumulative product with earlier ones fixed."""
    temps = np.ones(rounds.num_positions)
    for k in range(rounds.num_positions):
        rows = rounds.verified > k
        if rows.any():
            prefix = survival(rounds.logits[rows, :k], temps[:k])
            temps[k] = search_temperature(prefix, rounds.logits[rows, k], rounds.accepted[rows] > k)
    return temps


def search_temperature(prefix: np.ndarray, z: np.ndarray, label: np.ndarray) -> float:
    def loss(t: float) -> float:
        return ece(prefix * sigmoid(z / t), label)
    best = min(GRID, key=loss)
    step = GRID[1] / GRID[0]
    fine = np.clip(best * np.geomspace(1 / step, step, FINE_POINTS), GRID[0], GRID[-1])
    return float(min(fine, key=loss))


def metrics(pred, label) -> dict:
    label = np.asarray(label)
    return {"n": int(label.size), "accept_rate": float(label.mean()) if label.size else float("nan"),
            "mean_pred": float(np.mean(pred)) if label.size else float("nan"),
            "ece": ece(pred, label), "auroc": auroc(pred, label), "brier": brier(pred, label)}


def position_metrics(rounds: Rounds, temps=None) -> list[dict]:
    """Per position k = 1..G: the metrics of the cumulative product (temps None = uncalibrated)."""
    temps = np.ones(rounds.num_positions) if temps is None else np.asarray(temps, dtype=np.float64)
    return [{"position": k + 1, **metrics(*cumulative(rounds, temps, k))} for k in range(rounds.num_positions)]


def pooled_metrics(rounds: Rounds, temps=None) -> dict:
    """The metrics over every (round, verified position) pair at once."""
    temps = np.ones(rounds.num_positions) if temps is None else np.asarray(temps, dtype=np.float64)
    pairs = [cumulative(rounds, temps, k) for k in range(rounds.num_positions)]
    return metrics(np.concatenate([p for p, _ in pairs]), np.concatenate([y for _, y in pairs]))


def save_sts(path: Path, temps, **meta) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"temperatures": [float(t) for t in temps], **meta}, indent=2))
    return path


def load_temperatures(path: Path) -> np.ndarray | None:
    path = Path(path)
    return np.array(json.loads(path.read_text())["temperatures"], dtype=np.float64) if path.is_file() else None
