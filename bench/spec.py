"""Speculative decoding cost on the offline engine: per-request tokens/s of plain decoding vs a drafter at several
concurrencies, and the step split into target verify, draft backbone, draft LM head, sequential head, sampling and
host overhead."""
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine import LLM, SamplingParams
from engine.context import TIMINGS
from engine.prompt_sets import load_prompts

DRAFT_PARTS = ("draft_backbone", "draft_lm_head", "sequential_head", "draft_sampling", "confidence_head",
               "draft_fused")  # draft_fused: the whole step on the Triton path (graph or eager)
PARTS = ("target", "verify", "sampling", "draft_context") + DRAFT_PARTS


def measure(llm: LLM, prompts: list[list[int]], params: SamplingParams, label: str) -> dict:
    """Run the batch to completion; steps where every request decodes give the per-step split (medians)."""
    for p in prompts:
        llm.add_request(p, params)
    steps, parts, produced = [], {p: [] for p in PARTS}, 0
    start_all = time.perf_counter()
    with tqdm(total=len(prompts) * params.max_tokens, desc=label, leave=False) as bar:
        while llm.has_unfinished():
            steady = not llm.scheduler.waiting and all(s.is_decoding for s in llm.scheduler.running)
            TIMINGS.take()
            start = time.perf_counter()
            outs = llm.step()
            elapsed = time.perf_counter() - start
            split = TIMINGS.take()
            new = sum(len(o.delta_token_ids) for o in outs)
            produced += new
            bar.update(new)
            if steady and len(llm.scheduler.running) == len(prompts):
                steps.append((elapsed, new))
                for p in PARTS:
                    parts[p].append(split.get(p, 0.0))
    wall = time.perf_counter() - start_all
    step_ms = statistics.median(s for s, _ in steps) * 1e3
    per_step = {p: statistics.median(v) * 1e3 for p, v in parts.items()}
    per_step["host"] = step_ms - sum(per_step.values())
    tokens_per_step = sum(n for _, n in steps) / len(steps)
    return {"label": label, "concurrency": len(prompts), "step_ms": step_ms, "tokens_per_step": tokens_per_step,
            "tok_s_per_request": tokens_per_step / len(prompts) / (step_ms / 1e3),
            "wall_tok_s": produced / wall, "split_ms": per_step, "steady_steps": len(steps)}


def run(args) -> dict:
    torch.set_num_threads(args.num_threads)
    common = dict(model=args.model, dtype=args.dtype, num_threads=args.num_threads, max_num_seqs=max(args.concurrency),
                  max_num_batched_tokens=2048)
    engines = {"plain": LLM(**common, spec_method="none")}
    sizes, policies = args.draft_vocab_sizes, args.verify_policy
    for method, draft in (("dspark", args.draft), ("dflash", args.dflash_draft)):
        for size, policy in itertools.product(sizes if draft else [], policies):
            name = "/".join([method] + ([policy] if len(policies) > 1 else [])
                            + ([f"v{'all' if size < 0 else size or 'file'}"] if len(sizes) > 1 else []))
            engines[name] = LLM(**common, spec_method=method, draft=draft, num_draft_tokens=args.gamma,
                                verify_policy=policy, draft_vocab_size=size)
    texts = load_prompts(args.dataset, max(args.concurrency), seed=args.seed)
    plain = engines["plain"]
    prompts = [plain.chat_prompt([{"role": "user", "content": t}])[:args.max_prompt_tokens] for t in texts]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed)
    for llm in engines.values():
        llm.generate(prompts[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    TIMINGS.enabled = True
    runs = {}
    for _ in range(args.repeats):  # engines take turns, so a slow spell of the box hits them all alike
        for c in args.concurrency:
            for name, llm in engines.items():
                stats_before = llm.spec_stats.as_dict()
                row = measure(llm, prompts[:c], params, f"{name} c={c}")
                row["method"] = name
                row["tau"] = tau_since(stats_before, llm.spec_stats.as_dict())
                runs.setdefault((c, name), []).append(row)
    TIMINGS.enabled = False
    rows = [median_row(r) for r in runs.values()]
    return {"model": plain.config.model, "draft": args.draft, "dtype": args.dtype, "threads": args.num_threads,
            "gamma": args.gamma, "verify_policies": args.verify_policy, "temperature": args.temperature,
            "dataset": args.dataset, "max_tokens": args.max_tokens, "rows": rows}


def median_row(runs: list[dict]) -> dict:
    """The repeats of one engine and concurrency: medians of the timings, tau over all of them (mean)."""
    row = dict(runs[0], repeats=len(runs))
    for key in ("step_ms", "tokens_per_step", "tok_s_per_request", "wall_tok_s"):
        row[key] = statistics.median(r[key] for r in runs)
    row["split_ms"] = {p: statistics.median(r["split_ms"][p] for r in runs) for p in runs[0]["split_ms"]}
    taus = [r["tau"] for r in runs if r["tau"] is not None]
    row["tau"] = statistics.mean(taus) if taus else None
    return row


def tau_since(before: dict, after: dict) -> float | None:
    rounds = after["num_drafts"] - before["num_drafts"]
    return 1 + (after["num_accepted_tokens"] - before["num_accepted_tokens"]) / rounds if rounds else None


def report(results: dict, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.json").write_text(json.dumps(results, indent=2))
    plain = {r["concurrency"]: r for r in results["rows"] if r["method"] == "plain"}
    print(f"\n{'conc':>4} {'method':>22} {'tok/s/req':>9} {'tau':>5} {'step ms':>8} {'draft ms':>8} "
          f"{'draft/plain':>11} {'seq head/plain':>14}  split (ms)")
    for r in results["rows"]:
        base = plain[r["concurrency"]]["step_ms"]
        draft = sum(r["split_ms"][p] for p in DRAFT_PARTS)
        seq = r["split_ms"]["sequential_head"]
        split = " ".join(f"{k}={v:.1f}" for k, v in r["split_ms"].items() if v >= 0.05 or k == "host")
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        print(f"{r['concurrency']:>4} {r['method']:>22} {r['tok_s_per_request']:>9.1f} {tau:>5} {r['step_ms']:>8.1f} "
              f"{draft:>8.1f} {draft / base:>11.1%} {seq / base:>14.1%}  {split}")
    plot(results, out_dir / "spec.png")


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    parts = list(PARTS) + ["host"]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    bottoms = [0.0] * len(rows)
    for i, part in enumerate(parts):
        heights = [max(r["split_ms"][part], 0) for r in rows]
        ax.bar(range(len(rows)), heights, bottom=bottoms, label=part, color=f"C{i}")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(rows)), [f"{r['method']}\nc={r['concurrency']}" for r in rows])
    ax.set_ylabel("ms per engine step (median)")
    ax.set_title(f"{Path(results['model']).name}: step split, gamma={results['gamma']}, T={results['temperature']}")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
