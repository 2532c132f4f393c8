"""python -m profiler: measure SPS(B), the engine's steps per second as a function of the target tokens B a step
carries (and the draft's cost per number of requests), once per model / draft / device / dtype / threads. Writes the
cost table the engine loads with --sps-profile, prints it, and draws it."""
import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from engine import LLM
from engine.cli import add_engine_args, config_from_args
from engine.cost_model import measure_curve, token_grid
from engine.sps_profile import profile_key

TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
REQUESTS = (1, 2, 4, 8, 16, 32, 64)


def main():
    parser = add_engine_args(argparse.ArgumentParser(prog="python -m profiler", description=__doc__))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--requests", type=int, nargs="+", default=list(REQUESTS))
    parser.add_argument("--context-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_out/sps.json"))
    args = parser.parse_args()
    config = config_from_args(args)
    config.sps_profile, config.verify_policy = "none", "full"
    llm = LLM(config)
    curves = {}
    num_tokens = len(token_grid(llm.model_runner, args.tokens))
    total = len(args.context_lens) * (num_tokens + (len(args.requests) if config.spec_method != "none" else 0))
    with tqdm(total=total, desc="profiling") as bar:
        for ctx in args.context_lens:
            curves[ctx] = measure_curve(llm.model_runner, llm.block_manager, args.tokens, args.requests, ctx,
                                        args.repeats, bar)
    # the engine plans with the shortest context measured (the common case); all are kept for the picture
    data = {"key": profile_key(llm.model_runner), **curves[min(curves)].to_json(),
            "by_context_len": {ctx: c.to_json() for ctx, c in curves.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))
    print_table(curves)
    plot(curves, args.out.with_suffix(".png"), data["key"])
    print(f"wrote {args.out} (load it with --sps-profile {args.out})")


def print_table(curves):
    contexts = sorted(curves)
    print("\n   B " + " ".join(f"{f'ms @ctx {c}':>12} {'SPS':>7}" for c in contexts))
    for i, b in enumerate(curves[contexts[0]].step_cost[0]):
        print(f"{b:>4} " + " ".join(f"{curves[c].step_cost[1][i] * 1e3:>12.1f} {1 / curves[c].step_cost[1][i]:>7.1f}"
                                    for c in contexts))
    drafts = curves[contexts[0]].draft_cost
    if any(drafts[1]):
        print("\n   R  draft ms")
        for r, cost in zip(*drafts):
            print(f"{r:>4} {cost * 1e3:>9.1f}")


def plot(curves, path: Path, key: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for ctx, curve in sorted(curves.items()):
        tokens, costs = curve.step_cost
        ax.plot(tokens, [1 / c for c in costs], marker="o", label=f"context {ctx}",
                drawstyle="steps-pre" if curve.graph_tokens else "default")  # graphs: B costs its tier
    ax.set_xlabel("target tokens per step B")
    ax.set_ylabel("steps per second SPS(B) (target only)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{Path(key['model']).name}, {key['dtype']}, {key['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
