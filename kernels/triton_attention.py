"""Paged varlen flash attention in Triton: one kernel for prefill, chunked prefill, decode, verify and draft blocks
(twins: kernels.attention.varlen_paged_attention and kernels.attention.block_attention).

A program owns one sequence, one KV head and a tile of rows, each row a (query, query head of that KV head's group)
pair, so GQA loads every key once per group. It walks the sequence's cached keys through kv_slots, then, for a
draft block, the block's own keys, with an online softmax and fp32 accumulators."""
import math

import torch
import triton
import triton.language as tl

from kernels.triton_support import INTERPRETING, require_triton_device

MAX_ROWS = 64  # rows (query x grouped head) per program
KEY_BLOCK = 64  # keys per softmax step
MIN_DOT = 16  # tl.dot needs every tile dim >= 16 on the GPU

# The interpreter mishandles bf16 arithmetic, so there every operand is widened to fp32 before tl.dot.
DOT_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale):
    """Fold one key tile (k, v [N, D]; visible [M, N]) into the running max m_i, sum l_i and output acc."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _varlen_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_q_ptr, kv_slots_ptr, kv_lens_ptr, tail_ptr,
        k_block_ptr, v_block_ptr, qk_scale,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_ch, stride_cs, stride_slots, stride_bt, stride_bh,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_TYPE: tl.constexpr,
        HAS_TAIL: tl.constexpr, HAS_BLOCK_KV: tl.constexpr):
    q_tile, seq, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + seq)
    tail = tl.load(tail_ptr + seq) if HAS_TAIL else 0

    rows = tl.arange(0, BLOCK_Q * GROUP_P)
    query = q_tile * BLOCK_Q + rows // GROUP_P
    head = kv_head * GROUP + rows % GROUP_P
    row_ok = (query < q_len) & (rows % GROUP_P < GROUP)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_rows = (q_start + query).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_TYPE)
    # Last cached key each row sees: its causal position, or the newest key for the non-causal tail.
    last_key = tl.where(query >= q_len - tail, kv_len - 1, kv_len - q_len + query)
    kv_stop = tl.max(tl.where(row_ok, last_key, -1), 0) + 1

    m_i = tl.full([BLOCK_Q * GROUP_P], -1e30, tl.float32)  # finite, so fully masked tiles give exp2(-inf) = 0
    l_i = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P, BLOCK_D], tl.float32)
    head_base = kv_head.to(tl.int64) * stride_ch
    for start in range(0, kv_stop, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        slot = tl.load(kv_slots_ptr + seq * stride_slots + key, mask=key < kv_stop, other=0).to(tl.int64)
        offs = head_base + slot[:, None] * stride_cs + d[None, :]
        kv_mask = (key < kv_stop)[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(DOT_TYPE)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(DOT_TYPE)
        m_i, l_i, acc = _softmax_step(q, k, v, key[None, :] <= last_key[:, None], m_i, l_i, acc, qk_scale)

    if HAS_BLOCK_KV:  # a draft block: its own keys sit beside its queries, all visible to all of them
        for start in range(0, q_len, BLOCK_N):
            key = start + tl.arange(0, BLOCK_N)
            offs = (q_start + key).to(tl.int64)[:, None] * stride_bt + kv_head * stride_bh + d[None, :]
            kv_mask = (key < q_len)[:, None] & d_ok[None, :]
            k = tl.load(k_block_ptr + offs, mask=kv_mask, other=0.0).to(DOT_TYPE)
            v = tl.load(v_block_ptr + offs, mask=kv_mask, other=0.0).to(DOT_TYPE)
            m_i, l_i, acc = _softmax_step(q, k, v, (key < q_len)[None, :], m_i, l_i, acc, qk_scale)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key (kv_len 0) yields 0, not NaN
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def varlen_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           kv_slots: torch.Tensor, kv_lens: torch.Tensor, non_causal_tail: torch.Tensor | None,
                           scale: float, max_q_len: int | None = None) -> torch.Tensor:
    """q [T, H, D] packed by cu_seqlens_q [B+1] (each sequence's newest q_len tokens) against its kv_lens[b] keys
    kv_slots[b, :kv_len] in caches [Hkv, slots, D]; query i sees key j <= kv_len - q_len + i, or every key when it is
    among the last non_causal_tail[b] queries -> [T, H, D]. Pass max_q_len to skip a host sync (CUDA graphs)."""
    check_varlen_inputs(q, k_cache, v_cache, cu_seqlens_q, kv_slots, kv_lens, non_causal_tail)
    require_triton_device(q, k_cache, v_cache, cu_seqlens_q, kv_slots, kv_lens)
    if max_q_len is None:
        max_q_len = int(cu_seqlens_q.diff().max()) if q.shape[0] else 0
    return _launch(q, k_cache, v_cache, cu_seqlens_q, kv_slots, kv_lens, non_causal_tail, None, None, scale,
                   max_q_len)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    kv_slots: torch.Tensor, ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """A draft block: q/k/v [B, G, H(kv), D] attend, without a causal mask, to their sequence's first ctx_lens[b]
    cached keys (gathered by kv_slots [B, L]) and to the whole block itself -> [B, G, H, D]."""
    B, G, H, D = q.shape
    Hkv = k_cache.shape[0]
    if k.shape != (B, G, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"block_attention: block k {tuple(k.shape)} / v {tuple(v.shape)} must be "
                         f"[{B}, {G}, {Hkv}, {D}] to match q {tuple(q.shape)} and the caches")
    cu_seqlens_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * G
    whole_block = torch.full((B,), G, device=q.device, dtype=torch.int32)
    flat_q = q.reshape(B * G, H, D)
    flat_k = k.reshape(B * G, Hkv, D).to(k_cache.dtype).contiguous()
    flat_v = v.reshape(B * G, Hkv, D).to(v_cache.dtype).contiguous()
    check_varlen_inputs(flat_q, k_cache, v_cache, cu_seqlens_q, kv_slots, ctx_lens, whole_block)
    require_triton_device(q, k, v, k_cache, v_cache, kv_slots, ctx_lens)
    out = _launch(flat_q, k_cache, v_cache, cu_seqlens_q, kv_slots, ctx_lens, whole_block,
                  flat_k, flat_v, scale, G)
    return out.view(B, G, H, D)


def check_varlen_inputs(q, k_cache, v_cache, cu_seqlens_q, kv_slots, kv_lens, non_causal_tail):
    """Shape checks that need no host sync; a wrong shape would otherwise read out of bounds on the GPU."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: q {tuple(q.shape)} must be [T, H, D] and the caches equal [Hkv, slots, D], "
                         f"got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if q.shape[2] != k_cache.shape[2] or q.shape[1] % k_cache.shape[0]:
        raise ValueError(f"attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} "
                         "(head_dim must match and query heads be a multiple of KV heads)")
    B = kv_slots.shape[0] if kv_slots.dim() == 2 else -1
    if cu_seqlens_q.shape != (B + 1,) or kv_lens.shape != (B,):
        raise ValueError(f"attention: kv_slots {tuple(kv_slots.shape)} must be [B, L] with cu_seqlens_q [B+1] and "
                         f"kv_lens [B], got {tuple(cu_seqlens_q.shape)} and {tuple(kv_lens.shape)}")
    if non_causal_tail is not None and non_causal_tail.shape != (B,):
        raise ValueError(f"attention: non_causal_tail {tuple(non_causal_tail.shape)} must be [{B}]")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() \
            or kv_slots.stride(-1) != 1:
        raise ValueError("attention: q, kv_slots and the caches need a contiguous last dim (and equal cache strides)")


def _launch(q, k_cache, v_cache, cu_seqlens_q, kv_slots, kv_lens, non_causal_tail, k_block, v_block, scale,
            max_q_len):
    T, H, D = q.shape
    Hkv = k_cache.shape[0]
    group = H // Hkv
    group_p = triton.next_power_of_2(group)
    rows = max(MIN_DOT, group_p, min(MAX_ROWS, triton.next_power_of_2(max(max_q_len, 1)) * group_p))
    block_q = rows // group_p
    out = torch.empty_like(q)  # rows past cu_seqlens_q[-1] (padding) are left unwritten
    if T == 0 or max_q_len == 0:
        return out
    has_block_kv = k_block is not None
    k_block = k_block if has_block_kv else q  # unused placeholders keep the signature fixed
    v_block = v_block if has_block_kv else q
    grid = (triton.cdiv(max_q_len, block_q), kv_slots.shape[0], Hkv)
    _varlen_attention_kernel[grid](
        out, q, k_cache, v_cache, cu_seqlens_q, kv_slots, kv_lens,
        kv_lens if non_causal_tail is None else non_causal_tail, k_block, v_block, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        kv_slots.stride(0), k_block.stride(0), k_block.stride(1),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, HEAD_DIM=D, BLOCK_D=max(MIN_DOT, triton.next_power_of_2(D)),
        BLOCK_N=KEY_BLOCK, DOT_TYPE=tl.float32 if INTERPRETING else DOT_TYPES[k_cache.dtype],
        HAS_TAIL=non_causal_tail is not None, HAS_BLOCK_KV=has_block_kv)
    return out
