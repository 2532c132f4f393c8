from enum import Enum, auto
from itertools import count

import torch

from engine.outputs import SpecStats
from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, how many of them have KV in the cache, and its block table."""
    ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 generator: torch.Generator | None = None):
        self.seq_id = next(Sequence.ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.block_table: list[int] = []
        self.request_slot: int | None = None  # its per-request KV state (DeepSeek-V4's rings) while it holds blocks
        self.state_restore: tuple[int, int] | None = None  # (block end, state slot) its rings start from: a prefix hit
        self.state_saves: dict[int, int] = {}  # block end -> state slot its rings' rows are saved in, until filed
        self.block_hashes: list[bytes] = []  # prefix hashes of its full blocks (prefix caching), memoised
        self.num_filed_blocks = 0            # leading blocks of block_table already in the prefix cache
        self.num_cached_tokens = 0           # prompt tokens found in the prefix cache when last admitted
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.detokenizer = None
        self.proposal = None                  # the drafted block for the current anchor (speculative decoding)
        self.spec_token_ids: list[int] = []   # the prefix of it the target verifies this step
        self.spec_stats = SpecStats()
        self.mean_survival: list[float] | None = None  # running mean of its blocks' survivals (sps-lagged)
        self.pending_context: list = []  # (first position, target features) of committed rows without draft K/V yet

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_complete_tokens(self) -> int:
        """Leading tokens whose K/V is in every cache: computed by the target and, when drafting, in the draft's
        context too (queued draft context rows are not written yet; the queue is in position order)."""
        return self.pending_context[0][0] if self.pending_context else self.num_computed_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens the target still has to process: uncomputed ones plus the drafts chosen for verification."""
        return self.num_uncomputed_tokens + len(self.spec_token_ids)

    @property
    def is_decoding(self) -> bool:
        """Running with everything but the last token (the anchor) in the KV cache."""
        return self.status is SequenceStatus.RUNNING and self.num_computed_tokens == len(self.token_ids) - 1

    @property
    def reaches_end(self) -> bool:
        """This step's scheduled tokens are all it has pending: the step samples (or verifies) for it."""
        return self.num_pending_tokens == self.num_scheduled_tokens

    def advance(self):
        """The scheduled tokens' K/V is now in the cache (a verify step then rolls back what it rejected)."""
        self.num_computed_tokens += self.num_scheduled_tokens
        self.num_scheduled_tokens = 0

    def scheduled_token_ids(self) -> list[int]:
        start = self.num_computed_tokens
        return (self.token_ids + self.spec_token_ids)[start:start + self.num_scheduled_tokens]

    def clear_draft(self):
        self.proposal, self.spec_token_ids = None, []

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


def step_saves(seq) -> list[tuple[int, int]]:
    """The (block end, state slot) pairs of seq's saves that this step's positions reach."""
    start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
    return [(boundary, slot) for boundary, slot in seq.state_saves.items() if start < boundary <= end]
