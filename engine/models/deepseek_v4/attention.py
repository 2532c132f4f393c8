"""DeepSeek-V4's attention: low-rank Q (wq_a, q_norm, wq_b, a unit RMS norm per head), one shared K=V head (wkv,
kv_norm), partial interleaved rope, a causal sliding window, and on compressed layers the compressor's entries (each a
softmax-gated sum of `ratio` tokens' projections; CSA's windows overlap by one window and its Lightning indexer keeps
the top-k entries per query; HCA attends to every finished entry); a learned sink per head; the output's rope undone,
then the grouped low-rank output (wo_a per group, wo_b). Released names (vLLM's DeepSeek-V4 model code); the math
follows transformers 5.24's modeling_deepseek_v4.py: an entry w is visible to the query at position t once its window
has ended, w < (t + 1) // ratio.

What a sequence needs from its past lives in per-token caches indexed by KV slot (the engine's paged block tables):
the window's K=V, and each compressor's raw projections (wkv, wgate). Entries are pooled from them when a step needs
them, so an entry depends only on committed tokens: rolling back rejected tokens is truncating the block table, a
chunked prefill sees exactly what a one-shot prefill sees, and the prefix cache shares every part."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.deepseek_v4.config import V4Config
from engine.models.deepseek_v4.mhc import unit_rms
from engine.models.deepseek_v4.rope import cos_sin, inv_freq, rotate
from engine.models.layers import Linear


@dataclass
class Segment:
    """One sequence's rows in a step: rows start..start+length of the flat batch are its last `length` positions,
    and context_slots [L] are the cache slots of all its positions 0..L-1 (the new ones included)."""
    start: int
    length: int
    context_slots: torch.Tensor

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)


class V4Norm(nn.Module):
    """RMSNorm with an fp32 weight, applied in fp32 and cast back once."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class Compressor(nn.Module):
    """Every `ratio` tokens -> one entry of size dim: softmax over the window's slots of gate + ape, per channel,
    weighting the tokens' projections; overlapping (CSA) windows also take the previous window's first half."""

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.width = (2 if overlap else 1) * dim
        self.wkv, self.wgate = Linear(hidden, self.width, bias=False), Linear(hidden, self.width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, self.width, dtype=torch.float32))
        self.norm = V4Norm(dim, eps)
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        self.cache = None  # [slots, 2 * width]: each token's wkv | wgate

    def store(self, x: torch.Tensor, slot_mapping: torch.Tensor):
        self.cache[slot_mapping] = torch.cat([self.wkv(x), self.wgate(x)], -1).to(self.cache.dtype)

    def entries(self, context_slots: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The entries of a sequence's complete windows [L // ratio, dim], rope at each window's first position."""
        n = context_slots.shape[0] // self.ratio
        raw = self.cache[context_slots[:n * self.ratio]].to(dtype).unflatten(0, (n, self.ratio))
        kv, gate = raw[..., :self.width], raw[..., self.width:] + self.ape
        if self.overlap:
            kv, gate = self.overlapped(kv, 0.0), self.overlapped(gate, float("-inf"))
        pooled = (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(1)
        cos, sin = cos_sin(freqs, torch.arange(n, device=raw.device) * self.ratio)
        return rotate(self.norm(pooled), cos, sin)

    def overlapped(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """[n, r, 2d] -> [n, 2r, d]: window w's slots are window w-1's first halves, then its own second halves."""
        n, r, d = t.shape[0], self.ratio, self.dim
        out = t.new_full((n, 2 * r, d), fill)
        out[:, r:] = t[..., d:]
        out[1:, :r] = t[:-1, :, :d]
        return out


class Indexer(nn.Module):
    """The Lightning indexer: score(t, s) = sum_h w[t,h] * relu(q[t,h] . k[s]) / sqrt(d) over its own compressed
    keys; the top-k visible entries per query, ties to the earlier entry."""

    def __init__(self, config: V4Config, ratio: int):
        super().__init__()
        d, heads = config.index_head_dim, config.index_n_heads
        self.wq_b = Linear(config.q_lora_rank, heads * d, bias=False)
        self.weights_proj = Linear(config.hidden_size, heads, bias=False)
        self.compressor = Compressor(config.hidden_size, d, ratio, True, config.rms_norm_eps)
        self.heads, self.dim, self.top_k = heads, d, config.index_topk

    def select(self, x: torch.Tensor, q_low: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """A sequence's query rows -> [q, T] bool: the entries each attends to (visible says which have ended)."""
        q = rotate(self.wq_b(q_low).unflatten(-1, (self.heads, self.dim)), cos, sin)
        scores = F.relu(torch.einsum("shd,td->sht", q.float(), keys.float())) * self.dim ** -0.5
        weights = self.weights_proj(x).float() * self.heads ** -0.5
        scores = (scores * weights.unsqueeze(-1)).sum(1).masked_fill(~visible, float("-inf"))
        chosen = torch.zeros_like(visible)
        if keys.shape[0]:  # ties (every head's ReLU at zero) go to the earlier entry, whatever the entry count
            order = scores.sort(dim=-1, descending=True, stable=True).indices
            chosen.scatter_(1, order[:, :min(self.top_k, keys.shape[0])], True)
        return chosen & visible


class V4Attention(nn.Module):
    def __init__(self, config: V4Config, layer: int):
        super().__init__()
        c, hidden, d = config, config.hidden_size, config.head_dim
        self.wq_a = Linear(hidden, c.q_lora_rank, bias=False)
        self.q_norm = V4Norm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = Linear(c.q_lora_rank, c.num_heads * d, bias=False)
        self.wkv = Linear(hidden, d, bias=False)
        self.kv_norm = V4Norm(d, c.rms_norm_eps)
        self.wo_a = Linear(c.num_heads * d // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, hidden, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(c.num_heads, dtype=torch.float32))
        self.kind, self.ratio = c.layer_kinds[layer], c.compress_ratios[layer]
        if self.kind != "window":
            self.compressor = Compressor(hidden, d, self.ratio, self.kind == "csa", c.rms_norm_eps)
        if self.kind == "csa":
            self.indexer = Indexer(c, self.ratio)
        self.make_rope(c)
        self.heads, self.dim, self.groups, self.window = c.num_heads, d, c.o_groups, c.sliding_window
        self.eps = c.rms_norm_eps
        self.kv_cache = None  # [slots, head_dim]: each token's K=V after norm and rope

    def make_rope(self, c: V4Config):
        """The rope frequencies (not in the checkpoint: made again after a load on the meta device). A compressed
        layer's queries, keys, entries and indexer share the compress rope; a window-only layer has the plain one."""
        with torch.device("cpu"):
            freqs = (inv_freq(c.rope_head_dim, c.rope_theta) if self.kind == "window" else
                     inv_freq(c.rope_head_dim, c.compress_rope_theta, c.compress_rope_scaling))
        self.register_buffer("freqs", freqs, persistent=False)

    def caches(self) -> list[nn.Module]:
        """The compressors whose raw projections are cached per token (besides this layer's K=V)."""
        return [m for m in (getattr(self, "compressor", None), getattr(getattr(self, "indexer", None),
                                                                        "compressor", None)) if m is not None]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                segments: list[Segment]) -> torch.Tensor:
        """x [N, hidden]: the step's rows of every sequence; their K=V and compressor projections go to the caches at
        slot_mapping first, then each sequence attends over its context there."""
        cos, sin = cos_sin(self.freqs, positions)
        q_low = self.q_norm(self.wq_a(x))
        q = rotate(unit_rms(self.wq_b(q_low).unflatten(-1, (self.heads, self.dim)), self.eps), cos, sin)
        self.kv_cache[slot_mapping] = rotate(self.kv_norm(self.wkv(x)), cos, sin).to(self.kv_cache.dtype)
        for compressor in self.caches():
            compressor.store(x, slot_mapping)
        out = torch.empty_like(q)
        for seg in segments:
            rows = seg.rows
            keys, allowed = self.context(x[rows], q_low[rows], positions[rows], cos[rows], sin[rows],
                                         seg.context_slots)
            out[seg.rows] = sink_attention(q[seg.rows], keys, allowed, self.attn_sink, self.dim ** -0.5)
        grouped = rotate(out, cos, -sin).reshape(x.shape[0], self.groups, -1)
        w = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])
        return self.wo_b(torch.einsum("sgi,gri->sgr", grouped, w.to(grouped.dtype)).flatten(1))

    def context(self, x: torch.Tensor, q_low: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, slots: torch.Tensor):
        """A sequence's keys (its window's K=V, then the compressor's entries) and which each query row sees; cos / sin
        are its rows' rope angles."""
        keys = self.kv_cache[slots].to(x.dtype)
        gap = positions[:, None] - torch.arange(slots.shape[0], device=x.device)[None, :]
        allowed = (gap >= 0) & (gap < self.window)
        if self.kind == "window":
            return keys, allowed
        entries = self.compressor.entries(slots, self.freqs, x.dtype)
        visible = torch.arange(entries.shape[0], device=x.device)[None, :] < ((positions + 1) // self.ratio)[:, None]
        if self.kind == "csa":
            index_keys = self.indexer.compressor.entries(slots, self.freqs, x.dtype)
            visible = self.indexer.select(x, q_low, cos, sin, index_keys, visible)
        return torch.cat([keys, entries]), torch.cat([allowed, visible], 1)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """q [S, H, D] over shared keys = values [K, D] where allowed [S, K]; each head's softmax also has its sink
    logit, whose probability mass is dropped (a learned 'attend to nothing')."""
    logits = torch.einsum("shd,kd->hsk", q, keys).float() * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(-1, 1, 1).expand(-1, q.shape[0], 1)
    probs = torch.cat([logits, sink], -1).softmax(-1)[..., :-1]
    return torch.einsum("hsk,kd->shd", probs.to(keys.dtype), keys)
