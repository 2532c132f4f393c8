"""The serving picture on the offline engine (the DSpark paper's Figures 7-8 at our scale): for each verify policy and
concurrency, keep C requests in flight (closed loop) and measure aggregate output tokens/s, per-user tokens/s and the
mean verify budget per request and step."""
import gc
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.report import save_and_print
from engine import LLM, SamplingParams
from engine.prompt_sets import encode_prompt, load_prompts


def closed_loop(llm: LLM, prompts: list[list[int]], concurrency: int, params: SamplingParams, label: str) -> dict:
    """Serve every prompt keeping `concurrency` requests in flight; per-user speed = tokens after the first one over
    the time since the first one (like TPOT), averaged over requests. The mean verify budget counts draft tokens
    verified per request and step, steps that drafted nothing included (one output is one request's step)."""
    pending, first_at, finished, produced, request_steps = list(prompts), {}, [], 0, 0
    before = llm.spec_stats.as_dict()
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=label, leave=False) as bar:
        while pending or llm.has_unfinished():
            while pending and len(llm.scheduler.running) + len(llm.scheduler.waiting) < concurrency:
                llm.add_request(pending.pop(), params)
            for out in llm.step():
                now = time.perf_counter()
                produced += len(out.delta_token_ids)
                request_steps += 1
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
    return {"concurrency": concurrency, "throughput_tok_s": produced / wall, "wall_s": wall, "output_tokens": produced,
            "per_user_tok_s": statistics.mean(finished) if finished else 0.0,
            "mean_verify_budget": verified / request_steps if request_steps else 0.0,
            "verified_per_round": verified / rounds if rounds else 0.0,
            "tau": 1 + accepted / rounds if rounds else 1.0}


def make_engine(args, policy: str) -> LLM:
    spec = {"spec_method": "none"} if policy == "none" else {
        "spec_method": "dspark", "draft": args.draft, "verify_policy": policy, "sps_profile": args.sps_profile}
    return LLM(model=args.model, dtype=args.dtype, num_threads=args.num_threads, max_num_seqs=max(args.concurrency),
               max_num_batched_tokens=2048, kv_cache_gb=args.kv_cache_gb, enable_prefix_caching=False, **spec)


def run(args) -> dict:
    """Every policy's engine is built up front; at each concurrency the policies take turns (in a rotated order each
    repeat) on the same prompts, so the runs compared at a level sit side by side in time (this box drifts by ±10%
    over minutes) and, greedy, do the same work: prefix caching is off, so a repeat prefills its prompts again rather
    than finding them cached. A point is the repeat with the median aggregate throughput."""
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.set_num_threads(args.num_threads)
    texts = load_prompts(args.dataset, args.num_prompts, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    engines = {policy: make_engine(args, policy) for policy in args.policies}
    first = next(iter(engines.values()))
    prompts = [encode_prompt(first, t, args.max_prompt_tokens) for t in texts]
    for llm in engines.values():
        llm.generate(prompts[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    rows, every_run = [], []
    for c in args.concurrency:
        level = prompts[:max(c * args.rounds, c)]
        runs = {policy: [] for policy in args.policies}
        for repeat in range(args.repeats):
            for policy in rotated(args.policies, repeat):
                row = closed_loop(engines[policy], list(level), c, params, f"{policy} c={c} #{repeat + 1}")
                runs[policy].append({"policy": policy, "repeat": repeat, **row})
        for policy in args.policies:
            every_run += runs[policy]
            rows.append(median_run(runs[policy]))
    del engines, first
    gc.collect()
    return {"model": args.model, "draft": args.draft, "dtype": args.dtype, "threads": args.num_threads,
            "temperature": args.temperature, "max_tokens": args.max_tokens, "dataset": args.dataset,
            "repeats": args.repeats, "rows": rows, "all_repeats": every_run}


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def median_run(runs: list[dict]) -> dict:
    """The run with the median aggregate throughput (the lower one of an even count), with every repeat's
    throughput beside it; its verify budget is the mean over the repeats (the planners draft in few steps at load,
    so one run's budget is noisy)."""
    ranked = sorted(runs, key=lambda r: r["throughput_tok_s"])
    return dict(ranked[(len(ranked) - 1) // 2], throughputs=[r["throughput_tok_s"] for r in runs],
                mean_verify_budget=statistics.mean(r["mean_verify_budget"] for r in runs))


def report(results: dict, out_dir: Path):
    rows = [[r["policy"], str(r["concurrency"]), f"{r['throughput_tok_s']:.1f}", f"{r['per_user_tok_s']:.1f}",
             f"{r['mean_verify_budget']:.2f}", f"{r['tau']:.2f}",
             " / ".join(f"{t:.0f}" for t in r.get("throughputs", [r["throughput_tok_s"]]))] for r in results["rows"]]
    save_and_print(results, out_dir / "sweep.json", ["policy", "concurrency", "throughput tok/s", "per-user tok/s",
                                                     "mean verify budget", "tau", "every repeat's tok/s"], rows)
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
