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
from kernels.v4_attention import check_rows_inputs, check_v4_inputs

BIG_HEAD = 256  # above this head_dim, smaller head and key tiles keep the fp32 accumulator and a key tile on chip


@triton.jit
def _start_row(q_ptr, sinks_ptr, row64, head_tile, num_heads, stride_qs, stride_qh,
               HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DOT_TYPE: tl.constexpr):
    """A program's query tile (one row, BLOCK_H heads) and its online softmax started from the heads' sinks."""
    head = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = head < num_heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + row64 * stride_qs + head[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_TYPE)
    sink = tl.load(sinks_ptr + head, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = tl.maximum(sink, -1e30)  # finite, so a -inf sink or fully masked tiles give exp2(-inf) = 0
    l_i = tl.exp2(sink - m_i)
    return q, head, head_ok, d, d_ok, m_i, l_i, tl.zeros([BLOCK_H, BLOCK_D], tl.float32)


@triton.jit
def _store_row(out_ptr, row64, head, head_ok, d, d_ok, l_i, acc, stride_os, stride_oh):
    out = acc / l_i[:, None]
    tl.store(out_ptr + row64 * stride_os + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])


@triton.jit
def _indexed_keys(q, keys_ptr, index_ptr, stride_k, index_width, d, d_ok, m_i, l_i, acc, qk_scale,
                  BLOCK_N: tl.constexpr, DOT_TYPE: tl.constexpr):
    """Fold the keys one row's index list names (-1 skips) into its online softmax. A tile of -1s costs its index
    load only: a graph's lists are as wide as its longest context (every HCA entry), a row's own run often short."""
    for start in range(0, index_width, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        key = tl.load(index_ptr + j, mask=j < index_width, other=-1).to(tl.int64)
        if tl.max(key, axis=0) >= 0:
            key_ok = key >= 0
            k = tl.load(keys_ptr + key[:, None] * stride_k + d[None, :],
                        mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_TYPE)
            m_i, l_i, acc = _softmax_step(q, k, k, key_ok[None, :], m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


@triton.jit
def _v4_attention_kernel(
        out_ptr, q_ptr, window_ptr, entries_ptr, index_ptr, sinks_ptr, qk_scale,
        num_rows, num_heads, window_rows, window, index_width,
        stride_qs, stride_qh, stride_os, stride_oh, stride_w, stride_e, stride_i,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_TYPE: tl.constexpr):
    row64 = tl.program_id(0).to(tl.int64)
    q, head, head_ok, d, d_ok, m_i, l_i, acc = _start_row(q_ptr, sinks_ptr, row64, tl.program_id(1), num_heads,
                                                          stride_qs, stride_qh, HEAD_DIM, BLOCK_H, BLOCK_D, DOT_TYPE)
    last = window_rows - num_rows + tl.program_id(0)  # this row's own K=V in the window
    first = tl.maximum(last - window + 1, 0)
    for start in range(first, last + 1, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        key_ok = key <= last
        k = tl.load(window_ptr + key.to(tl.int64)[:, None] * stride_w + d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_TYPE)
        m_i, l_i, acc = _softmax_step(q, k, k, key_ok[None, :], m_i, l_i, acc, qk_scale)
    m_i, l_i, acc = _indexed_keys(q, entries_ptr, index_ptr + row64 * stride_i, stride_e, index_width, d, d_ok,
                                  m_i, l_i, acc, qk_scale, BLOCK_N, DOT_TYPE)
    _store_row(out_ptr, row64, head, head_ok, d, d_ok, l_i, acc, stride_os, stride_oh)


@triton.jit
def _v4_rows_kernel(
        out_ptr, q_ptr, window_ptr, window_index_ptr, entries_ptr, entry_index_ptr, sinks_ptr, qk_scale,
        num_heads, window_width, entry_width,
        stride_qs, stride_qh, stride_os, stride_oh, stride_w, stride_e, stride_wi, stride_ei,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_TYPE: tl.constexpr):
    """_v4_attention_kernel for rows of many sequences: the window's keys come by index too (from the rings)."""
    row64 = tl.program_id(0).to(tl.int64)
    q, head, head_ok, d, d_ok, m_i, l_i, acc = _start_row(q_ptr, sinks_ptr, row64, tl.program_id(1), num_heads,
                                                          stride_qs, stride_qh, HEAD_DIM, BLOCK_H, BLOCK_D, DOT_TYPE)
    m_i, l_i, acc = _indexed_keys(q, window_ptr, window_index_ptr + row64 * stride_wi, stride_w, window_width, d,
                                  d_ok, m_i, l_i, acc, qk_scale, BLOCK_N, DOT_TYPE)
    m_i, l_i, acc = _indexed_keys(q, entries_ptr, entry_index_ptr + row64 * stride_ei, stride_e, entry_width, d,
                                  d_ok, m_i, l_i, acc, qk_scale, BLOCK_N, DOT_TYPE)
    _store_row(out_ptr, row64, head, head_ok, d, d_ok, l_i, acc, stride_os, stride_oh)


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
    tiles = tile_options(H, D, window_kv.dtype)
    entries = entries if entries.shape[0] else window_kv  # an empty buffer has no pointer to pass; never read
    _v4_attention_kernel[(S, triton.cdiv(H, tiles["BLOCK_H"]))](
        out, q, window_kv, entries, entry_index, sinks, scale * math.log2(math.e),
        S, H, window_kv.shape[0], window, entry_index.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), window_kv.stride(0), entries.stride(0),
        entry_index.stride(0), **tiles)
    return out


def tile_options(heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Both kernels' tiles: past BIG_HEAD, the smallest head tile, 32 keys a tile and 8 warps."""
    big = head_dim > BIG_HEAD
    return dict(HEAD_DIM=head_dim, BLOCK_H=MIN_DOT if big else min(64, max(MIN_DOT, triton.next_power_of_2(heads))),
                BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_N=32 if big else 64,
                DOT_TYPE=tl.float32 if INTERPRETING else DOT_TYPES[dtype], num_warps=8 if big else 4)


def v4_rows_attention(q: torch.Tensor, window_keys: torch.Tensor, window_index: torch.Tensor, entries: torch.Tensor,
                      entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """The rows of many sequences, every key by index (twin: kernels.v4_attention.v4_rows_attention): q [T, H, D];
    row i sees window_keys[window_index[i, j]] and entries[entry_index[i, j]], -1 skipping -> [T, H, D]. No host
    sync, fixed shapes: what a CUDA graph of a DeepSeek-V4 decode / verify step replays."""
    check_rows_inputs(q, window_keys, window_index, entries, entry_index, sinks)
    require_triton_device(q, window_keys, window_index, entries, entry_index, sinks)
    tensors = (q, window_keys, window_index, entries, entry_index)
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("v4_rows_attention: q, the key buffers and the indexes need a contiguous last dim")
    T, H, D = q.shape
    out = torch.empty_like(q)
    if T == 0:
        return out
    tiles = tile_options(H, D, window_keys.dtype)
    entries = entries if entries.shape[0] else window_keys  # an empty buffer has no pointer to pass; never read
    _v4_rows_kernel[(T, triton.cdiv(H, tiles["BLOCK_H"]))](
        out, q, window_keys, window_index, entries, entry_index, sinks, scale * math.log2(math.e),
        H, window_index.shape[1], entry_index.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), window_keys.stride(0), entries.stride(0),
        window_index.stride(0), entry_index.stride(0), **tiles)
    return out
