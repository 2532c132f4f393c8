"""The load-test client: streams /v1/chat/completions from any OpenAI-compatible server with asyncio + httpx.

Arrivals as `vllm bench serve`: with a request rate, gaps are Gamma(shape=burstiness, scale=1/(rate·burstiness))
(burstiness 1 = Poisson); without one every request is sent at once. A concurrency limit (semaphore) caps the
requests in flight. Every failure (refused connection, HTTP error, error event, stream cut before [DONE], timeout)
becomes a failed RequestResult carrying its reason; nothing a server does stops the run.
"""
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm.auto import tqdm

from bench.serve_metrics import RequestResult


class RequestFailed(Exception):
    """A server answer that is not a complete stream (its message is the whole reason)."""


@dataclass
class LoadOptions:
    model: str = ""
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    concurrency: int | None = None       # None: no client-side limit
    request_rate: float = float("inf")   # requests/s; inf: all at once
    burstiness: float = 1.0
    timeout: float = 600.0               # seconds without a byte before a request fails
    api_key: str = ""


def request_body(prompt: str, index: int, opts: LoadOptions) -> dict:
    body = {"model": opts.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": opts.max_tokens,
            "temperature": opts.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if opts.temperature > 0:
        body["seed"] = opts.seed + index
    if opts.ignore_eos:
        body["ignore_eos"] = True
    return body


def chunk_content(chunk: dict) -> str:
    delta = (chunk["choices"][0].get("delta") or {}) if chunk.get("choices") else {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


def take_chunk(result: RequestResult, chunk: dict, elapsed: float, last: float) -> float:
    """Folds one SSE data object into result; returns the time of the latest content chunk."""
    if "error" in chunk:
        error = chunk["error"]
        raise RequestFailed(f"error event: {error.get('message', error) if isinstance(error, dict) else error}")
    if usage := chunk.get("usage"):
        result.output_tokens, result.usage_reported = usage.get("completion_tokens", 0), True
        result.prompt_tokens = usage.get("prompt_tokens", 0)
    if not (text := chunk_content(chunk)):
        return last
    if not result.text:
        result.ttft = elapsed
    else:
        result.itl.append(elapsed - last)
    result.text += text
    return elapsed


async def read_stream(response: httpx.Response, result: RequestResult):
    last, chunks, done = 0.0, 0, False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        before = len(result.text)
        last = take_chunk(result, json.loads(data), time.perf_counter() - result.start, last)
        chunks += len(result.text) > before
    if not done:
        raise RequestFailed("stream ended before [DONE]")
    if not result.usage_reported:
        result.output_tokens = chunks


async def send(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """One streamed request, timed from the moment it is sent; never raises."""
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RequestFailed(f"HTTP {response.status_code}: {error_message(text)}")
            await read_stream(response, result)
            result.latency = time.perf_counter() - result.start
        result.ok = bool(result.text) or result.output_tokens > 0
        result.error = "" if result.ok else "empty response"
    except Exception as e:  # noqa: BLE001 - whatever went wrong is this request's failure, never the run's
        result.error = str(e) if isinstance(e, RequestFailed) else f"{type(e).__name__}: {e}".strip().rstrip(":")
    return result


def error_message(text: str) -> str:
    try:
        error = json.loads(text).get("error", text)
        return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
    except (ValueError, AttributeError):
        return text.strip()[:300]


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Seconds to wait before each request (the first goes at once)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i == 0 or rate == float("inf"):
            yield 0.0
        else:
            yield float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))


def make_client(opts: LoadOptions) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=opts.concurrency or 256)
    return httpx.AsyncClient(timeout=httpx.Timeout(opts.timeout, connect=min(opts.timeout, 30.0)),
                             limits=limits, headers=auth(opts.api_key))


async def run_requests(base_url: str, prompts: list[str], opts: LoadOptions, progress: bool = True,
                       desc: str = "requests", first_index: int = 0) -> tuple[list[RequestResult], float]:
    """Sends every prompt (arrivals and concurrency per opts); returns results in prompt order and the duration."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    limit = asyncio.Semaphore(opts.concurrency) if opts.concurrency else None
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    failed = 0

    async def one(client, i, prompt):
        nonlocal failed
        async with limit or contextlib.nullcontext():
            result = await send(client, url, request_body(prompt, first_index + i, opts))
        failed += not result.ok
        bar.set_postfix(failed=failed, refresh=False)
        bar.update(1)
        return result

    async with make_client(opts) as client:
        start, tasks = time.perf_counter(), []
        for i, (prompt, gap) in enumerate(zip(prompts, arrival_gaps(len(prompts), opts.request_rate,
                                                                     opts.burstiness, opts.seed))):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(client, i, prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def auth(api_key: str) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def fetch_text(base_url: str, path: str, api_key: str = "", timeout: float = 10.0) -> str | None:
    """GET base_url+path; None on any failure (absent route, refused connection)."""
    try:
        response = httpx.get(base_url.rstrip("/") + path, headers=auth(api_key), timeout=timeout)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def served_model(base_url: str, api_key: str = "") -> str:
    """The first model id of /v1/models, or '' (the server then picks its own)."""
    try:
        data = httpx.get(base_url.rstrip("/") + "/v1/models", headers=auth(api_key), timeout=10).json()["data"]
        return data[0]["id"] if data else ""
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError):
        return ""
