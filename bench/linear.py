"""CPU linear paths on a model's real weight shapes: one pass over every linear layer (weights well beyond cache, as
in a decode step), for each number of input rows M, through our AVX2 kernel, our AVX512-BF16 kernel (where the CPU
has it), the same kernel on weights in 2 MB huge pages (as the engine keeps them), torch's bf16 F.linear and oneDNN's
packed fp32 copy; and, when the model directory holds a GGUF file, over that file's own blocks (the default model:
Q4_1 layers, a Q8_0 LM head) through the row-major block kernel and the x16-packed one, bf16 activations.
Interleaved repeats, medians. --paths picks some of them (substrings of their names)."""
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench.report import save_and_print
from engine.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from engine.cpu import move_to_huge_pages
from kernels import cpu_linear, quant_linear


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    """[N, K] of each linear the engine runs: fused qkv, o, fused gate_up, down per layer, then the LM head."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * d
    per_layer = [(qkv, h), (h, config["num_attention_heads"] * d), (2 * config["intermediate_size"], h),
                 (h, config["intermediate_size"])]
    return per_layer * layers + [(config["vocab_size"], h)]


HUGE = ", huge pages"


def paths(native: bool) -> dict:
    """name -> fn(x, w, packed) for x [M, K] bf16; a name ending in HUGE runs on the weights in huge pages."""
    out = {"kernel AVX2": lambda x, w, p: cpu_linear.bf16_linear(x, w, allow_native=False)}
    if native:
        out["kernel AVX512-BF16"] = lambda x, w, p: cpu_linear.bf16_linear(x, w)
    out[("kernel AVX512-BF16" if native else "kernel AVX2") + HUGE] = \
        lambda x, w, p: cpu_linear.bf16_linear(x, w, allow_native=native)
    out["torch F.linear bf16"] = lambda x, w, p: F.linear(x, w)
    out["oneDNN packed fp32"] = lambda x, w, p: torch.ops.mkldnn._linear_pointwise(x.float(), p, None, "none", [], "")
    return out


def gguf_layers(model: Path) -> list[tuple[torch.Tensor, int, int]] | None:
    """(blocks [N, row bytes], GGML type, K) per linear in layer_shapes' order, from the model directory's GGUF file
    (q|k|v and gate|up fused as the engine fuses them; the tied LM head is token_embd); None without one."""
    files = sorted(model.glob("*.gguf"))
    if not files or not quant_linear.available():
        return None
    import numpy as np
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(files[0]).tensors}

    def blocks(*names):
        parts = [tensors[n] for n in names]
        data = torch.cat([torch.from_numpy(np.array(t.data)).view(int(t.shape[1]), -1) for t in parts])
        return data, int(parts[0].tensor_type), int(parts[0].shape[0])

    out, i = [], 0
    while f"blk.{i}.attn_q.weight" in tensors:
        b = f"blk.{i}."
        out += [blocks(b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"), blocks(b + "attn_output.weight"),
                blocks(b + "ffn_gate.weight", b + "ffn_up.weight"), blocks(b + "ffn_down.weight")]
        i += 1
    return out + [blocks("output.weight" if "output.weight" in tensors else "token_embd.weight")]


def run(args) -> dict:
    torch.set_num_threads(args.num_threads)
    model = Path(args.model or DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME)
    shapes = layer_shapes(json.loads((model / "config.json").read_text()))
    weights = [torch.randn(n, k).bfloat16() for n, k in shapes]
    in_huge_pages = nn.ParameterList(nn.Parameter(w.clone(), requires_grad=False) for w in weights)
    move_to_huge_pages(in_huge_pages)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w.float(), 1) for w in weights]
    ways = {name: (fn, list(zip(in_huge_pages if name.endswith(HUGE) else weights, packed)))
            for name, fn in paths(cpu_linear.native_bf16_available()).items()}
    gguf = gguf_layers(model)
    if gguf:
        types = "/".join(sorted({quant_linear.quant_name(t) for _, t, _ in gguf}))
        ways[f"GGUF {types} row-major"] = (lambda x, b, t, k, n: quant_linear.linear(x, b, t, k),
                                           [(b, t, k, b.shape[0]) for b, t, k in gguf])
        if quant_linear.packed_available():  # in huge pages, as the engine keeps every weight
            tiles = nn.ParameterList(nn.Parameter(quant_linear.pack(b, t, k), requires_grad=False) for b, t, k in gguf)
            move_to_huge_pages(tiles)
            ways[f"GGUF {types} x16-packed"] = (quant_linear.linear_packed,
                                                [(p, t, k, b.shape[0]) for p, (b, t, k) in zip(tiles, gguf)])
    if args.paths:
        ways = {name: way for name, way in ways.items() if any(p in name for p in args.paths)}
    times = {name: {m: [] for m in args.rows} for name in ways}
    with torch.inference_mode(), tqdm(total=args.repeats * len(args.rows) * len(ways), desc="linear passes") as bar:
        for _ in range(args.repeats):
            for m in args.rows:
                xs = {k: torch.randn(m, k).bfloat16() for k in {k for _, k in shapes}}
                for name, (fn, layers) in ways.items():
                    start = time.perf_counter()
                    for (n, k), layer in zip(shapes, layers):
                        fn(xs[k], *layer)
                    times[name][m].append(time.perf_counter() - start)
                    bar.update(1)
    return {"model": str(model), "threads": args.num_threads, "layers": len(shapes),
            "weight_mb": sum(w.numel() * 2 for w in weights) / 2**20,
            "native_bf16": cpu_linear.native_bf16_available(),
            "ms": {name: {m: 1000 * statistics.median(t) for m, t in per.items()} for name, per in times.items()},
            "best_ms": {name: {m: 1000 * min(t) for m, t in per.items()} for name, per in times.items()}}


def report(result: dict, out: Path):
    names = list(result["ms"])
    rows = [[str(m)] + [f"{result['ms'][n][m]:.1f} ({result['best_ms'][n][m]:.1f})" for n in names]
            for m in result["ms"][names[0]]]
    print(f"{result['layers']} linear layers, {result['weight_mb']:.0f} MB bf16, {result['threads']} threads: "
          "ms per pass, median (fastest) of the repeats")
    save_and_print(result, out / "linear.json", ["rows M"] + names, rows)
    plot(result, out / "linear.png")
    print(f"wrote {out / 'linear.json'} and {out / 'linear.png'}")


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, per in result["ms"].items():
        ax.plot(list(map(int, per)), list(per.values()), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input rows M")
    ax.set_ylabel("ms per pass over all linears")
    ax.set_title(f"{Path(result['model']).name}: {result['weight_mb']:.0f} MB bf16, {result['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
