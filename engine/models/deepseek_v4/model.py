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
                slot_mapping: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        pre, post, comb = self.mix_weights(streams, "attn")
        out = self.attn(self.attn_norm(collapse(pre, streams)), positions, segments)
        streams = spread(post, comb, out, streams)
        pre, post, comb = self.mix_weights(streams, "ffn")
        return spread(post, comb, self.ffn(self.ffn_norm(collapse(pre, streams)), input_ids), streams)


class V4Model(nn.Module):
    own_attention = True  # its attention is its own, over each sequence's rows and context slots (the varlen batch)
    feeds_drafts = True  # to its own in-checkpoint DSpark module only (engine/drafts/loader.load_any_draft)

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
        rings = [ring for a in self.attentions() for ring in a.rings()]
        return (self.max_requests * sum(ring.bytes_per_request(self.max_rollback, dtype) for ring in rings) +
                self.block_end_states * sum(ring.bytes_per_state(dtype) for ring in rings))

    def allocate_kv_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device):
        for attn in self.attentions():
            attn.allocate(num_slots, self.max_requests, self.max_rollback, dtype, device, self.block_end_states)

    def use_request_slots(self, request_slots: list[int], restores: list | None = None, saves: list | None = None):
        """The next step's sequences' ring indices (Sequence.request_slot), in the varlen batch's order, and per
        sequence the block-end state its rings start from (or None) and the block ends whose states it saves."""
        if any(slot is None or not 0 <= slot < self.max_requests for slot in request_slots):
            raise RuntimeError(f"request slots {request_slots} outside the {self.max_requests} allocated")
        self.request_slots = request_slots
        self.ring_states = (restores or [None] * len(request_slots), saves or [()] * len(request_slots))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, capture_layers: tuple[int, ...] = ()):
        """The engine's step: the flat rows of every scheduled sequence (engine context: slot mapping and the varlen
        batch) -> (final hidden [N, hidden], for each of capture_layers its output streams averaged over the hc
        copies [N, hidden]: what the in-checkpoint DSpark module reads)."""
        ctx = get_context()
        captured = dict.fromkeys(capture_layers)
        segments = segments_of(ctx.varlen, self.request_slots, *self.ring_states)
        hidden = self.run_layers(input_ids, positions, ctx.slot_mapping, segments, captured)
        return hidden, [captured[i] for i in capture_layers]

    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                   segments: list[Segment], captured: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
        """captured: layer index -> filled with that layer's output streams, hc-averaged (the full mHC stream after
        its FFN, as vLLM's DeepSeek-V4 model captures `dspark_target_layer_ids`: boundary id + 1)."""
        c = self.v4
        streams = self.embed(input_ids).unsqueeze(1).expand(-1, c.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            streams = layer(streams, positions, input_ids, slot_mapping, segments)
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
        return self.run_layers(input_ids, slots, slots, [Segment(0, n, slots)], captured)


def segments_of(varlen, request_slots: list[int], restores: list, saves: list) -> list[Segment]:
    """The varlen batch's sequences: rows cu[b]:cu[b+1], context slots kv_slots[b, :kv_lens[b]], rings
    request_slots[b] (restored from restores[b], saving saves[b])."""
    cu, lens = varlen.cu_seqlens_q.tolist(), varlen.kv_lens.tolist()
    return [Segment(cu[b], cu[b + 1] - cu[b], varlen.kv_slots[b, :lens[b]], request_slots[b], restores[b],
                    tuple(saves[b])) for b in range(len(lens))]
