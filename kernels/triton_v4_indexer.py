"""DeepSeek-V4's Lightning indexer scores in Triton (twin: kernels/v4_indexer.py, same signature): a program owns one
row and a tile of BLOCK_J of its entry slots, gathers those keys from the paged buffer by index, scores them against
all the row's heads in one dot ([heads, d] x [d, BLOCK_J]), and sums the heads' ReLUs weighted, so only [R, J] scores
are written: neither the gathered keys [R, J, d] nor the per-head scores [R, H, J] are materialised, which is what
kept CUDA graphs of a fixed-shape step to short contexts. vLLM's DeepSeek-V3.2 / V4 indexer (DeepGEMM's paged MQA
logits, then a top-k per row) has this split; learned from, not copied. fp32 dot (IEEE), as the torch path computes,
so the ranking matches it.

Checked without a GPU: against the twin and a by-hand sum under Triton's interpreter, and compiled for sm_90
(tests/test_triton_compile.py). Not checked: its speed and tiles."""
import torch
import triton
import triton.language as tl

from kernels.triton_support import require_triton_device
from kernels.v4_indexer import check_indexer_inputs

BLOCK_J = 32  # entry slots per program


@triton.jit
def _indexer_kernel(out_ptr, q_ptr, weights_ptr, keys_ptr, index_ptr, scale, num_heads, width,
                    stride_qr, stride_qh, stride_wr, stride_k, stride_ir, stride_or,
                    DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    head = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    head_ok, d_ok = head < num_heads, d < DIM
    entry = tl.load(index_ptr + row * stride_ir + j, mask=j < width, other=-1).to(tl.int64)
    entry_ok = entry >= 0
    score = tl.full([BLOCK_J], float("-inf"), tl.float32)
    if tl.max(entry, axis=0) >= 0:  # a tile past the row's visible entries costs its index load only
        q = tl.load(q_ptr + row * stride_qr + head[:, None] * stride_qh + d[None, :],
                    mask=head_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        k = tl.load(keys_ptr + entry[:, None] * stride_k + d[None, :], mask=entry_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        scores = tl.maximum(tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0) * scale
        w = tl.load(weights_ptr + row * stride_wr + head, mask=head_ok, other=0.0).to(tl.float32)
        score = tl.where(entry_ok, tl.sum(scores * w[:, None], axis=0), float("-inf"))
    tl.store(out_ptr + row * stride_or + j, score, mask=j < width)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, index: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """q [R, H, d], weights [R, H], keys [E, d], index [R, J] (-1: none) -> float32 [R, J], -inf where none."""
    check_indexer_inputs(q, weights, keys, index)
    require_triton_device(q, weights, keys, index)
    if any(t.stride(-1) != 1 for t in (q, weights, keys, index)):
        raise ValueError("indexer_scores: q, weights, keys and index need a contiguous last dim")
    (R, H, D), J = q.shape, index.shape[1]
    out = torch.empty(R, J, dtype=torch.float32, device=q.device)
    if R == 0 or J == 0:
        return out
    keys = keys if keys.shape[0] else q.new_zeros(1, D)  # an empty buffer has no pointer to pass; never read
    _indexer_kernel[(R, triton.cdiv(J, BLOCK_J))](
        out, q, weights, keys, index, scale, H, J,
        q.stride(0), q.stride(1), weights.stride(0), keys.stride(0), index.stride(0), out.stride(0),
        DIM=D, BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_J=BLOCK_J, num_warps=4)
    return out
