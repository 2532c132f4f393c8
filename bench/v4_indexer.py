"""python -m bench.v4_indexer: one CSA layer's Lightning indexer in a fixed-shape DeepSeek-V4 step, at V4-Flash's sizes
(64 index heads of 128, top-512), random inputs: the scores of every row's entry slots (kernels' indexer_scores:
Triton on a GPU, the twin on CPU) and their ranking, the engine's exact top-k (int64 keys) against the stable sort it
replaced; milliseconds, medians. Every slot is visible (the longest context a graph holds: the worst case).
`make gpu-check` runs it on the GPU (measure())."""
import argparse
import statistics
import time

import torch

from engine.models.deepseek_v4.attention import stable_top_k
from kernels import dispatch, triton_support

HEADS, DIM, TOP_K = 64, 128, 512
CPU_SIZES = ((8, 4096), (64, 4096), (64, 16384))  # (rows, entry slots): a graph tier and its context / 4
GPU_SIZES = ((8, 4096), (64, 16384), (384, 16384), (64, 262144))


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(device: str = "cuda", sizes=GPU_SIZES, repeats: int = 10) -> dict:
    device = torch.device(device)
    triton_support.select("triton" if device.type == "cuda" else "torch")
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    with torch.inference_mode():
        for rows, slots in sizes:
            q = torch.randn(rows, HEADS, DIM, generator=g).to(device, dtype)
            weights = torch.randn(rows, HEADS, generator=g).to(device)
            keys = torch.randn(slots, DIM, generator=g).to(device, dtype)
            index = torch.randperm(slots, generator=g).to(device).expand(rows, slots).contiguous()
            scores = dispatch.indexer_scores(q, weights, keys, index, DIM ** -0.5)
            out[f"{rows} rows x {slots} slots"] = {
                "scores": timed(lambda: dispatch.indexer_scores(q, weights, keys, index, DIM ** -0.5), device,
                                repeats),
                "top-k": timed(lambda: stable_top_k(scores, TOP_K), device, repeats),
                "sort": timed(lambda: scores.sort(dim=-1, descending=True, stable=True).indices[:, :TOP_K], device,
                              repeats)}
    return out


def markdown(result: dict) -> str:
    lines = ["| step | scores ms | exact top-k ms | stable sort ms | sort / top-k |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['scores']:.3f} | {v['top-k']:.3f} | {v['sort']:.3f} | {v['sort'] / v['top-k']:.2f}x |"
              for k, v in result.items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: str, device: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sizes, width = list(result), 0.38
    for i, (key, label) in enumerate((("sort", "stable sort"), ("top-k", "exact top-k (int64 keys)"))):
        ax.bar([x + (i - 0.5) * width for x in range(len(sizes))], [result[s][key] for s in sizes], width, label=label)
    ax.set_xticks(range(len(sizes)), [s.replace(" slots", "") for s in sizes])
    ax.set_ylabel("ms (median)")
    ax.set_title(f"DeepSeek-V4 CSA indexer ranking, top-{TOP_K} ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.v4_indexer", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--png", default=None, help="also plot the rankings' times here")
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    sizes = GPU_SIZES if args.device == "cuda" else CPU_SIZES
    result = measure(args.device, sizes, args.repeats)
    print(markdown(result))
    if args.png:
        plot(result, args.png, args.device)


if __name__ == "__main__":
    main()
