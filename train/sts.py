"""Confidence-head calibration (paper §3.2.1): ECE / AUROC / Brier of the cumulative product Π_{i<=k} c_i against
prefix acceptance, and Sequential Temperature Scaling (one temperature per position, fitted left to right), optionally
with a per-position bias as well (c_k = σ((z_k + b_k) / T_k)): a temperature alone can only sharpen or flatten
confidences around 1/2, not move them all down, which is what a head that is overconfident on unseen text needs.

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
BIAS_GRID = np.linspace(-3.0, 3.0, 61)  # logit shifts tried per position by the affine fit


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


@dataclass
class Scaling:
    """Per-position calibration c_k = σ((z_k + b_k) / T_k); zero biases are plain temperature scaling."""
    temps: np.ndarray
    biases: np.ndarray

    @classmethod
    def identity(cls, num_positions: int) -> "Scaling":
        return cls(np.ones(num_positions), np.zeros(num_positions))

    def confidences(self, logits: np.ndarray) -> np.ndarray:
        """σ((z + b) / T) of logits [..., G'] (G' <= G positions)."""
        g = logits.shape[-1]
        return sigmoid((logits + self.biases[:g]) / self.temps[:g])

    def survival(self, logits: np.ndarray) -> np.ndarray:
        """Π_i c_i over the last axis."""
        return np.prod(self.confidences(logits), axis=-1)


def cumulative(rounds: Rounds, scaling: Scaling | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true survival of the first k+1 drafts, over the rounds that verified position k."""
    rows = rounds.verified > k
    scaling = Scaling.identity(rounds.num_positions) if scaling is None else scaling
    pred = scaling.survival(rounds.logits[rows, :k + 1])
    return pred, rounds.accepted[rows] > k


def fit_sts(rounds: Rounds, with_bias: bool = False) -> Scaling:
    """T_1..T_G (and b_1..b_G with_bias), each position minimising the ECE of the cumulative product with the earlier
    positions' scaling fixed."""
    scaling = Scaling.identity(rounds.num_positions)
    for k in range(rounds.num_positions):
        rows = rounds.verified > k
        if rows.any():
            prefix = scaling.survival(rounds.logits[rows, :k])
            z, label = rounds.logits[rows, k], rounds.accepted[rows] > k
            fits = [(b, *search_temperature(prefix, z + b, label)) for b in (BIAS_GRID if with_bias else [0.0])]
            scaling.biases[k], scaling.temps[k], _ = min(fits, key=lambda f: (f[2], abs(f[0])))
    return scaling


def search_temperature(prefix: np.ndarray, z: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """The temperature minimising the ECE of prefix · σ(z / T), and that ECE."""
    def loss(t: float) -> float:
        return ece(prefix * sigmoid(z / t), label)
    best = min(GRID, key=loss)
    step = GRID[1] / GRID[0]
    fine = np.clip(best * np.geomspace(1 / step, step, FINE_POINTS), GRID[0], GRID[-1])
    t = float(min(fine, key=loss))
    return t, loss(t)


def cross_validated(rounds: Rounds, with_bias: bool, folds: int = 2, seed: int = 0) -> list[dict]:
    """Per-position metrics of a scaling fitted on the other folds, pooled over folds: the calibration to expect on
    rounds the fit has not seen."""
    fold = np.random.default_rng(seed).integers(0, folds, size=len(rounds.verified))
    preds = [[] for _ in range(rounds.num_positions)]
    labels = [[] for _ in range(rounds.num_positions)]
    for f in range(folds):
        scaling = fit_sts(subset(rounds, fold != f), with_bias)
        held_out = subset(rounds, fold == f)
        for k in range(rounds.num_positions):
            pred, label = cumulative(held_out, scaling, k)
            preds[k].append(pred)
            labels[k].append(label)
    return [{"position": k + 1, **metrics(np.concatenate(p), np.concatenate(y))}
            for k, (p, y) in enumerate(zip(preds, labels))]


def subset(rounds: Rounds, rows: np.ndarray) -> Rounds:
    return Rounds(rounds.logits[rows], rounds.verified[rows], rounds.accepted[rows])


def metrics(pred, label) -> dict:
    label = np.asarray(label)
    return {"n": int(label.size), "accept_rate": float(label.mean()) if label.size else float("nan"),
            "mean_pred": float(np.mean(pred)) if label.size else float("nan"),
            "ece": ece(pred, label), "auroc": auroc(pred, label), "brier": brier(pred, label)}


def position_metrics(rounds: Rounds, scaling: Scaling | None = None) -> list[dict]:
    """Per position k = 1..G: the metrics of the cumulative product (scaling None = uncalibrated)."""
    return [{"position": k + 1, **metrics(*cumulative(rounds, scaling, k))} for k in range(rounds.num_positions)]


def pooled_metrics(rounds: Rounds, scaling: Scaling | None = None) -> dict:
    """The metrics over every (round, verified position) pair at once."""
    pairs = [cumulative(rounds, scaling, k) for k in range(rounds.num_positions)]
    return metrics(np.concatenate([p for p, _ in pairs]), np.concatenate([y for _, y in pairs]))


def save_sts(path: Path, scaling: Scaling, **meta) -> Path:
    """sts.json: "temperatures" (what DeepSpec's STS writes) and, when any is non-zero, "biases"."""
    path = Path(path)
    data = {"temperatures": [float(t) for t in scaling.temps]}
    if np.any(scaling.biases):
        data["biases"] = [float(b) for b in scaling.biases]
    path.write_text(json.dumps(data | meta, indent=2))
    return path


def load_scaling(path: Path) -> Scaling | None:
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    temps = np.array(data["temperatures"], dtype=np.float64)
    return Scaling(temps, np.array(data.get("biases", np.zeros(len(temps))), dtype=np.float64))
