"""python -m bench.stored_gemm: DeepSeek-V4-Flash's weights kept as stored, on a GPU, timed two ways at decode and
verify sizes (random bytes of V4-Flash's shapes; CUDA events, medians):

- a linear over an FP8 weight with 128x128 block scales (wq_a, wq_b, wo_b, the shared expert's w1; wo_a grouped 8
  ways): the stored-weight GEMM (kernels/triton_stored_moe.py, one expert, or a group an expert) against dequantizing
  to bf16 and a dense GEMM (StoredWeight's other path), 1 to 64 rows;
- a routed MoE layer of 256 MXFP4 experts, top-6: the grouped GEMMs over the stored bytes (MoE.stored, no host sync)
  against one expert at a time, each dequantized (MoE.one_by_one, the path before it), 1 to 64 tokens.

`make gpu-check` runs it (measure()); `--smoke` runs tiny shapes on CPU under Triton's interpreter (no timing worth
reading: it checks that the benchmark runs)."""
import argparse
import json
import statistics
import time

import torch

from engine.models.deepseek_v4.checkpoint import StoredTensor
from engine.models.deepseek_v4.config import v4_config
from engine.models.deepseek_v4.moe import MoE
from engine.models.deepseek_v4.stored import StoredWeight
from kernels import stored_moe, triton_support

FLASH = {"vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
         "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
         "compress_ratios": [0] * 43, "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128,
         "index_topk": 512, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 6,
         "n_shared_experts": 1, "num_hash_layers": 3, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
         "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000}
LINEARS = {"attn.wq_a": (1024, 4096), "attn.wq_b": (32768, 1024), "attn.wo_b": (4096, 8192),
           "shared_experts.w1": (2048, 4096)}
GROUPED = {"attn.wo_a": (8, 1024, 4096)}  # the grouped output projection: groups x [o_lora_rank, heads * dim / groups]
SMOKE = {"linears": {"w": (96, 256)}, "grouped": {"g": (2, 128, 256)}, "hidden": 64, "inner": 64, "experts": 8,
         "top_k": 2}
ROWS = (1, 8, 32, 64)


def random_stored(kind: str, rows: int, cols: int, device, g: torch.Generator) -> StoredWeight:
    """Random bytes in a stored format, scales near 1 (finite products)."""
    if kind == "fp4":
        data = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8).view(torch.int8)
        scale = torch.randint(124, 128, (rows, cols // stored_moe.MX_GROUP), generator=g, dtype=torch.uint8)
        scale = scale.view(torch.float8_e8m0fnu)
    else:
        data = (torch.randn(rows, cols, generator=g) * 0.5).to(torch.float8_e4m3fn)
        scale = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 0.01
    return StoredWeight(StoredTensor("w", kind, data, scale)).to(device)


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, else the wall clock)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_linears(shapes: dict, grouped: dict, rows: tuple, device, dtype, repeats: int,
                 g: torch.Generator) -> dict:
    out = {}
    for name, (n, k) in shapes.items():
        weight = random_stored("fp8", n, k, device, g)
        for r in rows:
            x = torch.randn(r, k, generator=g).to(device, dtype)
            out[f"{name} [{n}x{k}] rows {r}"] = {
                "stored": timed(lambda: weight.linear(x, None), device, repeats),
                "dequantized": timed(lambda: torch.nn.functional.linear(x, weight(dtype)), device, repeats)}
    for name, (groups, n, k) in grouped.items():
        weight = random_stored("fp8", groups * n, k, device, g)
        for r in rows:
            x = torch.randn(r, groups, k, generator=g).to(device, dtype)
            dense = lambda: torch.einsum("sgi,gri->sgr", x, weight(dtype).view(groups, n, k))  # noqa: E731
            out[f"{name} [{groups} x {n}x{k}] rows {r}"] = {
                "stored": timed(lambda: weight.grouped_linear(x, groups), device, repeats),
                "dequantized": timed(dense, device, repeats)}
    return out


def flash_moe(smoke: bool, device, dtype, g: torch.Generator) -> MoE:
    """One routed MoE layer of V4-Flash (or the smoke test's tiny one), its experts random MXFP4 bytes."""
    config = dict(FLASH)
    if smoke:
        config |= {"hidden_size": SMOKE["hidden"], "moe_intermediate_size": SMOKE["inner"],
                   "n_routed_experts": SMOKE["experts"], "num_experts_per_tok": SMOKE["top_k"]}
    cfg = v4_config(config)
    with torch.device("meta"):
        moe = MoE(cfg, cfg.num_hash_layers)
    moe = moe.to_empty(device=device).to(dtype).requires_grad_(False)
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    torch.nn.init.zeros_(moe.gate.bias)
    h, inner = cfg.hidden_size, cfg.moe_intermediate_size
    for expert in moe.experts:
        for name, (n, k) in (("w1", (inner, h)), ("w3", (inner, h)), ("w2", (h, inner))):
            getattr(expert, name).keep_stored(random_stored("fp4", n, k, device, g))
    return moe


def time_moe(smoke: bool, rows: tuple, device, dtype, repeats: int, g: torch.Generator) -> dict:
    moe = flash_moe(smoke, device, dtype, g)
    assert moe.stack() and moe.path == "stored"
    out = {}
    for r in rows:
        x = torch.randn(r, moe.gate.weight.shape[1], generator=g).to(device, dtype)
        ids, weights = moe.gate(x, torch.zeros(r, dtype=torch.long, device=device))
        out[f"tokens {r}"] = {"stored": timed(lambda: moe.stored(x, ids, weights), device, repeats),
                              "one by one": timed(lambda: moe.one_by_one(x, ids, weights), device, repeats)}
    return out


def measure(smoke: bool = False, repeats: int = 20) -> dict:
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    triton_support.select("triton")
    rows = ROWS[:2] if smoke else ROWS
    with torch.inference_mode():
        shapes = (SMOKE["linears"], SMOKE["grouped"]) if smoke else (LINEARS, GROUPED)
        return {"linear_ms": time_linears(*shapes, rows, device, dtype, repeats, g),
                "moe_ms": time_moe(smoke, rows, device, dtype, repeats, g)}


def markdown(result: dict) -> str:
    lines = ["| FP8 linear | stored-weight GEMM ms | dequantize + GEMM ms | speed-up |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['stored']:.3f} | {v['dequantized']:.3f} | {v['dequantized'] / v['stored']:.2f}x |"
              for k, v in result["linear_ms"].items()]
    lines += ["", "| routed MoE layer, MXFP4 experts | stored (grouped) ms | one by one ms | speed-up |",
              "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['stored']:.3f} | {v['one by one']:.3f} | {v['one by one'] / v['stored']:.2f}x |"
              for k, v in result["moe_ms"].items()]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.stored_gemm", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench.stored_gemm times GPU kernels: it needs CUDA (or --smoke under TRITON_INTERPRET=1)")
    result = measure(args.smoke, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown(result))


if __name__ == "__main__":
    main()
