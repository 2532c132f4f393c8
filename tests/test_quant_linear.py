"""kernels/quant_linear (linear and row dequantization over GGUF blocks in their own types) against the `gguf`
library: a weight quantized by gguf.quants.quantize (F16, Q4_0, Q4_1, Q8_0), or, for the K-quants gguf can only
decode, random blocks laid out by the format's definition (fp16 scales set finite, every other byte random, so every
nibble / 6-bit scale / high-bit pattern occurs); our result must equal gguf.quants.dequantize(blocks) @ x.

Tolerance: the kernel computes the GGML formula in fp32 and sums in fp32, so against an fp64 product of gguf's fp32
dequantization it may differ by summation rounding only: |y - ref| <= 1e-5 * (|W| @ |x|) + 1e-6 per output (a
wrong or missing term costs ~1/K of that scale, far above it), plus bf16's final rounding (2^-8 |ref|) when x is bf16.
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from kernels import quant_linear

pytestmark = pytest.mark.skipif(not quant_linear.available(), reason="CPU kernels unavailable here")

ROWS = (1, 3, 27, 200)  # decode, verify, a few dozen (draft / batched verify), a prefill
# (type, N, K): odd N everywhere; K an odd number of blocks (F16: an odd K, so the k % 16 tail runs)
CASES = [(T.F16, 37, 77), (T.Q4_0, 67, 32 * 13), (T.Q4_1, 41, 32 * 19), (T.Q8_0, 29, 32 * 7),
         (T.Q4_K, 23, 256 * 3), (T.Q6_K, 19, 256 * 3)]
GGUF_QUANTIZES = (T.F16, T.Q4_0, T.Q4_1, T.Q8_0)
HALF_FIELDS = {T.Q4_K: (0, 2), T.Q6_K: (208,)}  # byte offsets of each K-quant block's fp16 scales


def weight_blocks(qtype: T, n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [n, row bytes]: the GGUF bytes of an n x k weight of this type."""
    rng = np.random.default_rng(seed)
    if qtype in GGUF_QUANTIZES:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
        w[0, :8] += 3.0  # an outlier: a block whose scale differs from the rest
        return np.ascontiguousarray(quantize(w, qtype)).view(np.uint8).reshape(n, -1)
    elements, nbytes = quant_linear.BLOCK_SHAPES[int(qtype)]
    blocks = rng.integers(0, 256, size=(n, k // elements, nbytes), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        scales = (rng.uniform(0.002, 0.02, size=(n, k // elements)) * rng.choice([-1, 1], (n, k // elements)))
        blocks[..., offset:offset + 2] = scales.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


def reference(blocks: np.ndarray, qtype: T, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gguf's dequantization @ x in fp64, |W| @ |x|: the summation-error scale)."""
    w = torch.from_numpy(dequantize(blocks, qtype).astype(np.float64))
    xd = x.double()
    return xd @ w.T, xd.abs() @ w.abs().T


def assert_close(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor):
    tol = 1e-5 * scale + 1e-6
    if y.dtype == torch.bfloat16:
        tol = tol + ref.abs() * 2.0 ** -8
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, max err/tol {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype,n,k", CASES, ids=[c[0].name for c in CASES])
def test_linear_equals_gguf_dequantize_matmul(qtype, n, k, dtype):
    blocks = weight_blocks(qtype, n, k, seed=int(qtype))
    packed = torch.from_numpy(blocks)
    g = torch.Generator().manual_seed(k)
    for m in ROWS:
        x = torch.randn(m, k, generator=g).to(dtype)
        y = quant_linear.linear(x, packed, int(qtype), k)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close(y, *reference(blocks, qtype, x))


@pytest.mark.parametrize("qtype,n,k", CASES, ids=[c[0].name for c in CASES])
def test_dequantize_equals_gguf(qtype, n, k):
    blocks = weight_blocks(qtype, n, k, seed=int(qtype) + 1)
    expected = torch.from_numpy(dequantize(blocks, qtype).astype(np.float32))
    packed = torch.from_numpy(blocks)
    assert torch.equal(quant_linear.dequantize(packed, int(qtype), k), expected)  # the same fp32 formula: exact
    rows = torch.tensor([n - 1, 0, 5, 5])
    assert torch.equal(quant_linear.dequantize(packed, int(qtype), k, rows), expected[rows])


def test_leading_dims_and_bias():
    qtype, n, k = T.Q4_1, 33, 64
    blocks = weight_blocks(qtype, n, k, seed=7)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    y = quant_linear.linear(x, torch.from_numpy(blocks), int(qtype), k, bias)
    ref, scale = reference(blocks, qtype, x.reshape(-1, k))
    assert y.shape == (2, 5, n)
    assert_close(y.reshape(-1, n), ref + bias.double(), scale + bias.double().abs())


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K], ids=["Q4_1", "Q6_K"])
def test_negative_control_corrupted_scale_fails(qtype):
    """One flipped bit in one block's fp16 scale: the check above must fail on that row, and only there."""
    n, k = 9, 256 * 2
    blocks = weight_blocks(qtype, n, k, seed=3)
    corrupted = blocks.copy()
    offset = HALF_FIELDS.get(qtype, (0,))[0] + 1  # the high byte of the first block's scale d
    corrupted[4, offset] ^= 0x04  # scale x2^+-1 (an exponent bit)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    ref, scale = reference(blocks, qtype, x)
    y = quant_linear.linear(x, torch.from_numpy(corrupted), int(qtype), k)
    with pytest.raises(AssertionError, match="max err"):
        assert_close(y, ref, scale)
    keep = torch.arange(n) != 4
    assert_close(y[:, keep], ref[:, keep], scale[:, keep])


def test_negative_control_wrong_type_fails():
    """Q4_0 bytes read as Q4_1 (another block size): refused; Q4_1 bytes with Q4_0's formula: wrong values."""
    n, k = 5, 64
    q4_1 = weight_blocks(T.Q4_1, n, k, seed=4)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="bytes"):
        quant_linear.linear(x, torch.from_numpy(weight_blocks(T.Q4_0, n, k, seed=4)), int(T.Q4_1), k)
    as_q4_0 = np.ascontiguousarray(q4_1.reshape(n, -1, 20)[..., 2:].reshape(n, -1))  # 18-byte blocks, m dropped
    y = quant_linear.linear(x, torch.from_numpy(as_q4_0), int(T.Q4_0), k)
    with pytest.raises(AssertionError, match="max err"):
        assert_close(y, *reference(q4_1, T.Q4_1, x))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="GGML type 6 has no CPU kernel"):
        quant_linear.row_bytes(6, 64)  # Q5_0
    with pytest.raises(ValueError, match="blocks of 32"):
        quant_linear.row_bytes(int(T.Q4_1), 48)
    with pytest.raises(RuntimeError, match="has no kernel"):
        quant_linear.linear(torch.randn(1, 64), torch.zeros(1, 44, dtype=torch.uint8), 6, 64)
    with pytest.raises(RuntimeError, match="outside"):
        quant_linear.dequantize(torch.zeros(3, 40, dtype=torch.uint8), int(T.Q4_1), 64, torch.tensor([3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype,n,k", CASES, ids=[c[0].name for c in CASES])
def test_rows_are_batch_invariant(qtype, n, k, dtype):
    """A row's result is bitwise the same alone or among others (verify rows equal decode rows)."""
    packed = torch.from_numpy(weight_blocks(qtype, n, k, seed=11))
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(12)).to(dtype)
    together = quant_linear.linear(x, packed, int(qtype), k)
    for i in (0, 5, 10):
        assert torch.equal(quant_linear.linear(x[i:i + 1], packed, int(qtype), k), together[i:i + 1])


# ---- the x16-packed layout (kernels/csrc/quant_packed_avx512.cpp): bf16 x, Q4_0 / Q4_1 / Q8_0 ----

needs_packed = pytest.mark.skipif(not quant_linear.packed_available(), reason="no AVX512-BF16 here")
PACKED_CASES = [(T.Q4_0, 67, 32 * 13), (T.Q4_1, 41, 32 * 19), (T.Q8_0, 29, 32 * 7), (T.Q4_1, 16, 32)]
# decode; 2..8 rows (one pass); 9, 16, 27, 64 (several passes of 8, a ragged last one); a prefill
PACKED_ROWS = (1, 2, 5, 8, 9, 16, 27, 64, 200)


def packed_weight(qtype: T, n: int, k: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    blocks = weight_blocks(qtype, n, k, seed)
    return blocks, quant_linear.pack(torch.from_numpy(blocks), int(qtype), k)


@needs_packed
@pytest.mark.parametrize("qtype,n,k", PACKED_CASES, ids=[f"{c[0].name}-{c[1]}x{c[2]}" for c in PACKED_CASES])
def test_packed_linear_equals_gguf_dequantize_matmul(qtype, n, k):
    """Every row count the engine sends (decode, verify, draft, prefill) on odd shapes: N not a multiple of 16 (a
    partial last group), K an odd number of blocks."""
    blocks, packed = packed_weight(qtype, n, k, seed=int(qtype) + 20)
    assert packed.shape == ((n + 15) // 16, quant_linear.row_bytes(int(qtype), k) * 16)
    g = torch.Generator().manual_seed(k + 1)
    for m in PACKED_ROWS:
        x = torch.randn(m, k, generator=g).bfloat16()
        y = quant_linear.linear_packed(x, packed, int(qtype), k, n)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert_close(y, *reference(blocks, qtype, x))


@needs_packed
@pytest.mark.parametrize("qtype,n,k", PACKED_CASES[:3], ids=[c[0].name for c in PACKED_CASES[:3]])
def test_packed_dequantize_equals_gguf(qtype, n, k):
    blocks, packed = packed_weight(qtype, n, k, seed=int(qtype) + 21)
    expected = torch.from_numpy(dequantize(blocks, qtype).astype(np.float32))
    assert torch.equal(quant_linear.dequantize_packed(packed, int(qtype), k, n), expected)
    rows = torch.tensor([n - 1, 0, 17, 17])
    assert torch.equal(quant_linear.dequantize_packed(packed, int(qtype), k, n, rows), expected[rows])


@needs_packed
@pytest.mark.parametrize("qtype,n,k", PACKED_CASES[:3], ids=[c[0].name for c in PACKED_CASES[:3]])
def test_packed_rows_are_batch_invariant(qtype, n, k):
    """A row's result is bitwise the same alone or at any place among 27 (verify rows equal decode rows)."""
    _, packed = packed_weight(qtype, n, k, seed=22)
    x = torch.randn(27, k, generator=torch.Generator().manual_seed(23)).bfloat16()
    together = quant_linear.linear_packed(x, packed, int(qtype), k, n)
    for i in (0, 7, 8, 15, 26):
        assert torch.equal(quant_linear.linear_packed(x[i:i + 1], packed, int(qtype), k, n), together[i:i + 1])
        assert torch.equal(quant_linear.linear_packed(x[i:i + 9], packed, int(qtype), k, n)[0], together[i])


@needs_packed
def test_packed_leading_dims_and_bias():
    qtype, n, k = T.Q4_1, 33, 64
    blocks, packed = packed_weight(qtype, n, k, seed=24)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(0)).bfloat16()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    y = quant_linear.linear_packed(x, packed, int(qtype), k, n, bias)
    ref, scale = reference(blocks, qtype, x.reshape(-1, k))
    assert y.shape == (2, 5, n)
    assert_close(y.reshape(-1, n), ref + bias.double(), scale + bias.double().abs())


@needs_packed
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0], ids=["Q4_1", "Q8_0"])
def test_packed_negative_control(qtype):
    """One flipped exponent bit in one lane's scale of one tile fails the check on that output only (at 1 and at 12
    rows); two lanes' nibbles swapped (a wrong layout) fail it on those two outputs."""
    n, k = 21, 32 * 3
    blocks, packed = packed_weight(qtype, n, k, seed=25)
    corrupted = packed.clone()
    corrupted[1, 2 * 4 + 1] ^= 0x04  # group 1 (rows 16..), block 0, lane 4: the high byte of row 20's first d
    for m in (1, 12):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(26)).bfloat16()
        ref, scale = reference(blocks, qtype, x)
        y = quant_linear.linear_packed(x, corrupted, int(qtype), k, n)
        with pytest.raises(AssertionError, match="max err"):
            assert_close(y, ref, scale)
        keep = torch.arange(n) != 20
        assert_close(y[:, keep], ref[:, keep], scale[:, keep])
    swapped = packed.clone()
    qs = 64 if qtype == T.Q4_1 else 32
    tile = swapped[0, :quant_linear.row_bytes(int(qtype), k) * 16 // 3]  # group 0, block 0
    lane = lambda l: [qs + c * 32 + 2 * l + h for c in range((len(tile) - qs) // 32) for h in (0, 1)]
    tile[lane(2) + lane(3)] = tile[lane(3) + lane(2)].clone()
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(27)).bfloat16()
    ref, scale = reference(blocks, qtype, x)
    y = quant_linear.linear_packed(x, swapped, int(qtype), k, n)
    for bad in (2, 3):
        with pytest.raises(AssertionError, match="max err"):
            assert_close(y[:, bad:bad + 1], ref[:, bad:bad + 1], scale[:, bad:bad + 1])
    keep = (torch.arange(n) != 2) & (torch.arange(n) != 3)
    assert_close(y[:, keep], ref[:, keep], scale[:, keep])


@needs_packed
def test_packed_errors_name_the_problem():
    _, packed = packed_weight(T.Q4_1, 20, 64, seed=28)
    with pytest.raises(RuntimeError, match="x must be bf16"):
        quant_linear.linear_packed(torch.randn(1, 64), packed, int(T.Q4_1), 64, 20)
    with pytest.raises(RuntimeError, match="expected a contiguous CPU uint8"):
        quant_linear.linear_packed(torch.randn(1, 64).bfloat16(), packed, int(T.Q4_1), 64, 40)
    with pytest.raises(RuntimeError, match="no packed layout"):
        quant_linear.pack(torch.zeros(3, 288, dtype=torch.uint8), int(T.Q4_K), 512)
