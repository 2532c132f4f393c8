"""DeepSeek-V4's attention of one step in Triton (twin: kernels.v4_attention.v4_attention, same signature).

A program owns one query row and a tile of its heads: V4 has one shared K=V head, so every head of a row reads the
same keys under the same mask and the heads are the tile's M dimension, as in FlashMLA's sparse MLA kernels (one
query token's h_q heads over its top-k indices) and vLLM's DeepSeek-V3.2 / V4 sparse backends built on them. The row
walks its band of the window's K=V, then its entries, gathered inside the kernel from the paged entries buffer by
entry_index (-1 skips; FlashMLA's convention), so neither the selected entries nor a dense mask are materialised.
The head's sink starts the online softmax as a key of value zero (m = sink, l = 1): its mass is dropped and a row
that sees no key yields 0. fp32 accumulators; K and V are the same load.

Checked without a GPU: the math under Triton's interpreter (against the twin and the engine's sink_attention) and
that it compiles for sm_90 (tests/test_triton_compile.py). Not checked: its speed, the tile sizes and warps chosen
below for head_dim 512, and bf16/fp16 dots on real tensor cores (the interpreter widens them to fp32)."""
import math

import torch
import triton
import triton.language as tl

from kernels.triton_attention import DOT_TYPES, MIN_DOT, _softmax_step
from kernels.triton_support import INTERPRETING, require_triton_device
from kernels.v4_attention import check_v4_inputs

BIG_HEAD = 256  # above this head_dim, smaller head and key tiles keep the fp32 accumulator and a key tile on chip


@triton.jit
def _v4_attention_kernel(
        out_ptr, q_ptr, window_ptr, entries_ptr, index_ptr, sinks_ptr, qk_scale,
        num_rows, num_heads, window_rows, window, index_width,
        stride_qs, stride_qh, stride_os, stride_oh, stride_w, stride_e, stride_i,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_TYPE: tl.constexpr):
    row, head_tile = tl.program_id(0), tl.program_id(1)
    head = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = head < num_heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row64 = row.to(tl.int64)
    q = tl.load(q_ptr + row64 * stride_qs + head[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_TYPE)
    sink = tl.load(sinks_ptr + head, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = tl.maximum(sink, -1e30)  # finite, so a -inf sink or fully masked tiles give exp2(-inf) = 0
    l_i = tl.exp2(sink - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    last = window_rows - num_rows + row  # this row's own K=V in the window
    first = tl.maximum(last - window + 1, 0)
    for start in range(first, last + 1, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        key_ok = key <= last
        k = tl.load(window_ptr + key.to(tl.int64)[:, None] * stride_w + d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_TYPE)
        m_i, l_i, acc = _softmax_step(q, k, k, key_ok[None, :], m_i, l_i, acc, qk_scale)

    for start in range(0, index_width, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        entry = tl.load(index_ptr + row64 * stride_i + j, mask=j < index_width, other=-1).to(tl.int64)
        entry_ok = entry >= 0
        k = tl.load(entries_ptr + entry[:, None] * stride_e + d[None, :],
                    mask=entry_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_TYPE)
        m_i, l_i, acc = _softmax_step(q, k, k, entry_ok[None, :], m_i, l_i, acc, qk_scale)

    out = acc / l_i[:, None]
    tl.store(out_ptr + row64 * stride_os + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])


def v4_attention(q: torch.Tensor, window_kv: torch.Tensor, window: int, entries: torch.Tensor,
                 entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, H, D]: a sequence's newest S rows; window_kv [W, D]: the K=V of its positions up to the newest, row i
    sitting at W - S + i and seeing the last `window` of them up to itself; entries [E, D]: the paged entries buffer,
    of which row i also sees entries[entry_index[i, j]] for each entry_index[i, j] >= 0 ([S, J]); sinks [H]: each
    head's sink logit -> [S, H, D] in q's dtype. An index past E is not checked (it would cost a host sync)."""
    check_v4_inputs(q, window_kv, window, entries, entry_index, sinks)
    require_triton_device(q, window_kv, entries, entry_index, sinks)
    if q.stride(-1) != 1 or window_kv.stride(-1) != 1 or entries.stride(-1) != 1 or entry_index.stride(-1) != 1:
        raise ValueError("v4_attention: q, window_kv, entries and entry_index need a contiguous last dim")
    S, H, D = q.shape
    out = torch.empty_like(q)
    if S == 0:
        return out
    big = D > BIG_HEAD
    block_h = MIN_DOT if big else min(64, max(MIN_DOT, triton.next_power_of_2(H)))
    grid = (S, triton.cdiv(H, block_h))
    entries = entries if entries.shape[0] else window_kv  # an empty buffer has no pointer to pass; never read
    _v4_attention_kernel[grid](
        out, q, window_kv, entries, entry_index, sinks, scale * math.log2(math.e),
        S, H, window_kv.shape[0], window, entry_index.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), window_kv.stride(0), entries.stride(0),
        entry_index.stride(0),
        HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=max(MIN_DOT, triton.next_power_of_2(D)), BLOCK_N=32 if big else 64,
        DOT_TYPE=tl.float32 if INTERPRETING else DOT_TYPES[window_kv.dtype], num_warps=8 if big else 4)
    return out
