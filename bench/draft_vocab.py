"""How much acceptance a draft vocabulary (FR-Spec, python -m train draft-vocab) costs: over the same verify rounds
of the whole-vocabulary draft, the expected acceptance E[sum_x min(p, q)] of its q and of q restricted to the top K
of draft_vocab.json (renormalised), per draft position, and the target's mass inside the K tokens. Same contexts
for every K, so the ratios carry no sampling noise between variants."""
import json
from pathlib import Path

import torch

import engine.speculator
from engine import LLM, SamplingParams
from engine.drafts.loader import VOCAB_FILE
from engine.prompt_sets import encode_prompt, load_prompts


class AcceptanceProbe:
    """Wraps the verifier: for each verified draft row, sum_x min(p, q_K) for every K and the target mass inside."""

    def __init__(self, token_lists: dict[int, torch.Tensor], verifier):
        self.token_lists, self.verifier = token_lists, verifier
        self.rows = []  # (draft position, alpha of the whole vocabulary, {K: alpha}, {K: target mass inside})

    def __call__(self, target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms):
        t = d = 0
        for n in num_drafts.tolist():
            p, q = target_probs[t:t + n].double(), draft_probs[d:d + n].double()
            alpha = {k: torch.minimum(p, restricted(q, ids)).sum(-1) for k, ids in self.token_lists.items()}
            inside = {k: p[:, ids].sum(-1) for k, ids in self.token_lists.items()}
            full = torch.minimum(p, q).sum(-1)
            self.rows += [(j, full[j].item(), {k: a[j].item() for k, a in alpha.items()},
                           {k: m[j].item() for k, m in inside.items()}) for j in range(n)]
            t, d = t + n + 1, d + n
        return self.verifier(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms)


def restricted(q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(q)
    out[:, ids] = q[:, ids]
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def run(args) -> dict:
    ranked = json.loads((Path(args.draft) / VOCAB_FILE).read_text())["token_ids"]
    sizes = [k for k in args.sizes if k <= len(ranked)]
    probe = AcceptanceProbe({k: torch.tensor(ranked[:k]) for k in sizes}, engine.speculator.rejection_sample)
    llm = LLM(model=args.model, spec_method="dspark", draft=args.draft, draft_vocab_size=-1,
              verify_policy=args.verify_policy, num_threads=args.num_threads, max_num_seqs=args.max_num_seqs)
    prompts = [encode_prompt(llm, text, args.max_prompt_tokens)
               for name in args.datasets for text in load_prompts(name, args.num_prompts, seed=args.seed)]
    engine.speculator.rejection_sample = probe
    try:
        llm.generate(prompts, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed))
    finally:
        engine.speculator.rejection_sample = probe.verifier
    if not probe.rows:
        raise SystemExit("no verify rounds went through rejection sampling (greedy steps verify by argmax): use a "
                         "temperature > 0")
    return {"draft": args.draft, "datasets": args.datasets, "temperature": args.temperature,
            "verify_policy": args.verify_policy, "sizes": sizes, "rows": probe.rows}


def summary(results: dict) -> list[dict]:
    """Per draft position (and 'all'): rows, mean alpha of the whole vocabulary, and per K mean alpha and ratio."""
    rows = results["rows"]
    positions = sorted({r[0] for r in rows})
    out = []
    for pos in positions + ["all"]:
        chosen = [r for r in rows if pos == "all" or r[0] == pos]
        full = sum(r[1] for r in chosen) / len(chosen)
        out.append({"position": pos if pos == "all" else pos + 1, "rows": len(chosen), "alpha": full,
                    **{f"alpha_{k}": sum(r[2][k] for r in chosen) / len(chosen) for k in results["sizes"]},
                    **{f"inside_{k}": sum(r[3][k] for r in chosen) / len(chosen) for k in results["sizes"]}})
    return out


def report(results: dict, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary(results)
    (out_dir / "draft_vocab.json").write_text(json.dumps({**results, "rows": len(results["rows"]),
                                                          "summary": table}, indent=2))
    sizes = results["sizes"]
    print("\n| position | rounds | E[alpha], every token | " + " | ".join(f"top {k}: E[alpha] (ratio)" for k in sizes)
          + " |\n|---|---:|---:|" + "---:|" * len(sizes))
    for row in table:
        cells = " | ".join(f"{row[f'alpha_{k}']:.4f} ({row[f'alpha_{k}'] / max(row['alpha'], 1e-12):.3f})"
                           for k in sizes)
        print(f"| {row['position']} | {row['rows']} | {row['alpha']:.4f} | {cells} |")
    pooled = table[-1]
    print("\ntarget mass inside the list: " + ", ".join(f"top {k} {pooled[f'inside_{k}']:.3f}" for k in sizes))
    plot(table, sizes, out_dir / "draft_vocab.png", results)


def plot(table: list[dict], sizes: list[int], path: Path, results: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in table:
        if row["rows"] >= 50:
            name = "all positions" if row["position"] == "all" else f"position {row['position']}"
            ax.plot(sizes, [row[f"alpha_{k}"] / max(row["alpha"], 1e-12) for k in sizes], "o-",
                    label=f"{name} ({row['rows']} rounds)")
    ax.plot(sizes, [table[-1][f"inside_{k}"] for k in sizes], "k--", label="target mass inside the list")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xscale="log", xlabel="draft vocabulary size K", ylabel="E[alpha] with top K / with every token",
           title=f"draft vocabulary cost, T={results['temperature']:g}, {', '.join(results['datasets'])}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
