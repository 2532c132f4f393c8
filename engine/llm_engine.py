"""The engine loop: requests in, one scheduled forward per step, streamed deltas out."""
import json
import random
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import torch
from transformers import AutoTokenizer

from engine import parallel_launch, parallel_step
from engine.block_manager import BlockManager
from engine.calibration_monitor import CalibrationMonitor, RoundLog
from engine.config import EngineConfig, uses_cuda_graphs
from engine.detokenizer import IncrementalDetokenizer
from engine.drafts.loader import CALIBRATION_FILE, read_calibration
from engine.model_runner import ModelRunner
from engine.outputs import ConfidenceRecord, Emitted, EngineStats, RequestError, RequestOutput, SpecStats
from engine.planner import Planner, check_policy
from engine.sampler import make_generator
from engine.sampling_params import SAMPLING_DEFAULT_FIELDS, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculator import Speculator
from engine.sps_profile import load_sps_curve


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **options):
        known = {f.name for f in fields(EngineConfig)}
        if unknown := set(options) - known:
            raise TypeError(f"unknown engine option(s) {sorted(unknown)}; known: {sorted(known)}")
        self.config = config or EngineConfig(**options)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.ranks = parallel_launch.start(self.config)  # tensor parallel: the other ranks, started or joined
        try:
            self.build()
        except BaseException:
            if self.ranks:
                self.ranks.kill()  # a failed start leaves no rank behind
            raise

    def build(self):
        with self.watch_ranks():
            self.model_runner = ModelRunner(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        generation_config = read_generation_config(Path(self.config.model))
        self.eos_token_ids = self.read_eos_ids(generation_config)
        self.sampling_defaults = {k: generation_config[k] for k in SAMPLING_DEFAULT_FIELDS if k in generation_config}
        model_len = self.model_runner.model.config.get("max_position_embeddings", 4096)
        self.max_model_len = min(self.config.max_model_len or model_len, model_len)
        if uses_cuda_graphs(self.config):
            self.model_runner.capture_graphs(self.max_model_len)
        self.block_manager = BlockManager(self.model_runner.num_blocks, self.config.kv_block_size,
                                          self.config.enable_prefix_caching, self.model_runner.num_block_end_states)
        self.kv_capacity_tokens = self.block_manager.num_blocks * self.block_manager.block_size
        self.vocab_size = self.model_runner.model.config["vocab_size"]
        self.scheduler = Scheduler(self.config, self.block_manager)
        with self.watch_ranks():
            self.speculator = self.make_speculator()
        self.seeds = random.Random(self.config.seed) if self.config.seed >= 0 else random.SystemRandom()
        self.sequences: dict[str, Sequence] = {}

    def make_speculator(self) -> Speculator | None:
        drafter, policy = self.model_runner.drafter, self.config.verify_policy
        check_policy(policy, drafter is not None and drafter.draft.has_confidence)
        if drafter is None:
            return None
        curve = (load_sps_curve(self.model_runner, self.block_manager, self.config.sps_profile)
                 if policy.startswith("sps") else None)
        planner = Planner(policy, self.max_model_len, curve, drafter.num_draft_tokens)
        return Speculator(drafter, self.model_runner, self.block_manager, planner, *self.calibration_watch(drafter))

    def calibration_watch(self, drafter) -> tuple[CalibrationMonitor | None, RoundLog | None]:
        """The calibration monitor, and the round log when asked for, for a draft with a confidence head."""
        c = self.config
        if not drafter.draft.has_confidence:
            if c.log_spec_rounds:
                raise ValueError("log_spec_rounds needs a DSpark draft with a confidence head")
            return None, None
        monitor = CalibrationMonitor(drafter.num_draft_tokens, c.calibration_window, c.calibration_ece_threshold)
        log = RoundLog(c.log_spec_rounds, int(c.log_spec_rounds_max_mb * 2**20)) if c.log_spec_rounds else None
        return monitor, log

    def read_eos_ids(self, generation_config: dict) -> set[int]:
        eos = generation_config.get("eos_token_id")
        listed = eos if isinstance(eos, list) else [] if eos is None else [eos]
        return {self.tokenizer.eos_token_id} - {None} | set(listed)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """The model's own sampling defaults (its generation_config.json), then overrides (as vLLM does)."""
        return SamplingParams(**(self.sampling_defaults | overrides))

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) for t in prompt):
            raise TypeError("a prompt must be a str or a list of int token ids")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; a RequestError (a ValueError naming the offending field) when it cannot be served."""
        params = params or self.default_sampling_params()
        token_ids = self.tokenize(prompt)
        self.check_prompt(token_ids, params)
        seed = params.seed if params.seed is not None else self.seeds.getrandbits(63)
        seq = Sequence(token_ids, params, request_id, make_generator(seed))
        if seq.request_id in self.sequences:
            raise RequestError(f"request id {seq.request_id!r} is already in use", "request_id")
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def check_prompt(self, token_ids: list[int], params: SamplingParams):
        vocab = self.vocab_size
        if not token_ids:
            raise RequestError("the prompt is empty", "prompt")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab}), got {min(token_ids)}..{max(token_ids)}",
                               "prompt")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(token_ids)} tokens but the model's context length is "
                               f"{self.max_model_len}: no room to generate", "prompt")
        need = self.block_manager.blocks_for(min(len(token_ids) + params.max_tokens, self.max_model_len))
        if need > self.block_manager.num_blocks:
            raise RequestError(f"the request needs {need} KV blocks but the cache has only "
                               f"{self.block_manager.num_blocks} (raise kv_cache_gb or lower max_tokens)", "max_tokens")

    def abort(self, request_id: str) -> bool:
        self.sequences.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One step; with tensor parallelism a rank that dies or stops answering raises RankFailure naming it."""
        with self.watch_ranks():
            if self.speculator:
                self.speculator.draft_and_plan(self.scheduler.running)
            seqs = self.scheduler.schedule()
            if not seqs:
                return []
            runner = self.speculator or self.model_runner  # either runs the step and commits what it computed
            emitted = runner.run(seqs)
            return [self.append_tokens(seq, emitted[seq.seq_id]) for seq in seqs if seq.seq_id in emitted]

    def watch_ranks(self):
        return self.ranks.watch() if self.ranks else nullcontext()

    @property
    def parallel(self) -> bool:
        """Tensor parallel: other ranks run this engine's forwards (keep_alive checks them while idle)."""
        return self.ranks is not None

    def keep_alive(self):
        """While idle (the server, about once a second): every rank answers within the timeout, or RankFailure."""
        with self.watch_ranks():
            parallel_step.keep_alive()

    def close(self):
        """Stop the other tensor-parallel ranks (they also stop when this process exits)."""
        if self.ranks:
            self.ranks.close()

    def append_tokens(self, seq: Sequence, emitted: Emitted) -> RequestOutput:
        """Commit newly sampled tokens one by one, stopping exactly where a stop condition hits."""
        self.block_manager.cache_blocks(seq)
        text, added = "", []
        for token in emitted.tokens:
            seq.token_ids.append(token)
            added.append(token)
            text += seq.detokenizer.add_tokens([token])
            if reason := self.finish_reason(seq, token):
                text += "" if seq.detokenizer.finished_by_stop else seq.detokenizer.flush()
                self.finish(seq, reason)
                break
        stats = seq.spec_stats
        logprobs = None if emitted.logprobs is None else emitted.logprobs[:len(added)]
        return RequestOutput(seq.request_id, text, added, seq.is_finished, seq.finish_reason, seq.num_prompt_tokens,
                             seq.num_completion_tokens, seq.num_cached_tokens, stats.num_verified_tokens,
                             stats.num_accepted_tokens, logprobs)

    def finish(self, seq: Sequence, reason: str):
        if self.speculator:
            self.speculator.finish(seq)
        self.scheduler.finish(seq, reason)
        self.sequences.pop(seq.request_id, None)

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.detokenizer.finished_by_stop or token in p.stop_token_ids:
            return "stop"
        if token in self.eos_token_ids and not p.ignore_eos:
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    @property
    def speculative(self) -> bool:
        return self.speculator is not None

    @property
    def spec_stats(self) -> SpecStats:
        """Speculative decoding counters since start (all zero without a draft)."""
        return self.speculator.stats if self.speculator else SpecStats()

    def reset_spec_stats(self):
        """Start the speculative decoding counters from zero (offline measurements; metrics expect them cumulative)."""
        if self.speculator:
            self.speculator.stats = SpecStats()

    def record_confidences(self, enabled: bool = True) -> list[ConfidenceRecord] | None:
        """Start (with a fresh list) or stop recording one ConfidenceRecord per verify round; returns the list."""
        return self.speculator.record_confidences(enabled) if self.speculator else None

    def reload_calibration(self) -> int:
        """Read the draft's sts.json again (a refit wrote it) and use it from the next step; returns the calibration's
        version (1 at start, one more per reload)."""
        if self.speculator is None or self.speculator.monitor is None:
            raise ValueError("no calibration to reload: the engine has no DSpark draft with a confidence head")
        block = self.speculator.drafter.draft.config.block_size
        path = Path(self.config.calibration_file or Path(self.config.draft) / CALIBRATION_FILE)
        scaling = read_calibration(Path(self.config.draft), block, self.config.calibration_file)
        if scaling is None:
            raise ValueError(f"{path} is missing: write it with `python -m train calibrate`")
        return self.speculator.set_calibration(*scaling)

    def stats(self) -> EngineStats:
        """A snapshot of the engine's gauges and cumulative counters, for metrics."""
        s, b = self.scheduler, self.block_manager
        out = EngineStats(len(s.running), len(s.waiting), b.num_blocks, b.num_free_blocks, s.num_preemptions,
                          b.num_queried_tokens, b.num_hit_tokens)
        if self.speculator:
            p = self.speculator.planner
            out.spec, out.planner_budget = self.speculator.stats.copy(), p.last_budget
            out.planner_theta, out.planner_skipped_steps = p.last_theta, p.num_skipped_steps
            out.calibration = self.speculator.monitor.snapshot() if self.speculator.monitor else None
        return out

    def describe(self) -> dict:
        """What runs where, for a start-up log line."""
        runner, c = self.model_runner, self.config
        return {"device": c.device, "kernels": c.kernels, "attention": runner.attention,
                "cuda_graphs": runner.graphs is not None, "speculation": c.spec_method,
                "verify_policy": c.verify_policy if self.speculator else "", "kv_blocks": self.block_manager.num_blocks,
                "sampling_defaults": self.sampling_defaults}


def read_generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
