"""Survival products and the global top-K verify-budget allocation of the sps planners, on tensors: the plain-torch
twin of kernels/triton_budget.py (the planner's list version is engine.sps.top_k_lengths)."""
import torch


def survivals(confidences: torch.Tensor, rooms: torch.Tensor) -> torch.Tensor:
    """a[r, j] = prod_{i <= j} c[r, i] for j < rooms[r], else 0: [R, G] fp32."""
    G = confidences.shape[1]
    inside = torch.arange(G, device=confidences.device)[None] < rooms[:, None]
    return torch.where(inside, confidences.float().cumprod(1), 0.0)


def allocate_budget(confidences: torch.Tensor, rooms: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give `budget` draft tokens to the highest survivals over all requests (ties: lower position, then lower
    request first), so each request gets a prefix. Returns (survivals [R, G], lengths [R] int64)."""
    a = survivals(confidences, rooms)
    R = a.shape[0]
    by_position = a.t().reshape(-1)  # flat index j * R + r: a stable sort then breaks ties by position, then request
    order = by_position.argsort(descending=True, stable=True)[:max(budget, 0)]
    order = order[by_position[order] > 0]
    lengths = torch.zeros(R, dtype=torch.long, device=a.device)
    lengths.scatter_reduce_(0, order % R, order // R + 1, "amax")
    return a, lengths
