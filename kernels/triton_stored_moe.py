"""Grouped GEMMs over DeepSeek-V4's experts kept as stored (FP8 e4m3 with 128x128 block scales, MXFP4 e2m1 with e8m0
scales per 32 inputs) in Triton; twin and routing: kernels/stored_moe.py, same signature.

A program owns one block of route()'s pairs (one expert, up to BLOCK_M pairs) and a tile of BLOCK_N outputs. It
gathers its pairs' x rows, and walks K decoding its expert's stored bytes to the dot's dtype tile by tile, scale
applied in fp32, so no dense copy of any weight is made and each stored byte is read once per block: the released
V4-Flash experts stay in their 4.25 bits per weight on the GPU. The codes are decoded arithmetically (sign, exponent,
mantissa fields), which the interpreter runs as the GPU does. Blocks past the last run (block_expert -1) return at
once; their number depends only on the pair count, so a CUDA graph holds the whole MoE. vLLM's fused_moe_kernel has
this layout (sorted pair ids, one expert per block) and its MXFP4 / block-FP8 variants decode inside the loop; learned
from, not copied.

Checked without a GPU: the math under Triton's interpreter (against the twin, and through the engine against each
expert's dequantized weight) and that it compiles for sm_90 (tests/test_triton_compile.py). Not checked: its speed
and the tiles below, and dots on real tensor cores (the interpreter widens them to fp32)."""
import torch
import triton
import triton.language as tl

from kernels.stored_moe import Routing, check_inputs
from kernels.triton_attention import DOT_TYPES
from kernels.triton_support import INTERPRETING, require_triton_device

BLOCK_N, BLOCK_K = 64, 128  # BLOCK_K: one FP8 scale block, four MXFP4 groups


@triton.jit
def _e2m1(code):
    """MXFP4 codes (int32 0..15) -> float32: sign bit 3, exponent bits 1-2 (bias 1), mantissa bit 0."""
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.5, (2.0 + mantissa) * tl.exp2((exponent - 2).to(tl.float32)))
    return tl.where(code >= 8, -magnitude, magnitude)


@triton.jit
def _e4m3(byte):
    """FP8 e4m3 bytes (int32 0..255) -> float32: sign bit 7, exponent bits 3-6 (bias 7), mantissa bits 0-2."""
    exponent = (byte >> 3) & 15
    mantissa = (byte & 7).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125,  # subnormal: m / 8 * 2^-6
                         (8.0 + mantissa) * tl.exp2((exponent - 10).to(tl.float32)))
    return tl.where(byte >= 128, -magnitude, magnitude)


@triton.jit
def _stored_moe_kernel(
        out_ptr, x_ptr, w_ptr, scale_ptr, pairs_ptr, block_expert_ptr,
        num_pairs, rows_per_x, N, K,
        stride_x, stride_out, stride_we, stride_wn, stride_se, stride_sn,
        FP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_TYPE: tl.constexpr):
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair_ok = pair < num_pairs
    x_row = pair // rows_per_x
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    weights = w_ptr + expert * stride_we + n.to(tl.int64)[:, None] * stride_wn
    scales = scale_ptr + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w_ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + x_row[:, None] * stride_x + k[None, :], mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        if FP4:
            byte = tl.load(weights + (k // 2)[None, :], mask=w_ok, other=0).to(tl.int32)
            w = _e2m1((byte >> ((k % 2) * 4)[None, :]) & 15)
            exponent = tl.load(scales + n[:, None] * stride_sn + (k // 32)[None, :], mask=w_ok, other=127)
            w = w * tl.exp2(exponent.to(tl.float32) - 127.0)
        else:
            w = _e4m3(tl.load(weights + k[None, :], mask=w_ok, other=0).to(tl.int32))
            w = w * tl.load(scales + (n // 128)[:, None] * stride_sn + (k // 128)[None, :], mask=w_ok, other=0.0)
        acc += tl.dot(x.to(DOT_TYPE), tl.trans(w.to(DOT_TYPE)), input_precision="ieee")
    tl.store(out_ptr + pair[:, None] * stride_out + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=pair_ok[:, None] & n_ok[None, :])


def stored_moe_gemm(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fp4: bool, routing: Routing,
                    rows_per_x: int) -> torch.Tensor:
    """x [R, K] @ each pair's expert's weight.T -> [P, N] in x's dtype, zero rows for pairs routed to no expert
    (kernels/stored_moe.py says what the weights hold)."""
    check_inputs(x, data, scale, fp4, routing, rows_per_x)
    require_triton_device(x, data, scale, routing.pairs)
    if x.stride(1) != 1 or data.stride(2) != 1 or scale.stride(2) != 1:
        raise ValueError("stored_moe_gemm: x, data and scale need a contiguous last dim")
    num_pairs, n = routing.expert.numel(), data.shape[1]
    out = torch.zeros(num_pairs, n, dtype=x.dtype, device=x.device)
    if num_pairs == 0:
        return out
    scale = scale.view(torch.uint8) if fp4 else scale.float()
    _stored_moe_kernel[(routing.block_expert.numel(), triton.cdiv(n, BLOCK_N))](
        out, x, data.view(torch.uint8), scale, routing.pairs, routing.block_expert,
        num_pairs, rows_per_x, n, x.shape[1],
        x.stride(0), out.stride(0), data.stride(0), data.stride(1), scale.stride(0), scale.stride(1),
        FP4=fp4, BLOCK_M=routing.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        DOT_TYPE=tl.float32 if INTERPRETING else DOT_TYPES[x.dtype], num_warps=4)
    return out
