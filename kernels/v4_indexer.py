"""DeepSeek-V4's Lightning indexer scores for rows whose compressed keys come by index (a fixed-shape decode / verify
step), in plain torch: the twin (the test oracle and the CPU path) of kernels/triton_v4_indexer.py, same signature.

    score[r, j] = scale * sum_h weights[r, h] * relu(q[r, h] . keys[index[r, j]])      (-inf where index[r, j] is -1)

in fp32. The caller ranks each row's scores (its top-k entries)."""
import torch
import torch.nn.functional as F

from kernels.v4_attention import gather_rows


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, index: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """q [R, H, d], weights [R, H], keys [E, d] (the indexer's paged keys), index [R, J] -> float32 [R, J]."""
    check_indexer_inputs(q, weights, keys, index)
    scores = F.relu(torch.einsum("rhd,rjd->rhj", q.float(), gather_rows(keys, index).float())) * scale
    return (scores * weights.float().unsqueeze(-1)).sum(1).masked_fill(index < 0, float("-inf"))


def check_indexer_inputs(q, weights, keys, index):
    if q.dim() != 3 or keys.dim() != 2 or keys.shape[1] != q.shape[2]:
        raise ValueError(f"indexer_scores: q {tuple(q.shape)} must be [R, H, d] and keys {tuple(keys.shape)} [E, d]")
    R, H = q.shape[:2]
    if weights.shape != (R, H):
        raise ValueError(f"indexer_scores: weights {tuple(weights.shape)} must be [{R}, {H}] (one per row and head)")
    if index.dim() != 2 or index.shape[0] != R or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indexer_scores: index {tuple(index.shape)} {index.dtype} must be [{R}, J] int32/int64")
