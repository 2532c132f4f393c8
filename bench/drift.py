"""python -m bench drift: serve a prompt set through the engine with its draft, logging every verified round
(--log-spec-rounds) and sampling the calibration monitor as rounds accumulate: the pooled ECE and predicted vs
realised tokens per round over time, a table, JSON and a PNG. Run it on traffic the draft was not calibrated on, refit
with `python -m train calibrate --from-rounds`, and run it again with the refitted draft (docs/benchmarks.md). It also
times what the monitor costs per round and per snapshot."""
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from engine.calibration_monitor import CalibrationMonitor
from engine.llm import LLM
from engine.prompt_sets import encode_prompt, load_prompts
from engine.sampling_params import SamplingParams


def run(args) -> dict:
    llm = LLM(model=args.model, draft=args.draft, spec_method="dspark", verify_policy=args.verify_policy,
              num_threads=args.num_threads, max_num_seqs=args.max_num_seqs, seed=args.seed,
              calibration_window=args.calibration_window, log_spec_rounds=args.log_spec_rounds)
    texts = load_prompts(args.dataset, args.num_prompts, args.seed)
    prompts = [encode_prompt(llm, t, args.max_prompt_tokens) for t in texts]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    series = serve(llm, prompts, params, args.sample_every)
    llm.speculator.round_log and llm.speculator.round_log.flush()
    final = llm.stats().calibration
    return {"dataset": args.dataset, "draft": args.draft, "num_prompts": len(prompts), "series": series,
            "final": vars(final), "monitor_cost": monitor_cost(llm.speculator.drafter.num_draft_tokens)}


def serve(llm: LLM, prompts: list[list[int]], params: SamplingParams, every: int) -> list[dict]:
    """Every prompt queued at once (max_num_seqs at a time); the monitor sampled each `every` rounds."""
    for prompt in prompts:
        llm.add_request(prompt, params)
    series, next_sample = [], every
    with tqdm(total=len(prompts), desc="serving") as bar:
        while llm.has_unfinished():
            bar.update(sum(out.finished for out in llm.step()))
            rounds = llm.spec_stats.num_drafts
            if rounds >= next_sample:
                s = llm.stats().calibration
                series.append({"rounds": rounds, "ece": s.pooled_ece, "worst_ece": s.worst_ece,
                               "tokens_predicted": s.tokens_predicted,
                               "tokens_realised": s.tokens_realised, "drifting": s.drifting})
                next_sample += every
    return series


def monitor_cost(block: int, rounds: int = 20000) -> dict:
    """Microseconds per recorded round and per snapshot, on synthetic rounds of this block size."""
    rng = np.random.default_rng(0)
    data = [(rng.uniform(0.3, 1, block).tolist(), int(rng.integers(1, block + 1)), 0) for _ in range(rounds)]
    monitor = CalibrationMonitor(block, window=10000, threshold=1.0)  # synthetic rounds: no drift warnings
    start = time.perf_counter()
    for confidences, verified, _ in data:
        monitor.record(confidences, verified, verified // 2)
    per_round = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(1000):
        monitor.snapshot()
    return {"record_us": per_round * 1e6, "snapshot_us": (time.perf_counter() - start) / 1000 * 1e6}


def report(result: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'rounds':>7} {'ECE pooled':>10} {'worst position':>14} {'tokens/round predicted':>23} {'realised':>9}")
    for p in result["series"]:
        print(f"{p['rounds']:>7} {p['ece']:>10.3f} {p['worst_ece']:>14.3f} {p['tokens_predicted']:>23.2f} "
              f"{p['tokens_realised']:>9.2f}"
              f"{'  drift' if p['drifting'] else ''}")
    cost = result["monitor_cost"]
    print(f"monitor: {cost['record_us']:.1f} us per round, {cost['snapshot_us']:.1f} us per snapshot")
    plot(result, out / "drift.png")
    print(f"wrote {out / 'drift.json'} and {out / 'drift.png'}")


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rounds = [p["rounds"] for p in result["series"]]
    fig, (ece, tokens) = plt.subplots(1, 2, figsize=(10, 3.8))
    ece.plot(rounds, [p["ece"] for p in result["series"]], marker=".", label="pooled")
    ece.plot(rounds, [p["worst_ece"] for p in result["series"]], marker=".", label="worst position")
    ece.axhline(0.05, color="grey", linestyle="--", label="drift threshold")
    ece.set(xlabel="verified rounds", ylabel="ECE over the window", title=f"{result['dataset']}")
    ece.legend()
    tokens.plot(rounds, [p["tokens_predicted"] for p in result["series"]], label="predicted")
    tokens.plot(rounds, [p["tokens_realised"] for p in result["series"]], label="realised")
    tokens.set(xlabel="verified rounds", ylabel="tokens per round (window mean)")
    tokens.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
