"""The DSpark / DFlash draft (DeepSpec `Qwen3DSparkModel`): a parallel backbone over the block
[anchor, mask x (G-1)] whose every layer also attends to projected target features (context K/V), then a sequential
head that samples the block left to right, and a confidence head."""
from dataclasses import dataclass

import torch
from torch import nn

from engine import distributed, parallel_step
from engine.context import TIMINGS
from engine.drafts.heads import SEQUENTIAL_HEADS, ConfidenceHead, VanillaMarkov
from engine.models.decoder import MLP, cached_decoder_stack
from engine.models.layers import (
    KERNEL_MAX_ROWS,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    column_linear,
    rope_inv_freq,
    row_linear,
)
from engine.parallel import fused_rows
from engine.sampler import SamplingTensors
from kernels import cpu_ops, triton_support
from kernels.dispatch import block_attention, store_kvcache
from kernels.sampling import sample_inverse_cdf


@dataclass
class DraftConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    target_layer_ids: list[int]
    mask_token_id: int
    markov_rank: int
    markov_head_type: str
    confidence_head: bool
    confidence_with_markov: bool
    hf: dict  # the whole config.json (MLP sizes, norms, rope)


@dataclass
class Proposal:
    """One request's drafted block: tokens, the fp32 distributions they were sampled from, confidences."""
    tokens: list[int]
    probs: torch.Tensor              # [G, V'] over the draft's vocabulary (DSparkDraft.vocab_ids; V' = V without one)
    confidence: torch.Tensor | None  # [G] conditional acceptance estimates
    confidence_logits: torch.Tensor | None = None  # [G] the same before STS temperatures (for calibration)


class DraftAttention(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        split, d = distributed.head_split(c.num_heads, c.num_kv_heads), c.head_dim  # this rank's heads
        self.num_heads, self.num_kv_heads, self.head_dim = split.q_count, split.kv_count, d
        eps = c.hf["rms_norm_eps"]
        q_part, kv_part = (split.q_start * d, split.q_count * d), (split.kv_start * d, split.kv_count * d)
        self.q_proj = column_linear(c.hidden_size, fused_rows([c.num_heads * d], [q_part]), bias=False)
        self.kv_proj = column_linear(c.hidden_size, fused_rows([c.num_kv_heads * d] * 2, [kv_part] * 2), bias=False)
        self.o_proj = row_linear(q_part, c.hidden_size, bias=False)
        self.q_norm, self.k_norm = RMSNorm(c.head_dim, eps), RMSNorm(c.head_dim, eps)
        self.scale = c.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)

    def key_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        k, v = self.kv_proj(x).view(*x.shape[:-1], 2 * self.num_kv_heads, self.head_dim).chunk(2, dim=-2)
        return apply_rotary(self.k_norm(k), cos, sin), v

    def store_context(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor):
        if self.fused_context(ctx):  # the target's C++ norm + rotary + store: the same values, no per-op dispatch
            kv = self.kv_proj(ctx)
            norm = self.k_norm.weight  # also passed as the (unused: no query heads) q norm
            _, k = cpu_ops.norm_rope(kv, cos, sin, norm, norm, self.k_norm.eps, 0, self.num_kv_heads)
            v = kv[:, self.num_kv_heads * self.head_dim:].view(-1, self.num_kv_heads, self.head_dim)
            cpu_ops.store_kv(k, v, self.k_cache, self.v_cache, slot_mapping)
            return
        k, v = self.key_values(ctx, cos, sin)
        store_kvcache(k, v, self.k_cache, self.v_cache, slot_mapping)

    def fused_context(self, ctx: torch.Tensor) -> bool:
        return (ctx.dim() == 2 and ctx.dtype == self.k_norm.weight.dtype and self.k_cache.dtype == torch.float32
                and cpu_ops.usable(ctx) and not triton_support.enabled())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_slots: torch.Tensor,
                ctx_lens: torch.Tensor) -> torch.Tensor:
        """x [B, G, h] (already input-normed), cos/sin [B, G, 1, D] -> [B, G, h]."""
        B, G = x.shape[:2]
        q = apply_rotary(self.q_norm(self.q_proj(x).view(B, G, self.num_heads, self.head_dim)), cos, sin)
        k, v = self.key_values(x, cos, sin)
        out = block_attention(q, k, v, self.k_cache, self.v_cache, kv_slots, ctx_lens, self.scale)
        return distributed.all_reduce(self.o_proj(out.reshape(B, G, -1)))


class DraftLayer(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        eps = c.hf["rms_norm_eps"]
        self.input_layernorm = RMSNorm(c.hidden_size, eps)
        self.self_attn = DraftAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps)
        self.mlp = MLP(c.hf)

    def forward(self, x, cos, sin, kv_slots, ctx_lens):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_slots, ctx_lens)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fused_weights(self) -> list[torch.Tensor]:
        """This layer in kernels/cpu_ops.decoder_stack's order (q and k/v projections as one qkv weight), or [] when
        a linear has no bf16 CPU kernel."""
        attn, none = self.self_attn, torch.empty(0)
        linears = [attn.q_proj, attn.kv_proj, attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj]
        if not all(lin.use_kernel for lin in linears):
            return []
        qkv = torch.cat([attn.q_proj.weight, attn.kv_proj.weight])
        return [self.input_layernorm.weight, qkv, none, attn.q_norm.weight, attn.k_norm.weight, attn.o_proj.weight,
                none, self.post_attention_layernorm.weight, self.mlp.gate_up_proj.weight, self.mlp.down_proj.weight,
                attn.k_cache, attn.v_cache]


class DSparkDraft(nn.Module):
    """Shares the target's embedding and LM head (attach_target); holds no copy of them."""
    context_window: int | None = None  # None: the draft step reads every context slot (a window draft: its width)

    def __init__(self, c: DraftConfig, use_sequential_head: bool = True):
        super().__init__()
        self.config = c
        h = c.hidden_size
        self.fc = Linear(len(c.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, c.hf["rms_norm_eps"])
        self.layers = nn.ModuleList(DraftLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(h, c.hf["rms_norm_eps"])
        vocab = c.hf["vocab_size"]
        self.markov_head = SEQUENTIAL_HEADS[c.markov_head_type](vocab, c.markov_rank, h) if c.markov_rank else None
        if c.confidence_head:
            self.confidence_head = ConfidenceHead(h + (c.markov_rank if c.confidence_with_markov else 0))
        else:
            self.confidence_head = None
        self.use_sequential_head = use_sequential_head and self.markov_head is not None
        self.rotary = self.make_rotary(c)
        self.target = ()
        self.vocab_ids = None   # the token ids the draft may propose (restrict_vocab), None = the whole vocabulary
        self.vocab_head = None  # the target's LM head rows of vocab_ids
        self.scratch_slots = None  # cache slots past the block tables, for the block's own K/V (fused CPU path)
        self.stack = (None, None)  # (k cache address, kernels/cpu_ops.decoder_stack of the layers)

    @staticmethod
    def make_rotary(c: DraftConfig) -> RotaryEmbedding:
        positions = c.hf.get("max_position_embeddings", 4096) + c.block_size
        with torch.device("cpu"):
            return RotaryEmbedding(c.head_dim, positions, rope_inv_freq(c.hf, c.head_dim))

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        c, kv_heads = self.config, self.layers[0].self_attn.num_kv_heads  # this rank's
        return 2 * c.num_layers * kv_heads * c.head_dim * kv_dtype.itemsize

    def allocate_kv_cache(self, num_slots: int, kv_dtype: torch.dtype, device: torch.device):
        """Context K/V in the target's slots, so one block table serves both. Past them, a few scratch slots that no
        block table owns hold the drafted block's own K/V on the CPU's fused path."""
        c, kv_heads = self.config, self.layers[0].self_attn.num_kv_heads
        self.kv_cache = torch.zeros(2, c.num_layers, kv_heads, num_slots + KERNEL_MAX_ROWS, c.head_dim,
                                    dtype=kv_dtype, device=device)
        self.scratch_slots = torch.arange(num_slots, num_slots + KERNEL_MAX_ROWS, device=device)
        for i, layer in enumerate(self.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def attach_target(self, embed_tokens: nn.Embedding, lm_head: nn.Module):
        self.target = (embed_tokens, lm_head)  # a tuple, so they are not registered as this module's parameters

    def restrict_vocab(self, token_ids: torch.Tensor):
        """Draft only among token_ids (FR-Spec): the LM head, the Markov bias and sampling shrink to those columns.
        Lossless still, since verification sees the draft's true distribution (zero outside the subset)."""
        lm_head = self.target[1]
        self.vocab_ids = token_ids.to(lm_head.weight.device, torch.long)
        self.vocab_head = Linear(lm_head.in_features, len(token_ids), bias=False).to(lm_head.weight)
        full = lm_head.full_weight() if hasattr(lm_head, "full_weight") else lm_head.weight.detach()  # TP: gathered
        self.vocab_head.weight.data = full[self.vocab_ids].clone()
        sliced = [self.vocab_head]
        if self.markov_head is not None:
            w2 = self.markov_head.markov_w2
            w2.weight.data = w2.weight.detach()[self.vocab_ids].clone()
            w2.out_features = len(token_ids)
            sliced.append(w2)
        if getattr(lm_head, "cpu_ready", False):  # already prepared for the CPU: prepare the slices too
            for linear in sliced:
                linear.pack_for_cpu()

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.vocab_head or self.target[1])(hidden).float()

    def block_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's hidden states -> the base logits the sampling reads."""
        return self.vocab_logits(hidden)

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into the draft's vocabulary."""
        return indices if self.vocab_ids is None else self.vocab_ids[indices]

    def full_vocab_probs(self, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[N, V'] draft-vocabulary rows -> [N, vocab_size], zero outside the draft's vocabulary."""
        if self.vocab_ids is None:
            return probs
        return probs.new_zeros(probs.shape[0], vocab_size).index_copy_(1, self.vocab_ids, probs)

    def context(self, features: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(self.fc(features))

    @torch.inference_mode()
    def extend_context(self, features: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor):
        """Write draft context K/V for committed target rows: features [N, n_layers * h] (target_layer_ids order),
        their positions and cache slots. Context rows get no input_layernorm."""
        if not features.shape[0]:
            return
        parallel_step.send_context(features, positions, slot_mapping)
        ctx = self.context(features.to(self.fc.weight.dtype))
        cos, sin = self.rotary.cos_sin_at(positions, ctx.dtype)
        for layer in self.layers:
            layer.self_attn.store_context(ctx, cos, sin, slot_mapping)

    def backbone(self, anchors: torch.Tensor, starts: torch.Tensor, kv_slots: torch.Tensor,
                 ctx_lens: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, block_size, h] of the blocks [anchor, mask...] at starts[b] + 0.."""
        embed = self.target[0]
        G = self.config.block_size
        ids = torch.full((anchors.shape[0], G), self.config.mask_token_id, device=anchors.device)
        ids[:, 0] = anchors
        x = embed(ids)
        positions = starts[:, None] + torch.arange(G, device=starts.device)
        cos, sin = self.rotary.cos_sin_at(positions.reshape(-1), x.dtype)
        stack = self.fused_stack(x)
        if stack is not None:
            return self.norm(self.stacked_backbone(stack, x, cos, sin, kv_slots, ctx_lens))
        cos, sin = cos.view(*positions.shape, 1, -1), sin.view(*positions.shape, 1, -1)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_slots, ctx_lens)
        return self.norm(x)

    def fused_stack(self, x: torch.Tensor):
        """The C++ decoder stack (the target's short-query path) for the block's layers on CPU with bf16 weights,
        or None: the block's rows are short queries that see their context and, through scratch slots, each other."""
        if (distributed.is_parallel() or self.scratch_slots is None or x.shape[0] * x.shape[1] > len(self.scratch_slots)
                or x.dtype != torch.bfloat16 or not cpu_ops.usable(x) or triton_support.enabled()):
            return None
        self.stack = cached_decoder_stack(self.stack, self.layers, self.config.hf["rms_norm_eps"])
        return self.stack[1]

    def stacked_backbone(self, stack, x, cos, sin, kv_slots, ctx_lens) -> torch.Tensor:
        """Block b's rows store their K/V in scratch slots and see its ctx_lens[b] context keys followed by those
        slots, all of them (no causal mask): the same attention as kernels.attention.block_attention."""
        B, G = x.shape[:2]
        scratch = self.scratch_slots[:B * G]
        after_context = ctx_lens[:, None] + torch.arange(G, device=x.device)
        keys = torch.cat([kv_slots, kv_slots.new_zeros(B, G)], 1).scatter_(1, after_context, scratch.view(B, G))
        row_seq = torch.arange(B, device=x.device).repeat_interleave(G)
        h, = stack.forward(x.reshape(B * G, -1), cos, sin, scratch, keys, row_seq, self.block_row_limits(ctx_lens, G),
                           [])
        return h.view(B, G, -1)

    @staticmethod
    def block_row_limits(ctx_lens: torch.Tensor, G: int) -> torch.Tensor:
        """Keys each row of the stacked block sees: all of its context and of its block, whatever its position."""
        return (ctx_lens + G).repeat_interleave(G)

    @torch.inference_mode()
    def draft_block(self, anchors, starts, kv_slots, ctx_lens, num_tokens: int, sampling: SamplingTensors,
                    uniforms: torch.Tensor, temperature_only: bool):
        """Draft num_tokens (<= block_size) tokens per request, driven by uniforms [B, num_tokens] -> tokens [B, G],
        probs [B, G, V], confidence and its logits [B, G] (or None). temperature_only: no request uses
        top-k/top-p/min-p (decided on the host from the requests' settings)."""
        parallel_step.send_draft(anchors, starts, kv_slots, ctx_lens, num_tokens)
        if temperature_only and self.has_fused_markov and triton_support.enabled():
            with TIMINGS.section("draft_fused"):
                return self.fused_block(anchors, starts, kv_slots, ctx_lens, num_tokens, sampling.temperature,
                                        uniforms)
        with TIMINGS.section("draft_backbone"):
            hidden = self.backbone(anchors, starts, kv_slots, ctx_lens)[:, :num_tokens]
        with TIMINGS.section("draft_lm_head"):
            base_logits = self.block_logits(hidden)
        tokens, probs = self.sample_block(hidden, base_logits, anchors, sampling, uniforms, temperature_only)
        with TIMINGS.section("confidence_head"):
            return (tokens, probs, *self.confidence(hidden, anchors, tokens))

    def sample_block(self, hidden, base_logits, anchors, sampling: SamplingTensors, uniforms: torch.Tensor,
                     temperature_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's tokens [B, G] and the distributions they were drawn from [B, G, V'], left to right through
        the sequential head (the C++ loop on CPU when it can), or position by position without one."""
        if temperature_only and self.has_fused_markov and cpu_ops.usable(base_logits):
            with TIMINGS.section("draft_sampling"):
                head = self.markov_head
                return cpu_ops.markov_sample(base_logits, anchors, head.markov_w1.weight, head.w2_transposed(),
                                             sampling.temperature, uniforms, self.vocab_ids)
        if self.use_sequential_head:
            return self.sample_sequentially(hidden, base_logits, anchors, sampling, uniforms)
        with TIMINGS.section("draft_sampling"):
            return self.sample_independently(base_logits, sampling, uniforms)

    def draft_collectives(self, anchors, starts, kv_slots, ctx_lens, num_tokens: int):
        """A tensor-parallel worker's part of draft_block: the calls that talk to the other ranks (rank 0 samples)."""
        hidden = self.backbone(anchors, starts, kv_slots, ctx_lens)[:, :num_tokens]
        if self.vocab_head is None:
            self.target[1](hidden)

    def fused_block(self, anchors, starts, kv_slots, ctx_lens, num_tokens: int, temperature: torch.Tensor,
                    uniforms: torch.Tensor):
        """The Triton path's whole draft step, with no host synchronisation (engine/graphs.py captures it): backbone,
        LM head, the fused Markov sampling loop, confidence."""
        from kernels import triton_markov
        hidden = self.backbone(anchors, starts, kv_slots, ctx_lens)[:, :num_tokens]
        head = self.markov_head
        tokens, probs = triton_markov.markov_sample(self.block_logits(hidden).contiguous(), anchors,
                                                    head.markov_w1.weight, head.markov_w2.weight, temperature,
                                                    uniforms.contiguous(), self.vocab_ids)
        return (tokens, probs, *self.confidence(hidden, anchors, tokens))

    def confidence(self, hidden, anchors, tokens) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(calibrated confidences, their logits) [B, G], or (None, None) without the head."""
        logits = self.confidence_logits(hidden, anchors, tokens)
        return (None, None) if logits is None else (self.confidence_head.calibrate(logits), logits)

    @staticmethod
    def proposals(tokens: torch.Tensor, probs: torch.Tensor, conf: torch.Tensor | None,
                  conf_logits: torch.Tensor | None) -> list[Proposal]:
        if conf is None:
            return [Proposal(t, probs[b], None) for b, t in enumerate(tokens.tolist())]
        return [Proposal(t, probs[b], conf[b], conf_logits[b]) for b, t in enumerate(tokens.tolist())]

    def sample_sequentially(self, hidden, base_logits, anchors, sampling, uniforms):
        B, G = base_logits.shape[:2]
        prev, state = anchors, self.markov_head.init_state(B, hidden)
        tokens, probs = [], []
        for k in range(G):
            with TIMINGS.section("sequential_head"):
                bias, state = self.markov_head.step(prev, hidden[:, k], state)
                logits = bias.add_(base_logits[:, k])
            with TIMINGS.section("draft_sampling"):
                q = sampling.probs(logits)
                prev = self.token_ids(sample_inverse_cdf(q, uniforms[:, k]))
            tokens.append(prev)
            probs.append(q)
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    @property
    def graph_capturable(self) -> bool:
        """The draft step can be a CUDA graph (engine/graphs.DraftGraphs runs fused_block)."""
        return self.has_fused_markov

    @property
    def has_fused_markov(self) -> bool:
        """A vanilla sequential head: the fused Triton loop (and the draft's CUDA graphs) cover it, for requests that
        sample with temperature only."""
        return self.use_sequential_head and type(self.markov_head) is VanillaMarkov

    def sample_independently(self, base_logits, sampling, uniforms):
        B, G, V = base_logits.shape
        q = sampling.repeat_interleave(G).probs(base_logits.reshape(B * G, V))
        return self.token_ids(sample_inverse_cdf(q, uniforms.reshape(-1))).view(B, G), q.view(B, G, V)

    @property
    def has_confidence(self) -> bool:
        return self.confidence_head is not None and self.use_sequential_head

    def confidence_logits(self, hidden: torch.Tensor, anchors: torch.Tensor,
                          tokens: torch.Tensor) -> torch.Tensor | None:
        if not self.has_confidence:
            return None
        return self.confidence_logits_from_prev(hidden, torch.cat([anchors[:, None], tokens[:, :-1]], dim=1))

    def confidence_logits_from_prev(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Uncalibrated confidence logits [B, G] from [h_k ; W1[prev_k]], prev [B, G] the token before each
        position (training passes the ground truth: teacher forcing)."""
        features = hidden
        if self.config.confidence_with_markov:
            features = torch.cat([hidden, self.markov_head.markov_w1(prev).to(hidden.dtype)], dim=-1)
        return self.confidence_head.logits(features)
