"""Triton ragged rejection sampling (twin: kernels.sampling.rejection_sample). Each program verifies a tile of
BLOCK_R requests: real vocabularies give one request per program, tiny ones pack many (the interpreter pays per
program, and so does a GPU with little work per request)."""
import torch
import triton
import triton.language as tl

from kernels.sampling import RESIDUAL_EPS
from kernels.triton_support import require_triton_device

MAX_BLOCK_V = 1024
TILE = 16384  # elements of one [BLOCK_R, BLOCK_V] tile


@triton.jit
def _count_accepted(target_ptr, draft_ptr, tokens_ptr, uniforms_ptr, stride_t, stride_d, n, t_start, d_start):
    """Drafts accepted before the first rejection: u * q(x) < p(x) position by position."""
    accepted = tl.full(n.shape, 0, n.dtype)
    accepting = n > 0
    for k in range(tl.max(n)):
        check = accepting & (k < n)
        x = tl.load(tokens_ptr + d_start + k, mask=check, other=0)
        p_x = tl.load(target_ptr + (t_start + k) * stride_t + x, mask=check, other=0.0).to(tl.float32)
        q_x = tl.load(draft_ptr + (d_start + k) * stride_d + x, mask=check, other=0.0).to(tl.float32)
        u = tl.load(uniforms_ptr + d_start + k, mask=check, other=1.0)
        accepting = check & (u * q_x < p_x)
        accepted += accepting.to(accepted.dtype)
    return accepted


@triton.jit
def _load_block(target_ptr, draft_ptr, stride_t, stride_d, p_rows, q_rows, live, rejected, cols, V):
    """One vocabulary block of each request's target row p and (rejected requests only, else 0) draft row q."""
    in_v = cols[None, :] < V
    p = tl.load(target_ptr + p_rows[:, None] * stride_t + cols[None, :], mask=live[:, None] & in_v, other=0.0)
    q = tl.load(draft_ptr + q_rows[:, None] * stride_d + cols[None, :], mask=rejected[:, None] & in_v, other=0.0)
    return p.to(tl.float32), q.to(tl.float32)


@triton.jit
def _rejection_kernel(target_ptr, draft_ptr, tokens_ptr, num_drafts_ptr, t_start_ptr, d_start_ptr, uniforms_ptr,
                      bonus_ptr, num_accepted_ptr, next_token_ptr, stride_t, stride_d, R, V,
                      RESIDUAL_EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    reqs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = reqs < R
    n = tl.load(num_drafts_ptr + reqs, mask=live, other=0)
    t_start = tl.load(t_start_ptr + reqs, mask=live, other=0)
    d_start = tl.load(d_start_ptr + reqs, mask=live, other=0)
    accepted = _count_accepted(target_ptr, draft_ptr, tokens_ptr, uniforms_ptr, stride_t, stride_d, n, t_start,
                               d_start)
    rejected = live & (accepted < n)
    p_rows, q_rows = t_start + accepted, d_start + accepted

    # Totals are the ends of running cdfs carried by their max, exactly as the search below scans, so the search's
    # cdf ends on the very total its threshold was scaled by and stays monotone across blocks.
    residual_total = tl.full([BLOCK_R], 0.0, tl.float32)
    p_total = tl.full([BLOCK_R], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        p, q = _load_block(target_ptr, draft_ptr, stride_t, stride_d, p_rows, q_rows, live, rejected,
                           start + tl.arange(0, BLOCK_V), V)
        residual_total = tl.max(residual_total[:, None] + tl.cumsum(tl.maximum(p - q, 0.0), 1), 1)
        p_total = tl.max(p_total[:, None] + tl.cumsum(p, 1), 1)

    use_residual = rejected & (residual_total > RESIDUAL_EPS)
    threshold = tl.load(bonus_ptr + reqs, mask=live, other=0.0) * tl.where(use_residual, residual_total, p_total)
    token = tl.full([BLOCK_R], V - 1, dtype=tl.int64)  # nothing above the threshold (rounding): clamp like the twin
    carry = tl.full([BLOCK_R], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        p, q = _load_block(target_ptr, draft_ptr, stride_t, stride_d, p_rows, q_rows, live, use_residual, cols, V)
        cdf = carry[:, None] + tl.cumsum(tl.maximum(p - q, 0.0), 1)
        hit = (cdf > threshold[:, None]) & (cols[None, :] < V)
        token = tl.minimum(token, tl.min(tl.where(hit, cols[None, :], V), 1).to(tl.int64))
        carry = tl.max(cdf, 1)
    tl.store(num_accepted_ptr + reqs, accepted, mask=live)
    tl.store(next_token_ptr + reqs, token, mask=live)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     num_drafts: torch.Tensor, uniforms: torch.Tensor,
                     bonus_uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same layouts and result as kernels.sampling.rejection_sample (greedy requests arrive as one-hot rows).
    fp32 probabilities with a contiguous last dim; sum(num_drafts) == len(draft_tokens) is trusted (checking it
    would cost a device sync). Returns int64 (num_accepted [R], next_token [R])."""
    require_triton_device(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms)
    _check_rejection_inputs(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms)
    R, V = num_drafts.shape[0], target_probs.shape[1]
    num_accepted = torch.empty(R, dtype=torch.int64, device=target_probs.device)
    next_token = torch.empty_like(num_accepted)
    if R == 0:
        return num_accepted, next_token
    num_drafts = num_drafts.to(torch.int64).contiguous()
    d_start = num_drafts.cumsum(0) - num_drafts
    t_start = d_start + torch.arange(R, device=num_drafts.device)
    tokens = draft_tokens.to(torch.int64).contiguous()
    uniforms, bonus_uniforms = (u.to(torch.float32).contiguous() for u in (uniforms, bonus_uniforms))
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    block_r = min(triton.next_power_of_2(R), TILE // block_v)
    _rejection_kernel[(triton.cdiv(R, block_r),)](
        target_probs, draft_probs, tokens, num_drafts, t_start, d_start, uniforms, bonus_uniforms, num_accepted,
        next_token, target_probs.stride(0), draft_probs.stride(0), R, V,
        RESIDUAL_EPS=RESIDUAL_EPS, BLOCK_R=block_r, BLOCK_V=block_v)
    return num_accepted, next_token


def _check_rejection_inputs(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms):
    if target_probs.dim() != 2 or draft_probs.dim() != 2 or target_probs.shape[1] != draft_probs.shape[1]:
        raise ValueError(f"rejection_sample: target_probs {tuple(target_probs.shape)} and draft_probs "
                         f"{tuple(draft_probs.shape)} must be [N, V] with the same V")
    if target_probs.dtype != torch.float32 or draft_probs.dtype != torch.float32:
        raise ValueError(f"rejection_sample: probs must be float32, got {target_probs.dtype} / {draft_probs.dtype}")
    if target_probs.stride(1) != 1 or draft_probs.stride(1) != 1:
        raise ValueError("rejection_sample: probs need a contiguous last dim")
    Nd, R = draft_probs.shape[0], num_drafts.shape[0] if num_drafts.dim() == 1 else -1
    if draft_tokens.shape != (Nd,) or uniforms.shape != (Nd,):
        raise ValueError(f"rejection_sample: draft_tokens {tuple(draft_tokens.shape)} and uniforms "
                         f"{tuple(uniforms.shape)} must be [{Nd}], one per draft_probs row")
    if R < 0 or bonus_uniforms.shape != (R,):
        raise ValueError(f"rejection_sample: num_drafts {tuple(num_drafts.shape)} and bonus_uniforms "
                         f"{tuple(bonus_uniforms.shape)} must both be [R]")
    if target_probs.shape[0] != Nd + R:
        raise ValueError(f"rejection_sample: target_probs has {target_probs.shape[0]} rows, expected "
                         f"{Nd} drafts + {R} requests = {Nd + R}")
