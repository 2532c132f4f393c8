"""Measure the engine's own step cost as a function of the verify tokens B (and the draft's cost as a function of the
number of requests): the points of the SPS(B) curve. Used at start-up in a quick mode and by `python -m profiler`."""
import statistics
import time

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.sps import SpsCurve

QUICK_TOKENS = (1, 2, 4, 8, 16, 32, 64)
QUICK_REQUESTS = (1, 4, 16)
ROWS_PER_REQUEST = 8  # a verify row of anchor + 7 drafts


def fake_requests(engine, count: int, context_len: int) -> list[Sequence]:
    """Requests whose first context_len tokens are in the KV cache (prefilled, untimed)."""
    seqs = [Sequence([3 + (i + k) % 50 for k in range(context_len + ROWS_PER_REQUEST)], SamplingParams(max_tokens=1))
            for i in range(count)]
    for seq in seqs:
        engine.block_manager.allocate(seq, len(seq))
        seq.num_scheduled_tokens = context_len
        engine.model_runner.forward([seq], [0])
        seq.num_computed_tokens, seq.num_scheduled_tokens = context_len, 0
    return seqs


def clock(engine) -> float:
    """Wall time once the device has finished what was queued (GPU work is asynchronous)."""
    if engine.model_runner.device.type == "cuda":
        torch.cuda.synchronize(engine.model_runner.device)
    return time.perf_counter()


def forward_seconds(engine, seqs: list[Sequence], sizes: list[int]) -> float:
    """One target forward carrying sizes[i] tokens for seqs[i]."""
    for seq, n in zip(seqs, sizes):
        seq.num_scheduled_tokens = n
    start = clock(engine)
    engine.model_runner.forward(seqs, sizes, engine.model_runner.capture_layers)
    seconds = clock(engine) - start
    for seq in seqs:
        seq.num_scheduled_tokens = 0
    return seconds


def draft_seconds(engine, seqs: list[Sequence]) -> float:
    """One draft step (a block proposed for each of seqs)."""
    start = clock(engine)
    engine.model_runner.speculator.propose(seqs)
    seconds = clock(engine) - start
    for seq in seqs:
        seq.clear_draft()
    return seconds


def time_forward(engine, seqs: list[Sequence], sizes: list[int], repeats: int) -> float:
    return statistics.median([forward_seconds(engine, seqs, sizes) for _ in range(repeats + 1)][1:])


def time_draft(engine, seqs: list[Sequence], repeats: int) -> float:
    return statistics.median([draft_seconds(engine, seqs) for _ in range(repeats + 1)][1:])


def split(tokens: int, rows: int) -> list[int]:
    """tokens spread over rows as evenly as possible."""
    return [tokens // rows + (i < tokens % rows) for i in range(rows)]


def token_grid(engine, token_counts) -> list[int]:
    """The token counts to time: the given ones, plus the CUDA-graph tiers up to the largest."""
    graphs = engine.model_runner.graphs
    tiers = [] if graphs is None else [t for t in graphs.tiers if t <= max(token_counts)]
    return sorted(set(token_counts) | set(tiers))


def measure_curve(engine, token_counts=QUICK_TOKENS, request_counts=QUICK_REQUESTS, context_len: int = 256,
                  repeats: int = 3, progress=None) -> SpsCurve:
    """Step cost of a target forward carrying B tokens (as verify rows of up to 8 tokens per request, each with
    context_len cached tokens) and draft cost for R requests, medians of repeats with every point timed once per
    round: timed one point after another, a slow spell of the machine bent the curve's shape (a quick profile once
    had 2 tokens cost what 1 did). The KV used is freed afterwards. With CUDA graphs the
    rows are at most the graphs' verify row, the grid also gets every graph tier up to its largest B, and up to the
    largest graph the curve is the step function the graphs give."""
    graphs = engine.model_runner.graphs
    token_counts = token_grid(engine, token_counts)
    rows = ROWS_PER_REQUEST if graphs is None else min(ROWS_PER_REQUEST, graphs.max_q_len)
    most = max(-(-max(token_counts) // rows), max(request_counts))
    bm = engine.block_manager
    fits = bm.num_free_blocks // most * bm.block_size - rows
    if fits < 1:
        raise ValueError(f"the KV cache is too small to profile {most} requests; raise kv_cache_gb")
    seqs = fake_requests(engine, most, min(context_len, fits))
    timings = [(("step", b), lambda n=-(-b // rows), b=b: forward_seconds(engine, seqs[:n], split(b, n)))
               for b in token_counts]
    if engine.model_runner.speculator:
        timings += [(("draft", r), lambda r=r: draft_seconds(engine, seqs[:r])) for r in request_counts]
    try:
        times = {point: [] for point, _ in timings}
        for round_index in range(repeats + 1):  # the points take turns, so drift reaches all of them alike
            for point, measure in timings:
                seconds = measure()
                if round_index:  # the first round warms up
                    times[point].append(seconds)
                progress and progress.update(1 / (repeats + 1))
        cost = {point: statistics.median(t) for point, t in times.items()}
        step = {n: c for (kind, n), c in cost.items() if kind == "step"}
        draft = {n: c for (kind, n), c in cost.items() if kind == "draft"}
        graph_tokens = 0 if graphs is None else max(t for t in token_counts if t <= graphs.tiers[-1])
        return SpsCurve(step, draft, graph_tokens)
    finally:
        for seq in seqs:
            engine.block_manager.free(seq)
