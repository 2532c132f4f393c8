"""HTTP serving overhead: aggregate output tokens/s and time to first token of our server (streaming chat over SSE)
against the offline engine, same model, prompts, greedy decoding and thread count."""
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.report import save_and_print
from engine import LLM, SamplingParams
from engine.prompt_sets import load_prompts


def offline(prompts: list[str], concurrency: int, max_tokens: int, threads: int) -> dict:
    llm = LLM(num_threads=threads, max_num_seqs=max(concurrency, 1))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts[:concurrency]]
    llm.generate(ids[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start, first = time.perf_counter(), {}
    for i in ids:
        llm.add_request(i, params)
    produced = 0
    while llm.has_unfinished():
        for out in llm.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
            produced += len(out.delta_token_ids)
    return {"tok_s": produced / (time.perf_counter() - start), "ttft_s": statistics.median(first.values())}


async def one_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and ttft is None:
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


async def served(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=128)) as client:
        await one_stream(client, "warm up", 4)
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, p, max_tokens) for p in prompts[:concurrency]))
        wall = time.perf_counter() - start
    return {"tok_s": sum(n for _, n in results) / wall, "ttft_s": statistics.median(t for t, _ in results)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--num-threads", str(threads),
                             "--max-num-seqs", str(max_num_seqs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 120 s")


def run(args) -> dict:
    prompts = load_prompts(args.dataset, max(args.concurrency), seed=args.seed)
    rows = [{"concurrency": c, "offline": offline(prompts, c, args.max_tokens, args.num_threads)}
            for c in args.concurrency]
    proc, url = start_server(args.num_threads, max(args.concurrency))
    try:
        for row in rows:
            row["server"] = asyncio.run(served(url, prompts, row["concurrency"], args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"dataset": args.dataset, "max_tokens": args.max_tokens, "threads": args.num_threads, "rows": rows}


def report(results: dict, out_dir: Path):
    rows = [[str(r["concurrency"]), f"{r['offline']['tok_s']:.1f}", f"{r['server']['tok_s']:.1f}",
             f"{r['server']['tok_s'] / r['offline']['tok_s']:.0%}", f"{r['offline']['ttft_s']:.2f}",
             f"{r['server']['ttft_s']:.2f}"] for r in results["rows"]]
    save_and_print(results, out_dir / "server_overhead.json", ["concurrency", "offline tok/s", "server tok/s",
                                                                "server / offline", "offline TTFT s", "server TTFT s"],
                   rows)
