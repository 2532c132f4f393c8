"""Anchored training blocks (DeepSpec `common.py`): random anchors per conversation, the block inputs
[token at anchor, MASK x (G-1)] and labels, the packed attention mask and the eval mask."""
from dataclasses import dataclass, fields

import torch


@dataclass
class Blocks:
    anchors: torch.Tensor      # [A] sorted positions
    input_ids: torch.Tensor    # [A, G] the anchor token then mask tokens
    positions: torch.Tensor    # [A, G] anchor + k
    labels: torch.Tensor       # [A, G] input_ids[anchor + 1 + k] (0 where past the end)
    valid: torch.Tensor        # [A, G] bool: a supervised label and every earlier label in the block too
    context_start: torch.Tensor | None = None  # [A] first context position each block may see (None = 0: one
    #                                            conversation; train/gpu_leg.py packs several into one forward)

    def to(self, device) -> "Blocks":
        return Blocks(*(None if (t := getattr(self, f.name)) is None else t.to(device) for f in fields(self)))


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions p <= S-2 whose token and next token are both supervised (the first label is an answer token)."""
    m = loss_mask.bool()
    return torch.nonzero(m[:-1] & m[1:]).flatten()


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    candidates = anchor_candidates(loss_mask)
    if len(candidates) > num_anchors:
        candidates = candidates[torch.randperm(len(candidates), generator=generator)[:num_anchors]]
    return candidates.sort().values


def make_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int,
                mask_token_id: int) -> Blocks:
    S, G = len(input_ids), block_size
    positions = anchors[:, None] + torch.arange(G)
    block_ids = torch.full((len(anchors), G), mask_token_id, dtype=torch.long)
    block_ids[:, 0] = input_ids[anchors]
    label_pos = positions + 1
    inside = label_pos < S
    safe = label_pos.clamp(max=S - 1)
    labels = torch.where(inside, input_ids[safe].long(), 0)
    valid = (inside & loss_mask.bool()[safe]).long().cumprod(dim=1).bool()
    return Blocks(anchors, block_ids, positions, labels, valid)


def block_attention_mask(anchors: torch.Tensor, context_len: int, block_size: int,
                         context_start: torch.Tensor | None = None) -> torch.Tensor:
    """[A*G, S + A*G] bool (True = may attend): a block's queries see context positions < its anchor (and >= its
    context_start) and every position of their own block (bidirectionally); blocks never see each other."""
    A, G = len(anchors), block_size
    p = torch.arange(context_len, device=anchors.device)[None, :]
    context = p < anchors[:, None]                                                      # [A, S]
    if context_start is not None:
        context &= p >= context_start[:, None]
    own_block = torch.eye(A, dtype=torch.bool, device=anchors.device).repeat_interleave(G, dim=1)  # [A, A*G]
    return torch.cat([context, own_block], dim=1).repeat_interleave(G, dim=0)
