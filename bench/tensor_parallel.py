"""Tensor parallelism on this CPU, side by side: the default model's greedy decode with TP=2 (two processes, one thread
each, gloo) and TP=1 (one process, two threads), in turns, a few rounds; tokens/s per concurrency (medians), whether
the two give the same tokens, and the time rank 0 spends in each step's collectives (all-reduces, the LM head's
all-gather, the step's input broadcast; it includes waiting for the other rank).

    python -m bench.tensor_parallel --rounds 3 --out tp.json
"""
import argparse
import json
import statistics
import time
from dataclasses import fields

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.context import TIMINGS

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
             "Name three primary colors.", "How do plants make food?", "What is 17 times 23?",
             "Give me a tip for learning Python.", "Why is the sky blue?"]
COLLECTIVES = ("all_reduce", "all_gather", "step_broadcast")
# the dense bf16 weights: tensor parallelism splits dense weights (an engine that can keep a GGUF's blocks instead
# is told quantization='none')
DENSE = {"quantization": "none"} if "quantization" in {f.name for f in fields(EngineConfig)} else {}


def measure(tp: int, concurrencies: list[int], max_tokens: int) -> dict:
    llm = LLM(spec_method="none", tensor_parallel_size=tp, num_threads=2 // tp, **DENSE)
    try:
        prompts = [llm.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
        return {str(c): run(llm, prompts[:c], params) for c in concurrencies} | {"round_trip_ms": round_trip(llm)}
    finally:
        llm.close()


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    steps, step = 0, llm.step

    def counted():
        nonlocal steps
        steps += 1
        return step()
    llm.step = counted
    TIMINGS.take()
    TIMINGS.enabled = True
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    TIMINGS.enabled = False
    llm.step = step
    spent = TIMINGS.take()
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens_per_s": tokens / wall, "steps": steps, "step_ms": 1e3 * wall / steps,
            "collective_ms_per_step": {k: 1e3 * spent.get(k, 0.0) / steps for k in COLLECTIVES},
            "token_ids": [o.token_ids for o in outs]}


def round_trip(llm: LLM, calls: int = 200) -> float:
    """Median ms of LLM.keep_alive(): one step broadcast and one all-reduce of a single value, nothing computed (the
    latency floor of a collective here); 0 with one process."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        llm.keep_alive()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) if llm.parallel else 0.0


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per request, the first position where the two runs' tokens differ (None: identical)."""
    return [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(a, b)]


def summary(rounds: list[dict]) -> dict:
    out = {}
    for tp in ("1", "2"):
        out[f"tp{tp}_round_trip_ms"] = round(statistics.median(r[tp]["round_trip_ms"] for r in rounds), 3)
        for c in (c for c in rounds[0][tp] if c != "round_trip_ms"):
            runs = [r[tp][c] for r in rounds]
            out[f"tp{tp}_c{c}"] = {
                "tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs],
                "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
                "median_step_ms": round(statistics.median(r["step_ms"] for r in runs), 2),
                "median_collective_ms_per_step": {k: round(statistics.median(r["collective_ms_per_step"][k]
                                                                             for r in runs), 3)
                                                  for k in COLLECTIVES}}
    out["first_difference_tp2_vs_tp1"] = {c: first_difference(rounds[0]["1"][c]["token_ids"],
                                                              rounds[0]["2"][c]["token_ids"])
                                          for c in rounds[0]["1"] if c != "round_trip_ms"}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rounds = []
    for i in range(args.rounds):
        rounds.append({str(tp): measure(tp, args.concurrency, args.max_tokens) for tp in ((1, 2) if i % 2 else (2, 1))})
        print(f"round {i + 1}: " + ", ".join(f"tp{tp} c{c} {r['tokens_per_s']:.1f} tok/s" for tp, by_c in
                                           rounds[-1].items() for c, r in by_c.items() if c != "round_trip_ms"),
              flush=True)
    result = summary(rounds)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
