"""The serving picture on the offline engine (the DSpark paper's Figures 7-8 at our scale): for each verify policy and
concurrency, keep C requests in flight (closed loop) and measure aggregate output tokens/s, per-user tokens/s and the
mean verify budget per request and step."""
import gc
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.datasets import load_prompts
from bench.report import save_and_print
from engine import LLM, SamplingParams

POLICIES = ("none", "fixed:1", "full", "threshold:0.5", "sps", "sps-lagged")


def closed_loop(llm: LLM, prompts: list[list[int]], concurrency: int, params: SamplingParams, label: str) -> dict:
    """Serve every prompt keeping `concurrency` requests in flight; per-user speed = tokens after the first one over
    the time since the first one (like TPOT), averaged over requests."""
    pending, first_at, finished, produced = list(prompts), {}, [], 0
    before = llm.spec_stats.as_dict()
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=label, leave=False) as bar:
        while pending or llm.has_unfinished():
            while pending and len(llm.scheduler.running) + len(llm.scheduler.waiting) < concurrency:
                llm.add_request(pending.pop(), params)
            for out in llm.step():
                now = time.perf_counter()
                produced += len(out.delta_token_ids)
                first_at.setdefault(out.request_id, (now, out.num_completion_tokens))
                if out.finished:
                    t0, n0 = first_at[out.request_id]
                    if out.num_completion_tokens > n0 and now > t0:
                        finished.append((out.num_completion_tokens - n0) / (now - t0))
                    bar.update(1)
    wall = time.perf_counter() - start
    after = llm.spec_stats.as_dict()
    rounds = after["num_drafts"] - before["num_drafts"]
    verified = after["num_verified_tokens"] - before["num_verified_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    return {"concurrency": concurrency, "throughput_tok_s": produced / wall, "wall_s": wall,
            "per_user_tok_s": statistics.mean(finished) if finished else 0.0,
            "mean_verify_budget": verified / rounds if rounds else 0.0,
            "tau": 1 + accepted / rounds if rounds else 1.0}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    texts = load_prompts(args.dataset, args.num_prompts, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    for policy in args.policies:
        spec = {"spec_method": "none"} if policy == "none" else {
            "spec_method": "dspark", "draft": args.draft, "verify_policy": policy, "sps_profile": args.sps_profile}
        llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads, max_num_seqs=max(args.concurrency),
                  max_num_batched_tokens=2048, **spec)
        prompts = [llm.chat_prompt([{"role": "user", "content": t}])[:args.max_prompt_tokens] for t in texts]
        llm.generate(prompts[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
        for c in args.concurrency:
            row = closed_loop(llm, prompts[:max(c * args.rounds, c)], c, params, f"{policy} c={c}")
            rows.append({"policy": policy, **row})
        del llm
        gc.collect()
    return {"model": args.model, "draft": args.draft, "dtype": args.dtype, "threads": args.threads,
            "temperature": args.temperature, "max_tokens": args.max_tokens, "dataset": args.dataset, "rows": rows}


def report(results: dict, out_dir: Path):
    rows = [[r["policy"], str(r["concurrency"]), f"{r['throughput_tok_s']:.1f}", f"{r['per_user_tok_s']:.1f}",
             f"{r['mean_verify_budget']:.2f}", f"{r['tau']:.2f}"] for r in results["rows"]]
    save_and_print(results, out_dir / "sweep.json", ["policy", "concurrency", "throughput tok/s", "per-user tok/s",
                                                     "mean verify budget", "tau"], rows)
    plot(results, out_dir / "sweep.png")


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (pareto, budget) = plt.subplots(1, 2, figsize=(11, 4))
    for i, policy in enumerate(dict.fromkeys(r["policy"] for r in results["rows"])):
        rows = [r for r in results["rows"] if r["policy"] == policy]
        pareto.plot([r["per_user_tok_s"] for r in rows], [r["throughput_tok_s"] for r in rows], marker="o",
                    color=f"C{i}", label=policy)
        budget.plot([r["concurrency"] for r in rows], [r["mean_verify_budget"] for r in rows], marker="o",
                    color=f"C{i}", label=policy)
    pareto.set_xlabel("per-user tokens/s")
    pareto.set_ylabel("aggregate output tokens/s")
    budget.set_xlabel("concurrency")
    budget.set_ylabel("mean draft tokens verified per request and step")
    budget.set_xscale("log", base=2)
    pareto.legend(fontsize=8)
    fig.suptitle(f"{Path(results['model']).name or 'default'}: throughput vs per-user speed, T={results['temperature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
