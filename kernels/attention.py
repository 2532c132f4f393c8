"""Paged KV store and varlen attention: the plain-torch twins (CPU path and test oracle)."""
import torch
import torch.nn.functional as F


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor):
    """k, v: [T, Hkv, D]; caches: [Hkv, num_slots, D]; rows with slot -1 are padding and skipped."""
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence attending to itself: q [L, H, D], k/v [L, Hkv, D] -> [L, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor,
                    mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, Q, H, D] against keys gathered from the cache by kv_slots [B, L]; mask [B, Q, L] -> [B, Q, H, D]."""
    k, v = gather_kv(k_cache, v_cache, kv_slots)
    return grouped_attention(q, k, v, None if mask is None else mask.unsqueeze(2), scale)


def varlen_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           kv_slots: torch.Tensor, kv_lens: torch.Tensor, non_causal_tail: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """q [T, H, D] packed by cu_seqlens_q [B+1] (each sequence's newest tokens) against its kv_lens[b] keys
    kv_slots[b, :kv_len]; visibility as in attention_mask -> [T, H, D]."""
    q_lens = cu_seqlens_q.diff().tolist()
    tail = None if non_causal_tail is None else non_causal_tail.tolist()
    mask = attention_mask(q_lens, kv_lens.tolist(), tail)
    padded = torch.nn.utils.rnn.pad_sequence(list(q.split(q_lens)), batch_first=True)
    out = paged_attention(padded, k_cache, v_cache, kv_slots[:, :mask.shape[2]], mask, scale)
    return torch.cat([rows[:n] for rows, n in zip(out, q_lens)])


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    kv_slots: torch.Tensor, ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """A draft block: q/k/v [B, G, H(kv), D] attend, without a causal mask, to their sequence's first ctx_lens[b]
    cached context keys (gathered by kv_slots [B, L]) and to the whole block itself -> [B, G, H, D].
    The block's own K/V never touch the cache."""
    B, G = q.shape[:2]
    ctx_k, ctx_v = gather_kv(k_cache, v_cache, kv_slots)
    k = torch.cat([ctx_k, k.to(ctx_k.dtype).permute(2, 0, 1, 3)], dim=2)
    v = torch.cat([ctx_v, v.to(ctx_v.dtype).permute(2, 0, 1, 3)], dim=2)
    L = kv_slots.shape[1]
    visible = torch.cat([torch.arange(L)[None] < ctx_lens[:, None], torch.ones(B, G, dtype=torch.bool)], dim=1)
    return grouped_attention(q, k, v, visible.view(B, 1, 1, L + G), scale)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor):
    """Keys and values of kv_slots [B, L] from caches [Hkv, slots, D] -> two [Hkv, B, L, D]."""
    B, L = kv_slots.shape
    slots = kv_slots.reshape(-1)
    shape = (k_cache.shape[0], B, L, k_cache.shape[-1])
    return k_cache.index_select(1, slots).view(shape), v_cache.index_select(1, slots).view(shape)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """q [B, Q, H, D], k/v [Hkv, B, L, D], mask broadcastable to [B, Q, 1, L] (True = visible) -> [B, Q, H, D].
    Query heads are grouped under their KV head so each (KV head, sequence) is one small matmul, in the keys'
    dtype (fp32 on CPU, where batched bf16 matmuls are slow)."""
    B, Q, H, D = q.shape
    Hkv, L = k.shape[0], k.shape[2]
    G = H // Hkv
    qg = q.to(k.dtype).view(B, Q, Hkv, G, D).permute(2, 0, 3, 1, 4).reshape(Hkv, B, G * Q, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        keep = mask.expand(B, Q, 1, L).permute(2, 0, 1, 3).unsqueeze(2)  # [1, B, 1, Q, L]
        scores = scores.view(Hkv, B, G, Q, L).masked_fill_(~keep, float("-inf"))
    probs = scores.view(Hkv, B, G * Q, L).softmax(-1)
    out = torch.matmul(probs, v).view(Hkv, B, G, Q, D).permute(1, 3, 0, 2, 4)
    return out.reshape(B, Q, H, D).to(q.dtype)


def attention_mask(q_lens: list[int], kv_lens: list[int], non_causal_tail: list[int] | None = None) -> torch.Tensor:
    """[B, Qmax, Lmax] bool. Query i of sequence b (its q_len newest tokens) sees keys j <= kv_len - q_len + i;
    the last non_causal_tail[b] queries also see each other (a draft block attends bidirectionally)."""
    qmax, lmax = max(q_lens), max(kv_lens)
    q_len = torch.tensor(q_lens).view(-1, 1, 1)
    kv_len = torch.tensor(kv_lens).view(-1, 1, 1)
    i = torch.arange(qmax).view(1, -1, 1)
    j = torch.arange(lmax).view(1, 1, -1)
    limit = kv_len - q_len + i
    if non_causal_tail is not None:
        tail = torch.tensor(non_causal_tail).view(-1, 1, 1)
        limit = torch.where(i >= q_len - tail, kv_len - 1, limit)
    mask = (j <= limit) & (j < kv_len)
    mask |= (i >= q_len) & (j == 0)  # padding queries see one key so softmax stays finite
    return mask
