"""The engine loop: requests in, one scheduled forward per step, streamed deltas out."""
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import AutoTokenizer

from engine.block_manager import BlockManager
from engine.config import EngineConfig, uses_cuda_graphs
from engine.detokenizer import IncrementalDetokenizer
from engine.model_runner import ModelRunner
from engine.planner import Planner
from engine.sps_profile import load_sps_curve
from engine.sampler import make_generator
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.spec_stats import ConfidenceRecord, SpecStats


@dataclass
class RequestOutput:
    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **options):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown engine option(s) {sorted(unknown)}; known: {sorted(known - {'hf_config'})}")
        self.config = config or EngineConfig(**options)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.model_runner = ModelRunner(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self.eos_token_ids = self.read_eos_ids(Path(self.config.model))
        model_len = self.model_runner.model.config.get("max_position_embeddings", 4096)
        self.max_model_len = min(self.config.max_model_len or model_len, model_len)
        if uses_cuda_graphs(self.config):
            self.model_runner.capture_graphs(self.max_model_len)
        self.block_manager = BlockManager(self.model_runner.num_blocks, self.config.kv_block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.planner = self.make_planner()
        self.spec_stats = SpecStats()
        self.confidence_records: list[ConfidenceRecord] | None = None  # a list while record_confidences is on
        self.sequences: dict[str, Sequence] = {}

    def make_planner(self) -> Planner:
        spec = self.model_runner.speculator
        planner = Planner(self.config.verify_policy, self.max_model_len, draft_len=spec.num_draft_tokens if spec else 0)
        if planner.needs_confidence and (spec is None or not spec.draft.has_confidence):
            raise ValueError(f"verify_policy={self.config.verify_policy!r} needs a DSpark draft with a confidence "
                             "head (spec_method='dspark')")
        if planner.kind.startswith("sps"):
            planner.sps = load_sps_curve(self, self.config.sps_profile)
        return planner

    def read_eos_ids(self, model_dir: Path) -> set[int]:
        ids = {self.tokenizer.eos_token_id} - {None}
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) for t in prompt):
            raise TypeError("a prompt must be a str or a list of int token ids")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        token_ids = self.tokenize(prompt)
        self.check_prompt(token_ids, params)
        seq = Sequence(token_ids, params, request_id, make_generator(params.seed))
        if seq.request_id in self.sequences:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def check_prompt(self, token_ids: list[int], params: SamplingParams):
        vocab = self.model_runner.model.config["vocab_size"]
        if not token_ids:
            raise ValueError("the prompt is empty")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(token_ids)}..{max(token_ids)}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens but the model's context length is "
                             f"{self.max_model_len}: no room to generate")
        need = self.block_manager.blocks_for(min(len(token_ids) + params.max_tokens, self.max_model_len))
        if need > self.block_manager.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks but the cache has only "
                             f"{self.block_manager.num_blocks} (raise kv_cache_gb or lower max_tokens)")

    def abort(self, request_id: str) -> bool:
        self.sequences.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        if self.model_runner.speculator:
            self.draft_and_plan()
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        results = self.model_runner.run(seqs)
        outputs = []
        for seq in seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if seq.seq_id not in results:
                continue
            tokens, accepted = results[seq.seq_id]
            self.block_manager.rollback(seq, len(seq.spec_token_ids) - accepted)
            self.block_manager.cache_blocks(seq)
            if seq.proposal is not None:
                self.record_round(seq, accepted)
            seq.clear_draft()
            outputs.append(self.append_tokens(seq, tokens))
        return outputs

    def draft_and_plan(self):
        """Draft a block for every decoding request that lacks one and could still use drafts, then choose what each
        verifies this step."""
        decoding = [s for s in self.scheduler.running if s.is_decoding and self.planner.room(s) > 0]
        if not decoding:
            return
        drafting = self.planner.drafters(decoding) if self.planner.drafts_at_all else []
        for seq in set(decoding) - set(drafting):  # plain this step; an unverified old block is dropped (lossless)
            seq.clear_draft()
        if not drafting:
            return
        self.model_runner.propose([s for s in drafting if s.proposal is None], self.planner.positions_to_draft(drafting))
        for seq, n in zip(drafting, self.planner.plan(drafting)):
            seq.spec_token_ids = seq.proposal.tokens[:n]

    def record_round(self, seq: Sequence, accepted: int):
        args = (len(seq.proposal.tokens), len(seq.spec_token_ids), accepted)
        seq.spec_stats.record(*args)
        self.spec_stats.record(*args)
        if self.confidence_records is not None and seq.proposal.confidence_logits is not None:
            self.confidence_records.append(ConfidenceRecord(seq.proposal.confidence_logits.tolist(), *args))

    def record_confidences(self, enabled: bool = True) -> list[ConfidenceRecord] | None:
        """Start (with a fresh list) or stop recording one ConfidenceRecord per verify round; returns the list."""
        self.confidence_records = [] if enabled else None
        return self.confidence_records

    def append_tokens(self, seq: Sequence, tokens: list[int]) -> RequestOutput:
        """Commit newly sampled tokens one by one, stopping exactly where a stop condition hits."""
        text, added = "", []
        for token in tokens:
            seq.token_ids.append(token)
            added.append(token)
            text += seq.detokenizer.add_tokens([token])
            reason = self.finish_reason(seq, token)
            if reason:
                text += "" if seq.detokenizer.finished_by_stop else seq.detokenizer.flush()
                self.complete_draft_context(seq)
                self.scheduler.finish(seq, reason)
                self.sequences.pop(seq.request_id, None)
                break
        return RequestOutput(seq.request_id, text, added, seq.is_finished, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_completion_tokens, seq.num_cached_tokens)

    def complete_draft_context(self, seq: Sequence):
        """Write a finishing request's queued draft context, so its blocks enter the prefix cache whole."""
        if self.block_manager.enable_prefix_caching and seq.pending_context:
            self.model_runner.speculator.write_context([seq])

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.detokenizer.finished_by_stop or token in p.stop_token_ids:
            return "stop"
        if token in self.eos_token_ids and not p.ignore_eos:
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None
