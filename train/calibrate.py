"""python -m train calibrate: fit Sequential Temperature Scaling on a DSpark draft's confidence logits and write
sts.json next to the draft, with a table and a reliability diagram of the cumulative product before and after. The
logits come from a rollout on held-out prompts (every drafted position verified), from records a rollout saved
(--from-records), or from rounds a server logged while serving (--from-rounds: see from_rounds)."""
import json
from pathlib import Path

import numpy as np

from engine.calibration import (
    Rounds,
    Scaling,
    draft_block_size,
    pooled,
    pooled_metrics,
    position_metrics,
    reliability,
    rounds_from_log,
    rounds_from_records,
    save_scaling,
)
from engine.calibration_monitor import read_rounds
from engine.drafts.loader import CALIBRATION_FILE
from engine.sampling_params import SamplingParams
from train import sts


def prompt_texts(name: str, n: int, seed: int) -> list[str]:
    from engine.prompt_sets import load_prompts, sharegpt_prompts
    if name == "sharegpt-test":
        return sharegpt_prompts(n, seed, split="test")
    return load_prompts(name, n, seed)


def rollout(args) -> list:
    from engine.llm import LLM
    from engine.prompt_sets import encode_prompt
    llm = LLM(model=args.model, dtype=args.dtype, spec_method="dspark", draft=args.draft, verify_policy="full",
              num_threads=args.num_threads, max_num_seqs=args.max_num_seqs, kv_cache_gb=args.kv_cache_gb,
              seed=args.seed)
    texts = prompt_texts(args.prompts, args.num_prompts, args.seed)
    prompts = [encode_prompt(llm, t, args.max_prompt_tokens) for t in texts]
    records = llm.record_confidences()
    llm.generate(prompts, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed))
    llm.record_confidences(False)
    if not records:
        raise SystemExit(f"no confidence records: does {args.draft} have a confidence head (enable_confidence_head)?")
    return records


def calibrate(args) -> dict:
    draft = Path(args.draft)
    block_size = draft_block_size(draft)
    if args.from_rounds:
        if args.from_records or args.save_records:
            raise SystemExit("--from-rounds reads logged rounds: it takes neither --from-records nor --save-records")
        return from_rounds(args, draft, block_size)
    if args.from_records:
        records = [json.loads(line) for line in Path(args.from_records).read_text().splitlines() if line.strip()]
        args.prompts = f"records:{args.from_records}"
    else:
        records = rollout(args)
    if args.save_records:
        Path(args.save_records).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_records).write_text("".join(json.dumps(r if isinstance(r, dict) else vars(r)) + "\n"
                                                    for r in records))
    rounds = rounds_from_records(records, block_size)
    scaling = sts.fit_sts(rounds, args.scaling == "affine")
    result = {"draft": str(draft), "prompts": args.prompts, "num_prompts": args.num_prompts,
              "temperature": args.temperature, "max_tokens": args.max_tokens, "num_rounds": len(records),
              **fit_metrics(rounds, scaling, args.scaling),
              "held_out": sts.cross_validated(rounds, args.scaling == "affine")}
    write(args, draft, scaling, result, rounds, f"{args.prompts}, T={args.temperature}",
          prompts=args.prompts, temperature=args.temperature)
    return result


def from_rounds(args, draft: Path, block_size: int) -> dict:
    """Refit from rounds a server logged (--log-spec-rounds; engine.calibration_monitor.RoundLog), each PATH read
    after its rotated PATH.1, oldest first. A seeded --holdout fraction of the rounds is kept out of the fit, and the
    written scaling's ECE before / after on them is printed and stored in sts.json ('ece_held_out*'); --holdout 0 fits
    every round and reports cross-validated halves instead, as the rollout does.

    Rounds served under a verify policy other than `full` label only the positions the target verified (position k
    of a round is labelled when k < verified; rounds_from_records / cumulative leave the rest out): a later position
    is then fitted only on the rounds the planner chose to verify that far, a selection by its own predictions that
    can bias the fit there; rounds served under `full` label every drafted position. Refuses (SystemExit naming the
    problem) files that are missing or hold no rounds, and rounds longer than the draft's block_size (logged with
    another draft) or inconsistent."""
    missing = [p for p in args.from_rounds if not Path(p).is_file() and not Path(f"{p}.1").is_file()]
    if missing:
        raise SystemExit(f"--from-rounds: no such round log: {', '.join(missing)}")
    if not 0 <= args.holdout < 1:
        raise SystemExit(f"--holdout must be in [0, 1), got {args.holdout}")
    try:
        rounds = rounds_from_log(read_rounds(*args.from_rounds), block_size, ", ".join(args.from_rounds))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    n = len(rounds.verified)
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(args.seed).permutation(n)[:round(args.holdout * n)]] = True
    if args.holdout and not 0 < held.sum() < n:
        raise SystemExit(f"{n} logged round(s) cannot be split {1 - args.holdout:g} / {args.holdout:g} for a "
                         "held-out check: log more, or --holdout 0")
    fit_rounds, held_out = sts.subset(rounds, ~held), sts.subset(rounds, held)
    with_bias = args.scaling == "affine"
    scaling = sts.fit_sts(fit_rounds, with_bias)
    meta = {"source": "logged rounds", "files": [str(p) for p in args.from_rounds],
            "num_held_out_rounds": int(held.sum()), "holdout": args.holdout, "seed": args.seed}
    result = {"draft": str(draft), "num_rounds": n, **meta, **fit_metrics(fit_rounds, scaling, args.scaling)}
    if not held.any():
        result["held_out"] = sts.cross_validated(rounds, with_bias, seed=args.seed)
        write(args, draft, scaling, result, rounds, "logged rounds, every one fitted", **meta)
        return result
    result |= {"held_out_before": position_metrics(held_out), "held_out": position_metrics(held_out, scaling),
               "pooled_held_out_before": pooled_metrics(held_out), "pooled_held_out": pooled_metrics(held_out, scaling)}
    meta |= {"ece_held_out_before": [m["ece"] for m in result["held_out_before"]],
             "pooled_ece_held_out_before": result["pooled_held_out_before"]["ece"],
             "pooled_ece_held_out": result["pooled_held_out"]["ece"]}
    write(args, draft, scaling, result, held_out, f"logged rounds: {n - held.sum()} fitted, {held.sum()} held out "
          f"(seed {args.seed}); before / after = the fitted rounds, 'held out' = the others, plotted", **meta)
    print(f"held-out rounds ({held.sum()}): pooled ECE {result['pooled_held_out_before']['ece']:.4f} before, "
          f"{result['pooled_held_out']['ece']:.4f} after")
    return result


def fit_metrics(rounds: Rounds, scaling: Scaling, kind: str) -> dict:
    """The fitted scaling and the metrics of the rounds it was fitted on, before and after it."""
    return {"scaling": kind, "temperatures": scaling.temps.tolist(), "biases": scaling.biases.tolist(),
            "before": position_metrics(rounds), "after": position_metrics(rounds, scaling),
            "pooled_before": pooled_metrics(rounds), "pooled_after": pooled_metrics(rounds, scaling)}


def output_paths(out: str, draft: Path) -> tuple[Path, Path, Path]:
    """sts.json, the metrics JSON and the reliability PNG: --out FILE.json names the scaling file (the other two go
    beside it as FILE_metrics.json / FILE_reliability.png); otherwise sts.json goes next to the draft and the other
    two to --out, a directory (default: the draft)."""
    out = Path(out) if out else draft
    if out.suffix == ".json":
        return out, out.with_name(f"{out.stem}_metrics.json"), out.with_name(f"{out.stem}_reliability.png")
    return draft / CALIBRATION_FILE, out / "sts_metrics.json", out / "sts_reliability.png"


def write(args, draft: Path, scaling: Scaling, result: dict, plotted: Rounds, title: str, **meta):
    """sts.json (the scaling, the ECEs and meta), the metrics JSON, the table and the reliability PNG (of plotted)."""
    sts_path, metrics_path, png_path = output_paths(args.out, draft)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    save_scaling(sts_path, scaling, num_rounds=result["num_rounds"], **meta,
                 ece_before=[m["ece"] for m in result["before"]], ece_after=[m["ece"] for m in result["after"]],
                 ece_held_out=[m["ece"] for m in result["held_out"]])
    metrics_path.write_text(json.dumps(result, indent=2))
    print_table(result, title)
    plot(plotted, scaling, position_metrics(plotted), position_metrics(plotted, scaling), png_path)
    print(f"wrote {sts_path}")


def print_table(result: dict, title: str):
    held_out = ("'held out' = fitted on one half of the rounds, measured on the other (both ways)"
                if "pooled_held_out" not in result else "")
    print(f"\nSTS ({result['scaling']}) on {result['num_rounds']} rounds ({title}); metrics of the cumulative product "
          f"Π c_i vs prefix acceptance" + (f"; {held_out}" if held_out else ""))
    print("| pos | n | accept | T_k | b_k | mean pred before | ECE before | ECE after | ECE held out | AUROC before "
          "| AUROC after |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = list(zip(result["before"], result["after"], result["held_out"], result["temperatures"], result["biases"]))
    rows.append((result["pooled_before"], result["pooled_after"], result.get("pooled_held_out", {"ece": float("nan")}),
                 float("nan"), float("nan")))
    for b, a, h, t, bias in rows:
        pos = b.get("position", "all")
        print(f"| {pos} | {b['n']} | {b['accept_rate']:.3f} | {t:.3f} | {bias:.2f} | {b['mean_pred']:.3f} | "
              f"{b['ece']:.4f} | {a['ece']:.4f} | {h['ece']:.4f} | {b['auroc']:.3f} | {a['auroc']:.3f} |")


def plot(rounds: Rounds, scaling: Scaling, before: list[dict], after: list[dict], path: Path):
    """The pooled reliability diagram of rounds and the ECE per position (before / after), side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot([0, 1], [0, 1], "k:", lw=1)
    for name, fitted in (("before", None), ("after STS", scaling)):
        curve = reliability(*pooled(rounds, fitted))
        left.plot(curve["predicted"], curve["realised"], "o-", label=name)
    left.set(xlabel="predicted prefix survival Π c_i", ylabel="observed acceptance", title="reliability (pooled)")
    left.legend()
    pos = np.arange(1, rounds.num_positions + 1)
    right.bar(pos - 0.2, [m["ece"] for m in before], 0.4, label="before")
    right.bar(pos + 0.2, [m["ece"] for m in after], 0.4, label="after STS")
    right.set(xlabel="position k", ylabel="ECE of Π_{i<=k} c_i", title="ECE per position")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
