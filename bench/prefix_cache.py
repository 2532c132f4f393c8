"""python -m bench prefix-cache: two-turn chats with and without prefix caching. Each conversation asks a dataset
question, then a follow-up that resends the question and the answer (as every OpenAI client does); the second turn's
time to first token is measured on an engine that caches prefixes and on one that does not, alternating in one
process, one request at a time."""
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench.report import save_and_print
from engine import LLM, SamplingParams
from engine.prompt_sets import load_prompts

FOLLOW_UP = "Thanks. Now summarise your answer in two sentences."


def timed(llm: LLM, token_ids: list[int], params: SamplingParams) -> dict:
    """Run one request alone: time to its first token, its tokens, and how many prompt tokens the cache served."""
    start, first, tokens, cached = time.perf_counter(), None, [], 0
    llm.add_request(token_ids, params)
    while llm.has_unfinished():
        for out in llm.step():
            first = first if first is not None else time.perf_counter() - start
            tokens += out.delta_token_ids
            cached = out.num_cached_tokens
    return {"ttft_s": first, "tokens": tokens, "cached": cached, "prompt": len(token_ids)}


def conversation(llm: LLM, question: str, params: SamplingParams) -> tuple[dict, dict]:
    turn1 = timed(llm, llm.chat_prompt([{"role": "user", "content": question}]), params)
    answer = llm.tokenizer.decode(turn1["tokens"], skip_special_tokens=True)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                {"role": "user", "content": FOLLOW_UP}]
    return turn1, timed(llm, llm.chat_prompt(messages), params)


def run(args) -> dict:
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    engines = {on: LLM(model=args.model, dtype=args.dtype, num_threads=args.num_threads, spec_method="none",
                       enable_prefix_caching=on) for on in (True, False)}
    for llm in engines.values():
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    rows = []
    for question in tqdm(load_prompts(args.dataset, args.num_prompts, seed=args.seed), desc="conversations"):
        (t1_on, t2_on), (t1_off, t2_off) = (conversation(engines[on], question, params) for on in (True, False))
        rows.append({"turn2_prompt_tokens": t2_on["prompt"], "turn2_cached_tokens": t2_on["cached"],
                     "turn1_cached_tokens": t1_on["cached"], "same_answers": (t1_on["tokens"], t2_on["tokens"])
                     == (t1_off["tokens"], t2_off["tokens"]), "turn1_ttft_on_s": t1_on["ttft_s"],
                     "turn1_ttft_off_s": t1_off["ttft_s"], "turn2_ttft_on_s": t2_on["ttft_s"],
                     "turn2_ttft_off_s": t2_off["ttft_s"]})
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "same_answers"}
    summary["same_answers"] = sum(r["same_answers"] for r in rows)
    return {"rows": rows, "median": summary, "num_conversations": len(rows), "threads": args.num_threads,
            "max_tokens": args.max_tokens, "dataset": args.dataset}


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [1000 * r["turn2_ttft_off_s"] for r in rows], 0.4, label="prefix caching off")
    ax.bar([i + 0.2 for i in x], [1000 * r["turn2_ttft_on_s"] for r in rows], 0.4, label="prefix caching on")
    ax.set(xlabel="conversation", ylabel="second-turn TTFT (ms)", title="Second turn of a chat, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict, out: Path):
    rows = [[str(i), str(r["turn2_prompt_tokens"]), str(r["turn2_cached_tokens"]),
             f"{1000 * r['turn2_ttft_off_s']:.0f}", f"{1000 * r['turn2_ttft_on_s']:.0f}",
             f"{r['turn2_ttft_off_s'] / r['turn2_ttft_on_s']:.2f}", "yes" if r["same_answers"] else "no"]
            for i, r in enumerate(result["rows"])]
    m = result["median"]
    rows.append(["median", f"{m['turn2_prompt_tokens']:.0f}", f"{m['turn2_cached_tokens']:.0f}",
                 f"{1000 * m['turn2_ttft_off_s']:.0f}", f"{1000 * m['turn2_ttft_on_s']:.0f}",
                 f"{m['turn2_ttft_off_s'] / m['turn2_ttft_on_s']:.2f}", f"{m['same_answers']}/{len(result['rows'])}"])
    header = ["conversation", "turn-2 prompt tokens", "served from cache", "TTFT off ms", "TTFT on ms", "off / on",
              "same answers"]
    save_and_print(result, out / "prefix_cache.json", header, rows)
    plot(result, out / "prefix_cache.png")
    print(f"wrote {out / 'prefix_cache.json'} and {out / 'prefix_cache.png'}")
