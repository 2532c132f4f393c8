"""`python -m bench serve`: load-test a running OpenAI-compatible server (ours or a peer such as llama-server) with
streamed chat requests from a real prompt set; metrics as `vllm bench serve` (see bench/serve_metrics.py).

    python -m bench serve --url http://127.0.0.1:8000 --dataset sharegpt --num-prompts 200 --concurrency 8
    python -m bench serve --url http://127.0.0.1:8081 --dataset mtbench --request-rate 4 --burstiness 0.5

Warm-up requests run first and are excluded, also from the /metrics diff (scraped after them).
"""
import argparse
import asyncio
import dataclasses
import time
from pathlib import Path

from bench.report import save_and_print
from bench.serve_client import LoadOptions, fetch_text, run_requests, served_model
from bench.serve_metrics import parse_metrics, server_diff, summarize
from engine.prompt_sets import load_prompts


def add_load_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by serve and serve-sweep."""
    parser.add_argument("--dataset", default="sharegpt", help="sharegpt | mtbench | humaneval | math | jsonl:PATH")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens (biases acceptance)")
    parser.add_argument("--seed", type=int, default=0, help="prompt order, arrival times, per-request seeds at T>0")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and left out of every number")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds without a byte before a request fails")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    parser.add_argument("--model", default="", help="model id to send (default: the first of /v1/models)")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of the gaps; 1 = Poisson")
    parser.add_argument("--out", type=Path, default=Path("bench_out/serve"))
    return add_load_args(parser)


def load_options(args, **overrides) -> LoadOptions:
    names = {f.name for f in dataclasses.fields(LoadOptions)}
    return LoadOptions(**{n: getattr(args, n) for n in names if hasattr(args, n)} | overrides)


def scrape(url: str, api_key: str) -> dict | None:
    text = fetch_text(url, "/metrics", api_key)
    try:
        return parse_metrics(text) if text is not None else None
    except ValueError:  # a /metrics route that is not Prometheus text
        return None


def benchmark(url: str, prompts: list[str], warmup: list[str], opts: LoadOptions, progress: bool = True,
              desc: str = "serve") -> dict:
    """Warm-up, scrape /metrics, run every prompt, scrape again: the result dict of one load level."""
    opts = dataclasses.replace(opts, model=opts.model or served_model(url, opts.api_key))
    warm = asyncio.run(run_requests(url, warmup, dataclasses.replace(opts, request_rate=float("inf")), progress,
                                    f"{desc} warm-up", first_index=len(prompts)))[0] if warmup else []
    before = scrape(url, opts.api_key)
    results, duration = asyncio.run(run_requests(url, prompts, opts, progress, desc))
    after = scrape(url, opts.api_key)
    options = dataclasses.asdict(opts) | {"api_key": bool(opts.api_key), "request_rate": str(opts.request_rate)}
    return {"url": url, "options": options,
            "num_prompts": len(prompts), "warmup_requests": len(warm), "warmup_failed": sum(not r.ok for r in warm),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summarize(results, duration, opts.concurrency),
            "server": server_diff(before, after), "requests": [r.record() for r in results]}


def run(args) -> dict:
    texts = load_prompts(args.dataset, args.num_prompts + args.warmup, seed=args.seed)
    result = benchmark(args.url, texts[:args.num_prompts], texts[args.num_prompts:], load_options(args),
                       args.progress)
    return {"dataset": args.dataset} | result


def fmt(value, spec: str = ".2f") -> str:
    return "absent" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def summary_rows(result: dict) -> list[list[str]]:
    s, opts = result["summary"], result["options"]
    rows = [["successful requests", fmt(s["successful_requests"])], ["failed requests", fmt(s["failed_requests"])],
            ["max concurrency", fmt(opts["concurrency"] or "none")], ["request rate (req/s)", opts["request_rate"]],
            ["duration (s)", fmt(s["duration_s"])], ["total input tokens", fmt(s["total_input_tokens"])],
            ["total output tokens", fmt(s["total_output_tokens"])],
            ["request throughput (req/s)", fmt(s["request_throughput"])],
            ["output token throughput (tok/s)", fmt(s["output_throughput"])],
            ["total token throughput (tok/s)", fmt(s["total_token_throughput"])],
            ["mean concurrency", fmt(s["mean_concurrency"])]]
    for key, label in (("per_user_tok_s", "per-user tok/s"), ("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"),
                       ("itl_ms", "ITL ms"), ("e2e_ms", "E2E ms")):
        rows += [[f"{stat} {label}", fmt(v)] for stat, v in s[key].items()]
    errors = [[f"error x{n}", " ".join(e.replace("|", "/").split())[:200]] for e, n in s["errors"].items()]
    return rows + server_rows(result["server"]) + errors


def server_rows(server: dict | None) -> list[list[str]]:
    if server is None:
        return [["server /metrics", "absent"]]
    rows = [["server: requests", fmt(server["requests"], ".0f")],
            ["server: generation tokens", fmt(server["generation_tokens"], ".0f")]]
    if server["num_drafts"] == 0:
        return rows + [["server: speculative rounds", "0"]]
    pos = server["per_position_acceptance"]
    return rows + [["server: acceptance length", fmt(server["acceptance_length"])],
                   ["server: per-position acceptance", "absent" if pos is None else " ".join(f"{p:.2f}" for p in pos)],
                   ["server: mean verify budget", fmt(server["mean_verify_budget"])]]


def report(result: dict, out_dir: Path, name: str = "serve"):
    save_and_print(result, Path(out_dir) / f"{name}.json", ["metric", "value"], summary_rows(result))
    print(f"wrote {Path(out_dir) / f'{name}.json'}")
