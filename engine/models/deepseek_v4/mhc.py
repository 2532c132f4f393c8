"""Manifold-constrained hyper-connections (mHC): the residual stream is hc_mult streams; before a sub-block a small
projection of the normalised streams gives `pre` (collapse the streams into the block's input), `post` (spread the
block's output back) and `comb` (mix the streams, Sinkhorn-normalised to a doubly-stochastic matrix). Computed in
fp32, as transformers 5.24's DeepseekV4HyperConnection and DeepseekV4HyperHead, which this follows."""
import torch
import torch.nn.functional as F

from kernels import dispatch


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
               eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """streams [T, N, D] -> pre [T, N], post [T, N], comb [T, N, N] (fp32)."""
    n = streams.shape[1]
    mixes = F.linear(unit_rms(streams.flatten(1).float(), norm_eps), fn.float())
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], -1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * s[2] + comb_b.view(n, n), -1) + eps
    return pre, post, dispatch.sinkhorn(comb, iters, eps)


def collapse(pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    return (pre.unsqueeze(-1) * streams).sum(1).to(streams.dtype)


def spread(post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """The block's output spread over the streams plus the streams mixed by comb (applied transposed)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """The final collapse of the streams before the last norm: sigmoid weights only."""
    mixes = F.linear(unit_rms(streams.flatten(1).float(), norm_eps), fn.float())
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + eps
    return collapse(pre, streams)
