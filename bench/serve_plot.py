"""The two pictures of a serve-sweep (PNG): aggregate output throughput vs per-user tokens/s (one line per
configuration, points labelled with the concurrency) and the mean verify budget per request and round vs concurrency."""
from pathlib import Path


def series(results: dict) -> dict[str, list[dict]]:
    """Measured rows per configuration, in sweep order."""
    out = {}
    for r in results["rows"]:
        if "error" not in r:
            out.setdefault(r["config"], []).append(r)
    return out


def plot_sweep(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    title = f"{Path(results['model']).name}, {results['dataset']}, T={results['temperature']}, " \
            f"{results['threads']} threads"
    paths = [out_dir / "serve_pareto.png", out_dir / "serve_verify_budget.png"]
    pareto, budget = plt.subplots(figsize=(7, 5)), plt.subplots(figsize=(7, 4))
    for i, (name, rows) in enumerate(series(results).items()):
        draw_pareto(pareto[1], name, rows, f"C{i}")
        draw_budget(budget[1], name, rows, f"C{i}")
    label(pareto[1], "per-user tokens/s (mean over requests, after the first token)", "aggregate output tokens/s",
          "throughput vs per-user speed (HTTP): " + title)
    label(budget[1], "concurrency", "mean draft tokens verified per request and round", "verify budget: " + title)
    budget[1].set_xscale("log", base=2)
    for (fig, _), path in zip((pareto, budget), paths):
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return paths


def draw_pareto(ax, name: str, rows: list[dict], color: str):
    xs = [r["summary"]["per_user_tok_s"]["mean"] or 0.0 for r in rows]
    ys = [r["summary"]["output_throughput"] for r in rows]
    ax.plot(xs, ys, marker="o", color=color, label=name)
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)


def draw_budget(ax, name: str, rows: list[dict], color: str):
    points = [(r["concurrency"], r["server"]["mean_verify_budget"]) for r in rows
              if r["server"] and r["server"]["mean_verify_budget"] is not None]
    if points:
        ax.plot(*zip(*points), marker="o", color=color, label=name)


def label(ax, xlabel: str, ylabel: str, title: str):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
