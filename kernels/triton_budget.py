"""Triton survival cumprod + global top-K budget allocation (twin: kernels.budget.allocate_budget). One program
per request ranks its candidates against every request's, so the step needs no sort and no host round trip."""
import torch
import triton
import triton.language as tl

from kernels.triton_support import require_triton_device


@triton.jit
def _row_survivals(conf_ptr, rooms_ptr, r, G, BLOCK_G: tl.constexpr):
    j = tl.arange(0, BLOCK_G)
    c = tl.load(conf_ptr + r * G + j, mask=j < G, other=1.0).to(tl.float32)
    return tl.where(j < tl.load(rooms_ptr + r), tl.cumprod(c, axis=0), 0.0)


@triton.jit
def _allocate_budget_kernel(conf_ptr, rooms_ptr, surv_ptr, len_ptr, R, G, budget, BLOCK_G: tl.constexpr):
    r = tl.program_id(0)
    j = tl.arange(0, BLOCK_G)
    own = _row_survivals(conf_ptr, rooms_ptr, r, G, BLOCK_G)
    tl.store(surv_ptr + r * G + j, own, mask=j < G)
    rank = tl.zeros([BLOCK_G], dtype=tl.int32)
    for other_r in tl.range(0, R):
        other = _row_survivals(conf_ptr, rooms_ptr, other_r, G, BLOCK_G)
        a, b = own[:, None], other[None, :]
        ji, jo = j[:, None], j[None, :]
        tie_first = (jo < ji) | ((jo == ji) & (other_r < r))
        ahead = (b > 0) & ((b > a) | ((b == a) & tie_first))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    admitted = (own > 0) & (rank < budget)
    tl.store(len_ptr + r, tl.sum(admitted.to(tl.int64), axis=0))  # survivals fall along a row: a prefix


def allocate_budget(confidences: torch.Tensor, rooms: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """confidences [R, G] (conditional acceptance estimates), rooms [R] (positions usable per request), budget K.
    Returns (survivals [R, G] fp32, lengths [R] int64)."""
    require_triton_device(confidences, rooms)
    if confidences.dim() != 2 or rooms.shape != confidences.shape[:1]:
        raise ValueError(f"allocate_budget: confidences {tuple(confidences.shape)} must be [R, G] and rooms "
                         f"{tuple(rooms.shape)} [R]")
    R, G = confidences.shape
    conf = confidences.contiguous()
    surv = torch.empty(R, G, dtype=torch.float32, device=conf.device)
    lengths = torch.zeros(R, dtype=torch.long, device=conf.device)
    if R and G:
        _allocate_budget_kernel[(R,)](conf, rooms.contiguous(), surv, lengths, R, G, max(int(budget), 0),
                                      BLOCK_G=max(16, triton.next_power_of_2(G)))
    return surv, lengths
