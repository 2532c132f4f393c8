import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed
from engine.context import get_context
from engine.parallel import Shard, columns, vocab_shard
from kernels import cpu_linear, cpu_ops, dispatch
from kernels.attention import causal_attention, paged_attention, store_kvcache

BF16_GEMV_MAX_ROWS = 2   # torch's bf16 GEMV beats fp32 GEMM only for a row or two on CPUs without native bf16
KERNEL_MAX_ROWS = 96     # our bf16 kernel beats oneDNN's packed fp32 GEMM up to ~100 rows (docs/benchmarks.md)


class Linear(nn.Linear):
    """nn.Linear with a CPU fast path for bf16 weights: few rows (decode, verify, drafts) go through our kernel that
    reads the bf16 weight once (kernels/cpu_linear: AVX2, or AVX512-BF16 where the CPU has it). Many rows (prefill)
    go through oneDNN: its bf16 GEMM on CPUs with native bf16, else an oneDNN-packed fp32 copy, since bf16 GEMM has
    no fast kernel on AVX2-only CPUs (exact on bf16 weights, cast back)."""
    packed_weight = packed_bias = None
    use_kernel = cpu_ready = False

    def keep_stored(self, stored: nn.Module):
        """Hold the weight as stored(dtype) makes it on each call (DeepSeek-V4's FP8 / MXFP4 bytes kept on the
        device: engine/models/deepseek_v4/stored.py) instead of a dense parameter."""
        del self.weight
        self.weight = None
        self.stored = stored  # a submodule: its buffers move with the model

    @property
    def kept(self) -> nn.Module | None:
        """The stored weight's module, if the weight is kept as stored."""
        return self._modules.get("stored")

    def grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """x [S, groups, in] -> [S, groups, out / groups]: group g through the g-th block of the weight's rows."""
        if self.kept is not None and (out := self.kept.grouped_linear(x, groups)) is not None:
            return out
        weight = self.kept(x.dtype) if self.kept is not None else self.weight
        return torch.einsum("sgi,gri->sgr", x, weight.view(groups, -1, x.shape[-1]).to(x.dtype))

    def pack_for_cpu(self):
        self.cpu_ready = True
        if self.kept is not None:
            return
        self.use_kernel = self.weight.dtype == torch.bfloat16 and cpu_linear.available()
        if self.use_kernel and cpu_linear.native_bf16_available():
            return  # oneDNN bf16 GEMM: ~2x the packed fp32 copy here (docs/benchmarks.md), in half the memory
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().float(), 1)
        self.packed_bias = None if self.bias is None else self.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (kept := self.kept) is not None:
            return kept.linear(x, self.bias)
        rows = x.numel() // x.shape[-1]
        if self.use_kernel and rows <= KERNEL_MAX_ROWS:
            return cpu_linear.bf16_linear(x, self.weight, self.bias)
        if self.packed_weight is None or (x.dtype == torch.bfloat16 and rows <= BF16_GEMV_MAX_ROWS):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        flat = x.reshape(rows, x.shape[-1]).float()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.packed_bias, "none", [], "")
        return out.view(*x.shape[:-1], -1).to(x.dtype)


def column_linear(in_features: int, shard: Shard, bias: bool) -> Linear:
    """A column-parallel linear: this rank's output rows of the full weight (no communication)."""
    linear = Linear(in_features, sum(count for _, count in shard.ranges), bias=bias)
    linear.shard = shard if distributed.is_parallel() else None
    return linear


def row_linear(part: tuple[int, int], out_features: int, bias: bool) -> Linear:
    """A row-parallel linear: this rank's input columns; its caller all-reduces the partial outputs (once per block)."""
    linear = Linear(part[1], out_features, bias=bias)
    linear.shard = columns(part) if distributed.is_parallel() else None
    return linear


class ReducedLinear(Linear):
    """A row-parallel linear that all-reduces its own output: for code shared with one process that has no all-reduce
    of its own (DeepSeek-V4's attention output, engine/models/deepseek_v4/parallel.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(super().forward(x))


def reduced_row_linear(part: tuple[int, int], out_features: int) -> ReducedLinear:
    linear = ReducedLinear(part[1], out_features, bias=False)
    linear.shard = columns(part) if distributed.is_parallel() else None
    return linear


class ParallelEmbedding(nn.Module):
    """A vocabulary-parallel embedding: this rank's rows; ids outside them read zeros, and the all-reduce adds the
    one rank that holds each id (vLLM's VocabParallelEmbedding)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.shard, self.start, self.count = vocab_shard(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.shard.pad_to, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.count)
        out = F.embedding(torch.where(inside, local, 0), self.weight)
        return distributed.all_reduce(out.masked_fill_(~inside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """A vocabulary-parallel LM head: logits of this rank's rows, gathered from every rank into the whole row."""

    def __init__(self, hidden_size: int, vocab_size: int):
        self.vocab_size = vocab_size
        shard, _, _ = vocab_shard(vocab_size)
        super().__init__(hidden_size, shard.pad_to, bias=False)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather_last(super().forward(x))[..., :self.vocab_size]

    def full_weight(self) -> torch.Tensor:
        """Every rank's rows, whole (start-up only: a draft's FR-Spec head takes rows of it)."""
        return distributed.all_gather_rows(self.weight.detach())[:self.vocab_size]


def embedding(vocab_size: int, hidden_size: int) -> nn.Module:
    return ParallelEmbedding(vocab_size, hidden_size) if distributed.is_parallel() else nn.Embedding(vocab_size,
                                                                                                      hidden_size)


def lm_head(hidden_size: int, vocab_size: int) -> Linear:
    if distributed.is_parallel():
        return ParallelLMHead(hidden_size, vocab_size)
    return Linear(hidden_size, vocab_size, bias=False)


def pack_linears_for_cpu(model: nn.Module):
    if torch.backends.mkldnn.is_available():
        for module in model.modules():
            if isinstance(module, Linear):
                module.pack_for_cpu()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype and cpu_ops.usable(x):
            return cpu_ops.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, inv_freq: torch.Tensor):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def cos_sin_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_inv_freq(config: dict, head_dim: int) -> torch.Tensor:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if kind == "default":
        return inv_freq
    if kind == "llama3":
        return llama3_scaled(inv_freq, rope)
    raise NotImplementedError(f"rope type {kind!r} is not supported (supported: default, llama3)")


def llama3_scaled(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, smoothed, scaled)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] of the flat batch -> [T, H, D], through the paged cache."""
    ctx = get_context()
    if ctx.varlen is not None or ctx.planned is not None:
        return varlen_attend(q, k, v, k_cache, v_cache, scale, ctx)
    fused = cpu_ops.usable(q)
    if fused:
        cpu_ops.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    else:
        store_kvcache(k, v, k_cache, v_cache, ctx.slot_mapping)
    outs = []
    for g in ctx.groups:
        rows = slice(g.row_start, g.row_start + g.num_rows)
        if fused and g.row_limit is not None:
            outs.append(cpu_ops.paged_attention(q[rows], k_cache, v_cache, g.kv_slots, g.row_seq, g.row_limit, scale))
            continue
        if g.causal:
            outs.append(causal_attention(q[rows], k[rows], v[rows], scale))
            continue
        gq = q[rows].view(g.batch, g.q_len, *q.shape[1:]) if g.q_rows is None else q[g.q_rows]
        out = paged_attention(gq, k_cache, v_cache, g.kv_slots, g.mask, scale).reshape(-1, *q.shape[1:])
        outs.append(out if g.out_rows is None else out[g.out_rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def varlen_attend(q, k, v, k_cache, v_cache, scale: float, ctx) -> torch.Tensor:
    """The Triton path: store the step's K/V, then one varlen paged attention call over every row (FlashInfer's when
    the step was planned for it, else ours)."""
    from kernels.triton_attention import varlen_paged_attention
    dispatch.store_kvcache(k, v, k_cache, v_cache, ctx.slot_mapping)
    if ctx.planned is not None:
        return ctx.planned.run(q, k_cache, v_cache)
    b = ctx.varlen
    return varlen_paged_attention(q, k_cache, v_cache, b.cu_seqlens_q, b.kv_slots, b.kv_lens, None, scale,
                                  b.max_q_len)
