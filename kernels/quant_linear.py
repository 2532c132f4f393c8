"""Linear layers over GGUF weight blocks kept in their own types (kernels/csrc/quant_linear.cpp; built with the other
CPU kernels by kernels/cpu_build):

    from kernels import quant_linear
    if quant_linear.available():
        y = quant_linear.linear(x, blocks, Q4_1, k)    # x [..., K] bf16/fp32, blocks uint8 [N, row_bytes(Q4_1, K)]
        w = quant_linear.dequantize(blocks, Q4_1, k)   # fp32 [N, K], or only the rows asked for (embeddings)

A weight is the GGUF tensor's bytes as they are in the file, one row of blocks per output feature. The result is
the type's GGML dequantization times x in fp32 (bf16 x widened exactly), in x's dtype: it differs from
`gguf.quants.dequantize(...) @ x` only in fp32 rounding and summation order. Each row is unpacked once per call
whatever the number of input rows, so decode-sized steps read ~3x fewer bytes than a bf16 weight (Q4_1); long
prefills take dequantize() and a GEMM instead (the caller's choice). bf16 x over Q4_0 / Q4_1 / Q8_0 on CPUs with
AVX512-BF16 takes a dot-product path that never writes a dequantized row (kernels/csrc/quant_linear_avx512.cpp).
Every row's result is independent of the other rows (batch invariant). Uses torch.get_num_threads() threads;
inference only.

pack() rearranges Q4_0 / Q4_1 / Q8_0 blocks (same bytes, same size) into tiles of 16 output rows for
linear_packed(), the AVX512-BF16 kernel for bf16 x of any row count (kernels/csrc/quant_packed_avx512.cpp): a
block's scale applies to 16 outputs at once, so 8-64 rows cost what the bf16 kernel does and 1-4 rows ~2.5x less;
dequantize_packed() reads the packed weight back.
"""
import torch

from kernels.cpu_build import available, module

__all__ = ["BLOCK_SHAPES", "F16", "PACKED_TYPES", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0", "available", "dequantize",
           "dequantize_packed", "linear", "linear_packed", "pack", "packed_available", "row_bytes"]

F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 1, 2, 3, 8, 12, 14  # GGML type ids (gguf.GGMLQuantizationType values)
BLOCK_SHAPES = {F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210)}


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of k elements of this type; ValueError for a type without a kernel or a ragged k."""
    if qtype not in BLOCK_SHAPES:
        raise ValueError(f"GGML type {qtype} has no CPU kernel (supported: {sorted(BLOCK_SHAPES)})")
    elements, nbytes = BLOCK_SHAPES[qtype]
    if k % elements:
        raise ValueError(f"rows of {k} elements do not split into blocks of {elements}")
    return k // elements * nbytes


def ops():
    module()  # loads the extension, which registers torch.ops.dspark_quant
    return torch.ops.dspark_quant


def linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int, k: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ dequant(blocks).T (+ bias) -> [..., N] in x's dtype, accumulated in fp32."""
    return ops().linear(x, blocks, qtype, k, bias)


def dequantize(blocks: torch.Tensor, qtype: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The weight's rows (all, or those indexed by rows) in fp32 [R, k]."""
    return ops().dequantize(blocks, qtype, k, rows)


def quant_name(qtype: int) -> str:
    return {F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}.get(qtype, str(qtype))


def avx512() -> bool:
    return available() and ops().avx512()


# ---- bf16 x over weights repacked in tiles of 16 output rows (kernels/csrc/quant_packed_avx512.cpp) ----

PACKED_TYPES = (Q4_0, Q4_1, Q8_0)


def packed_available() -> bool:
    """The x16-packed kernel runs here (AVX512-BF16)."""
    return available() and ops().packed_available()


def pack(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """GGUF blocks uint8 [N, row_bytes] -> the x16 layout uint8 [ceil(N / 16), row_bytes * 16] (Q4_0/Q4_1/Q8_0)."""
    return ops().pack(blocks, qtype, k)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, qtype: int, k: int, n: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 x [..., k] @ dequant(W).T (+ bias) -> bf16 [..., n], W packed by pack(); fp32 accumulation."""
    return ops().linear_packed(x, packed, qtype, k, n, bias)


def dequantize_packed(packed: torch.Tensor, qtype: int, k: int, n: int,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize() for a packed weight of n rows."""
    return ops().dequantize_packed(packed, qtype, k, n, rows)
