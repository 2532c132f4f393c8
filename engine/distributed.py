"""Tensor parallelism's process group: this process's rank, the world size, and the collectives the layers run (gloo
on CPU, NCCL on GPU). Two groups: `compute` for the forwards' all-reduces and all-gathers, with a short timeout so a
rank that stops answering fails the step; `control` for the per-step input broadcast and start-up agreements, whose
long timeout lets workers wait through an idle server. Follows vLLM's parallel_state / communication_op split
(vllm/distributed/parallel_state.py)."""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.context import TIMINGS

IDLE_TIMEOUT = timedelta(days=7)  # a worker waits this long for the next step (rank 0 sends keep-alives)


class RankFailure(RuntimeError):
    """Another rank died or did not answer within the collective timeout."""


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    compute: object = None
    control: object = None
    timeout_s: float = 0.0
    expert_parallel: bool = False  # DeepSeek-V4's routed experts: whole experts per rank instead of each one split


_STATE = ParallelState()


def rank() -> int:
    return _STATE.rank


def world_size() -> int:
    return _STATE.world_size


def is_parallel() -> bool:
    return _STATE.world_size > 1


def is_driver() -> bool:
    """Rank 0: the scheduler, planner, sampling and the server run here; the other ranks only run forwards."""
    return _STATE.rank == 0


def expert_parallel() -> bool:
    return _STATE.expert_parallel and _STATE.world_size > 1


@contextmanager
def whole():
    """One process's view while the block runs: a model built there on the meta device has the checkpoint's full
    shapes (what a loader checks the checkpoint against before it takes this rank's slices)."""
    global _STATE
    state, _STATE = _STATE, ParallelState()
    try:
        yield
    finally:
        _STATE = state


def init(rank_: int, world: int, device_type: str, timeout_s: float, init_method: str = "env://",
         expert_parallel: bool = False):
    """Join the process group (init_method 'env://' reads MASTER_ADDR / MASTER_PORT, as torchrun sets them)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank_)) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    global _STATE
    _STATE = ParallelState(rank_, world, dist.group.WORLD, control, timeout_s, expert_parallel)


def shutdown():
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of each rank's partial x (a row-parallel linear's output), in place."""
    if _STATE.world_size == 1:
        return x
    x = x.contiguous()
    timed("all_reduce", dist.all_reduce, x, group=_STATE.compute)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Each rank's x [..., n] side by side -> [..., world * n], rank order (a vocabulary-parallel LM head's logits)."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    timed("all_gather", dist.all_gather, parts, x.contiguous(), group=_STATE.compute)
    return torch.cat(parts, dim=-1)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Each rank's x [n, ...] stacked -> [world * n, ...] (start-up only: a sharded weight made whole)."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.control)
    return torch.cat(parts)


def timed(name: str, collective, *args, **kwargs):
    """A collective, its wall time added to TIMINGS[name] when timings are on (rank 0's: it includes waiting for the
    slowest rank)."""
    if not TIMINGS.enabled:
        return collective(*args, **kwargs)
    with TIMINGS.section(name):
        return collective(*args, **kwargs)


def agree_min(value: int) -> int:
    """The smallest value any rank holds (the KV blocks every rank can allocate)."""
    if _STATE.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.control)
    return int(t.item())


def broadcast_control(t: torch.Tensor):
    """Rank 0's t to every rank, in place (CPU tensors, on the control group). Workers wait as long as the server
    idles; rank 0 waits the collective timeout (a gloo broadcast returns once every rank has taken it, so a rank that
    stopped reading would otherwise hold rank 0 for the control group's long timeout)."""
    if not is_driver():
        dist.broadcast(t, 0, group=_STATE.control)
        return
    work = dist.broadcast(t, 0, group=_STATE.control, async_op=True)
    timed("step_broadcast", work.wait, timeout=timedelta(seconds=_STATE.timeout_s))


def split(n: int, world: int | None = None, rank_: int | None = None) -> tuple[int, int]:
    """(start, count) of this rank's contiguous share of n items, shares differing by at most one."""
    world = _STATE.world_size if world is None else world
    rank_ = _STATE.rank if rank_ is None else rank_
    base, extra = divmod(n, world)
    return rank_ * base + min(rank_, extra), base + (rank_ < extra)


@dataclass(frozen=True)
class HeadSplit:
    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def head_split(num_heads: int, num_kv_heads: int, world: int | None = None,
               rank_: int | None = None) -> HeadSplit:
    """This rank's query and K/V heads. K/V heads are split (each with its query group; uneven when the count does
    not divide, e.g. 3 K/V heads over 2 ranks: 2 and 1); with fewer K/V heads than ranks each is replicated over
    world / num_kv_heads ranks that split its queries."""
    world = _STATE.world_size if world is None else world
    rank_ = _STATE.rank if rank_ is None else rank_
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} attention heads are not a multiple of {num_kv_heads} K/V heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        kv_start, kv_count = split(num_kv_heads, world, rank_)
        return HeadSplit(kv_start * group, kv_count * group, kv_start, kv_count)
    if world % num_kv_heads or num_heads % world:
        raise ValueError(f"tensor_parallel_size {world} must be a multiple of the {num_kv_heads} K/V heads and "
                         f"divide the {num_heads} attention heads when there are fewer K/V heads than ranks")
    q_start, q_count = split(num_heads, world, rank_)
    return HeadSplit(q_start, q_count, rank_ // (world // num_kv_heads), 1)
