from dataclasses import dataclass

import torch

from engine.sampling_params import GREEDY_EPS, SamplingParams


def probs_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Row-wise [N, V] fp32 distribution each row samples from (greedy rows: one-hot at argmax)."""
    logits = logits.float()
    greedy = temperature < GREEDY_EPS
    if greedy.all():
        return _one_hot_argmax(logits)
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temperature.float())[:, None], dim=-1)
    keep = _top_k_top_p_mask(probs, top_k, top_p)
    if (min_p > 0).any():
        floor = min_p.float()[:, None] * probs.amax(-1, keepdim=True)
        keep = probs >= floor if keep is None else keep & (probs >= floor)
    if keep is not None:
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.where(greedy[:, None], _one_hot_argmax(logits), probs) if greedy.any() else probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)


def _top_k_top_p_mask(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor | None:
    V = probs.shape[1]
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1
    if not (use_k.any() or use_p.any()):
        return None
    # Stable descending sort: among equal probs the lower token id ranks first, so boundary
    # ties are broken in favour of lower ids (for both top-k and top-p).
    sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=probs.device)
    keep = rank[None] < torch.where(use_k, top_k, V)[:, None]
    before = sorted_p.cumsum(-1) - sorted_p  # prob mass ranked strictly above each token
    keep &= (before < top_p.float()[:, None]) | ~use_p[:, None]
    return torch.zeros_like(keep).scatter_(1, idx, keep)


def sample(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Exponential race: argmax(p / E), E ~ Exp(1) drawn per row from that row's own generator."""
    noise = torch.empty_like(probs)
    for row, g in zip(noise, generators, strict=True):
        if row.is_cuda:
            row.exponential_(generator=g)
        else:
            row.uniform_(generator=g).neg_().log1p_().neg_()  # -log(1-U): finite Exp(1), ~4x faster
    return probs.div(noise.clamp_min_(1e-30)).argmax(-1)


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [N] fp32, 0 for greedy rows
    top_k: torch.Tensor        # [N] long, <= 0 disabled
    top_p: torch.Tensor        # [N] fp32
    min_p: torch.Tensor        # [N] fp32

    @classmethod
    def from_params(cls, params: list[SamplingParams], repeats: list[int] | None = None,
                    device: str | torch.device = "cpu") -> "SamplingTensors":
        rows = [p for i, p in enumerate(params) for _ in range(1 if repeats is None else repeats[i])]

        def col(fn, dtype):
            return torch.tensor([fn(p) for p in rows], dtype=dtype).to(device, non_blocking=True)
        return cls(col(lambda p: 0.0 if p.greedy else p.temperature, torch.float32),
                   col(lambda p: p.top_k, torch.long),
                   col(lambda p: p.top_p, torch.float32),
                   col(lambda p: p.min_p, torch.float32))

    def repeat_interleave(self, repeats: int) -> "SamplingTensors":
        """Each row's settings repeats times in a row (one request's several positions)."""
        return SamplingTensors(*(t.repeat_interleave(repeats) for t in
                                 (self.temperature, self.top_k, self.top_p, self.min_p)))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return probs_from_logits(logits, self.temperature, self.top_k, self.top_p, self.min_p)
