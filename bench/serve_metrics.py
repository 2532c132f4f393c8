"""Load-test metrics from recorded streams, with `vllm bench serve`'s definitions (pure functions, no I/O).

Per request (successful ones only):
    TTFT  = time of the first chunk that carries content, from the moment the request was sent
    ITL   = gaps between consecutive content chunks (a chunk carrying k speculated tokens is one gap, as in vLLM)
    TPOT  = (E2E - TTFT) / (output tokens - 1), for requests with more than one output token
    E2E   = time of the end of the stream ([DONE]) from the moment the request was sent
    per-user tokens/s = (output tokens - 1) / (E2E - TTFT) = 1 / TPOT: the decode speed a user sees once the answer
          has started (as bench/sweep.py measures it offline). vLLM's pareto plot instead divides the aggregate
          output throughput by the concurrency; that is reported too, as output_tok_s_per_concurrency.
Output tokens come from the usage chunk; a server that sends none gets its content chunks counted instead
(an undercount under speculative decoding, flagged by usage_reported=False).

Run totals: duration = first send to last finish (warm-up excluded); request / output / total token throughput =
count / duration; mean concurrency = sum of E2E / duration (SGLang's "Concurrency"). Percentiles are numpy's
linear interpolation, as vLLM's.

Server side, from two /metrics scrapes (Prometheus text): requests and tokens counted by the server, and the
speculative-decoding counters: acceptance length tau = 1 + accepted / drafts, per-position acceptance
accepted_per_pos[i] / drafts (vLLM's), per-position verify share verified_per_pos[i] / drafts, and the mean verify
budget per request and round = verified / drafts. A metric the server does not export is reported as None.
"""
from dataclasses import asdict, dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

PERCENTILES = (("mean", None), ("median", 50), ("p90", 90), ("p99", 99))


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0                   # perf_counter when the request was sent
    ttft: float = 0.0                    # seconds after start
    latency: float = 0.0                 # E2E seconds after start
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage_reported: bool = False
    text: str = ""

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "text"}


def distribution(values: list[float], scale: float = 1.0) -> dict:
    """mean, median, p90, p99 of values × scale (None each when there are none)."""
    if not values:
        return {name: None for name, _ in PERCENTILES}
    arr = np.asarray(values, dtype=float) * scale
    return {name: float(arr.mean() if q is None else np.percentile(arr, q)) for name, q in PERCENTILES}


def tpot(r: RequestResult) -> float | None:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def per_user_speed(r: RequestResult) -> float | None:
    return (r.output_tokens - 1) / (r.latency - r.ttft) if r.output_tokens > 1 and r.latency > r.ttft else None


def error_counts(results: list[RequestResult]) -> dict[str, int]:
    counts = {}
    for r in results:
        if not r.ok:
            counts[r.error] = counts.get(r.error, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def summarize(results: list[RequestResult], duration: float, concurrency: int | None = None) -> dict:
    """The client-side numbers of one run (see the module docstring)."""
    good = [r for r in results if r.ok]
    out_tokens, in_tokens = sum(r.output_tokens for r in good), sum(r.prompt_tokens for r in good)
    speeds = [s for r in good if (s := per_user_speed(r)) is not None]
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    summary = {
        "successful_requests": len(good), "failed_requests": len(results) - len(good), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "usage_reported": all(r.usage_reported for r in good),
        "request_throughput": per_second(len(good)), "output_throughput": per_second(out_tokens),
        "total_token_throughput": per_second(in_tokens + out_tokens),
        "mean_concurrency": per_second(sum(r.latency for r in good)),
        "per_user_tok_s": distribution(speeds),
        "output_tok_s_per_concurrency": per_second(out_tokens) / concurrency if concurrency else None,
        "ttft_ms": distribution([r.ttft for r in good], 1e3),
        "tpot_ms": distribution([t for r in good if (t := tpot(r)) is not None], 1e3),
        "itl_ms": distribution([gap for r in good for gap in r.itl], 1e3),
        "e2e_ms": distribution([r.latency for r in good], 1e3),
    }
    return summary | {"errors": error_counts(results)}


def parse_metrics(text: str) -> dict[str, dict[tuple, float]]:
    """Prometheus text -> {sample name: {labels without model_name (sorted tuple): value}}; every counter family
    is present, with no samples until first incremented."""
    samples = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":  # a labelled counter exports no sample before its first increment
            samples.setdefault(family.name + "_total", {})
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples.setdefault(s.name, {})[labels] = samples.get(s.name, {}).get(labels, 0.0) + s.value
    return samples


def counter_delta(before: dict, after: dict, name: str) -> float | None:
    if name not in after:
        return None
    return sum(after[name].values()) - sum(before.get(name, {}).values())


def positions(samples: dict, name: str) -> int:
    return 1 + max((int(dict(labels)["position"]) for labels in samples.get(name, {})), default=-1)


def per_position_delta(before: dict, after: dict, name: str, length: int) -> list[float] | None:
    if name not in after:
        return None
    value = (lambda m, p: m.get(name, {}).get((("position", str(p)),), 0.0))
    return [value(after, p) - value(before, p) for p in range(length)]


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def server_diff(before: dict | None, after: dict | None) -> dict | None:
    """What the server counted between two parse_metrics() scrapes; None when it exports no metrics."""
    if before is None or after is None:
        return None
    delta = lambda name: counter_delta(before, after, name)
    drafts, accepted = delta("vllm:spec_decode_num_drafts_total"), delta("vllm:spec_decode_num_accepted_tokens_total")
    verified = delta("dspark:spec_decode_num_verified_tokens_total")
    names = ("vllm:spec_decode_num_accepted_tokens_per_pos_total", "dspark:spec_decode_num_verified_tokens_per_pos_total")
    length = max(positions(after, name) for name in names)
    acc_pos, ver_pos = (per_position_delta(before, after, name, length) for name in names)
    return {
        "requests": delta("vllm:request_success_total"), "prompt_tokens": delta("vllm:prompt_tokens_total"),
        "generation_tokens": delta("vllm:generation_tokens_total"), "num_drafts": drafts,
        "num_draft_tokens": delta("vllm:spec_decode_num_draft_tokens_total"), "num_accepted_tokens": accepted,
        "num_verified_tokens": verified,
        "acceptance_length": 1 + accepted / drafts if accepted is not None and drafts else None,
        "per_position_acceptance": [a / drafts for a in acc_pos] if acc_pos is not None and drafts else None,
        "per_position_verified": [v / drafts for v in ver_pos] if ver_pos is not None and drafts else None,
        "mean_verify_budget": ratio(verified, drafts),
    }
