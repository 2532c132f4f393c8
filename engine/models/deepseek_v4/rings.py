"""Per-request rings: what a DeepSeek-V4 step needs from before its first position (the sliding window's K=V, a
compressor's raw projections of the tokens its next entry pools) lives in one ring per request, row p at p % capacity.
A ring holds `span` positions back plus `rollback`, the most a verify step can reject: rejected positions are never
erased, only written over when they are computed again, so the rows before a rolled-back step's first position are
still there (vLLM keeps DeepSeek-V4's window and compressor state per request too; the rollback margin is ours).

For the prefix cache a ring also keeps states: the `keep` rows before a block end that a step starting there reads,
saved by the step that crosses that end and loaded into another request's ring that starts there
(engine/block_end_states.py).

A decode / verify step in fixed shapes (engine/models/deepseek_v4/step_rows.py) writes its rows first (`put`, by
index: no host sync) and then reads each row's span back by index; one more ring row, after the requests', takes the
writes of padding rows. Which positions a request's rings hold is the model's to track (V4Model.guard_rings): every
ring is written by the same steps."""
import torch


class Ring:
    def __init__(self, width: int, span: int, keep: int):
        self.width, self.span, self.keep = width, span, keep
        self.capacity = span
        self.buffer: torch.Tensor | None = None  # [requests + 1, capacity, width]: the last row is scratch
        self.states: torch.Tensor | None = None  # [state slots, keep, width]: rows before a block end, right-aligned

    def bytes_per_request(self, rollback: int, dtype: torch.dtype) -> int:
        return (self.span + rollback) * self.width * dtype.itemsize

    def bytes_per_state(self, dtype: torch.dtype) -> int:
        return self.keep * self.width * dtype.itemsize

    def allocate(self, requests: int, rollback: int, dtype: torch.dtype, device: torch.device, states: int = 0):
        self.capacity = self.span + rollback
        self.buffer = torch.zeros(requests + 1, self.capacity, self.width, dtype=dtype, device=device)
        self.states = torch.zeros(states, self.keep, self.width, dtype=dtype, device=device)

    @property
    def margin(self) -> int:
        """The positions a step may roll back: what the ring keeps beyond the span it reads back."""
        return self.capacity - self.span

    def read(self, request: int, start: int, end: int) -> torch.Tensor:
        """Rows of positions start..end-1 [end - start, width] (the model checks that the ring holds them)."""
        return self.buffer[request, self.places(start, end)]

    def write(self, request: int, start: int, rows: torch.Tensor):
        """Rows of positions start.. (only the last `capacity` of them can matter later)."""
        end = start + rows.shape[0]
        first = max(start, end - self.capacity)
        self.buffer[request, self.places(first, end)] = rows[first - start:].to(self.buffer.dtype)

    def places(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.buffer.device) % self.capacity

    def save(self, request: int, start: int, rows: torch.Tensor, end: int, state: int):
        """Keep positions end-keep..end-1 as state `state`, from the ring's earlier rows and `rows` (a step's rows of
        positions start.., not written yet); before position keep, only the positions from 0."""
        first = max(0, end - self.keep)
        earlier = self.read(request, first, start) if first < start else rows[:0]
        kept = torch.cat([earlier.to(rows.dtype), rows[max(first, start) - start:end - start]])
        self.states[state, self.keep - kept.shape[0]:] = kept.to(self.states.dtype)

    def save_written(self, request: int, end: int, state: int):
        """save, once the rows up to end are in the ring (a fixed-shape step writes them first)."""
        self.save(request, end, self.buffer.new_empty(0, self.width), end, state)

    def load(self, request: int, end: int, state: int):
        """Make request's ring what it was at position end when `state` was saved there."""
        count = min(self.keep, end)
        self.write(request, end - count, self.states[state, self.keep - count:])

    @property
    def scratch(self) -> int:
        """The ring row that padding rows of a fixed-shape step write to (never read)."""
        return self.buffer.shape[0] - 1

    def put(self, ring_rows: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor):
        """rows [T, width] of positions [T] into ring rows [T], by index (the host's `ends` are the caller's)."""
        self.buffer[ring_rows, positions % self.capacity] = rows.to(self.buffer.dtype)

    def last_rows(self, ring_rows: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
        """For each of positions [T] in ring rows [T], the rows of flat() holding its last `count` positions up to it
        [T, count], -1 for positions before 0."""
        span = positions[:, None] + torch.arange(1 - count, 1, device=positions.device)
        return torch.where(span >= 0, ring_rows[:, None] * self.capacity + span % self.capacity, -1)

    def flat(self) -> torch.Tensor:
        return self.buffer.view(-1, self.width)
