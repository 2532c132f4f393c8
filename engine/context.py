"""Module-level state a step's code reads without passing it down: the forward context the layers attend with, and
the opt-in wall-clock accounting of the step's named parts (benchmarks and the profiler read it)."""
import time
from collections import defaultdict
from contextlib import contextmanager
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
class VarlenBatch:
    """The whole flat batch for one varlen attention call (the Triton path): sequence b owns query rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] and its keys are kv_slots[b, :kv_lens[b]] in the paged cache."""
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    kv_slots: torch.Tensor      # [B, Lmax] long
    kv_lens: torch.Tensor       # [B] int32
    max_q_len: int


@dataclass
class Context:
    slot_mapping: torch.Tensor | None = None
    groups: list[AttentionGroup] = field(default_factory=list)
    varlen: VarlenBatch | None = None
    planned: object = None  # with FlashInfer: the kernels.flashinfer_attention wrapper planned for this step


_CONTEXT = Context()


def device_tensor(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A step's host-built indices on the device (pinned and non-blocking when that is a GPU)."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def get_context() -> Context:
    return _CONTEXT


def set_context(slot_mapping: torch.Tensor, groups: list[AttentionGroup], varlen: VarlenBatch | None = None,
                planned=None):
    global _CONTEXT
    _CONTEXT = Context(slot_mapping, groups, varlen, planned)


def reset_context():
    global _CONTEXT
    _CONTEXT = Context()


class Timings:
    def __init__(self):
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, name: str):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds accumulated since the last take(), by section."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


TIMINGS = Timings()
