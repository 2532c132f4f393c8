"""python -m bench.v4_batch: greedy decode of a tiny random DeepSeek-V4 (tests/tiny_models.save_tiny_v4, seed 3, fp32)
at several batch sizes, its decode steps in fixed shapes (engine/models/deepseek_v4/step_rows.py: one batched call per
layer, the grouped MoE) against one sequence after another (the segment path, each expert over its rows), the two
alternating round by round on the same threads; output tokens per wall second (medians) and whether the tokens agree.
Writes a PNG of the two curves. `--four-ways` instead times one request with each attention path and each MoE path."""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine import LLM, SamplingParams
from engine.models.deepseek_v4.model import V4Model
from engine.models.deepseek_v4.moe import MoE

PATHS = ("fixed shapes", "per sequence")


def tiny_v4(path: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import save_tiny_v4
    save_tiny_v4(path, seed=3)


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (int(torch.randint(9, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def use_path(name: str, moe: str | None = None):
    """The fixed-shape step or the segment path (every step per sequence), with the grouped MoE (with the fixed
    shapes by default) or experts one by one (with the segment path by default)."""
    fixed = name == PATHS[0]
    V4Model.fits_rows = REAL_FITS if fixed else (lambda self: False)
    V4Model.eager_rows_from = 1  # even one sequence, here
    MoE.stack = REAL_STACK if (moe or ("grouped" if fixed else "loop")) == "grouped" else (lambda self: False)


REAL_FITS, REAL_STACK, REAL_FROM = V4Model.fits_rows, MoE.stack, V4Model.eager_rows_from


def engine(path: Path, threads: int, max_num_seqs: int) -> LLM:
    return LLM(model=str(path), dtype="float32", num_threads=threads, max_num_seqs=max_num_seqs, kv_cache_gb=0.05,
               enable_prefix_caching=False)


def four_ways(path: Path, args, params: SamplingParams):
    """One request: each attention path with each MoE path, taking turns round by round."""
    ways = [(name, moe) for name in PATHS for moe in ("grouped", "loop")]
    speeds = {way: [] for way in ways}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for way in ways:
            use_path(*way)
            speed, _ = run(engine(path, args.num_threads, 1), prompts(1, seed=r), params)
            if r:
                speeds[way].append(speed)
    for (name, moe), v in speeds.items():
        print(f"{name} attention, {moe} MoE: {statistics.median(v):.1f} tokens/s")


def run(llm: LLM, batch: list[list[int]], params: SamplingParams) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start), [o.token_ids for o in outs]


def plot(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in PATHS:
        ax.plot(list(results), [results[b][name] for b in results], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests decoding at once")
    ax.set_ylabel("output tokens / s")
    ax.set_title("tiny DeepSeek-V4 on CPU: decode steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.v4_batch", description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=5, help="per batch size and path; the first is a warm-up")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--png", default="docs/img/v4_batch.png")
    parser.add_argument("--four-ways", action="store_true", help="batch 1 only: every attention path x MoE path")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    results, same = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        tiny_v4(Path(tmp) / "tiny-v4")
        if args.four_ways:
            return four_ways(Path(tmp) / "tiny-v4", args, params)
        for b in tqdm(args.batches, desc="batch sizes"):
            speeds = {name: [] for name in PATHS}
            for r in range(args.rounds):
                batch, tokens = prompts(b, seed=r), {}
                for name in PATHS:
                    use_path(name)  # a fresh engine per path: the grouped MoE stacks its experts once
                    llm = engine(Path(tmp) / "tiny-v4", args.num_threads, max(args.batches))
                    speed, tokens[name] = run(llm, batch, params)
                    if r:
                        speeds[name].append(speed)
                same &= tokens[PATHS[0]] == tokens[PATHS[1]]
            results[b] = {name: statistics.median(v) for name, v in speeds.items()}
    V4Model.fits_rows, MoE.stack, V4Model.eager_rows_from = REAL_FITS, REAL_STACK, REAL_FROM
    print(f"{'batch':>5} | {PATHS[0]:>14} | {PATHS[1]:>14} | ratio")
    for b, r in results.items():
        print(f"{b:>5} | {r[PATHS[0]]:>10.1f} t/s | {r[PATHS[1]]:>10.1f} t/s | {r[PATHS[0]] / r[PATHS[1]]:.2f}x")
    print("same greedy tokens on both paths:", same)
    plot(results, Path(args.png))
    print("wrote", args.png)


if __name__ == "__main__":
    main()
