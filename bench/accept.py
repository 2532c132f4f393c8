"""Offline acceptance of speculative drafts through the engine, every drafted position verified: tau per domain
(chat: MT-Bench, code: HumanEval, math: our grade-school word problems) and temperature, per-position conditional
acceptance (the paper's Fig. 2), and for DSpark drafts the ECE of the confidence head's cumulative product before STS
(raw logits) and after (the temperatures of the draft's sts.json). Optionally batch-1 decode speed, plain vs spec."""
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench.report import markdown_table, save_and_print
from engine import LLM, SamplingParams
from engine.calibration import load_scaling, pooled_metrics, position_metrics, rounds_from_records
from engine.config import REPO_ROOT
from engine.drafts.loader import CALIBRATION_FILE
from engine.prompt_sets import encode_prompt, load_prompts

DEFAULT_DOMAINS = ["chat=mtbench", "code=humaneval", "math=math"]
DEFAULT_DRAFTS = ["dspark:drafts/dspark-smollm2-135m", "dflash:drafts/dflash-smollm2-135m"]
METHODS = ("dspark", "dflash")


def parse_drafts(specs: list[str]) -> list[tuple[str, str]]:
    """'method:dir' each; none given = the default drafts that exist."""
    if not specs:
        specs = [s for s in DEFAULT_DRAFTS if (REPO_ROOT / s.split(":", 1)[1]).is_dir()]
        specs = [f"{m}:{REPO_ROOT / d}" for m, d in (s.split(":", 1) for s in specs)]
        if not specs:
            raise SystemExit(f"no drafts given and none of the defaults exist: {DEFAULT_DRAFTS}")
    drafts = []
    for spec in specs:
        method, _, path = spec.partition(":")
        if method not in METHODS or not path:
            raise SystemExit(f"--drafts takes method:dir with method in {METHODS}, got {spec!r}")
        drafts.append((method, path))
    return drafts


def parse_domains(specs: list[str]) -> list[tuple[str, str]]:
    """'name=prompt set' each (a bare name is its own prompt set)."""
    return [(s.partition("=")[0], s.partition("=")[2] or s) for s in specs]


def run(args) -> dict:
    domains, drafts = parse_domains(args.domains), parse_drafts(args.drafts)
    texts = {name: load_prompts(prompt_set, args.num_prompts, args.seed) for name, prompt_set in domains}
    options = dict(model=args.model, dtype=args.dtype, num_threads=args.num_threads, max_num_seqs=args.max_num_seqs,
                   kv_cache_gb=args.kv_cache_gb, seed=args.seed)
    rows, speed = [], []
    bar = tqdm(total=len(drafts) * len(domains) * len(args.temperatures), desc="accept", dynamic_ncols=True)
    for method, draft in drafts:
        llm = LLM(**options, spec_method=method, draft=draft, verify_policy="full")
        label = f"{method} ({Path(draft).name})"
        scaling = load_scaling(Path(draft) / CALIBRATION_FILE)
        prompts = {d: [encode_prompt(llm, t, args.max_prompt_tokens) for t in ts] for d, ts in texts.items()}
        for domain, ids in prompts.items():
            for temperature in args.temperatures:
                bar.set_postfix_str(f"{method} {domain} T={temperature}")
                row = measure(llm, ids, temperature, args.max_tokens, args.seed, scaling)
                rows.append({"draft": label, "method": method, "domain": domain, **row})
                bar.update()
        if args.speed:
            speed.append({"label": label, "tok_s": decode_speed(llm, first(prompts, args.speed_prompts), args)})
        del llm
    bar.close()
    if args.speed:
        plain = LLM(**options, spec_method="none")
        prompts = {d: [encode_prompt(plain, t, args.max_prompt_tokens) for t in ts] for d, ts in texts.items()}
        speed.insert(0, {"label": "plain", "tok_s": decode_speed(plain, first(prompts, args.speed_prompts), args)})
    return {"model": args.model, "domains": dict(domains), "num_prompts": args.num_prompts,
            "max_tokens": args.max_tokens, "dtype": args.dtype, "rows": rows, "speed": speed}


def first(prompts: dict[str, list], n: int) -> list:
    return next(iter(prompts.values()))[:n]


def measure(llm: LLM, prompts: list[list[int]], temperature: float, max_tokens: int, seed: int, scaling) -> dict:
    llm.reset_spec_stats()
    records = llm.record_confidences()
    llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed), use_tqdm=False)
    llm.record_confidences(False)
    stats = llm.spec_stats.as_dict()
    row = {"temperature": temperature, "tau": stats["mean_acceptance_length"],
           "conditional_acceptance": conditional_acceptance(stats), "stats": stats}
    return row | (calibration(records, scaling) if records else {})


def conditional_acceptance(stats: dict) -> list[float | None]:
    """#(a > k) / #(a > k-1) at every verified position (None once no round got that far)."""
    accepted = stats["accepted_per_pos"] + [0] * (len(stats["verified_per_pos"]) - len(stats["accepted_per_pos"]))
    before = [stats["num_drafts"]] + accepted[:-1]
    return [a / b if b else None for a, b in zip(accepted, before)]


def calibration(records: list, scaling) -> dict:
    """ECE etc. of the cumulative product, per position and pooled: raw, and with the sts.json scaling."""
    rounds = rounds_from_records(records)
    out = {"confidence_before": position_metrics(rounds), "pooled_before": pooled_metrics(rounds)}
    if scaling is not None:
        out["confidence_after"] = position_metrics(rounds, scaling)
        out["pooled_after"] = pooled_metrics(rounds, scaling)
    return out


def decode_speed(llm: LLM, prompts: list[list[int]], args) -> float:
    """Greedy tokens/s of one request at a time."""
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start, produced = time.perf_counter(), 0
    for p in tqdm(prompts, desc="batch-1 speed", leave=False):
        produced += len(llm.generate([p], params, use_tqdm=False)[0].token_ids)
    return produced / (time.perf_counter() - start)


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def report(results: dict, out_dir: Path):
    rows = results["rows"]
    header = ["draft", "domain", "T", "tau", "rounds", "ECE before", "ECE after", "AUROC before", "AUROC after"]
    table = [[r["draft"], r["domain"], f"{r['temperature']:g}", fmt(r["tau"], ".2f"), str(r["stats"]["num_drafts"]),
              fmt(r.get("pooled_before", {}).get("ece"), ".4f"), fmt(r.get("pooled_after", {}).get("ece"), ".4f"),
              fmt(r.get("pooled_before", {}).get("auroc")), fmt(r.get("pooled_after", {}).get("auroc"))]
             for r in rows]
    save_and_print(results, out_dir / "accept.json", header, table)
    width = max((len(r["conditional_acceptance"]) for r in rows), default=0)
    pos_header = ["draft", "domain", "T"] + [f"p{k}" for k in range(1, width + 1)]
    pos_rows = [[r["draft"], r["domain"], f"{r['temperature']:g}"] + [fmt(a, ".2f") for a in r["conditional_acceptance"]]
                + ["-"] * (width - len(r["conditional_acceptance"])) for r in rows]
    parts = ["## tau and pooled confidence calibration (cumulative product, ECE 20 bins)", markdown_table(header, table),
             "## conditional acceptance #(a>k)/#(a>k-1) per position", markdown_table(pos_header, pos_rows)]
    print("\n" + parts[-1])
    if results["speed"]:
        base = results["speed"][0]["tok_s"]
        speed = [[s["label"], f"{s['tok_s']:.1f}", f"{s['tok_s'] / base:.2f}x"] for s in results["speed"]]
        parts += ["## batch-1 greedy decode speed", markdown_table(["engine", "tok/s", "vs plain"], speed)]
        print("\n" + parts[-1])
    (out_dir / "accept.md").write_text("\n\n".join(parts) + "\n")
    plot(results, out_dir / "accept.png")


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    temps = list(dict.fromkeys(r["temperature"] for r in rows))
    fig, axes = plt.subplots(len(temps), len(domains), figsize=(3.6 * len(domains), 3 * len(temps)), squeeze=False,
                             sharey=True)
    for r in rows:
        ax = axes[temps.index(r["temperature"])][domains.index(r["domain"])]
        acc = r["conditional_acceptance"]
        ax.plot(range(1, len(acc) + 1), [math.nan if a is None else a for a in acc], "o-", label=f"{r['draft']} tau={r['tau']:.2f}")
    for (i, t), (j, d) in ((a, b) for a in enumerate(temps) for b in enumerate(domains)):
        ax = axes[i][j]
        ax.set(title=f"{d}, T={t:g}", xlabel="draft position k", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("conditional acceptance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
