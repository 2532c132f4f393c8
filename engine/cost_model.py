"""Measure the engine's own step cost as a function of the verify tokens B (and the draft's cost as a function of the
number of requests): the points of the SPS(B) curve. Used at start-up in a quick mode and by `python -m profiler`."""
import statistics
import time

import torch

from engine.block_manager import BlockManager
from engine.graphs import split
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.sps import SpsCurve

QUICK_TOKENS = (1, 2, 4, 8, 16, 32, 64)
QUICK_REQUESTS = (1, 4, 16)
ROWS_PER_REQUEST = 8  # a verify row of anchor + 7 drafts


def fake_requests(runner: ModelRunner, blocks: BlockManager, count: int, context_len: int) -> list[Sequence]:
    """Requests whose first context_len tokens are in the KV cache (prefilled, untimed)."""
    vocab = runner.model.config["vocab_size"]
    seqs = [Sequence([(3 + (i + k) % 50) % vocab for k in range(context_len + ROWS_PER_REQUEST)],
                     SamplingParams(max_tokens=1)) for i in range(count)]
    for seq in seqs:
        blocks.allocate(seq, len(seq))
        seq.num_scheduled_tokens = context_len
        runner.forward([seq], [0])
        seq.num_computed_tokens, seq.num_scheduled_tokens = context_len, 0
    return seqs


def clock(runner: ModelRunner) -> float:
    """Wall time once the device has finished what was queued (GPU work is asynchronous)."""
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter()


def forward_seconds(runner: ModelRunner, seqs: list[Sequence], sizes: list[int]) -> float:
    """One target forward carrying sizes[i] tokens for seqs[i]."""
    for seq, n in zip(seqs, sizes):
        seq.num_scheduled_tokens = n
    start = clock(runner)
    runner.forward(seqs, sizes, runner.capture_layers)
    seconds = clock(runner) - start
    for seq in seqs:
        seq.num_scheduled_tokens = 0
    return seconds


def draft_seconds(runner: ModelRunner, seqs: list[Sequence]) -> float:
    """One draft step (a block proposed for each of seqs)."""
    start = clock(runner)
    runner.drafter.propose(seqs)
    seconds = clock(runner) - start
    for seq in seqs:
        seq.clear_draft()
    return seconds


def time_forward(runner: ModelRunner, seqs: list[Sequence], sizes: list[int], repeats: int) -> float:
    return statistics.median([forward_seconds(runner, seqs, sizes) for _ in range(repeats + 1)][1:])


def time_draft(runner: ModelRunner, seqs: list[Sequence], repeats: int) -> float:
    return statistics.median([draft_seconds(runner, seqs) for _ in range(repeats + 1)][1:])


def token_grid(runner: ModelRunner, token_counts) -> list[int]:
    """The token counts to time: the given ones, plus the CUDA-graph tiers up to the largest."""
    tiers = [] if runner.graphs is None else [t for t in runner.graphs.tiers if t <= max(token_counts)]
    return sorted(set(token_counts) | set(tiers))


def measure_curve(runner: ModelRunner, blocks: BlockManager, token_counts=QUICK_TOKENS, request_counts=QUICK_REQUESTS,
                  context_len: int = 256, repeats: int = 3, progress=None) -> SpsCurve:
    """Step cost of a target forward carrying B tokens (as verify rows of up to 8 tokens per request, each with
    context_len cached tokens) and draft cost for R requests: medians of repeats, the points taking turns round by
    round so that a slow spell of the machine reaches all of them alike. The KV used is freed afterwards. With CUDA
    graphs the rows are at most the graphs' verify row, the grid also gets every graph tier up to its largest B, and
    up to the largest graph the curve is the step function the graphs give."""
    graphs = runner.graphs
    token_counts = token_grid(runner, token_counts)
    rows = min(ROWS_PER_REQUEST, runner.max_rollback) if runner.drafter else ROWS_PER_REQUEST
    rows = rows if graphs is None else min(rows, graphs.max_q_len)
    if runner.model.own_attention:  # DeepSeek-V4: rings for max_num_seqs requests, no more at once
        seats = runner.config.max_num_seqs
        token_counts = [b for b in token_counts if b <= seats * rows]
        request_counts = [r for r in request_counts if r <= seats]
    most = max(-(-max(token_counts) // rows), max(request_counts))
    fits = blocks.num_free_blocks // most * blocks.block_size - rows
    if fits < 1:
        raise ValueError(f"the KV cache is too small to profile {most} requests; raise kv_cache_gb")
    seqs = fake_requests(runner, blocks, most, min(context_len, fits))
    timings = [(("step", b), lambda n=-(-b // rows), b=b: forward_seconds(runner, seqs[:n], split(b, n)))
               for b in token_counts]
    if runner.drafter:
        timings += [(("draft", r), lambda r=r: draft_seconds(runner, seqs[:r])) for r in request_counts]
    try:
        cost = median_costs(timings, repeats, progress)
        step = {n: c for (kind, n), c in cost.items() if kind == "step"}
        draft = {n: c for (kind, n), c in cost.items() if kind == "draft"}
        graph_tokens = 0 if graphs is None else max(t for t in token_counts if t <= graphs.tiers[-1])
        return SpsCurve(step, draft, graph_tokens)
    finally:
        for seq in seqs:
            blocks.free(seq)


def median_costs(timings: list, repeats: int, progress=None) -> dict:
    """Each (point, measure) timed once per round for repeats rounds after one warm-up round; medians by point."""
    times = {point: [] for point, _ in timings}
    for round_index in range(repeats + 1):
        for point, measure in timings:
            seconds = measure()
            if round_index:
                times[point].append(seconds)
            progress and progress.update(1 / (repeats + 1))
    return {point: statistics.median(t) for point, t in times.items()}
