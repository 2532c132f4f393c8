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
    cos_c, sin_c = draft.rotary.cos_sin_at(torch.arange(S, device=features.device), dtype)
    cos_b, sin_b = draft.rotary.cos_sin_at(blocks.positions.reshape(-1), dtype)
    mask = block_attention_mask(blocks.anchors, S, G, blocks.context_start)
    x = draft.target[0](blocks.input_ids.reshape(-1)).to(dtype)
    for layer in draft.layers:
        attn = layer.self_attn
        xn = layer.input_layernorm(x)
        q = attn.q_proj(xn).view(A * G, attn.num_heads, attn.head_dim)
        q = apply_rotary(attn.q_norm(q), cos_b, sin_b)
        k_ctx, v_ctx = attn.key_values(ctx, cos_c, sin_c)
        k_blk, v_blk = attn.key_values(xn, cos_b, sin_b)
        k, v = torch.cat([k_ctx, k_blk]), torch.cat([v_ctx, v_blk])
        gqa = q.device.type == "cpu"  # on CUDA, a masked SDPA with GQA falls back to the math kernel (whole scores)
        if not gqa:
            k, v = (t.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=attn.scale, enable_gqa=gqa)
        x = x + attn.o_proj(out.transpose(0, 1).reshape(A * G, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return draft.norm(x).view(A, G, -1)


def teacher_forced_prev(blocks: Blocks) -> torch.Tensor:
    """The token before each block position, ground truth: [anchor token, label_0, ..., label_{G-2}]."""
    return torch.cat([blocks.input_ids[:, :1], blocks.labels[:, :-1]], dim=1)


def draft_logits(draft: DSparkDraft, hidden: torch.Tensor, prev: torch.Tensor, head_weight: torch.Tensor,
                 vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LM head (head_weight: the target's rows of vocab_ids, or all of them) plus the sequential head's fp32 bias,
    teacher-forced: [A, G, K] fp32."""
    logits = (hidden.flatten(0, 1).to(head_weight.dtype) @ head_weight.t()).float().view(*prev.shape, -1)
    bias = markov_bias(draft.markov_head, hidden, prev, vocab_ids)
    return logits if bias is None else logits + bias


def markov_bias(head, hidden: torch.Tensor, prev: torch.Tensor, vocab_ids: torch.Tensor | None = None):
    if head is None:
        return None
    with torch.autocast(hidden.device.type, enabled=False):  # the bias stays fp32, as when serving
        if type(head) is VanillaMarkov:  # stateless: every position at once, only the vocabulary's columns
            w2 = head.markov_w2.weight if vocab_ids is None else head.markov_w2.weight[vocab_ids]
            return F.linear(head.markov_w1(prev).float(), w2.float())
        state, biases = head.init_state(prev.shape[0], hidden.float()), []
        for k in range(prev.shape[1]):
            bias, state = head.step(prev[:, k], hidden[:, k].float(), state)
            biases.append(bias)
        bias = torch.stack(biases, dim=1)
    return bias if vocab_ids is None else bias[..., vocab_ids]


def confidence_logits(draft: DSparkDraft, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
    """Pre-sigmoid confidence [A, G] from [h_k ; W1[x_{k-1}]] (teacher-forced prev), or None without the head."""
    return None if draft.confidence_head is None else draft.confidence_logits_from_prev(hidden, prev)


def target_probs(lm_weight: torch.Tensor, last_hidden: torch.Tensor, blocks: Blocks,
                 vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The target's next-token distribution at each block position (for label k), normalised over the whole
    vocabulary, then cut to vocab_ids' columns: [A, G, K] fp32. Blocks overlap, so the LM head runs once per
    distinct position."""
    S = last_hidden.shape[0]
    rows, inverse = torch.unique(blocks.positions.clamp(max=S - 1), return_inverse=True)
    with torch.no_grad():
        probs = (last_hidden[rows].to(lm_weight.dtype) @ lm_weight.t()).float().softmax(-1)
        if vocab_ids is not None:
            probs = probs[:, vocab_ids]
    return probs[inverse]
