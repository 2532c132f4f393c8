"""DeepSeek-V4's Lightning indexer scores for rows whose keys come by index (kernels/triton_v4_indexer.py and its
twin kernels/v4_indexer.py) against the score summed by hand from its definition, head by head and entry by entry:
odd sizes (5 heads, head size 40, two tiles of entry slots), -1 slots, an entry listed twice, fp32 and bf16 keys.
Negative controls: the sum without the ReLU, and another row's head weights, are far from it. The engine's fixed-shape
steps take this path in every CSA layer (tests/test_v4_step_rows.py, tests/test_triton_v4_attention.py). Then the
indexer's exact top-k against a stable sort."""
import pytest
import torch

from kernels import triton_v4_indexer as kernel
from kernels import v4_indexer as twin


def inputs(dtype: torch.dtype, device, rows=3, heads=5, dim=40, entries=23, width=37, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, entries, (rows, width), generator=g)
    index[torch.rand(rows, width, generator=g) < 0.3] = -1
    index[1, 5], index[1, 9] = 7, 7  # listed twice: scored twice
    index[2] = -1  # a row that sees nothing
    return dict(q=torch.randn(rows, heads, dim, generator=g).to(dtype).to(device),
                weights=torch.randn(rows, heads, generator=g).to(device),
                keys=torch.randn(entries, dim, generator=g).to(dtype).to(device),
                index=index.to(torch.int32).to(device), scale=dim ** -0.5)


def by_hand(q, weights, keys, index, scale, relu=True, weights_of=None) -> torch.Tensor:
    q, keys, weights = q.cpu().double(), keys.cpu().double(), weights.cpu().double()
    out = torch.full(index.shape, float("-inf"), dtype=torch.float64)
    for r in range(index.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[r, j])
            if e >= 0:
                total = 0.0
                for h in range(q.shape[1]):
                    dot = float(q[r, h] @ keys[e])
                    total += float(weights[r if weights_of is None else weights_of, h]) * (max(dot, 0.0) if relu
                                                                                            else dot)
                out[r, j] = total * scale
    return out.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_and_twin_equal_the_definition(kernel_device, dtype):
    args = inputs(dtype, kernel_device)
    expected = by_hand(**args)
    for scores in (kernel.indexer_scores(**args).cpu(), twin.indexer_scores(**args).cpu()):
        assert scores.dtype == torch.float32
        assert torch.equal(torch.isinf(scores), args["index"].cpu() < 0)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_negative_controls_are_far(kernel_device):
    args = inputs(torch.float32, kernel_device, seed=1)
    scores = kernel.indexer_scores(**args).cpu()
    seen = args["index"].cpu() >= 0
    for wrong in (by_hand(**args, relu=False), by_hand(**args, weights_of=0)):
        assert (scores[seen] - wrong[seen]).abs().max() > 0.5


def test_misshaped_inputs_are_named(kernel_device):
    args = inputs(torch.float32, kernel_device)
    with pytest.raises(ValueError, match="weights .* must be"):
        kernel.indexer_scores(**(args | {"weights": args["weights"][:, :2]}))
    with pytest.raises(ValueError, match="index .* must be"):
        twin.indexer_scores(**(args | {"index": args["index"].float()}))


def test_stable_top_k_is_the_stable_sort():
    """The indexer's top-k (int64 keys) against a stable descending sort on scores full of ties (halves, zeros of
    both signs, -inf), at entry counts below and above k. Negative control: a plain top-k of the scores breaks ties
    otherwise."""
    from engine.models.deepseek_v4.attention import stable_top_k
    g = torch.Generator().manual_seed(0)
    plain_differs = False
    for width in (1, 7, 300, 2500):
        scores = (torch.randn(6, width, generator=g) * 3).round() / 2
        for value, share in ((float("-inf"), 0.2), (-0.0, 0.1), (0.0, 0.1)):
            scores[torch.rand(6, width, generator=g) < share] = value
        expected = scores.sort(dim=-1, descending=True, stable=True).indices[:, :512]
        assert torch.equal(stable_top_k(scores, 512), expected)
        plain_differs |= not torch.equal(scores.topk(min(512, width), dim=-1).indices, expected)
    assert plain_differs
