"""mHC's Sinkhorn normalisation in one Triton launch against its torch twin (on the GPU, or under Triton's interpreter
on CPU). The engine's DeepSeek-V4 path on the Triton kernels, this one included, against the torch path is
tests/test_triton_v4_attention.py's lockstep run."""
import pytest
import torch

from kernels import sinkhorn as twin
from kernels import triton_sinkhorn


def mixing_matrices(T: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """As mHC makes them: a softmax per row plus eps, so positive, far from doubly stochastic."""
    g = torch.Generator().manual_seed(seed)
    return (torch.softmax(torch.randn(T, n, n, generator=g) * 3, -1) + 1e-6).to(device)


@pytest.mark.parametrize("n, iters", [(4, 20), (4, 1), (3, 7), (2, 20)])
def test_kernel_equals_twin(n, iters, kernel_device):
    comb = mixing_matrices(37, n, n + iters, kernel_device)
    out = triton_sinkhorn.sinkhorn(comb, iters, 1e-6)
    torch.testing.assert_close(out, twin.sinkhorn(comb, iters, 1e-6), rtol=2e-6, atol=1e-7)
    columns = torch.ones(37, n, device=kernel_device)
    torch.testing.assert_close(out.sum(-2), columns, rtol=0, atol=1e-3)  # a column pass came last


def test_negative_control_one_iteration_less_is_told_apart(kernel_device):
    comb = mixing_matrices(37, 4, 1, kernel_device)
    gap = (triton_sinkhorn.sinkhorn(comb, 3, 1e-6) - twin.sinkhorn(comb, 2, 1e-6)).abs().max()
    assert gap > 1e-3


def test_refuses_what_it_cannot_normalise(kernel_device):
    with pytest.raises(ValueError, match="float32"):
        triton_sinkhorn.sinkhorn(torch.rand(2, 4, 4, dtype=torch.float64, device=kernel_device), 20, 1e-6)
    with pytest.raises(ValueError, match=r"\[T, N, N\]"):
        triton_sinkhorn.sinkhorn(torch.rand(2, 4, 3, device=kernel_device), 20, 1e-6)
