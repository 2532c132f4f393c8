"""A DeepSeek-V4 decode / verify step in fixed shapes: every sequence brings a few rows (at most the rings' rollback
margin plus one), and each row finds what it attends to by index, computed on the device from the varlen batch and
the sequences' ring indices. No Python loop over sequences and no host sync inside the step, so the same code runs
eagerly (one batched call per layer instead of one per sequence) and inside a CUDA graph (engine/graphs.py, static
buffers). The host's share, before and after (checks, the prefix cache's ring restores and saves, the rings' `ends`),
is V4Model.begin_rows / end_rows.

vLLM's DeepSeek-V4 decode path works the same way: per-token slot and index tensors built before the step, sparse
attention over index lists (FlashMLA's layout), so its steps are graph-capturable; the tensors and names here are
ours."""
from dataclasses import dataclass

import torch


@dataclass
class StepRows:
    """ring_row [T]: each row's ring index (the rings' scratch row for padding rows); seq [T]: its sequence, a row of
    kv_slots [B, L] (the cache slot of each of that sequence's positions); valid [T]: a real row, not padding."""
    ring_row: torch.Tensor
    seq: torch.Tensor
    kv_slots: torch.Tensor
    valid: torch.Tensor

    def pages(self, ratio: int) -> torch.Tensor:
        """[T, ceil(L / ratio)]: the entry page of each compressed window of each row's sequence (window w's first
        token slot // ratio; past the sequence's end, whatever padding the slots hold)."""
        return self.kv_slots[:, ::ratio][self.seq] // ratio


def step_rows(cu_seqlens_q: torch.Tensor, kv_slots: torch.Tensor, request_slots: torch.Tensor, scratch: int,
              num_rows: int) -> StepRows:
    """The rows of a varlen batch (cu_seqlens_q [B + 1]; sequences past the real ones have no rows) whose sequences
    use rings request_slots [B]; rows from cu_seqlens_q[-1] to num_rows are padding."""
    row = torch.arange(num_rows, device=kv_slots.device)
    ends = cu_seqlens_q[1:].long()
    seq = torch.searchsorted(ends, row, right=True).clamp(max=ends.shape[0] - 1)
    valid = row < ends[-1]
    return StepRows(torch.where(valid, request_slots[seq].long(), scratch), seq, kv_slots, valid)
