"""Sinkhorn normalisation of mHC's stream-mixing matrices (DeepSeek-V4), in plain torch: the CPU path and the test
oracle of kernels/triton_sinkhorn.py. Columns first, then rows and columns alternately, `iters` column passes in all,
each sum offset by eps (transformers 5.24's DeepseekV4HyperConnection)."""
import torch


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb [..., N, N] (positive) -> nearly doubly stochastic, the same shape."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb
