"""Sampling from given distributions with given uniforms, and ragged speculative rejection sampling: the plain-torch
twins (CPU path and test oracle). Randomness comes in as tensors so each request's own generator drives it."""
import torch

GREEDY_EPS = 1e-5  # a temperature below this means greedy (argmax); shared by the engine and every sampling kernel
RESIDUAL_EPS = 1e-8  # residual mass below this means p == q up to rounding: resample from p instead


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [N, V] (unnormalised is fine) from uniforms [N] in [0, 1). Tokens of zero
    probability are never chosen."""
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max_(probs.shape[1] - 1)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     num_drafts: torch.Tensor, uniforms: torch.Tensor,
                     bonus_uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless verification of R requests' drafts, all in flat ragged layouts.
    Request r owns num_drafts[r] = l_r draft tokens (draft_tokens [Nd], sampled from draft_probs [Nd, V]) and l_r + 1
    target rows (target_probs [Nt, V]). Draft k is accepted when uniforms[k] < p(x)/q(x); at the first rejection the
    next token comes from norm(max(p - q, 0)), and when all l_r are accepted from the last target row.
    Returns (num_accepted [R], next_token [R])."""
    R, Nd = num_drafts.shape[0], draft_tokens.shape[0]
    rows_per_req = num_drafts + 1
    t_start = rows_per_req.cumsum(0) - rows_per_req
    d_start = num_drafts.cumsum(0) - num_drafts
    req = torch.repeat_interleave(torch.arange(R), num_drafts)
    pos = torch.arange(Nd) - d_start[req]
    p_x = target_probs[t_start[req] + pos, draft_tokens]
    q_x = draft_probs[torch.arange(Nd), draft_tokens]
    accepted = uniforms.to(q_x.dtype) * q_x < p_x
    first_reject = torch.where(accepted, num_drafts[req], pos)
    num_accepted = num_drafts.clone().scatter_reduce_(0, req, first_reject, "amin")
    p_next = target_probs[t_start + num_accepted]
    rejected = num_accepted < num_drafts
    q_next = draft_probs[(d_start + num_accepted).clamp_max(max(Nd - 1, 0))] if Nd else torch.zeros_like(p_next)
    residual = (p_next - q_next).clamp_min_(0)
    use_residual = rejected & (residual.sum(-1) > RESIDUAL_EPS)
    dist = torch.where(use_residual[:, None], residual, p_next)
    return num_accepted, sample_inverse_cdf(dist, bonus_uniforms)
