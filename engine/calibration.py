"""Calibration of a DSpark draft's confidence head, measured: ECE / AUROC / Brier of the cumulative product
Π_{i<=k} c_i against prefix acceptance, per position and pooled, and the per-position scaling of sts.json
(c_k = σ((z_k + b_k) / T_k)) that the engine applies, read and written here. Fitting that scaling is train.sts.

Data are the engine's ConfidenceRecords (engine.record_confidences): the uncalibrated logits of each drafted block and
how many of its tokens were verified / accepted. Position k (0-based) of a round is labelled accepted > k, and only
if k < verified."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_BINS = 20  # DeepSpec's CONFIDENCE_NUM_BINS
EPS = 1e-8


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


def rounds_from_log(records: list, block_size: int = 0, source: str = "the round log") -> Rounds:
    """Rounds a server logged (engine.calibration_monitor.read_rounds) -> arrays padded to block_size, refusing
    (ValueError naming source) a log with no rounds, a line that is not a round, a round with more confidence logits
    than the draft's block_size (logged with another draft), or one whose lengths disagree (0 <= accepted <= verified
    <= drafted = its number of logits). A shorter block is a round that drafted fewer tokens (a planner's choice, or
    num_draft_tokens below the block size): its later positions carry no label."""
    if not records:
        raise ValueError(f"{source}: no logged rounds")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {"logits", "drafted", "verified", "accepted"} <= r.keys():
            raise ValueError(f"{source}: round {i} is not a logged round (logits, drafted, verified, accepted): {r!r}")
        g = len(r["logits"])
        if block_size and g > block_size:
            raise ValueError(f"{source}: round {i} has {g} confidence logits but the draft's block_size is "
                             f"{block_size}: were these rounds logged with another draft?")
        if not 0 <= r["accepted"] <= r["verified"] <= r["drafted"] == g:
            raise ValueError(f"{source}: round {i} is inconsistent: {g} logits, drafted {r['drafted']}, verified "
                             f"{r['verified']}, accepted {r['accepted']}")
    return rounds_from_records(records, block_size)


def draft_block_size(draft_dir: Path) -> int:
    """block_size from a draft directory's config.json (dspark_block_size: a DeepSeek-V4 checkpoint's own module)."""
    path = Path(draft_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"draft directory {draft_dir} has no config.json")
    config = json.loads(path.read_text())
    return int(config["block_size"] if "block_size" in config else config["dspark_block_size"])


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


def metrics(pred, label) -> dict:
    label = np.asarray(label)
    return {"n": int(label.size), "accept_rate": float(label.mean()) if label.size else float("nan"),
            "mean_pred": float(np.mean(pred)) if label.size else float("nan"),
            "ece": ece(pred, label), "auroc": auroc(pred, label), "brier": brier(pred, label)}


def position_metrics(rounds: Rounds, scaling: Scaling | None = None) -> list[dict]:
    """Per position k = 1..G: the metrics of the cumulative product (scaling None = uncalibrated)."""
    return [{"position": k + 1, **metrics(*cumulative(rounds, scaling, k))} for k in range(rounds.num_positions)]


def pooled(rounds: Rounds, scaling: Scaling | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true survival of every (round, verified position) pair, position 1's first."""
    pairs = [cumulative(rounds, scaling, k) for k in range(rounds.num_positions)] or [(np.zeros(0), np.zeros(0, bool))]
    return np.concatenate([p for p, _ in pairs]), np.concatenate([y for _, y in pairs])


def pooled_metrics(rounds: Rounds, scaling: Scaling | None = None) -> dict:
    """The metrics over every (round, verified position) pair at once."""
    return metrics(*pooled(rounds, scaling))


def reliability(pred, label, bins: int = NUM_BINS) -> dict:
    """A reliability diagram's points: per non-empty equal-width bin of the prediction, how many pairs, their mean
    prediction and the fraction of them that came true (ece() is the count-weighted mean gap between the two)."""
    count, mean_pred, mean_label = bin_stats(pred, label, bins)
    full = count > 0
    return {"count": count[full].tolist(), "predicted": mean_pred[full].tolist(), "realised": mean_label[full].tolist()}


def save_scaling(path: Path, scaling: Scaling, **meta) -> Path:
    """sts.json: "temperatures" (what DeepSpec's STS writes) and, when any is non-zero, "biases"."""
    path = Path(path)
    data = {"temperatures": [float(t) for t in scaling.temps]}
    if np.any(scaling.biases):
        data["biases"] = [float(b) for b in scaling.biases]
    path.write_text(json.dumps(data | meta, indent=2))
    return path


def load_scaling(path: Path, num_positions: int = 0) -> Scaling | None:
    """sts.json's per-position temperatures and (optional, default 0) biases, or None without the file. Refuses a
    file whose temperatures are not positive finite numbers, num_positions of them (0: any number but none), or whose
    biases are not as many finite numbers."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data = data if isinstance(data, dict) else {}
    temps = data.get("temperatures")
    length = num_positions or (len(temps) if isinstance(temps, list) and temps else -1)
    biases = data.get("biases", [0.0] * max(length, 0))
    if not numbers(temps, length) or not all(t > 0 for t in temps):
        expected = num_positions or "one or more"
        raise ValueError(f"{path}: 'temperatures' must be {expected} positive finite numbers, got {temps!r}")
    if not numbers(biases, length):
        raise ValueError(f"{path}: 'biases' must be {length} finite numbers, got {biases!r}")
    return Scaling(np.array(temps, dtype=np.float64), np.array(biases, dtype=np.float64))


def numbers(values, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values))
