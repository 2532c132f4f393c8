from dataclasses import dataclass

import torch

from engine.outputs import Emitted, TokenLogprob
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
        probs = probs.masked_fill_(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.where(greedy[:, None], _one_hot_argmax(logits), probs) if greedy.any() else probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)


TOP_CANDIDATES = 1024  # top-k / top-p decided among this many of the largest probabilities when they suffice


def _top_k_top_p_mask(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor | None:
    """Keep-mask of top-k / top-p, as if ranked by a stable descending sort: among equal probs the lower token id
    ranks first, so boundary ties are broken in favour of lower ids (for both top-k and top-p)."""
    V = probs.shape[1]
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1
    if not (use_k.any() or use_p.any()):
        return None
    if V > TOP_CANDIDATES:
        keep = _mask_from_candidates(probs, use_k, top_k, use_p, top_p)
        if keep is not None:
            return keep
    return _mask_by_full_sort(probs, use_k, top_k, use_p, top_p)


def _kept_counts(sorted_p: torch.Tensor, use_k, top_k, use_p, top_p) -> torch.Tensor:
    """How many of the ranked tokens each row keeps."""
    before = sorted_p.cumsum(-1) - sorted_p  # prob mass ranked strictly above each token
    n = torch.where(use_p, (before < top_p.float()[:, None]).sum(-1), sorted_p.shape[1])
    return torch.where(use_k, torch.minimum(n, top_k), n)


def _mask_from_candidates(probs, use_k, top_k, use_p, top_p) -> torch.Tensor | None:
    """Sorting the whole vocabulary dominates sampling; the count of kept tokens is usually decided by the largest
    few hundred probabilities, and the kept set then follows from the last kept value (ties in id order)."""
    top = probs.topk(TOP_CANDIDATES, dim=-1).values
    decided = (use_k & (top_k <= TOP_CANDIDATES)) | (use_p & (top.sum(-1) >= top_p)) | ~(use_k | use_p)
    if not bool(decided.all()):
        return None
    n = _kept_counts(top, use_k, top_k, use_p, top_p).clamp(1, TOP_CANDIDATES)
    last = top.gather(1, (n - 1)[:, None])
    keep_all = ~(use_k | use_p)[:, None]
    ties = probs == last
    if not bool((ties.sum(-1) > 1).any()):  # the usual case: the last kept value is unique
        return (probs >= last) | keep_all
    above = probs > last
    tie_rank = ties.cumsum(-1) - ties.int()  # tied tokens with a lower id
    keep_ties = ties & (tie_rank < (n - above.sum(-1))[:, None])
    return above | keep_ties | keep_all


def _mask_by_full_sort(probs, use_k, top_k, use_p, top_p) -> torch.Tensor:
    sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
    n = _kept_counts(sorted_p, use_k, top_k, use_p, top_p)
    keep = torch.arange(probs.shape[1], device=probs.device)[None] < n[:, None]
    return torch.zeros_like(keep).scatter_(1, idx, keep)


def sample(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform per row from that row's own (CPU) generator: the same draws on CPU and
    GPU for a seeded request, and only R numbers cross to the device."""
    from kernels.sampling import sample_inverse_cdf
    uniforms = torch.stack([torch.rand((), generator=g) for g in generators])
    return sample_inverse_cdf(probs, uniforms.to(probs.device, non_blocking=True))


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


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: SamplingParams) -> list[TokenLogprob]:
    """logits [n, V]: the rows the tokens were drawn from -> each token's log-probability and the request's top
    `params.logprobs` alternatives, under the processed distribution (greedy: the raw softmax)."""
    if params.greedy:
        logp = torch.log_softmax(logits.float(), -1)
    else:
        logp = SamplingTensors.from_params([params], [logits.shape[0]], logits.device).probs(logits).log()
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    top = logp.topk(params.logprobs, dim=-1) if params.logprobs else None
    alternatives = ([list(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)] if top is not None
                    else [[] for _ in tokens])
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alternatives)]


def emit(logits: torch.Tensor, tokens: list[int], params: SamplingParams) -> Emitted:
    """The tokens a step gives a request, with their log-probabilities (from the rows they were drawn from) if asked."""
    return Emitted(tokens, None if params.logprobs is None else token_logprobs(logits, tokens, params))
