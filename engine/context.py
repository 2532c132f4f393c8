from dataclasses import dataclass, field

import torch


@dataclass
class AttentionGroup:
    """Sequences whose attention runs in one call (padded to the longest query / key length)."""
    q_rows: torch.Tensor | None      # [B, Qmax] rows of the flat batch (None: rows are contiguous, uniform length)
    kv_slots: torch.Tensor | None    # [B, Lmax] cache slots of each key (None: keys are this step's own tokens)
    mask: torch.Tensor | None        # [B, Qmax, Lmax] bool, True = may attend (None: no masking needed)
    causal: bool                     # plain causal self-attention over the step's own tokens
    row_start: int
    num_rows: int
    batch: int
    q_len: int
    out_rows: torch.Tensor | None    # [num_rows] index into the padded [B*Qmax] output (None: identity)
    row_seq: torch.Tensor | None = None    # [num_rows] short queries only: each row's sequence (index into kv_slots)
    row_limit: torch.Tensor | None = None  # [num_rows] ... and how many of its keys it sees (the fused CPU path)


@dataclass
class Context:
    slot_mapping: torch.Tensor | None = None
    groups: list[AttentionGroup] = field(default_factory=list)


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(slot_mapping: torch.Tensor, groups: list[AttentionGroup]):
    global _CONTEXT
    _CONTEXT = Context(slot_mapping, groups)


def reset_context():
    global _CONTEXT
    _CONTEXT = Context()
