"""The draft model on the device: a DSpark / DFlash draft, its context K/V (in the target's slots), its CUDA graphs,
and the draft step that proposes a block per request. engine/speculator.py decides what to do with the blocks."""
import torch

from engine.attention_inputs import key_slots, window_slots
from engine.block_manager import slots
from engine.config import EngineConfig
from engine.context import TIMINGS, device_tensor
from engine.drafts.loader import load_any_draft
from engine.models.decoder import DecoderModel
from engine.models.layers import pack_linears_for_cpu
from engine.sampler import SamplingTensors
from engine.sequence import Sequence


class Drafter:
    def __init__(self, config: EngineConfig, target: DecoderModel, dtype: torch.dtype, kv_block_size: int):
        self.device = torch.device(config.device)
        self.draft = load_any_draft(config, target, dtype).to(self.device)
        if self.device.type == "cpu":
            pack_linears_for_cpu(self.draft)
        gamma = self.draft.config.block_size
        if config.num_draft_tokens > gamma:
            raise ValueError(f"num_draft_tokens={config.num_draft_tokens} exceeds the draft's block_size {gamma}")
        self.num_draft_tokens = config.num_draft_tokens or gamma
        self.capture_layers = tuple(self.draft.config.target_layer_ids)
        self.kv_block_size = kv_block_size
        self.vocab_size = target.config["vocab_size"]
        self.graphs = None  # engine/graphs.DraftGraphs once captured

    @property
    def proposable_tokens(self) -> int:
        """How many tokens the draft may propose (its FR-Spec list, or the whole vocabulary)."""
        ids = self.draft.vocab_ids
        return self.vocab_size if ids is None else len(ids)

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        return self.draft.kv_bytes_per_token(kv_dtype)

    def allocate_kv_cache(self, num_slots: int, kv_dtype: torch.dtype):
        """The draft's context K/V lives in the target's slots, so one block table (and one rollback) serves both."""
        self.draft.allocate_kv_cache(num_slots, kv_dtype, self.device)

    def propose(self, seqs: list[Sequence], num_tokens: int | None = None):
        """Draft a block for each decoding seq from its anchor (last token) at position num_computed_tokens: its first
        num_tokens positions (default all num_draft_tokens; the backbone always runs over the whole block). Each seq
        draws num_draft_tokens uniforms whatever num_tokens is, so a CUDA graph drafting them all and an eager step
        drafting fewer agree on the positions both draft."""
        if not seqs:
            return
        with TIMINGS.section("draft_context"):
            self.write_context(seqs)
        starts = [s.num_computed_tokens for s in seqs]
        window = self.draft.context_window  # a draft that reads only its last `window` positions gets their slots
        kv_slots = (window_slots(seqs, starts, window, self.kv_block_size, self.device) if window
                    else key_slots(seqs, starts, self.kv_block_size, self.device))
        uniforms = torch.stack([torch.rand(self.num_draft_tokens, generator=s.generator) for s in seqs])
        num_tokens = min(num_tokens or self.num_draft_tokens, self.num_draft_tokens)
        anchors, starts = self.on_device([s.token_ids[-1] for s in seqs]), self.on_device(starts)
        sampling = SamplingTensors.from_params([s.params for s in seqs], device=self.device)
        uniforms = uniforms.to(self.device, non_blocking=True)
        temperature_only = all(s.params.temperature_only(self.vocab_size) for s in seqs)  # host-side: no sync
        bucket = self.graph_bucket(len(seqs), kv_slots.shape[1], temperature_only)
        if bucket is None:
            outputs = self.draft.draft_block(anchors, starts, kv_slots, starts, num_tokens, sampling,
                                             uniforms[:, :num_tokens].contiguous(), temperature_only)
        else:
            with TIMINGS.section("draft_fused"):
                outputs = self.graphs.run(bucket, anchors, starts, kv_slots, sampling.temperature, uniforms)
        for seq, proposal in zip(seqs, self.draft.proposals(*outputs)):
            seq.proposal = proposal

    def capture_graphs(self, max_num_seqs: int, max_ctx_len: int, pool=None):
        """CUDA graphs of the draft step per request-count bucket (the fused Triton path of a vanilla-Markov DSpark
        draft; other drafts and sampling settings run eagerly)."""
        from engine.graphs import DraftGraphs
        if self.draft.graph_capturable:
            width = self.draft.context_window or max_ctx_len
            self.graphs = DraftGraphs(self.draft, self.device, max_num_seqs, width, self.num_draft_tokens, pool)

    def graph_bucket(self, num_requests: int, ctx_width: int, temperature_only: bool) -> int | None:
        """The draft graph for these requests, or None (eager): the graphs hold the fused temperature-only loop."""
        if self.graphs is None or not temperature_only:
            return None
        return self.graphs.bucket_for(num_requests, ctx_width)

    def on_device(self, values: list) -> torch.Tensor:
        return device_tensor(values, self.device)

    def queue_context(self, seqs: list[Sequence], features: list[torch.Tensor], num_committed: list[int]):
        """Queue the first num_committed[i] scheduled rows of seqs[i] (whose target features are given) for the
        draft's context K/V. They are written in one batch just before the request next drafts, so steps that
        draft nothing (the planner judged speculation would not pay) do not pay for them. The rows are copied: a view
        would keep the step's whole feature tensor alive until every request in that step had drafted or finished."""
        for seq, rows, n in zip(seqs, features, num_committed):
            if n:
                seq.pending_context.append((seq.num_computed_tokens, rows[:n].clone()))

    def write_context(self, seqs: list[Sequence]):
        queued = [(s, start, rows) for s in seqs for start, rows in s.pending_context]
        if not queued:
            return
        positions = [p for _, start, rows in queued for p in range(start, start + len(rows))]
        slot_mapping = [x for s, start, rows in queued
                        for x in slots(s.block_table, self.kv_block_size, start, start + len(rows))]
        self.draft.extend_context(torch.cat([rows for *_, rows in queued]), self.on_device(positions),
                                  self.on_device(slot_mapping))
        for seq in seqs:
            seq.pending_context = []
