"""Speculative decoding around a DSpark / DFlash draft: propose blocks, verify them losslessly against the target's
logits, and keep the draft's context K/V in step with what the target committed."""
import torch

from engine.block_manager import slots
from engine.config import EngineConfig
from engine.context import device_tensor
from engine.drafts.loader import load_draft
from engine.models.decoder import DecoderModel
from engine.models.layers import KERNEL_MAX_ROWS, pack_linears_for_cpu
from engine.sampler import SamplingTensors
from engine.sequence import Sequence
from engine.timing import TIMINGS
from kernels.dispatch import rejection_sample


class Speculator:
    def __init__(self, config: EngineConfig, target: DecoderModel, dtype: torch.dtype, block_size: int):
        self.device = torch.device(config.device)
        self.draft = load_draft(config.draft, target, dtype, config.spec_method,
                                config.draft_vocab_size).to(self.device)
        if self.device.type == "cpu":
            pack_linears_for_cpu(self.draft)
        block = self.draft.config.block_size
        if config.num_draft_tokens > block:
            raise ValueError(f"num_draft_tokens={config.num_draft_tokens} exceeds the draft's block_size {block}")
        self.num_draft_tokens = config.num_draft_tokens or block
        self.capture_layers = tuple(self.draft.config.target_layer_ids)
        self.block_size = block_size
        self.vocab_size = target.config["vocab_size"]
        self.graphs = None  # engine/graphs.DraftGraphs once captured

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        c = self.draft.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * kv_dtype.itemsize

    def allocate_kv_cache(self, num_slots: int, kv_dtype: torch.dtype):
        """Draft context K/V lives in the same slots as the target's, so one block table serves both. Past them, a
        few scratch slots that no block table owns hold the drafted block's own K/V on the CPU's fused path."""
        c = self.draft.config
        self.kv_cache = torch.zeros(2, c.num_layers, c.num_kv_heads, num_slots + KERNEL_MAX_ROWS, c.head_dim,
                                    dtype=kv_dtype, device=self.device)
        self.draft.scratch_slots = torch.arange(num_slots, num_slots + KERNEL_MAX_ROWS, device=self.device)
        for i, layer in enumerate(self.draft.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

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
        longest = max(starts)
        kv_slots = self.on_device([slots(s.block_table, self.block_size, 0, n) + [0] * (longest - n)
                                   for s, n in zip(seqs, starts)])
        uniforms = torch.stack([torch.rand(self.num_draft_tokens, generator=s.generator) for s in seqs])
        num_tokens = min(num_tokens or self.num_draft_tokens, self.num_draft_tokens)
        anchors, starts = self.on_device([s.token_ids[-1] for s in seqs]), self.on_device(starts)
        sampling = SamplingTensors.from_params([s.params for s in seqs], device=self.device)
        uniforms = uniforms.to(self.device, non_blocking=True)
        temperature_only = all(s.params.temperature_only(self.vocab_size) for s in seqs)  # host-side: no sync
        bucket = self.graph_bucket(len(seqs), longest, temperature_only)
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
        if self.draft.has_fused_markov:
            self.graphs = DraftGraphs(self.draft, self.device, max_num_seqs, max_ctx_len, self.num_draft_tokens, pool)

    def graph_bucket(self, num_requests: int, ctx_width: int, temperature_only: bool) -> int | None:
        """The draft graph for these requests, or None (eager): the graphs hold the fused temperature-only loop."""
        if self.graphs is None or not temperature_only:
            return None
        return self.graphs.bucket_for(num_requests, ctx_width)

    def verify(self, seqs: list[Sequence], logits: list[torch.Tensor]) -> list[tuple[int, int]]:
        """logits[i]: the target's [1 + l_i, V] rows for [anchor, d_1..d_l] of seqs[i] (l_i = its spec tokens).
        Returns (accepted drafts, next token) per seq."""
        if all(s.params.greedy for s in seqs):
            return self.verify_greedy(seqs, logits)
        return self.verify_by_rejection(seqs, logits)

    def verify_by_rejection(self, seqs: list[Sequence], logits: list[torch.Tensor]) -> list[tuple[int, int]]:
        num_drafts = [len(s.spec_token_ids) for s in seqs]
        target_probs = SamplingTensors.from_params([s.params for s in seqs], [n + 1 for n in num_drafts],
                                                   self.device).probs(torch.cat(logits))
        drafted = [s for s, n in zip(seqs, num_drafts) if n]
        draft_probs = (torch.cat([s.proposal.probs[:len(s.spec_token_ids)] for s in drafted]) if drafted
                       else target_probs.new_zeros(0, self.vocab_size))
        draft_probs = self.draft.full_vocab_probs(draft_probs, self.vocab_size)
        draft_tokens = self.on_device([t for s in drafted for t in s.spec_token_ids])
        uniforms = [torch.rand(n + 1, generator=s.generator) for s, n in zip(seqs, num_drafts)]
        accepted, next_tokens = rejection_sample(
            target_probs, draft_probs, draft_tokens, self.on_device(num_drafts),
            torch.cat([u[:-1] for u in uniforms]).to(self.device), torch.stack([u[-1] for u in uniforms]).to(self.device))
        return list(zip(accepted.tolist(), next_tokens.tolist()))

    @staticmethod
    def verify_greedy(seqs: list[Sequence], logits: list[torch.Tensor]) -> list[tuple[int, int]]:
        """Rejection sampling when every request is greedy: q is one-hot at each draft and p one-hot at the target's
        argmax, so a draft is accepted exactly when it is that argmax, and the next token is the argmax of the first
        row that disagrees (or of the bonus row). Same result, without building any distribution."""
        best = torch.cat(logits).argmax(-1).tolist()
        results, start = [], 0
        for seq in seqs:
            drafts = seq.spec_token_ids
            accepted = next((i for i, t in enumerate(drafts) if t != best[start + i]), len(drafts))
            results.append((accepted, best[start + accepted]))
            start += len(drafts) + 1
        return results

    def on_device(self, values: list) -> torch.Tensor:
        return device_tensor(values, self.device)

    def extend_context(self, seqs: list[Sequence], features: list[torch.Tensor], num_committed: list[int]):
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
                        for x in slots(s.block_table, self.block_size, start, start + len(rows))]
        self.draft.extend_context(torch.cat([rows for *_, rows in queued]), self.on_device(positions),
                                  self.on_device(slot_mapping))
        for seq in seqs:
            seq.pending_context = []
