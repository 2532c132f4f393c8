"""mHC's Sinkhorn normalisation in one Triton launch (twin: kernels/sinkhorn.py): a program per TOKENS tokens keeps
their N x N matrices (4 x 4 in V4) in registers through every iteration, where the twin takes three small kernels per
half-iteration (about 120 launches a call at 20 iterations, two calls per V4 block: without CUDA graphs, a decode step
would wait on launches)."""
import torch
import triton
import triton.language as tl

from kernels.triton_support import require_triton_device

TOKENS = 16  # tokens per program: 16 of V4's 4 x 4 matrices fill a 256-element tile; one each left most lanes idle


@triton.jit
def _sinkhorn_kernel(comb_ptr, out_ptr, eps, num_tokens, N: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_T: tl.constexpr, ITERS: tl.constexpr):
    token = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None, None]
    i = tl.arange(0, BLOCK)[None, :, None]
    j = tl.arange(0, BLOCK)[None, None, :]
    keep = (token < num_tokens) & (i < N) & (j < N)
    offsets = token * N * N + i * N + j
    m = tl.load(comb_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
    m = m / (tl.sum(m, axis=1)[:, None, :] + eps)
    for _ in range(ITERS - 1):
        m = m / (tl.sum(m, axis=2)[:, :, None] + eps)
        m = m / (tl.sum(m, axis=1)[:, None, :] + eps)
    tl.store(out_ptr + offsets, m, mask=keep)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb [T, N, N] float32 -> the same, normalised as kernels.sinkhorn.sinkhorn."""
    require_triton_device(comb)
    if comb.dim() != 3 or comb.shape[1] != comb.shape[2] or comb.dtype != torch.float32 or iters < 1:
        raise ValueError(f"sinkhorn: a [T, N, N] float32 tensor and iters >= 1, got {comb.dtype} "
                         f"{tuple(comb.shape)}, iters={iters}")
    comb = comb.contiguous()
    out = torch.empty_like(comb)
    tokens, n = comb.shape[:2]
    if tokens:
        _sinkhorn_kernel[(triton.cdiv(tokens, TOKENS),)](comb, out, eps, tokens, N=n, BLOCK=triton.next_power_of_2(n),
                                                         BLOCK_T=TOKENS, ITERS=iters)
    return out
