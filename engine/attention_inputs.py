"""What one forward's attention needs, built on the host from the scheduled sequences (in flat-batch order), for each
attention path: the torch twins' padded groups (CPU), our Triton kernel's varlen batch, FlashInfer's page tables."""
from itertools import accumulate

import torch

from engine.context import AttentionGroup, VarlenBatch, device_tensor
from engine.sequence import Sequence
from kernels import flashinfer_attention
from kernels.attention import attention_mask

SHORT_QUERY = 16  # sequences with at most this many new tokens share one padded attention call


def q_and_kv_lens(seqs: list[Sequence]) -> tuple[list[int], list[int]]:
    q_lens = [s.num_scheduled_tokens for s in seqs]
    return q_lens, [s.num_computed_tokens + q for s, q in zip(seqs, q_lens)]


def key_slots(seqs: list[Sequence], kv_lens: list[int], block_size: int,
              device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Each sequence's key slots [B, longest] on the device, padded with slot 0."""
    position = torch.arange(max(kv_lens), device=device).expand(len(seqs), -1)
    return slots_at(seqs, position, position < device_tensor(kv_lens, device)[:, None], block_size, max(kv_lens))


def window_slots(seqs: list[Sequence], ends: list[int], window: int, block_size: int,
                 device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The slots of each sequence's last `window` positions before ends[b] [B, window], slot 0 before position 0."""
    position = device_tensor(ends, device)[:, None] - window + torch.arange(window, device=device)
    return slots_at(seqs, position, position >= 0, block_size, max(ends))


def slots_at(seqs: list[Sequence], position: torch.Tensor, present: torch.Tensor, block_size: int,
             longest: int) -> torch.Tensor:
    """The cache slots of positions [B, W] of each sequence (slot 0 where not present; all below longest), expanded
    on the device from the block tables: only a table per sequence is built on the host and copied, not an int per
    token (~0.5 s a step for four 1M-token contexts)."""
    blocks = max(1, -(-longest // block_size))  # one block at least: a gather needs a column to read
    tables = device_tensor([s.block_table[:blocks] + [0] * (blocks - len(s.block_table[:blocks])) for s in seqs],
                           position.device)
    position = torch.where(present, position, 0)
    found = tables.gather(1, position // block_size) * block_size + position % block_size
    return torch.where(present, found, 0)


def varlen_batch(seqs: list[Sequence], block_size: int, device: torch.device) -> VarlenBatch:
    q_lens, kv_lens = q_and_kv_lens(seqs)
    cu = list(accumulate(q_lens, initial=0))
    return VarlenBatch(device_tensor(cu, device, torch.int32), key_slots(seqs, kv_lens, block_size, device),
                       device_tensor(kv_lens, device, torch.int32), max(q_lens))


def page_table(seqs: list[Sequence], block_size: int, num_requests: int = 0) -> flashinfer_attention.PageTable:
    q_lens, kv_lens = q_and_kv_lens(seqs)
    return flashinfer_attention.page_table(q_lens, kv_lens, [s.block_table for s in seqs], block_size, num_requests)


def is_short(seq: Sequence) -> bool:
    return seq.num_scheduled_tokens <= SHORT_QUERY and seq.num_computed_tokens > 0


def attention_groups(seqs: list[Sequence], block_size: int) -> list[AttentionGroup]:
    """seqs come short-first: the short ones share one padded call, each long one gets its own."""
    short = [s for s in seqs if is_short(s)]
    groups, row = ([paged_group(short, 0, block_size)] if short else []), sum(s.num_scheduled_tokens for s in short)
    for seq in seqs[len(short):]:
        n = seq.num_scheduled_tokens
        causal = seq.num_computed_tokens == 0
        groups.append(AttentionGroup(None, None, None, True, row, n, 1, n, None) if causal
                      else paged_group([seq], row, block_size))
        row += n
    return groups


def paged_group(members: list[Sequence], row_start: int, block_size: int) -> AttentionGroup:
    """Members occupy consecutive rows of the flat batch starting at row_start."""
    q_lens, kv_lens = q_and_kv_lens(members)
    qmax = max(q_lens)
    uniform_q = all(q == qmax for q in q_lens)
    starts = [row_start + sum(q_lens[:b]) for b in range(len(members))]
    q_rows = None if uniform_q else torch.tensor([[r + min(i, q - 1) for i in range(qmax)]
                                                  for r, q in zip(starts, q_lens)])
    out_rows = None if uniform_q else torch.tensor([b * qmax + i for b, q in enumerate(q_lens) for i in range(q)])
    kv_slots = key_slots(members, kv_lens, block_size)
    mask = None if len(set(kv_lens)) == 1 and qmax == 1 else attention_mask(q_lens, kv_lens)
    group = AttentionGroup(q_rows, kv_slots, mask, False, row_start, sum(q_lens), len(members), qmax, out_rows)
    if qmax <= SHORT_QUERY:
        group.row_seq = torch.tensor([b for b, q in enumerate(q_lens) for _ in range(q)])
        group.row_limit = torch.tensor([n - q + i + 1 for q, n in zip(q_lens, kv_lens) for i in range(q)])
    return group
