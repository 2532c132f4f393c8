"""python -m train draft-vocab: choose the tokens a draft may propose (FR-Spec, Zhao et al. 2025). The draft's LM head,
Markov bias and sampling then cover only those columns, a few times cheaper, and verification stays lossless (the
draft's distribution is zero elsewhere). Tokens are ranked by their frequency in what the target writes (the
supervised tokens of the training conversations) mixed with ShareGPT's replies (a large sample of assistant text, so
that tokens the small training set never saw still rank sensibly); evaluation prompts are in neither."""
import json
from collections import Counter
from pathlib import Path

from engine.drafts.loader import VOCAB_FILE


def supervised_token_counts(rows: list[dict]) -> Counter:
    """Counts of the loss-masked (answer) tokens of training conversations."""
    counts = Counter()
    for row in rows:
        counts.update(t for t, m in zip(row["input_ids"], row["loss_mask"]) if m)
    return counts


def text_token_counts(texts: list[str], tokenizer, batch: int = 1000) -> Counter:
    counts = Counter()
    for start in range(0, len(texts), batch):
        for ids in tokenizer(texts[start:start + batch], add_special_tokens=False, verbose=False)["input_ids"]:
            counts.update(ids)
    return counts


def rank_tokens(sources: list[tuple[Counter, float]]) -> list[int]:
    """Token ids by descending weighted frequency sum_s w_s * count_s(t) / total_s (ties: smaller id first)."""
    score = Counter()
    for counts, weight in sources:
        total = sum(counts.values())
        for token, c in counts.items():
            score[token] += weight * c / total
    return sorted(score, key=lambda t: (-score[t], t))


def with_token(ranked: list[int], token: int | None, size: int) -> list[int]:
    """The first `size` of ranked, with `token` (EOS: the draft must be able to end an answer) as the last one if it
    is not among them."""
    chosen = ranked[:size]
    if token is None or token in chosen:
        return chosen
    return chosen[:size - 1] + [token]


def coverage(token_ids: list[int], counts: Counter) -> float:
    """Share of the counted tokens that are in token_ids."""
    chosen = set(token_ids)
    return sum(c for t, c in counts.items() if t in chosen) / max(1, sum(counts.values()))


def write_draft_vocab(args) -> Path:
    from transformers import AutoTokenizer

    from engine.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
    from engine.prompt_sets import sharegpt_replies
    from train.data import read_rows
    if not (Path(args.draft) / "config.json").is_file():
        raise SystemExit(f"{args.draft} is not a draft directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(args.model or DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME)
    rows = read_rows(Path(args.data)) if args.data else []
    if args.data and not rows:
        raise SystemExit(f"no training conversations in {args.data}")
    held_out = rows[-args.held_out:] if 0 < args.held_out < len(rows) else []
    fit_rows = rows[:len(rows) - len(held_out)]
    sources = [(supervised_token_counts(fit_rows), args.data_weight)] if fit_rows else []
    if args.sharegpt_replies:
        replies = sharegpt_replies(args.sharegpt_replies)
        sources.append((text_token_counts(replies, tokenizer), 1.0 - args.data_weight if fit_rows else 1.0))
    if not sources:
        raise SystemExit("no text to count: give --data and/or --sharegpt-replies")
    token_ids = with_token(rank_tokens(sources), tokenizer.eos_token_id, args.size)
    report = {"size": len(token_ids), "vocab_size": len(tokenizer),
              "sources": {"data": args.data, "data_rows": len(fit_rows), "data_weight": args.data_weight,
                          "sharegpt_replies": args.sharegpt_replies},
              "counted_tokens": [sum(c.values()) for c, _ in sources]}
    if held_out:
        report["held_out_rows"] = len(held_out)
        report["held_out_coverage"] = round(coverage(token_ids, supervised_token_counts(held_out)), 4)
    out = Path(args.draft) / VOCAB_FILE
    out.write_text(json.dumps({**report, "token_ids": token_ids}) + "\n")
    print(json.dumps(report, indent=1))
    return out
