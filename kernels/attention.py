"""Paged KV store and varlen attention: the plain-torch twins (CPU path and test oracle)."""
import torch
import torch.nn.functional as F


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor):
    """k, v: [T, Hkv, D]; caches: [num_slots, Hkv, D]; rows with slot -1 are padding and skipped."""
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence attending to itself: q [L, H, D], k/v [L, Hkv, D] -> [L, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor,
                    mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, Q, H, D] against keys gathered from the cache by kv_slots [B, L]; mask [B, 1, Q, L] -> [B, Q, H, D]."""
    k = k_cache[kv_slots].transpose(1, 2)
    v = v_cache[kv_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def attention_mask(q_lens: list[int], kv_lens: list[int], non_causal_tail: list[int] | None = None) -> torch.Tensor:
    """[B, 1, Qmax, Lmax] bool. Query i of sequence b (its q_len newest tokens) sees keys j <= kv_len - q_len + i;
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
    return mask.unsqueeze(1)
