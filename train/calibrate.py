"""python -m train calibrate: roll a DSpark draft out on held-out prompts (every drafted position verified), fit
Sequential Temperature Scaling on its confidence logits and write sts.json next to the draft, with a table and a
reliability diagram of the cumulative product before and after."""
import json
from pathlib import Path

import numpy as np

from engine.calibration import (
    Rounds,
    Scaling,
    bin_stats,
    cumulative,
    pooled_metrics,
    position_metrics,
    rounds_from_records,
    save_scaling,
)
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
    block_size = int(json.loads((draft / "config.json").read_text())["block_size"])
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
    with_bias = args.scaling == "affine"
    scaling = sts.fit_sts(rounds, with_bias)
    result = {"draft": str(draft), "prompts": args.prompts, "num_prompts": args.num_prompts,
              "temperature": args.temperature, "max_tokens": args.max_tokens, "num_rounds": len(records),
              "scaling": args.scaling, "temperatures": scaling.temps.tolist(), "biases": scaling.biases.tolist(),
              "before": position_metrics(rounds), "after": position_metrics(rounds, scaling),
              "held_out": sts.cross_validated(rounds, with_bias),
              "pooled_before": pooled_metrics(rounds), "pooled_after": pooled_metrics(rounds, scaling)}
    save_scaling(draft / CALIBRATION_FILE, scaling, num_rounds=len(records), prompts=args.prompts,
                 temperature=args.temperature, ece_before=[m["ece"] for m in result["before"]],
                 ece_after=[m["ece"] for m in result["after"]], ece_held_out=[m["ece"] for m in result["held_out"]])
    out = Path(args.out or draft)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sts_metrics.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    plot(rounds, scaling, result, out / "sts_reliability.png")
    print(f"wrote {draft / CALIBRATION_FILE}")
    return result


def print_table(result: dict):
    print(f"\nSTS ({result['scaling']}) on {result['num_rounds']} rounds ({result['prompts']}, "
          f"T={result['temperature']}); metrics of the cumulative product Π c_i vs prefix acceptance; 'held out' = "
          "fitted on one half of the rounds, measured on the other (both ways)")
    print("| pos | n | accept | T_k | b_k | mean pred before | ECE before | ECE after | ECE held out | AUROC before "
          "| AUROC after |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = list(zip(result["before"], result["after"], result["held_out"], result["temperatures"], result["biases"]))
    rows.append((result["pooled_before"], result["pooled_after"], {"ece": float("nan")}, float("nan"), float("nan")))
    for b, a, h, t, bias in rows:
        pos = b.get("position", "all")
        print(f"| {pos} | {b['n']} | {b['accept_rate']:.3f} | {t:.3f} | {bias:.2f} | {b['mean_pred']:.3f} | "
              f"{b['ece']:.4f} | {a['ece']:.4f} | {h['ece']:.4f} | {b['auroc']:.3f} | {a['auroc']:.3f} |")


def plot(rounds: Rounds, scaling: Scaling, result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot([0, 1], [0, 1], "k:", lw=1)
    for name, fitted in (("before", None), ("after STS", scaling)):
        pairs = [cumulative(rounds, fitted, k) for k in range(rounds.num_positions)]
        count, pred, label = bin_stats(np.concatenate([p for p, _ in pairs]), np.concatenate([y for _, y in pairs]))
        full = count > 0
        left.plot(pred[full], label[full], "o-", label=name)
    left.set(xlabel="predicted prefix survival Π c_i", ylabel="observed acceptance", title="reliability (pooled)")
    left.legend()
    pos = np.arange(1, rounds.num_positions + 1)
    right.bar(pos - 0.2, [m["ece"] for m in result["before"]], 0.4, label="before")
    right.bar(pos + 0.2, [m["ece"] for m in result["after"]], 0.4, label="after STS")
    right.set(xlabel="position k", ylabel="ECE of Π_{i<=k} c_i", title="ECE per position")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
