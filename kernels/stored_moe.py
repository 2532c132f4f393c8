"""Grouped GEMMs over mixture-of-experts weights kept in DeepSeek-V4's stored formats: the routing both versions share
and the plain-torch twin (the test oracle) of kernels/triton_stored_moe.py, with the same signature.

    routing = route(expert_of_pair, num_experts)                 # on the device, no host sync
    out = stored_moe_gemm(x, data, scale, fp4, routing, rows_per_x)
    # a dense linear: one expert, all rows in one block, so each stored byte is read once
    out = stored_moe_gemm(x, w.data[None], w.scale[None], fp4, route(zeros, 1, block_for(len(x))), 1)

A pair is one (row, chosen expert); pair p reads x row p // rows_per_x (rows_per_x = top-k for the experts' first
projections, 1 for the second, whose input is already one row per pair) and writes out row p. A pair whose expert id
is num_experts (held by another rank) gets a zero row.

The weights are the checkpoint's bytes (engine/models/deepseek_v4/checkpoint.py), one slice per expert:
- FP8: e4m3 bytes [E, N, K] with float32 scales per 128x128 block [E, ceil(N / 128), ceil(K / 128)];
- MXFP4: e2m1 codes two per byte, the low nibble the even input, [E, N, K / 2], with e8m0 scale bytes
  (2^(byte - 127)) per 32 inputs [E, N, K / 32].

route() sorts the pairs by expert and pads each expert's run to whole blocks of BLOCK_M pairs, so a kernel program
owns one block: one expert, up to BLOCK_M pairs (vLLM's moe_align_block_size and fused_moe_kernel are laid out the
same way; learned from, not copied). Its sizes depend only on the pair count, so a CUDA graph can hold it."""
from typing import NamedTuple

import torch

BLOCK_M = 16  # pairs per block: decode and verify steps give an expert few pairs
DENSE_ROWS = 64  # the most rows a dense linear over a stored weight gives one block (block_for)
FP8_BLOCK, MX_GROUP = 128, 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class Routing(NamedTuple):
    expert: torch.Tensor  # [P] each pair's expert (num_experts: none here)
    pairs: torch.Tensor  # [blocks * BLOCK_M] int32: the pairs sorted by expert, each expert's run padded with P
    block_expert: torch.Tensor  # [blocks] int32: each block's expert, -1 past the last run
    num_experts: int
    block_m: int = BLOCK_M


def route(expert_of_pair: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> Routing:
    """expert_of_pair [P] in [0, num_experts] -> the pairs in blocks of one expert each. At most P blocks hold a pair
    (each holds at least one), so the sizes are P blocks or fewer whatever the routing."""
    expert = expert_of_pair.flatten().long()
    num_pairs, device = expert.numel(), expert.device
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device).index_add_(
        0, expert, torch.ones_like(expert))[:num_experts]
    blocks_of = (counts + block_m - 1) // block_m
    block_end = blocks_of.cumsum(0)
    order = torch.sort(expert, stable=True).indices
    sorted_expert = expert[order]
    present = sorted_expert < num_experts
    own = sorted_expert.clamp(max=num_experts - 1)
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[own]  # place in its expert's run
    num_blocks = min(num_pairs, -(-(num_pairs + num_experts * (block_m - 1)) // block_m))
    slot = torch.where(present, (block_end - blocks_of)[own] * block_m + rank, num_blocks * block_m)
    pairs = torch.full((num_blocks * block_m + 1,), num_pairs, dtype=torch.int32, device=device)
    pairs.scatter_(0, slot, order.to(torch.int32))
    blocks = torch.arange(num_blocks, device=device)
    owner = torch.searchsorted(block_end, blocks, right=True)
    block_expert = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return Routing(expert, pairs[:-1], block_expert, num_experts, block_m)


def block_for(rows: int) -> int:
    """A block size that holds `rows` pairs of one expert (a power of two, at least BLOCK_M)."""
    return max(BLOCK_M, 1 << (rows - 1).bit_length())


def check_inputs(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fp4: bool, routing: Routing,
                 rows_per_x: int):
    experts, n, packed_k = data.shape
    k = packed_k * 2 if fp4 else packed_k
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"stored_moe_gemm: x {tuple(x.shape)} does not match weights [{experts}, {n}, {k}]")
    want = (experts, n, k // MX_GROUP) if fp4 else (experts, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"stored_moe_gemm: scale {tuple(scale.shape)}, expected {want}")
    if routing.num_experts != experts or routing.expert.numel() > x.shape[0] * rows_per_x:
        raise ValueError(f"stored_moe_gemm: routing for {routing.num_experts} experts and {routing.expert.numel()} "
                         f"pairs does not fit {experts} experts and {x.shape[0]} rows of {rows_per_x} pairs")


def dequantize(data: torch.Tensor, scale: torch.Tensor, fp4: bool) -> torch.Tensor:
    """Stored expert weights [E, N, K or K/2] -> float32 [E, N, K], from the formats' definitions."""
    if fp4:
        raw = data.view(torch.uint8).long()
        codes = torch.stack((raw & 0x0F, raw >> 4), -1).flatten(-2)
        values = torch.tensor(E2M1, device=data.device)[codes]
        return values * torch.exp2(scale.view(torch.uint8).float() - 127).repeat_interleave(MX_GROUP, -1)
    n, k = data.shape[1:]
    blocks = scale.float().repeat_interleave(FP8_BLOCK, 1)[:, :n].repeat_interleave(FP8_BLOCK, 2)[:, :, :k]
    return data.view(torch.float8_e4m3fn).float() * blocks


def stored_moe_gemm(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fp4: bool, routing: Routing,
                    rows_per_x: int) -> torch.Tensor:
    """x [R, K] @ each pair's expert's weight.T -> [P, N] in x's dtype (fp32 products and sums). Dequantizes every
    expert: the oracle's way, sized for tests."""
    check_inputs(x, data, scale, fp4, routing, rows_per_x)
    weights = dequantize(data, scale, fp4)
    held = routing.expert < routing.num_experts
    rows = x[torch.arange(routing.expert.numel(), device=x.device) // rows_per_x].float()
    out = torch.einsum("pk,pnk->pn", rows, weights[routing.expert.clamp(max=routing.num_experts - 1)])
    return torch.where(held[:, None], out, 0).to(x.dtype)
