"""Reliability of the confidences behind rounds a server logged (--log-spec-rounds): the cumulative product Π c_i
against prefix acceptance, pooled and per position, under the raw confidence logits and under each sts.json given
(default: the draft's own), so one picture shows a calibration before and after a refit (`python -m train calibrate
--from-rounds`). Rounds served under a verify policy other than `full` count only the positions the target verified."""
import math
from pathlib import Path

from bench.report import markdown_table, save_and_print
from engine.calibration import (
    NUM_BINS,
    Rounds,
    Scaling,
    cumulative,
    draft_block_size,
    load_scaling,
    pooled,
    pooled_metrics,
    position_metrics,
    reliability,
    rounds_from_log,
)
from engine.calibration_monitor import read_rounds
from engine.drafts.loader import CALIBRATION_FILE


def run(args) -> dict:
    missing = [p for p in args.from_rounds if not Path(p).is_file() and not Path(f"{p}.1").is_file()]
    if missing:
        raise SystemExit(f"--from-rounds: no such round log: {', '.join(map(str, missing))}")
    block_size = draft_block_size(Path(args.draft)) if args.draft else 0
    try:
        rounds = rounds_from_log(read_rounds(*args.from_rounds), block_size, ", ".join(map(str, args.from_rounds)))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    files = args.sts
    if files is None:  # not given: the draft's own sts.json, where there is one
        own = Path(args.draft) / CALIBRATION_FILE if args.draft else None
        files = [own] if own is not None and own.is_file() else []
    curves = [curve("raw", rounds, None)] + [curve(str(f), rounds, scaling_for(Path(f), rounds, block_size))
                                             for f in files]
    return {"files": [str(p) for p in args.from_rounds], "draft": args.draft, "num_rounds": len(rounds.verified),
            "num_positions": rounds.num_positions, "bins": NUM_BINS, "curves": curves}


def scaling_for(path: Path, rounds: Rounds, block_size: int) -> Scaling:
    """path's scaling (as many positions as the draft's block_size, or at least as the rounds have)."""
    try:
        scaling = load_scaling(path, block_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if scaling is None:
        raise SystemExit(f"--sts: no such file: {path}")
    if len(scaling.temps) < rounds.num_positions:
        raise SystemExit(f"{path} scales {len(scaling.temps)} positions but the rounds have {rounds.num_positions}")
    return scaling


def curve(name: str, rounds: Rounds, scaling: Scaling | None) -> dict:
    """engine.calibration's metrics and reliability points of the rounds under one scaling (None = raw logits)."""
    return {"name": name, "pooled": pooled_metrics(rounds, scaling), "positions": position_metrics(rounds, scaling),
            "reliability": reliability(*pooled(rounds, scaling)),
            "reliability_per_position": [reliability(*cumulative(rounds, scaling, k))
                                         for k in range(rounds.num_positions)]}


def panel(c: dict, p: int) -> tuple[dict, dict]:
    """A curve's reliability points and metrics: pooled (p = 0) or at position p."""
    return (c["reliability"], c["pooled"]) if p == 0 else (c["reliability_per_position"][p - 1], c["positions"][p - 1])


def fmt(x, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def report(results: dict, out_dir: Path):
    curves = results["curves"]
    header = ["pos", "n", "accept"] + [f"{c['name']} {m}" for c in curves for m in ("ECE", "AUROC")]
    rows = []
    for p in range(1 + results["num_positions"]):
        ms = [panel(c, p)[1] for c in curves]
        rows.append([str(ms[0].get("position", "all")), str(ms[0]["n"]), fmt(ms[0]["accept_rate"], ".3f")]
                    + [s for m in ms for s in (fmt(m["ece"], ".4f"), fmt(m["auroc"], ".3f"))])
    print(f"\n{results['num_rounds']} logged rounds from {', '.join(results['files'])}: the cumulative product Π c_i "
          f"vs prefix acceptance (ECE over {results['bins']} bins)")
    save_and_print(results, out_dir / "calibration.json", header, rows)
    (out_dir / "calibration.md").write_text(markdown_table(header, rows) + "\n")
    plot(results, out_dir / "calibration.png")


def plot(results: dict, path: Path):
    """Reliability diagrams, pooled then per position: mean predicted vs realised survival per bin, a line per
    scaling with its ECE in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 1 + results["num_positions"]
    cols = min(4, panels)
    fig, axes = plt.subplots(math.ceil(panels / cols), cols, figsize=(3.6 * cols, 3.4 * math.ceil(panels / cols)),
                             squeeze=False)
    for p, ax in enumerate(axes.flat):
        if p >= panels:
            ax.axis("off")
            continue
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for c in results["curves"]:
            points, m = panel(c, p)
            name = c["name"] if c["name"] == "raw" else "/".join(Path(c["name"]).parts[-2:])
            ax.plot(points["predicted"], points["realised"], "o-", ms=3, label=f"{name} (ECE {fmt(m['ece'], '.3f')})")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{'pooled' if p == 0 else f'position {p}'} "
               f"(n={panel(results['curves'][0], p)[1]['n']})", xlabel="predicted survival Π c_i", ylabel="realised")
        ax.legend(fontsize=7)
    fig.suptitle(f"reliability of {results['num_rounds']} logged rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
