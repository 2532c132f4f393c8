"""Turns a scheduled batch into one flat varlen forward of the target model, and samples."""
import logging

import torch

from engine import attention_inputs as inputs
from engine import distributed, parallel_step
from engine.block_manager import slots
from engine.config import EngineConfig
from engine.context import TIMINGS, device_tensor, get_context, reset_context, set_context
from engine.cpu import keep_freed_memory, move_to_huge_pages, return_freed_memory
from engine.drafter import Drafter
from engine.loader import load_model
from engine.models.layers import pack_linears_for_cpu
from engine.outputs import Emitted
from engine.sampler import SamplingTensors, emit, sample
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, step_saves
from kernels import flashinfer_attention, triton_support
from kernels.flashinfer_attention import FlashInferAttention

GPU_MEMORY_UTILIZATION = 0.9  # of the GPU memory free after loading and a warm-up step; the rest is slack

log = logging.getLogger("engine")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CPU_KV_DTYPE = torch.float32  # CPU attention math runs in fp32 (no fast bf16 batched matmul): store it so


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        keep_freed_memory()
        triton_support.select(config.kernels)
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.kv_dtype = CPU_KV_DTYPE if self.device.type == "cpu" else self.dtype
        # dense: the two-argument call bench/gpu_check stands its random model in for
        quantized = {"quantization": config.quantization} if config.quantization != "none" else {}
        self.model = load_model(config.model, self.dtype, **quantized).to(self.device)
        if self.device.type == "cpu":
            pack_linears_for_cpu(self.model)
        self.block_size = config.kv_block_size
        speculates = config.spec_method != "none"
        if speculates and not self.model.feeds_drafts:
            raise ValueError(f"{config.model}: speculative decoding with this target needs its own DSpark module, "
                             "which is not supported yet (use spec_method='none')")
        self.drafter = Drafter(config, self.model, self.dtype, self.block_size) if speculates else None
        if self.device.type == "cpu" and config.huge_pages:
            move_to_huge_pages(self.model, *([self.drafter.draft] if self.drafter else []))
            return_freed_memory()
        if self.model.own_attention:  # DeepSeek-V4: entries in the pages, per-request rings beside them
            self.fit_kv_options_to_v4()
            self.model.set_kv_layout(self.block_size, config.max_num_seqs, self.max_rollback,
                                     self.num_block_end_states)
            self.model.sync_free()  # settles each MoE's path (stacking its experts) before the KV sizing's warm-up
        self.attention = self.choose_attention()
        self.flashinfer = self.make_flashinfer() if self.attention == "flashinfer" else None
        self.num_blocks = self.allocate_kv_cache(config.kv_cache_gb or self.free_gpu_kv_gb())
        self.graphs = None  # engine/graphs.TargetGraphs once captured

    def fit_kv_options_to_v4(self):
        """DeepSeek-V4 serves with blocks of whole compressed windows: kv_block_size rounded up to a multiple of the
        largest compress ratio."""
        c, largest = self.config, self.model.largest_ratio
        if c.kv_block_size % largest:
            rounded = -(-c.kv_block_size // largest) * largest
            log.info("DeepSeek-V4: kv_block_size %d -> %d (whole windows of its largest compress ratio)",
                     c.kv_block_size, rounded)
            c.kv_block_size = self.block_size = rounded

    @property
    def num_block_end_states(self) -> int:
        """Ring states the prefix cache keeps at block ends (DeepSeek-V4 only; engine/block_end_states.py)."""
        c = self.config
        if not (self.model.own_attention and c.enable_prefix_caching):
            return 0
        return c.prefix_cache_states or 2 * c.max_num_seqs

    def choose_attention(self) -> str:
        """config.attention settled: 'torch' off the Triton path; for 'auto', FlashInfer on a GPU where it is
        installed, has kernels for this model's heads and dtype and runs a probe step (its kernels compile then),
        else our Triton kernel. A FlashInfer asked for by name that cannot run is an error."""
        c = self.config
        if c.kernels != "triton" or self.model.own_attention:
            return "torch"
        attn = self.model.layers[0].self_attn
        if c.attention == "triton":
            return "triton"
        fits = flashinfer_attention.has_kernels_for(self.device, self.kv_dtype, attn.head_dim)
        if c.attention == "auto" and (not fits or flashinfer_attention.unavailable_reason()):
            return "triton"
        self.workspace = torch.empty(flashinfer_attention.WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        reason = flashinfer_attention.probe(self.device, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                            self.block_size, self.kv_dtype, self.workspace)
        if not reason:
            return "flashinfer"
        if c.attention == "flashinfer":
            raise ValueError(f"attention='flashinfer' cannot run here: {reason}")
        log.warning("FlashInfer is installed but cannot run here (%s); the target uses the Triton attention", reason)
        self.workspace = None
        return "triton"

    def make_flashinfer(self, graph_requests: int = 0, graph_pages: int = 0) -> FlashInferAttention:
        attn = self.model.layers[0].self_attn
        return FlashInferAttention(self.device, attn.num_heads, attn.num_kv_heads, attn.head_dim, self.block_size,
                                   self.kv_dtype, attn.scale, self.workspace, graph_requests, graph_pages)

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return self.drafter.capture_layers if self.drafter else ()

    @property
    def max_rollback(self) -> int:
        """The most tokens one step can write and later drop: a verify row (anchor and drafts), all of it when the
        SPS profiler times a row and discards it (engine/cost_model.py)."""
        return 1 + (self.drafter.num_draft_tokens if self.drafter else self.config.num_draft_tokens)

    def kv_bytes_per_block(self) -> int:
        per_token = self.model.kv_bytes_per_token(self.kv_dtype)
        if self.drafter:
            per_token += self.drafter.kv_bytes_per_token(self.kv_dtype)
        return round(per_token * self.block_size)  # whole per block; per token, a V4 entry's share can be a fraction

    def kv_fixed_bytes(self) -> int:
        """KV bytes whatever the block count: DeepSeek-V4's rings, one set per request that can run at once."""
        return self.model.kv_fixed_bytes(self.kv_dtype) if self.model.own_attention else 0

    def free_gpu_kv_gb(self) -> float:
        """GiB for the KV cache (target + draft) on the GPU, measured: what is free after loading both and a warm-up
        of the largest step, less that step's activation peak twice over (eager steps, and the CUDA graphs' pool)."""
        dev = self.device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        resident = torch.cuda.memory_allocated(dev)
        self.warm_up()
        peak = torch.cuda.max_memory_allocated(dev) - resident
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(dev)
        kv_bytes = GPU_MEMORY_UTILIZATION * free - 2 * peak
        if kv_bytes < self.kv_fixed_bytes() + self.kv_bytes_per_block():
            raise ValueError(f"no GPU memory left for a KV cache: {free / 2**30:.2f} GiB free after loading the "
                             f"models, and the largest step needs {peak / 2**30:.2f} GiB of activations (lower "
                             f"--max-num-batched-tokens or --max-num-seqs, or give --kv-cache-gb)")
        return kv_bytes / 2**30

    @torch.inference_mode()
    def warm_up(self):
        """The largest step the engine takes, on a one-block cache (every K/V lands in block 0): a prefill chunk of
        max_num_batched_tokens, then the logits and probabilities of every row a verify step can sample."""
        self.allocate_blocks(1)
        c = self.config
        n = min(c.max_num_batched_tokens, self.model.config.get("max_position_embeddings", 4096))
        rows = min(n, c.max_num_seqs * (1 + (self.drafter.num_draft_tokens if self.drafter else 0)))
        seq = Sequence([0] * n, SamplingParams())
        seq.block_table, seq.num_scheduled_tokens, seq.request_slot = [0] * -(-n // self.block_size), n, 0
        input_ids, positions = self.prepare([seq])
        try:
            hidden, _ = self.model(input_ids, positions, self.capture_layers)
        finally:
            reset_context()
        self.model.compute_logits(hidden[-rows:]).softmax(-1)

    def allocate_kv_cache(self, kv_cache_gb: float) -> int:
        num_blocks = (int(kv_cache_gb * 2**30) - self.kv_fixed_bytes()) // self.kv_bytes_per_block()
        num_blocks = distributed.agree_min(num_blocks)  # tensor parallel: what every rank's share of the heads fits
        if num_blocks < 1:
            raise ValueError(f"kv_cache_gb={kv_cache_gb} is too small for even one KV block")
        return self.allocate_blocks(num_blocks)

    def allocate_blocks(self, num_blocks: int) -> int:
        self.kv_cache = self.model.allocate_kv_cache(num_blocks * self.block_size, self.kv_dtype, self.device)
        if self.drafter:
            self.drafter.allocate_kv_cache(num_blocks * self.block_size, self.kv_dtype)
        return num_blocks

    def prepare(self, seqs: list[Sequence], tier: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat input ids / positions for the scheduled tokens of seqs (in order) and the forward context (for
        CUDA graph `tier` when the step replays one)."""
        input_ids, positions, slot_mapping = [], [], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            input_ids += seq.scheduled_token_ids()
            positions += range(start, end)
            slot_mapping += slots(seq.block_table, self.block_size, start, end)
        if self.flashinfer is not None:
            set_context(self.on_device(slot_mapping), [], None, self.plan_attention(seqs, tier))
        elif triton_support.enabled() or self.model.own_attention:
            set_context(self.on_device(slot_mapping), [], inputs.varlen_batch(seqs, self.block_size, self.device))
            if self.model.own_attention:
                self.model.use_request_slots([s.request_slot for s in seqs],
                                             [(s.num_computed_tokens, s.num_scheduled_tokens) for s in seqs],
                                             [s.state_restore for s in seqs], [step_saves(s) for s in seqs])
        else:
            set_context(torch.tensor(slot_mapping), inputs.attention_groups(seqs, self.block_size))
        return self.on_device(input_ids), self.on_device(positions)

    def on_device(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return device_tensor(values, self.device, dtype)

    def plan_attention(self, seqs: list[Sequence], tier: int | None) -> FlashInferAttention:
        """Plan FlashInfer for this step: the eager wrapper, or graph `tier`'s, padded to the graph's request count."""
        attention = self.flashinfer if tier is None else self.graphs.attention[tier]
        attention.plan(inputs.page_table(seqs, self.block_size, 0 if tier is None else self.graphs.seats(tier)))
        return attention

    def capture_graphs(self, max_model_len: int):
        """CUDA graphs of the decode/verify forward per token tier and of the draft step per request bucket
        (engine/graphs.py); steps they do not cover run eagerly."""
        from engine.graphs import TargetGraphs
        if not triton_support.enabled():
            raise ValueError("CUDA graphs need the Triton kernels (kernels='triton')")
        if self.model.own_attention and not self.model.sync_free():
            log.warning("DeepSeek-V4 runs eagerly: its experts cannot run as the grouped GEMMs a CUDA graph needs here "
                        "(bf16 on a GPU before sm_90, or kept in mixed stored formats)")
            return
        max_q_len = 1 + (self.drafter.num_draft_tokens if self.drafter else 0)
        max_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * max_q_len)
        self.graphs = TargetGraphs(self.model, self.device, self.config.max_num_seqs, max_q_len, max_model_len,
                                   max_tokens, self.capture_layers,
                                   self.make_flashinfer if self.flashinfer is not None else None, self.block_size)
        if self.drafter:
            self.drafter.capture_graphs(self.config.max_num_seqs, max_model_len, self.graphs.pool)

    def graph_tier(self, seqs: list[Sequence], capture_layers: tuple[int, ...]) -> int | None:
        if self.graphs is None:
            return None
        q_lens = [s.num_scheduled_tokens for s in seqs]
        kv_lens = [s.num_computed_tokens + n for s, n in zip(seqs, q_lens)]
        return self.graphs.tier_for(q_lens, kv_lens, capture_layers)

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], num_logits: list[int], capture_layers: tuple[int, ...] = ()):
        """One forward over the scheduled tokens of seqs: for each seq the fp32 logits of its last num_logits[i]
        scheduled tokens ([num_logits[i], V], in input order) and, when capture_layers are given, its captured target
        features [num_scheduled, len(capture_layers) * h]. With tensor parallelism rank 0 first sends the step to the
        other ranks, whose seqs are engine/parallel_step.RemoteSeq."""
        parallel_step.send_forward(seqs, num_logits, bool(capture_layers))
        order = sorted(range(len(seqs)), key=lambda i: not inputs.is_short(seqs[i]))
        ordered = [seqs[i] for i in order]
        tier = self.graph_tier(ordered, capture_layers)
        input_ids, positions = self.prepare(ordered, tier)
        if tier is None:
            hidden, captured = self.model(input_ids, positions, capture_layers)
        else:
            hidden, captured = self.replay(tier, input_ids, positions, capture_layers)
        reset_context()
        ends = self.cumulative_ends(ordered)
        rows = [r for i, end in zip(order, ends) for r in range(end - num_logits[i], end)]
        logits = self.model.compute_logits(hidden[rows]) if rows else hidden.new_empty(0, 0)
        per_seq = dict(zip(order, logits.split([num_logits[i] for i in order])))
        features = None
        if captured:
            by_seq = dict(zip(order, torch.cat(captured, dim=-1).split([s.num_scheduled_tokens for s in ordered])))
            features = [by_seq[i] for i in range(len(seqs))]
        return [per_seq[i] for i in range(len(seqs))], features

    def replay(self, tier: int, input_ids: torch.Tensor, positions: torch.Tensor, capture_layers: tuple[int, ...]):
        """The step in CUDA graph `tier`; a DeepSeek-V4 step's host work (ring restores and checks, then ends and
        block-end saves) before and after the replay."""
        ctx, v4 = get_context(), self.model.own_attention
        if v4:
            self.model.begin_step()
        hidden, captured = self.graphs.run(tier, input_ids, positions, ctx.slot_mapping, ctx.varlen,
                                           want_features=bool(capture_layers),
                                           request_slots=self.model.request_slots if v4 else None)
        if v4:
            self.model.end_step(saved=False)
        return hidden, captured

    def run(self, seqs: list[Sequence]) -> dict[int, Emitted]:
        """A plain decoding step: the forward, then a sampled token for each seq whose scheduled tokens reach its end;
        computed counts advanced."""
        at_end = [s.reaches_end for s in seqs]
        with TIMINGS.section("target"):
            logits, _ = self.forward(seqs, [int(e) for e in at_end])
        for seq in seqs:
            seq.advance()
        sampling = [s for s, e in zip(seqs, at_end) if e]
        if not sampling:
            return {}
        with TIMINGS.section("sampling"):
            rows = [l for l, e in zip(logits, at_end) if e]
            tokens = self.sample(torch.cat(rows), sampling)
            return {s.seq_id: emit(row, [t], s.params) for s, row, t in zip(sampling, rows, tokens)}

    @staticmethod
    def cumulative_ends(seqs: list[Sequence]) -> list[int]:
        ends, total = [], 0
        for s in seqs:
            total += s.num_scheduled_tokens
            ends.append(total)
        return ends

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if not seqs:
            return []
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            return logits.argmax(-1).tolist()
        probs = SamplingTensors.from_params(params, device=logits.device).probs(logits)
        return sample(probs, [s.generator for s in seqs]).tolist()
