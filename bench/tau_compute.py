"""τ against training compute over the default DSpark draft's training legs (issue 32).

Compute is counted in anchored blocks trained on: steps × conversations per step × anchors per conversation (each
block is γ = 7 supervised positions; nominal anchors: a short answer gives fewer). For each leg, the teacher-forced
τ estimate comes from its training log (on its own training data), and the held-out τ is what `bench accept`
measured after it. Two fits of held-out τ are made, and both are extrapolated: τ linear in log10(blocks), and
τ − 1 as a power of blocks.

    python -m bench.tau_compute --leg "leg 1" drafts/dspark-smollm2-135m/train_log.jsonl 1 900 2 48 1.22 \\
        --leg "leg 2" drafts/dspark-smollm2-135m/train_log.jsonl 901 1900 2 48 1.31 ... --out docs/img/tau.png
"""
import argparse
import json
import math
from pathlib import Path


def read_leg(log: str, first: int, last: int) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    return [(r["step"], r["tau_estimate"]) for r in rows if first <= r["step"] <= last]


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.tau_compute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leg", nargs=7, action="append", required=True,
                        metavar=("LABEL", "LOG", "FIRST_STEP", "LAST_STEP", "BATCH", "ANCHORS", "HELD_OUT_TAU"),
                        help="a leg: its log and step range, conversations per step, anchors per conversation, "
                        "the held-out τ measured after it ('-' = none)")
    parser.add_argument("--predict", type=float, nargs="+", default=[10.0, 100.0],
                        help="multiples of the legs' total compute to extrapolate the fits to")
    parser.add_argument("--window", type=int, default=10, help="log entries per point of the teacher-forced curve")
    parser.add_argument("--out", default="bench_out/tau_vs_compute.png")
    args = parser.parse_args()

    total, legs = 0, []
    for label, log, first, last, batch, anchors, held in args.leg:
        entries = read_leg(log, int(first), int(last))
        if not entries:
            raise ValueError(f"no log entries for steps {first}-{last} in {log}")
        per_step, start = int(batch) * int(anchors), total
        curve = [(start + (step - int(first) + 1) * per_step, tau) for step, tau in entries]
        total = start + (int(last) - int(first) + 1) * per_step
        end_tf = sum(t for _, t in entries[-5:]) / len(entries[-5:])
        legs.append({"label": label, "steps": int(last) - int(first) + 1, "per_step": per_step, "blocks": total,
                     "curve": curve, "tf_end": end_tf, "held": None if held == "-" else float(held)})

    print("| leg | steps | blocks per step | cumulative blocks | teacher-forced τ at the end | held-out τ |")
    print("|---|---:|---:|---:|---:|---:|")
    for leg in legs:
        held = "–" if leg["held"] is None else f"{leg['held']:.2f}"
        print(f"| {leg['label']} | {leg['steps']:,} | {leg['per_step']} | {leg['blocks']:,} | {leg['tf_end']:.2f} | "
              f"{held} |")
    measured = [(leg["blocks"], leg["held"]) for leg in legs if leg["held"] is not None]
    xs = [math.log10(c) for c, _ in measured]
    a, b = linear_fit(xs, [t for _, t in measured])
    pa, pb = linear_fit(xs, [math.log10(t - 1) for _, t in measured])
    resid = [t - (a + b * x) for x, (_, t) in zip(xs, measured)]
    print(f"\nheld-out τ = {a:.3f} + {b:.3f}·log10(blocks)  ({len(measured)} points, residuals "
          f"{', '.join(f'{r:+.3f}' for r in resid)})")
    print(f"held-out τ − 1 = {10 ** pa:.3g}·blocks^{pb:.3f}")
    predictions = []
    for factor in args.predict:
        c = factor * total
        lin, power = a + b * math.log10(c), 1 + 10 ** (pa + pb * math.log10(c))
        predictions.append((c, lin, power))
        print(f"{factor:g}× the legs' {total:,} blocks ({c:.3g}): τ {lin:.2f} (log-linear), {power:.2f} (power law)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for leg in legs:
        pts, w = leg["curve"], args.window
        smooth = [(pts[i + w - 1][0], sum(t for _, t in pts[i:i + w]) / w) for i in range(0, len(pts) - w + 1, w)]
        ax.plot(*zip(*smooth), lw=1.2, label=f"{leg['label']}: teacher-forced τ (training data)")
    ax.plot(*zip(*measured), "ko", ms=7, label="held-out τ after the leg (bench accept)")
    hi = max(c for c, _, _ in predictions)
    grid = [10 ** (xs[0] + i * (math.log10(hi) - xs[0]) / 50) for i in range(51)]
    ax.plot(grid, [a + b * math.log10(c) for c in grid], "k--", lw=1, label="fit: τ linear in log(blocks)")
    ax.plot(grid, [1 + 10 ** (pa + pb * math.log10(c)) for c in grid], "k:", lw=1, label="fit: τ − 1 ∝ blocks^k")
    for c, lin, power in predictions:
        ax.plot([c, c], [power, lin], "r-", lw=1)
        ax.annotate(f"{c / total:g}×: {min(lin, power):.2f}–{max(lin, power):.2f}", (c, max(lin, power)),
                    textcoords="offset points", xytext=(-30, 6), fontsize=8, color="r")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative anchored blocks trained on (steps × conversations × anchors)")
    ax.set_ylabel("τ (tokens per drafted round, all 7 positions verified)")
    ax.set_title("Default DSpark draft (SmolLM2-135M): τ against training compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
