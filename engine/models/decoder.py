"""The Llama / Qwen2 / Qwen3 decoder family over one flattened varlen batch."""
import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed
from engine.context import get_context
from engine.models.layers import (
    KERNEL_MAX_ROWS,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    attend,
    column_linear,
    embedding,
    lm_head,
    rope_inv_freq,
    row_linear,
)
from engine.parallel import fused_rows
from kernels import cpu_ops

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


class Attention(nn.Module):
    def __init__(self, c: dict, family: str):
        super().__init__()
        heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = d = c.get("head_dim") or c["hidden_size"] // heads
        split = distributed.head_split(heads, kv_heads)  # this rank's heads (all of them in one process)
        self.num_heads, self.num_kv_heads = split.q_count, split.kv_count
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        bias = family == "qwen2" or c.get("attention_bias", False)
        q_part, kv_part = (split.q_start * d, self.q_size), (split.kv_start * d, self.kv_size)
        shard = fused_rows([heads * d, kv_heads * d, kv_heads * d], [q_part, kv_part, kv_part])
        self.qkv_proj = column_linear(c["hidden_size"], shard, bias)
        self.o_proj = row_linear(q_part, c["hidden_size"], c.get("attention_bias", False) and family != "qwen2")
        self.qk_norm = family == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c["rms_norm_eps"])
            self.k_norm = RMSNorm(self.head_dim, c["rms_norm_eps"])
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = self.fused_norm_rope(qkv, cos, sin) if cpu_ops.usable(qkv) else self.norm_rope(qkv, cos, sin)
        out = attend(q, k, v, self.k_cache, self.v_cache, self.scale)
        return distributed.all_reduce(self.o_proj(out.reshape(-1, self.q_size)))

    def fused_norm_rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        eps = self.q_norm.eps if self.qk_norm else 0.0
        q, k = cpu_ops.norm_rope(qkv, cos, sin, *norms, eps, self.num_heads, self.num_kv_heads)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        return q, k, v

    def norm_rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        qkv = qkv.view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        q, k = apply_rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        full = c["intermediate_size"]
        part = distributed.split(full)
        self.intermediate = part[1]
        self.gate_up_proj = column_linear(c["hidden_size"], fused_rows([full, full], [part, part]), bias=False)
        self.down_proj = row_linear(part, c["hidden_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_ops.usable(gate_up):
            return distributed.all_reduce(self.down_proj(cpu_ops.silu_mul(gate_up)))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return distributed.all_reduce(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, c: dict, family: str):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c, family)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MLP(c)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def fused_weights(self) -> list[torch.Tensor]:
        """This layer's tensors in kernels/cpu_ops.decoder_stack's order: bf16 weights, or GGUF weights packed in
        tiles of 16 rows (engine/models/quant.py), then each linear's (type, K, N) meta."""
        attn, none = self.self_attn, torch.empty(0)
        norms = [attn.q_norm.weight, attn.k_norm.weight] if attn.qk_norm else [none, none]
        linears = [attn.qkv_proj, attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj]
        packed = [getattr(lin, "packed", False) for lin in linears]
        if not all(lin.use_kernel or p for lin, p in zip(linears, packed)):
            return []
        weights = [lin.blocks if p else lin.weight for lin, p in zip(linears, packed)]
        bias = [none if lin.bias is None else lin.bias for lin in linears[:2]]
        tensors = [self.input_layernorm.weight, weights[0], bias[0], *norms, weights[1], bias[1],
                   self.post_attention_layernorm.weight, weights[2], weights[3], attn.k_cache, attn.v_cache]
        if not any(packed):
            return tensors
        return tensors + [torch.tensor([lin.qtype, lin.in_features, lin.out_features]) if p else none
                          for lin, p in zip(linears, packed)]


def cached_decoder_stack(cached: tuple, layers, eps: float) -> tuple:
    """(k cache address, kernels/cpu_ops.decoder_stack of layers or None when a layer has no fused weights), rebuilt
    only when the layers' K cache moved. Each layer has .fused_weights() and .self_attn with the head sizes."""
    key = layers[0].self_attn.k_cache.data_ptr()
    if cached[0] == key:
        return cached
    weights = [layer.fused_weights() for layer in layers]
    attn = layers[0].self_attn
    if not all(weights):
        return key, None
    return key, cpu_ops.decoder_stack(weights, attn.num_heads, attn.num_kv_heads, attn.head_dim, eps)


class DecoderModel(nn.Module):
    """Causal LM; forward returns final normed hidden states and the raw outputs of `capture_layers`, in that
    order (layer -1 = the embeddings)."""

    def __init__(self, c: dict):
        super().__init__()
        family = ARCHITECTURES[c["architectures"][0]]
        self.config = c
        self.embed_tokens = embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(c, family) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.rotary = self.make_rotary()
        self.tie_word_embeddings = c.get("tie_word_embeddings", False)
        self.lm_head = lm_head(c["hidden_size"], c["vocab_size"])
        self.stack = (None, None)  # (k cache address, kernels/cpu_ops.decoder_stack) for short-query steps

    own_attention = False  # False: the runner picks its attention backend (torch twins, Triton, FlashInfer)
    feeds_drafts = True   # its layers' outputs can be captured for a DSpark / DFlash draft

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        attn = self.layers[0].self_attn
        return 2 * len(self.layers) * attn.num_kv_heads * attn.head_dim * dtype.itemsize

    def allocate_kv_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[2, layers, kv heads, slots, head_dim]; each layer's attention gets its K and V views."""
        attn = self.layers[0].self_attn
        cache = torch.zeros(2, len(self.layers), attn.num_kv_heads, num_slots, attn.head_dim, dtype=dtype,
                            device=device)
        for i, layer in enumerate(self.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = cache[0, i], cache[1, i]
        return cache

    def make_rotary(self) -> RotaryEmbedding:
        head_dim = self.layers[0].self_attn.head_dim
        positions = self.config.get("max_position_embeddings", 4096)
        with torch.device("cpu"):
            return RotaryEmbedding(head_dim, positions, rope_inv_freq(self.config, head_dim))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin_at(positions, h.dtype)
        captured = {-1: h} if -1 in capture_layers else {}
        stack = self.fused_stack(h)
        if stack is not None:
            g, layer_ids = get_context().groups[0], [i for i in capture_layers if i >= 0]
            h, *outs = stack.forward(h, cos, sin, get_context().slot_mapping, g.kv_slots, g.row_seq, g.row_limit,
                                     layer_ids)
            captured.update(zip(layer_ids, outs))
            return self.norm(h), [captured[i] for i in capture_layers]
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin)
            if i in capture_layers:
                captured[i] = h
        return self.norm(h), [captured[i] for i in capture_layers]

    def fused_stack(self, h: torch.Tensor):
        """The C++ decoder stack when this step is short queries only (decode / verify) on bf16 (or x16-packed GGUF)
        weights, else None."""
        groups = get_context().groups
        if (distributed.is_parallel() or len(groups) != 1 or groups[0].row_limit is None or h.shape[0] > KERNEL_MAX_ROWS
                or h.dtype != torch.bfloat16 or not cpu_ops.usable(h)):
            return None
        self.stack = cached_decoder_stack(self.stack, self.layers, self.config["rms_norm_eps"])
        return self.stack[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
