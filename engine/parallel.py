"""Which slice of a full checkpoint tensor each rank holds: a module records its Shard when it is built with its local
size, and the loaders cut every tensor to it before loading (weights are sharded at load, never after, so a linear
whose weight is not a plain float tensor can take its slice the same way)."""
from dataclasses import dataclass

import torch
from torch import nn

from engine import distributed


@dataclass(frozen=True)
class Shard:
    """Rows (dim 0: a column-parallel linear, a vocabulary-parallel table) or columns (dim 1: a row-parallel linear)
    ranges of the full tensor, concatenated; pad_to zero-pads the rows (a vocabulary split that does not divide)."""
    dim: int
    ranges: tuple[tuple[int, int], ...]
    pad_to: int = 0

    def take(self, full: torch.Tensor):
        if not isinstance(full, torch.Tensor):  # a weight kept as stored (engine/models/deepseek_v4/stored.py)
            return full.take_shard(self)
        part = torch.cat([full.narrow(self.dim, start, count) for start, count in self.ranges], self.dim)
        if self.pad_to > part.shape[0]:
            part = torch.cat([part, part.new_zeros(self.pad_to - part.shape[0], *part.shape[1:])])
        return part.contiguous()

    def take_bias(self, full: torch.Tensor) -> torch.Tensor:
        """A column-parallel bias is cut like the rows; a row-parallel one is added once, by rank 0 (the all-reduce
        sums the ranks' outputs)."""
        if self.dim == 0:
            return self.take(full)
        return full if distributed.rank() == 0 else torch.zeros_like(full)


def rows(*ranges: tuple[int, int]) -> Shard:
    return Shard(0, tuple(ranges))


def columns(*ranges: tuple[int, int]) -> Shard:
    return Shard(1, tuple(ranges))


def fused_rows(full_sizes: list[int], parts: list[tuple[int, int]]) -> Shard:
    """The rows of a fused weight (q|k|v, gate|up) whose part i is full_sizes[i] rows long and of which this rank
    holds parts[i] = (start, count) within that part."""
    offsets = [sum(full_sizes[:i]) for i in range(len(full_sizes))]
    return rows(*[(offset + start, count) for offset, (start, count) in zip(offsets, parts)])


def vocab_shard(vocab_size: int) -> tuple[Shard, int, int]:
    """(shard, first token id, token count) of this rank's vocabulary rows: equal padded shares, so the ranks'
    logits gather into one [.., world * share] row that is cut back to vocab_size."""
    share = -(-vocab_size // distributed.world_size())
    start = min(distributed.rank() * share, vocab_size)
    count = min(share, vocab_size - start)
    return Shard(0, ((start, count),), share), start, count


def whole_shapes(build) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state of build() (a model constructor) as one process builds it, on the meta device:
    the checkpoint's full shapes, which a loader checks before it cuts this rank's slices."""
    with distributed.whole(), torch.device("meta"):
        return {name: tuple(t.shape) for name, t in build().state_dict().items()}


def held_by(key: str, modules: set[str]) -> bool:
    """Whether the state key belongs to one of these modules (or to a module inside one)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def shard_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The full checkpoint state cut to this rank's slices, by each module's recorded `shard` (its weight and bias)
    and `param_shards` (other parameters by name); the tensors of a module `held_elsewhere` (an expert on another
    rank) are dropped."""
    if not distributed.is_parallel():
        return state
    elsewhere = {name for name, module in model.named_modules() if getattr(module, "held_elsewhere", False)}
    if elsewhere:
        for key in [k for k in state if held_by(k, elsewhere)]:  # one pass over the keys, not one per module
            del state[key]
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if (shard := getattr(module, "shard", None)) is not None:
            if prefix + "weight" in state:
                state[prefix + "weight"] = shard.take(state[prefix + "weight"])
            if prefix + "bias" in state:
                state[prefix + "bias"] = shard.take_bias(state[prefix + "bias"])
        for param, shard in getattr(module, "param_shards", {}).items():
            if prefix + param in state:
                state[prefix + param] = shard.take(state[prefix + param])
    return state
