"""Decode throughput of our engine vs HF transformers `generate` vs llama.cpp, same model, dtype and threads."""
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench import peers
from engine import LLM, SamplingParams
from engine.prompt_sets import load_prompts


def copy_bandwidth_gbs(size_mb: int = 512, reps: int = 7) -> float:
    """Bytes moved (read + write) per second by a large tensor copy: the memory-bandwidth yardstick."""
    src = torch.empty(size_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


class ForwardTimer:
    """Wraps the model's forward (all decoder layers) to split a step into model time and the rest."""

    def __init__(self, model):
        self.times, self.inner = [], model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.times.append(time.perf_counter() - start)
        return out


def all_decoding(llm: LLM, batch: int) -> bool:
    running = llm.scheduler.running
    return not llm.scheduler.waiting and len(running) == batch and all(s.num_uncomputed_tokens == 1 for s in running)


def ours_decode(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    """Median decode step time while every request of the batch is decoding."""
    timer = ForwardTimer(llm.model_runner.model)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        llm.add_request(p, params)
    steps, forwards = [], []
    with tqdm(total=max_tokens, desc=f"ours batch {len(prompts)}", leave=False) as bar:
        while llm.has_unfinished():
            decoding = all_decoding(llm, len(prompts))
            start = time.perf_counter()
            llm.step()
            if decoding:
                steps.append(time.perf_counter() - start)
                forwards.append(timer.times[-1])
                bar.update(1)
    del llm.model_runner.model.forward
    step = statistics.median(steps)
    return {"tok_s": len(prompts) / step, "ms_per_step": step * 1e3,
            "model_forward_ms": statistics.median(forwards) * 1e3,
            "host_and_sampling_ms": (step - statistics.median(forwards)) * 1e3, "steps": len(steps)}


class StepClock:
    """A logits processor that only records when generate() asks for each next token."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def hf_decode(model_dir: str, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype) -> dict:
    """transformers generate on a left-padded batch: median gap between consecutive decode steps."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = StepClock()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    step = statistics.median(b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:]))
    return {"tok_s": len(prompts) / step, "ms_per_step": step * 1e3}


def llama_cpp_decode(gguf: Path, batch: int, max_tokens: int, prompt_len: int, threads: int) -> dict | None:
    if not gguf.is_file() or not peers.binary("llama-bench").is_file():
        return None
    if batch == 1:
        r = peers.llama_bench_decode(gguf, threads=threads, n_gen=max_tokens, n_prompt=prompt_len, depth=prompt_len)
        return {"tok_s": r["tg_tok_s"], "ms_per_step": 1e3 / r["tg_tok_s"], "cmd": r["cmd"]}
    [row] = peers.llama_batched_bench(gguf, threads=threads, n_prompt=prompt_len, n_gen=max_tokens, parallel=(batch,))
    return {"tok_s": row["speed_tg"], "ms_per_step": batch * 1e3 / row["speed_tg"]}


def run(args) -> dict:
    torch.set_num_threads(args.num_threads)
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.num_threads, max_num_seqs=max(args.batch_sizes),
              max_num_batched_tokens=2048, spec_method="none")  # plain decoding against llama.cpp's
    texts = load_prompts(args.dataset, max(args.batch_sizes), seed=args.seed)
    prompts = [llm.chat_prompt([{"role": "user", "content": t}])[:args.max_prompt_tokens] for t in texts]
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model_runner.model.parameters())
    bandwidth = copy_bandwidth_gbs()
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    results = {"model": llm.config.model, "dtype": args.dtype, "threads": args.num_threads, "dataset": args.dataset,
               "max_tokens": args.max_tokens, "weight_bytes": weight_bytes, "copy_bandwidth_gbs": bandwidth,
               "floor_ms_per_token": weight_bytes / (bandwidth * 1e9) * 1e3, "rows": []}
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    mean_prompt = int(statistics.mean(map(len, prompts)))
    for batch in args.batch_sizes:
        batch_prompts = prompts[:batch]
        row = {"batch": batch, "ours": ours_decode(llm, batch_prompts, args.max_tokens)}
        if "hf" in args.peers:
            row["transformers"] = hf_decode(llm.config.model, batch_prompts, args.hf_max_tokens, dtype)
        if "llama.cpp" in args.peers:
            row["llama.cpp"] = llama_cpp_decode(Path(args.gguf), batch, args.max_tokens, mean_prompt, args.num_threads)
        results["rows"].append(row)
    return results


def report(results: dict, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(results, indent=2))
    print(f"\nweights {results['weight_bytes'] / 1e6:.0f} MB, copy bandwidth {results['copy_bandwidth_gbs']:.1f} GB/s "
          f"-> floor {results['floor_ms_per_token']:.1f} ms/token at batch 1")
    print(f"{'batch':>5} {'engine':>13} {'tok/s':>8} {'ms/step':>8} {'vs ours':>8}")
    for row in results["rows"]:
        ours = row["ours"]["tok_s"]
        for name in ("ours", "transformers", "llama.cpp"):
            r = row.get(name)
            if r:
                print(f"{row['batch']:>5} {name:>13} {r['tok_s']:>8.1f} {r['ms_per_step']:>8.1f} "
                      f"{r['tok_s'] / ours:>8.2f}")
        o = row["ours"]
        print(f"{'':>5} {'ours split':>13} model {o['model_forward_ms']:.1f} ms + logits/sampling/host "
              f"{o['host_and_sampling_ms']:.1f} ms per step")
    plot(results, out_dir / "throughput.png")


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["ours", "transformers", "llama.cpp"]
    fig, axes = plt.subplots(1, len(results["rows"]), figsize=(4 * len(results["rows"]), 3.5))
    for ax, row in zip(axes if len(results["rows"]) > 1 else [axes], results["rows"]):
        present = [n for n in names if row.get(n)]
        ax.bar(present, [row[n]["tok_s"] for n in present], color=["C0", "C1", "C2"][:len(present)])
        ax.set_title(f"batch {row['batch']}")
        ax.set_ylabel("decode tokens/s")
    fig.suptitle(f"{Path(results['model']).name}, {results['dtype']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
