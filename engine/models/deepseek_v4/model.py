"""DeepSeek-V4 as a target: embedding, hc_mult residual streams through blocks (mHC around window / CSA / HCA
attention and the MoE), the hc_head collapse, the final norm and the LM head. Parameter names are the released
checkpoint's (`embed`, `layers.N.attn...`, `layers.N.ffn...`, `hc_head_*`, `head`), so a loaded checkpoint maps one
to one. `forward` runs the engine's flat varlen step over the paged caches; `forward_sequence` runs one whole
sequence on caches of its own (tested against transformers 5.24's DeepseekV4ForCausalLM)."""
import torch
from torch import nn

from engine.context import get_context
from engine.models.deepseek_v4 import parallel
from engine.models.deepseek_v4.attention import Segment, V4Attention, V4Norm
from engine.models.deepseek_v4.config import V4Config, v4_config
from engine.models.deepseek_v4.mhc import collapse, hc_head, hc_weights, spread
from engine.models.deepseek_v4.moe import MoE
from engine.models.deepseek_v4.rings import Ring
from engine.models.deepseek_v4.step_rows import StepRows, step_rows
from engine.models.layers import embedding, lm_head


def hc_parameters(module: nn.Module, prefix: str, config: V4Config):
    n, d = config.hc_mult, config.hidden_size
    mixes = (2 + n) * n
    module.register_parameter(f"{prefix}_fn", nn.Parameter(torch.zeros(mixes, n * d, dtype=torch.float32)))
    module.register_parameter(f"{prefix}_base", nn.Parameter(torch.zeros(mixes, dtype=torch.float32)))
    module.register_parameter(f"{prefix}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32)))


class V4Block(nn.Module):
    def __init__(self, config: V4Config, layer: int):
        super().__init__()
        self.attn_norm = V4Norm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = V4Norm(config.hidden_size, config.rms_norm_eps)
        hc_parameters(self, "hc_attn", config)
        hc_parameters(self, "hc_ffn", config)
        self.attn = parallel.attention(V4Attention, config, layer)  # tensor parallel: this rank's heads
        self.ffn = MoE(config, layer)
        self.config = config

    def mix_weights(self, streams: torch.Tensor, which: str):
        c = self.config
        return hc_weights(streams, getattr(self, f"hc_{which}_fn"), getattr(self, f"hc_{which}_base"),
                          getattr(self, f"hc_{which}_scale"), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor,
                step: list[Segment] | StepRows) -> torch.Tensor:
        pre, post, comb = self.mix_weights(streams, "attn")
        out = self.attn(self.attn_norm(collapse(pre, streams)), positions, step)
        streams = spread(post, comb, out, streams)
        pre, post, comb = self.mix_weights(streams, "ffn")
        return spread(post, comb, self.ffn(self.ffn_norm(collapse(pre, streams)), input_ids), streams)


class V4Model(nn.Module):
    own_attention = True  # its attention is its own, over each sequence's rows and context slots (the varlen batch)
    feeds_drafts = True  # to its own in-checkpoint DSpark module only (engine/drafts/loader.load_any_draft)
    eager_rows_from = 2  # eagerly, one sequence steps on its own path: ~10% quicker at batch 1 (docs/benchmarks.md)

    def __init__(self, raw_config: dict):
        super().__init__()
        self.config = raw_config  # the engine reads vocab_size and max_position_embeddings here, as for dense models
        self.v4 = config = v4_config(raw_config)
        self.embed = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(V4Block(config, i) for i in range(config.num_layers))
        self.norm = V4Norm(config.hidden_size, config.rms_norm_eps)
        n = config.hc_mult
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * config.hidden_size, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.head = lm_head(config.hidden_size, config.vocab_size)

    def set_kv_layout(self, block_size: int, max_requests: int, max_rollback: int, block_end_states: int = 0):
        """The engine's KV shape, before allocate_kv_cache: blocks hold whole compressor windows; one set of rings per
        request that can run at once, each keeping max_rollback positions more than a step reads back; and, for the
        prefix cache, block_end_states saved ring states (engine/block_end_states.py)."""
        largest = self.largest_ratio
        if block_size % largest:
            raise ValueError(f"kv_block_size must be a multiple of {largest} for this DeepSeek-V4 (a block holds whole "
                             f"compressed windows; its largest compress ratio is {largest}), got {block_size}")
        self.max_requests, self.max_rollback, self.block_end_states = max_requests, max_rollback, block_end_states

    def attentions(self) -> list[V4Attention]:
        return [layer.attn for layer in self.layers]

    @property
    def largest_ratio(self) -> int:
        return max((a.ratio for a in self.attentions() if a.kind != "window"), default=1)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> float:
        """The paged part: each compressed layer's entries (and a CSA layer's indexer keys), one per ratio tokens."""
        return sum(a.kv_bytes_per_token(dtype) for a in self.attentions())

    def kv_fixed_bytes(self, dtype: torch.dtype) -> int:
        """The per-request part, for every request that can run at once: the window rings and compressor rings; and
        the prefix cache's saved states at block ends."""
        rings = self.rings()
        scratch = sum(c.dim for a in self.attentions() for c in a.caches()) * dtype.itemsize  # padding rows' writes
        return ((self.max_requests + 1) * sum(ring.bytes_per_request(self.max_rollback, dtype) for ring in rings) +
                self.block_end_states * sum(ring.bytes_per_state(dtype) for ring in rings) + scratch)

    def allocate_kv_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device):
        for attn in self.attentions():
            attn.allocate(num_slots, self.max_requests, self.max_rollback, dtype, device, self.block_end_states)
        self.ends = [0] * self.max_requests  # per request slot: one past the last position its rings hold

    def sync_free(self) -> bool:
        """Whether a fixed-shape step runs without a host sync (a CUDA graph can hold it): every MoE's experts
        stacked for the grouped GEMMs."""
        return all(layer.ffn.stack() for layer in self.layers)

    def rings(self) -> list[Ring]:
        return [ring for a in self.attentions() for ring in a.rings()]

    def use_request_slots(self, request_slots: list[int], spans: list[tuple[int, int]], restores: list | None = None,
                          saves: list | None = None):
        """The next step's sequences' ring indices (Sequence.request_slot), in the varlen batch's order, and per
        sequence its (first position, row count), the block-end state its rings start from (or None) and the block
        ends whose states it saves."""
        if any(slot is None or not 0 <= slot < self.max_requests for slot in request_slots):
            raise RuntimeError(f"request slots {request_slots} outside the {self.max_requests} allocated")
        self.request_slots, self.spans = request_slots, spans
        self.ring_states = (restores or [None] * len(request_slots), saves or [()] * len(request_slots))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, capture_layers: tuple[int, ...] = ()):
        """The engine's step: the flat rows of every scheduled sequence (engine context: slot mapping and the varlen
        batch) -> (final hidden [N, hidden], for each of capture_layers its output streams averaged over the hc
        copies [N, hidden]: what the in-checkpoint DSpark module reads). A step of several sequences that all bring
        few rows runs in fixed shapes (step_rows.py), any other one sequence after another."""
        ctx, rows = get_context(), self.fits_rows() and len(self.spans) >= self.eager_rows_from
        self.begin_step()
        if rows:
            slots = torch.tensor(self.request_slots, device=input_ids.device)
            out = self.forward_rows(input_ids, positions, capture_layers, ctx.varlen.cu_seqlens_q,
                                    ctx.varlen.kv_slots, slots)
        else:
            captured = dict.fromkeys(capture_layers)
            segments = segments_of(ctx.varlen, self.request_slots, self.ring_states[1])
            out = self.run_layers(input_ids, positions, segments, captured), [captured[i] for i in capture_layers]
        self.end_step(saved=not rows)
        return out

    def fits_rows(self) -> bool:
        """Whether the next step can run in fixed shapes: every sequence's rows fit in the rings' rollback margin
        beside what they read back (a fixed-shape step writes its rows before reading any)."""
        return all(length <= self.ring_margin + 1 for _, length in self.spans)

    def begin_step(self):
        """Before a step: the rings of a request whose prefix-cache hit ends at a block end are loaded from the state
        saved there; then every request's rings must still hold what the step reads back (none rolled back further
        than their margin, and no positions skipped)."""
        self.guard_rings(self.restore_rings())

    def restore_rings(self) -> list[int]:
        """Load the restored requests' rings -> each request's end (one past the last position its rings hold)."""
        ends = []
        for slot, restore in zip(self.request_slots, self.ring_states[0]):
            if restore is not None:
                for ring in self.rings():
                    ring.load(slot, *restore)
            ends.append(self.ends[slot] if restore is None else restore[0])
        return ends

    @property
    def ring_margin(self) -> int:
        """The positions every ring can roll back (fixed at allocation; a test may cut one ring's)."""
        return min(ring.margin for ring in self.rings())

    def guard_rings(self, ends: list[int]):
        margin = self.ring_margin
        for slot, (start, _), written in zip(self.request_slots, self.spans, ends):
            if start and not start <= written <= start + margin:
                raise RuntimeError(f"request slot {slot}: a step starts at position {start} but its rings hold up to "
                                   f"position {written - 1} (rolled back more than the {margin} positions it keeps, "
                                   "or skipped positions)")

    def end_step(self, saved: bool):
        """After a step: the rings' ends; for a fixed-shape step (saved False) also the block-end states its rows
        reached, from the rings (the segment path keeps them as it writes: a long chunk overwrites them)."""
        for slot, (start, length), saves in zip(self.request_slots, self.spans, self.ring_states[1]):
            self.ends[slot] = start + length
            for end, state in [] if saved else saves:
                for ring in self.rings():
                    ring.save_written(slot, end, state)

    def forward_rows(self, input_ids: torch.Tensor, positions: torch.Tensor, capture_layers: tuple[int, ...],
                     cu_seqlens_q: torch.Tensor, kv_slots: torch.Tensor, request_slots: torch.Tensor):
        """forward's device part for a step in fixed shapes, rows past cu_seqlens_q[-1] padding: no host sync, so a
        CUDA graph can replay it (engine/graphs.py; begin_step / end_step around the replay)."""
        captured = dict.fromkeys(capture_layers)
        rows = step_rows(cu_seqlens_q, kv_slots, request_slots, self.layers[0].attn.ring.scratch, input_ids.shape[0])
        hidden = self.run_layers(input_ids, positions, rows, captured)
        return hidden, [captured[i] for i in capture_layers]

    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, step: list[Segment] | StepRows,
                   captured: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
        """captured: layer index -> filled with that layer's output streams, hc-averaged (the full mHC stream after
        its FFN, as vLLM's DeepSeek-V4 model captures `dspark_target_layer_ids`: boundary id + 1)."""
        c = self.v4
        streams = self.embed(input_ids).unsqueeze(1).expand(-1, c.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            streams = layer(streams, positions, input_ids, step)
            if captured is not None and i in captured:
                captured[i] = streams.float().mean(1).to(streams.dtype)
        return self.norm(hc_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.hc_eps,
                                 c.rms_norm_eps))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    @torch.inference_mode()
    def forward_sequence(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [S] of one sequence from position 0 -> fp32 logits [S, V], on caches of its own."""
        return self.compute_logits(self.sequence_hidden(input_ids))

    @torch.inference_mode()
    def sequence_hidden(self, input_ids: torch.Tensor, captured: dict | None = None) -> torch.Tensor:
        """input_ids [S] of one sequence from position 0 -> final hidden [S, hidden] (and captured layers filled, as
        run_layers), on caches of its own."""
        n, device = input_ids.shape[0], input_ids.device
        largest = self.largest_ratio
        self.set_kv_layout(largest, 1, 0)
        self.allocate_kv_cache(-(-n // largest) * largest, self.embed.weight.dtype
                               if self.embed.weight.is_floating_point() else torch.float32, device)
        slots = torch.arange(n, device=device)
        return self.run_layers(input_ids, slots, [Segment(0, n, slots)], captured)


def segments_of(varlen, request_slots: list[int], saves: list) -> list[Segment]:
    """The varlen batch's sequences: rows cu[b]:cu[b+1], context slots kv_slots[b, :kv_lens[b]], rings
    request_slots[b] (saving saves[b])."""
    cu, lens = varlen.cu_seqlens_q.tolist(), varlen.kv_lens.tolist()
    return [Segment(cu[b], cu[b + 1] - cu[b], varlen.kv_slots[b, :lens[b]], request_slots[b], tuple(saves[b]))
            for b in range(len(lens))]
