"""Calibration watched while serving. Every verified round says, for each position the target checked, what the
planner predicted (the calibrated survival Π c) and what happened (accepted or not). CalibrationMonitor keeps
per-position sums over the last `window` rounds, and binned ones for a reliability curve, updated in O(block) per
round, so windowed ECE and predicted-vs-realised survival cost nothing to read. RoundLog appends each round's raw
confidence logits and lengths (jsonl, rotated at a size bound) so the scaling can be refitted from served traffic
(`python -m train calibrate --from-rounds`)."""
import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.calibration import NUM_BINS

log = logging.getLogger("engine")
JUDGED_AFTER = 500  # a position verified fewer times in the window is too noisy to call drifted


@dataclass
class CalibrationSnapshot:
    """What /metrics shows: per position (1-based in the labels), over the window's rounds."""
    ece: list[float]                 # per position; nan where no round verified it
    predicted: list[float]           # mean predicted survival
    realised: list[float]            # fraction of those rounds that accepted the position
    pooled_ece: float                # over every (round, verified position) of the window
    worst_ece: float                 # the largest per-position ECE among positions verified >= JUDGED_AFTER times
    tokens_predicted: float          # per round: 1 + Σ predicted survival of the verified positions
    tokens_realised: float           # per round: 1 + accepted
    drifting: bool                   # at the last complete window, worst_ece was above the threshold
    rounds: int                      # in the window
    version: int                     # of the calibration the predictions came from


class CalibrationMonitor:
    def __init__(self, num_positions: int, window: int = 10000, threshold: float = 0.05, bins: int = NUM_BINS):
        self.window, self.threshold, self.bins = window, threshold, bins
        self.rounds: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (predicted survivals, labels) per round
        shape = (num_positions, bins)
        self.count, self.pred_sum, self.label_sum = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self.token_sums = np.zeros(2)
        self.since_check, self.drifting, self.version = 0, False, 1

    def record(self, confidences: list[float], verified: int, accepted: int):
        """One round: the calibrated confidences of its drafted block, how many the target verified and accepted."""
        pred = np.cumprod(np.asarray(confidences[:verified], dtype=np.float64))
        label = (np.arange(verified) < accepted).astype(np.float64)
        self.add(pred, label, 1.0)
        self.rounds.append((pred, label))
        if len(self.rounds) > self.window:
            self.add(*self.rounds.popleft(), -1.0)
        self.since_check += 1
        if self.since_check >= self.window:
            self.check()

    def add(self, pred: np.ndarray, label: np.ndarray, sign: float):
        """Add (sign 1) or remove (sign -1) a round's positions from the window's sums."""
        self.token_sums += sign * np.array([1.0 + pred.sum(), 1.0 + label.sum()])
        k = np.arange(pred.size)
        b = np.minimum((np.clip(pred, 0, 1) * self.bins).astype(np.int64), self.bins - 1)
        np.add.at(self.count, (k, b), sign)
        np.add.at(self.pred_sum, (k, b), sign * pred)
        np.add.at(self.label_sum, (k, b), sign * label)

    def check(self):
        """Once a window of new rounds: flag (and log) a position whose ECE is above the threshold. Per position, not
        pooled: the late positions, rarely accepted and rarely predicted to be, would dilute a drift at the first."""
        self.since_check = 0
        position, ece = self.worst()
        self.drifting = bool(ece > self.threshold)
        if self.drifting:
            log.warning("confidence calibration drifted: ECE %.3f at draft position %d over the last %d rounds "
                        "(threshold %.3f); refit with `python -m train calibrate --from-rounds` and reload", ece,
                        position + 1, len(self.rounds), self.threshold)

    def worst(self) -> tuple[int, float]:
        """(position, ECE) of the worst-calibrated position among those judged; (-1, nan) when none is."""
        count = self.count.sum(1)
        judged = np.flatnonzero(count >= JUDGED_AFTER)
        if not judged.size:
            return -1, float("nan")
        ece = np.abs(self.pred_sum - self.label_sum).sum(1)[judged] / count[judged]
        return int(judged[ece.argmax()]), float(ece.max())

    def pooled_ece(self) -> float:
        """Every (round, verified position) pair in shared bins, as engine.calibration's pooled metrics bin them."""
        total = self.count.sum()
        gaps = np.abs(self.pred_sum.sum(0) - self.label_sum.sum(0))
        return float(gaps.sum() / total) if total else float("nan")

    def reset(self, version: int):
        """A new calibration: its predictions start a fresh window."""
        self.__init__(self.count.shape[0], self.window, self.threshold, self.bins)
        self.version = version

    def snapshot(self) -> CalibrationSnapshot:
        count = self.count.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ece = np.abs(self.pred_sum - self.label_sum).sum(1) / count
            predicted, realised = self.pred_sum.sum(1) / count, self.label_sum.sum(1) / count
        n = len(self.rounds)
        tokens = self.token_sums / n if n else (float("nan"), float("nan"))
        return CalibrationSnapshot(ece.tolist(), predicted.tolist(), realised.tolist(), self.pooled_ece(),
                                   self.worst()[1], float(tokens[0]), float(tokens[1]), self.drifting, n, self.version)


class RoundLog:
    """Appends {"logits", "drafted", "verified", "accepted"} lines (engine.outputs.ConfidenceRecord's fields); past
    max_bytes the file moves to PATH.1 (replacing an older one) and a new one starts, so at most twice the bound is
    kept."""

    FLUSH_EVERY = 64  # rounds; and at each reload

    def __init__(self, path: str | Path, max_bytes: int = 64 << 20):
        self.path, self.max_bytes, self.unflushed = Path(path), max_bytes, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the engine's lifetime

    def write(self, logits: list[float], drafted: int, verified: int, accepted: int):
        line = json.dumps({"logits": [round(z, 5) for z in logits], "drafted": drafted, "verified": verified,
                           "accepted": accepted}, separators=(",", ":"))
        self.file.write(line + "\n")
        self.unflushed += 1
        if self.unflushed >= self.FLUSH_EVERY:
            self.flush()
        if self.file.tell() >= self.max_bytes:
            self.rotate()

    def rotate(self):
        self.file.close()
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def flush(self):
        self.file.flush()
        self.unflushed = 0


def read_rounds(*paths: str | Path) -> list[dict]:
    """Logged rounds, oldest first: each PATH's rotated PATH.1 before PATH itself. A last line cut short (the server
    stopped mid-write) is skipped; a bad line anywhere else is an error."""
    rows = []
    for path in paths:
        for file in (Path(str(path) + ".1"), Path(path)):
            if file.is_file():
                rows += parse_lines(file)
    return rows


def parse_lines(file: Path) -> list[dict]:
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{file}: line {i + 1} is not a logged round: {line[:80]!r}") from None
    return rows
