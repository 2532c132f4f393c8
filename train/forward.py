"""The draft's training forward: the same modules the engine serves with (engine/drafts/dspark.py), run over packed
anchored blocks with an exact dense mask instead of the paged cache, so gradients flow into the backbone, the
Markov head and the confidence head. Context K/V come from the cached target features of positions 0..S-1."""
import torch
import torch.nn.functional as F

from engine.drafts.dspark import DSparkDraft
from engine.drafts.heads import VanillaMarkov
from engine.models.layers import apply_rotary
from train.blocks import Blocks, block_attention_mask


def backbone_hidden(draft: DSparkDraft, features: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """features [S, n*h] -> final-normed hidden states [A, G, h] of every block."""
    A, G = blocks.input_ids.shape
    dtype = draft.fc.weight.dtype
    ctx = draft.context(features.to(dtype))
    S = ctx.shape[0]
    cos_c, sin_c = draft.rotary.cos_sin_at(torch.arange(S), dtype)
    cos_b, sin_b = draft.rotary.cos_sin_at(blocks.positions.reshape(-1), dtype)
    mask = block_attention_mask(blocks.anchors, S, G)
    x = draft.target[0](blocks.input_ids.reshape(-1)).to(dtype)
    for layer in draft.layers:
        attn = layer.self_attn
        xn = layer.input_layernorm(x)
        q = attn.q_proj(xn).view(A * G, attn.num_heads, attn.head_dim)
        q = apply_rotary(attn.q_norm(q), cos_b, sin_b)
        k_ctx, v_ctx = attn.key_values(ctx, cos_c, sin_c)
        k_blk, v_blk = attn.key_values(xn, cos_b, sin_b)
        k, v = torch.cat([k_ctx, k_blk]), torch.cat([v_ctx, v_blk])
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=attn.scale, enable_gqa=True)
        x = x + attn.o_proj(out.transpose(0, 1).reshape(A * G, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return draft.norm(x).view(A, G, -1)


def teacher_forced_prev(blocks: Blocks) -> torch.Tensor:
    """The token before each block position, ground truth: [anchor token, label_0, ..., label_{G-2}]."""
    return torch.cat([blocks.input_ids[:, :1], blocks.labels[:, :-1]], dim=1)


def draft_logits(draft: DSparkDraft, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """LM head plus the sequential head's bias, teacher-forced: [A, G, V] fp32 (the bias is added inside the GEMM)."""
    lm_weight = draft.target[1].weight
    flat = hidden.flatten(0, 1).to(lm_weight.dtype)
    bias = markov_bias(draft.markov_head, hidden, prev)
    if bias is None:
        return (flat @ lm_weight.t()).float().view(*prev.shape, -1)
    return torch.addmm(bias.flatten(0, 1), flat, lm_weight.t()).view(*prev.shape, -1)


def markov_bias(head, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
    if head is None:
        return None
    if type(head) is VanillaMarkov:  # stateless: every position at once
        return head.project(head.markov_w1(prev))
    state, biases = head.init_state(prev.shape[0], hidden), []
    for k in range(prev.shape[1]):
        bias, state = head.step(prev[:, k], hidden[:, k], state)
        biases.append(bias)
    return torch.stack(biases, dim=1)


def confidence_logits(draft: DSparkDraft, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
    """Pre-sigmoid confidence [A, G] from [h_k ; W1[x_{k-1}]] (teacher-forced prev), or None without the head."""
    return None if draft.confidence_head is None else draft.confidence_logits_from_prev(hidden, prev)


def target_probs(lm_head, last_hidden: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """The target's next-token distribution at each block position (for label k): [A, G, V] fp32. Blocks overlap,
    so the LM head runs once per distinct position."""
    S = last_hidden.shape[0]
    rows, inverse = torch.unique(blocks.positions.clamp(max=S - 1), return_inverse=True)
    with torch.no_grad():
        probs = lm_head(last_hidden[rows].to(lm_head.weight.dtype)).float().softmax(-1)
    return probs[inverse]
