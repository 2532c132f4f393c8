"""DeepSeek-V4 as a target: embedding, hc_mult residual streams through blocks (mHC around window / CSA / HCA
attention and the MoE), the hc_head collapse, the final norm and the LM head. Parameter names are the released
checkpoint's (`embed`, `layers.N.attn...`, `layers.N.ffn...`, `hc_head_*`, `head`), so a loaded checkpoint maps one
to one. `forward` runs the engine's flat varlen step over the paged caches; `forward_sequence` runs one whole
sequence on caches of its own (tested against transformers 5.24's DeepseekV4ForCausalLM)."""
import torch
from torch import nn

from engine.context import get_context
from engine.models.deepseek_v4.attention import Segment, V4Attention, V4Norm
from engine.models.deepseek_v4.config import V4Config, v4_config
from engine.models.deepseek_v4.mhc import collapse, hc_head, hc_weights, spread
from engine.models.deepseek_v4.moe import MoE
from engine.models.layers import Linear


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
        self.attn = V4Attention(config, layer)
        self.ffn = MoE(config, layer)
        self.config = config

    def mix_weights(self, streams: torch.Tensor, which: str):
        c = self.config
        return hc_weights(streams, getattr(self, f"hc_{which}_fn"), getattr(self, f"hc_{which}_base"),
                          getattr(self, f"hc_{which}_scale"), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor,
                slot_mapping: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        pre, post, comb = self.mix_weights(streams, "attn")
        out = self.attn(self.attn_norm(collapse(pre, streams)), positions, slot_mapping, segments)
        streams = spread(post, comb, out, streams)
        pre, post, comb = self.mix_weights(streams, "ffn")
        return spread(post, comb, self.ffn(self.ffn_norm(collapse(pre, streams)), input_ids), streams)


class V4Model(nn.Module):
    own_attention = True  # its attention is its own, over each sequence's rows and context slots (the varlen batch)
    feeds_drafts = False  # its DSpark module is its own (not a DSpark/DFlash draft on captured layers)

    def __init__(self, raw_config: dict):
        super().__init__()
        self.config = raw_config  # the engine reads vocab_size and max_position_embeddings here, as for dense models
        self.v4 = config = v4_config(raw_config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(V4Block(config, i) for i in range(config.num_layers))
        self.norm = V4Norm(config.hidden_size, config.rms_norm_eps)
        n = config.hc_mult
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * config.hidden_size, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Every layer's K=V plus every compressor's raw projections, per token."""
        attns = [layer.attn for layer in self.layers]
        width = sum(a.dim + sum(2 * c.width for c in a.caches()) for a in attns)
        return width * dtype.itemsize

    def allocate_kv_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device):
        for layer in self.layers:
            attn = layer.attn
            attn.kv_cache = torch.zeros(num_slots, attn.dim, dtype=dtype, device=device)
            for compressor in attn.caches():
                compressor.cache = torch.zeros(num_slots, 2 * compressor.width, dtype=dtype, device=device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, capture_layers: tuple[int, ...] = ()):
        """The engine's step: the flat rows of every scheduled sequence (engine context: slot mapping and the varlen
        batch) -> (final hidden [N, hidden], no captured features)."""
        if capture_layers:
            raise ValueError("DeepSeek-V4 targets do not feed DSpark/DFlash drafts yet")
        ctx = get_context()
        return self.run_layers(input_ids, positions, ctx.slot_mapping, segments_of(ctx.varlen)), []

    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                   segments: list[Segment]) -> torch.Tensor:
        c = self.v4
        streams = self.embed(input_ids).unsqueeze(1).expand(-1, c.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, positions, input_ids, slot_mapping, segments)
        return self.norm(hc_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.hc_eps,
                                 c.rms_norm_eps))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    @torch.inference_mode()
    def forward_sequence(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [S] of one sequence from position 0 -> fp32 logits [S, V], on caches of its own."""
        n, device = input_ids.shape[0], input_ids.device
        self.allocate_kv_cache(n, self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32,
                               device)
        slots = torch.arange(n, device=device)
        return self.compute_logits(self.run_layers(input_ids, slots, slots, [Segment(0, n, slots)]))


def segments_of(varlen) -> list[Segment]:
    """The varlen batch's sequences: rows cu[b]:cu[b+1], context slots kv_slots[b, :kv_lens[b]]."""
    cu, lens = varlen.cu_seqlens_q.tolist(), varlen.kv_lens.tolist()
    return [Segment(cu[b], cu[b + 1] - cu[b], varlen.kv_slots[b, :lens[b]]) for b in range(len(lens))]
