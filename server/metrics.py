"""Prometheus metrics under vLLM's names (so existing benchmark clients read us) plus DSpark's own (dspark:*)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from engine.calibration_monitor import CalibrationSnapshot
from engine.outputs import EngineStats, SpecStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
VERIFY_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
K_BUCKETS = (0, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)

disable_created_metrics()  # as vLLM: no *_created samples next to every counter


class Metrics:
    """One registry per server. Updated only by the engine loop thread; read by /metrics."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        name = ["model_name"]

        def one(metric):
            return metric.labels(model_name)
        self.running = one(Gauge("vllm:num_requests_running", "Requests in the running batch.", name, registry=r))
        self.waiting = one(Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", name, registry=r))
        self.kv_usage = one(Gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", name, registry=r))
        self.prompt_tokens = one(Counter("vllm:prompt_tokens", "Prefill tokens processed.", name, registry=r))
        self.generation_tokens = one(Counter("vllm:generation_tokens", "Tokens generated.", name, registry=r))
        self.preemptions = one(Counter("vllm:num_preemptions", "Preemptions (KV ran out).", name, registry=r))
        self.prefix_queries = one(Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                          name, registry=r))
        self.prefix_hits = one(Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", name,
                                       registry=r))
        self.success = Counter("vllm:request_success", "Finished requests.", name + ["finished_reason"], registry=r)
        self.ttft = one(Histogram("vllm:time_to_first_token_seconds", "Time to first token.", name,
                                  buckets=TTFT_BUCKETS, registry=r))
        self.itl = one(Histogram("vllm:inter_token_latency_seconds", "Gap between consecutive outputs of a request.",
                                 name, buckets=ITL_BUCKETS, registry=r))
        self.e2e = one(Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", name,
                                 buckets=LATENCY_BUCKETS, registry=r))
        self.drafts = one(Counter("vllm:spec_decode_num_drafts", "Speculative rounds.", name, registry=r))
        self.draft_tokens = one(Counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens.", name, registry=r))
        self.accepted = one(Counter("vllm:spec_decode_num_accepted_tokens", "Accepted draft tokens.", name,
                                    registry=r))
        self.accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                        "Rounds that accepted the draft token at this position.",
                                        name + ["position"], registry=r)
        self.verified = one(Counter("dspark:spec_decode_num_verified_tokens",
                                    "Draft tokens sent to the target for verification.", name, registry=r))
        self.verified_per_pos = Counter("dspark:spec_decode_num_verified_tokens_per_pos",
                                        "Rounds that verified the draft token at this position.",
                                        name + ["position"], registry=r)
        self.verify_budget = one(Histogram("dspark:request_verified_tokens",
                                           "Draft tokens verified per request (its verify budget spent).", name,
                                           buckets=VERIFY_BUCKETS, registry=r))
        self.planner_k = one(Histogram("dspark:planner_verify_length",
                                       "Mean verify length K the planner chose per round, one sample per step.",
                                       name, buckets=K_BUCKETS, registry=r))
        self.planner_budget = one(Gauge("dspark:planner_step_budget",
                                        "Draft tokens the planner let the target verify in the last step (K).",
                                        name, registry=r))
        self.planner_theta = one(Gauge("dspark:planner_expected_tokens_per_second",
                                       "The sps planners' predicted throughput for the last step.", name,
                                       registry=r))
        self.skipped_steps = one(Counter("dspark:planner_skipped_draft_steps",
                                         "Steps run without drafting because the sps planner judged (from lagged "
                                         "survivals) that speculation would not pay.", name, registry=r))
        self.calibration = CalibrationGauges(r, model_name)
        self.gpu, self.gpu_gauges = None, ()  # an engine on CUDA adds its GPU's gauges (attach_gpu)
        self.seen = SpecStats()
        self.seen_preemptions = 0
        self.seen_prefix = (0, 0)
        self.seen_skipped_steps = 0

    def attach_gpu(self, gpu_stats):
        """GPU gauges exist only when there is a GPU to read (server/gpu_stats.py)."""
        r, name = self.registry, ["model_name"]
        self.gpu = gpu_stats
        self.gpu_gauges = tuple(Gauge(n, doc, name, registry=r).labels(self.model_name) for n, doc in (
            ("dspark:gpu_utilization_ratio", "GPU busy fraction over NVML's last sample period."),
            ("dspark:gpu_memory_used_bytes", "GPU memory in use (NVML)."),
            ("dspark:gpu_memory_total_bytes", "GPU memory in all (NVML).")))

    def finished(self, reason: str):
        self.success.labels(self.model_name, reason).inc()

    def sync(self, stats: EngineStats):
        """Gauges from the engine's snapshot, counter increments from its cumulative counts."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.preemptions.inc(stats.num_preemptions - self.seen_preemptions)
        self.seen_preemptions = stats.num_preemptions
        self.prefix_queries.inc(stats.prefix_queried_tokens - self.seen_prefix[0])
        self.prefix_hits.inc(stats.prefix_hit_tokens - self.seen_prefix[1])
        self.seen_prefix = (stats.prefix_queried_tokens, stats.prefix_hit_tokens)
        reading = self.gpu.read() if self.gpu else None
        if reading:
            for gauge, value in zip(self.gpu_gauges, reading, strict=True):
                gauge.set(value)
        if stats.spec is not None:
            self.planner_budget.set(stats.planner_budget)
            self.planner_theta.set(stats.planner_theta)
            self.skipped_steps.inc(stats.planner_skipped_steps - self.seen_skipped_steps)
            self.seen_skipped_steps = stats.planner_skipped_steps
            self.sync_spec(stats.spec)
        if stats.calibration is not None:
            self.calibration.set(stats.calibration)

    def sync_spec(self, now: SpecStats):
        seen = self.seen
        if now.num_drafts == seen.num_drafts:
            return
        rounds = now.num_drafts - seen.num_drafts
        self.planner_k.observe((now.num_verified_tokens - seen.num_verified_tokens) / rounds)
        self.drafts.inc(now.num_drafts - seen.num_drafts)
        self.draft_tokens.inc(now.num_draft_tokens - seen.num_draft_tokens)
        self.accepted.inc(now.num_accepted_tokens - seen.num_accepted_tokens)
        self.verified.inc(now.num_verified_tokens - seen.num_verified_tokens)
        for counter, counts, before in ((self.accepted_per_pos, now.accepted_per_pos, seen.accepted_per_pos),
                                        (self.verified_per_pos, now.verified_per_pos, seen.verified_per_pos)):
            for pos, n in enumerate(counts):
                counter.labels(self.model_name, str(pos)).inc(n - (before[pos] if pos < len(before) else 0))
        self.seen = now.copy()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CalibrationGauges:
    """The confidence head's calibration over the monitor's window (engine/calibration_monitor.py)."""

    def __init__(self, r: CollectorRegistry, model_name: str):
        name, pos = ["model_name"], ["model_name", "position"]
        self.model_name = model_name
        self.ece = Gauge("dspark:calibration_ece", "ECE of the predicted survival at this draft position, over the "
                         "window.", pos, registry=r)
        self.predicted = Gauge("dspark:survival_predicted", "Mean survival the planner predicted at this position.",
                               pos, registry=r)
        self.realised = Gauge("dspark:survival_realised", "Fraction of rounds that accepted this position.", pos,
                              registry=r)
        scalars = (("pooled", "dspark:calibration_ece_pooled", "ECE over every verified position of the window."),
                   ("worst", "dspark:calibration_ece_worst", "The largest per-position ECE (positions verified at "
                    "least 500 times in the window)."),
                   ("drift", "dspark:calibration_drift", "1 when, at the last full window, a position's ECE was above "
                    "the threshold."),
                   ("version", "dspark:calibration_version", "Calibration loads: 1 at start, one more per reload."),
                   ("rounds", "dspark:calibration_window_rounds", "Verified rounds in the window."),
                   ("tokens_predicted", "dspark:tokens_per_round_predicted",
                    "Tokens a round was predicted to produce (1 + predicted survivals), mean over the window."),
                   ("tokens_realised", "dspark:tokens_per_round_realised",
                    "Tokens a round produced (1 + accepted), mean over the window."))
        self.scalars = {key: Gauge(metric, doc, name, registry=r).labels(model_name) for key, metric, doc in scalars}

    def set(self, s: CalibrationSnapshot):
        for gauge, values in ((self.ece, s.ece), (self.predicted, s.predicted), (self.realised, s.realised)):
            for position, value in enumerate(values, 1):
                gauge.labels(self.model_name, str(position)).set(value)
        values = {"pooled": s.pooled_ece, "worst": s.worst_ece, "drift": float(s.drifting), "version": s.version,
                  "rounds": s.rounds, "tokens_predicted": s.tokens_predicted, "tokens_realised": s.tokens_realised}
        for key, value in values.items():
            self.scalars[key].set(value)
