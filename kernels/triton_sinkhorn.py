"""mHC's Sinkhorn normalisation in one Triton launch (twin: kernels/sinkhorn.py): a program per token keeps its N x N
matrix in registers through every iteration, where the twin takes three small kernels per half-iteration (about 120
launches a call at 20 iterations, two calls per V4 block: without CUDA graphs, a decode step would wait on launches)."""
import torch
import triton
import triton.language as tl

from kernels.triton_support import require_triton_device


@triton.jit
def _sinkhorn_kernel(comb_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    keep = (i < N) & (j < N)
    offsets = row * N * N + i * N + j
    m = tl.load(comb_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
    m = m / (tl.sum(m, axis=0)[None, :] + eps)
    for _ in range(ITERS - 1):
        m = m / (tl.sum(m, axis=1)[:, None] + eps)
        m = m / (tl.sum(m, axis=0)[None, :] + eps)
    tl.store(out_ptr + offsets, m, mask=keep)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb [T, N, N] float32 -> the same, normalised as kernels.sinkhorn.sinkhorn."""
    require_triton_device(comb)
    if comb.dim() != 3 or comb.shape[1] != comb.shape[2] or comb.dtype != torch.float32 or iters < 1:
        raise ValueError(f"sinkhorn: a [T, N, N] float32 tensor and iters >= 1, got {comb.dtype} "
                         f"{tuple(comb.shape)}, iters={iters}")
    comb = comb.contiguous()
    out = torch.empty_like(comb)
    n = comb.shape[1]
    if comb.shape[0]:
        _sinkhorn_kernel[(comb.shape[0],)](comb, out, eps, N=n, BLOCK=triton.next_power_of_2(n), ITERS=iters)
    return out
