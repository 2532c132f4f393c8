"""Sequential Temperature Scaling of a DSpark draft's confidence head (paper §3.2.1): one temperature per position,
fitted left to right to minimise the ECE of the cumulative product Π_{i<=k} c_i against prefix acceptance, optionally
with a per-position bias as well (c_k = σ((z_k + b_k) / T_k)): a temperature alone can only sharpen or flatten
confidences around 1/2, not move them all down, which is what a head that is overconfident on unseen text needs.

The measurements (ECE / AUROC / Brier, the rounds, the scaling and its sts.json) are engine.calibration's."""
import numpy as np

from engine.calibration import Rounds, Scaling, cumulative, ece, metrics, sigmoid

GRID = np.geomspace(0.05, 20.0, 121)  # coarse temperature grid; a finer one follows around its best point
FINE_POINTS = 41
BIAS_GRID = np.linspace(-3.0, 3.0, 61)  # logit shifts tried per position by the affine fit


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
