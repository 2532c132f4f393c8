"""Batch-1 decode speed of the default model served from its Q4_1 GGUF blocks against the same model dequantized to
bf16, plainly and with the default DSpark draft: the engines take turns on the same prompt each round, and the
report gives medians over rounds (side by side, so a shared machine's load hits every engine alike).

    python -m bench.gguf_decode --rounds 5 --max-tokens 64 --out bench_out/gguf_decode.json
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.spec import measure
from engine import LLM, SamplingParams
from engine.config import DEFAULT_DRAFT
from engine.prompt_sets import load_prompts

ENGINES = {  # label -> engine options over the default model
    "Q4_1 plain": dict(quantization="gguf", spec_method="none"),
    "bf16 plain": dict(quantization="none", spec_method="none"),
    "Q4_1 dspark": dict(quantization="gguf", spec_method="dspark", draft=str(DEFAULT_DRAFT)),
    "bf16 dspark": dict(quantization="none", spec_method="dspark", draft=str(DEFAULT_DRAFT)),
}


def run(args) -> dict:
    torch.set_num_threads(args.num_threads)
    policy = {"verify_policy": args.verify_policy} if args.verify_policy else {}
    engines = {label: LLM(dtype="bfloat16", num_threads=args.num_threads, **ENGINES[label],
                          **(policy if "dspark" in label else {})) for label in args.engines}
    texts = load_prompts(args.dataset, args.rounds, seed=args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    first = next(iter(engines.values()))
    for llm in engines.values():  # warm-up
        llm.generate([first.chat_prompt([{"role": "user", "content": "Hi"}])], SamplingParams(max_tokens=4),
                     use_tqdm=False)
    runs = {label: [] for label in engines}
    for text in texts:
        prompt = first.chat_prompt([{"role": "user", "content": text}])[:args.max_prompt_tokens]
        for label, llm in engines.items():
            runs[label].append(measure(llm, [prompt], params, label))
    base = next(iter(runs.values()))  # the first engine: per-round speed ratios against it resist load swings
    summary = {label: {"tok_s": statistics.median(r["tok_s_per_request"] for r in rs),
                       "tokens_per_step": statistics.median(r["tokens_per_step"] for r in rs),
                       "step_ms": statistics.median(r["step_ms"] for r in rs),
                       "speed_vs_first": statistics.median(r["tok_s_per_request"] / b["tok_s_per_request"]
                                                           for r, b in zip(rs, base))}
               for label, rs in runs.items()}
    return {"threads": args.num_threads, "verify_policy": args.verify_policy or "default", "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "dataset": args.dataset, "summary": summary, "runs": runs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--dataset", default="mtbench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--verify-policy", default="", help="the dspark engines' (default: the engine's own)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--out", type=Path, default=Path("bench_out/gguf_decode.json"))
    args = p.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    first = args.engines[0]
    print(f"{'engine':>12} {'tok/s':>7} {'tokens/step':>11} {'ms/step':>8} {'vs ' + first:>16}   (batch 1, medians "
          f"of {args.rounds} rounds)")
    for label, s in results["summary"].items():
        print(f"{label:>12} {s['tok_s']:7.1f} {s['tokens_per_step']:11.2f} {s['step_ms']:8.1f} "
              f"{s['speed_vs_first']:16.2f}")


if __name__ == "__main__":
    main()
