"""Triton sequential vanilla-Markov draft sampling fused over the G steps (twin: kernels.markov.markov_sample), with
no host round trip between sampling token k and biasing step k + 1 by it. The vocabulary is split across programs,
so each step streams W2 once at the GPU's bandwidth, whatever the batch:

1. per vocabulary block (every request in turn): logits = (base + W2 · W1[prev]) / T, written to the probs row as
   scratch, and the block's max, sum of exp(logit - max) and first argmax;
2. per request: the row's max, softmax denominator and argmax from the block statistics, each block's share of the
   probability mass from them alone (normalised, so the cdf ends at 1 up to rounding), the block where the cdf
   passes u, and the token inside that block;

then, once after the G steps, every row is turned into probabilities in place (the next step never waits on it)."""
import torch
import triton
import triton.language as tl

from kernels.sampling import GREEDY_EPS
from kernels.triton_support import require_triton_device

TILE = 8192  # elements of one [BLOCK_V, BLOCK_RANK] block of W2, held in registers across the requests
STATS_CHUNK = 1024  # block statistics combined per iteration
NORMALIZE_BLOCK = 1024


@triton.jit
def _logits_kernel(base_ptr, prev_ptr, w1_ptr, w2_ptr, temperature_ptr, probs_ptr, stat_max_ptr, stat_sum_ptr,
                   stat_arg_ptr, B, step, NB, stride_prev, stride_bb, stride_bg, stride_pb, stride_pg, stride_w1,
                   stride_w2, V, RANK, GREEDY_EPS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_RANK: tl.constexpr):
    blk = tl.program_id(0)
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    ranks = tl.arange(0, BLOCK_RANK)
    in_v = cols < V
    w2 = tl.load(w2_ptr + cols[:, None].to(tl.int64) * stride_w2 + ranks[None, :],
                 mask=in_v[:, None] & (ranks[None, :] < RANK), other=0.0).to(tl.float32)
    for b in range(B):
        prev = tl.load(prev_ptr + b * stride_prev).to(tl.int64)
        latent = tl.load(w1_ptr + prev * stride_w1 + ranks, mask=ranks < RANK, other=0.0).to(tl.float32)
        temperature = tl.load(temperature_ptr + b)
        scale = tl.where(temperature < GREEDY_EPS, 1.0, temperature)
        base = tl.load(base_ptr + b * stride_bb + step * stride_bg + cols, mask=in_v, other=0.0)
        x = tl.where(in_v, (base + tl.sum(w2 * latent[None, :], 1)) / scale, -float("inf"))
        tl.store(probs_ptr + b * stride_pb + step * stride_pg + cols, x, mask=in_v)
        top, arg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(stat_max_ptr + b * NB + blk, top)
        tl.store(stat_sum_ptr + b * NB + blk, tl.sum(tl.exp(x - top), 0))
        tl.store(stat_arg_ptr + b * NB + blk, blk * BLOCK_V + arg)


@triton.jit
def _row_max(stat_max_ptr, NB, CHUNK: tl.constexpr):
    """The row's max and the first block that holds it."""
    top = -float("inf")
    for start in range(0, NB, CHUNK):
        j = start + tl.arange(0, CHUNK)
        top = tl.maximum(top, tl.max(tl.load(stat_max_ptr + j, mask=j < NB, other=-float("inf")), 0))
    first = NB
    for start in range(0, NB, CHUNK):
        j = start + tl.arange(0, CHUNK)
        m = tl.load(stat_max_ptr + j, mask=j < NB, other=-float("inf"))
        first = tl.minimum(first, tl.min(tl.where((m == top) & (j < NB), j, NB), 0))
    return top, first


@triton.jit
def _block_mass(stat_max_ptr, stat_sum_ptr, j, NB, top, best_blk, greedy):
    """Each block's unnormalised probability mass: sum over the block of exp(logit - top), or one-hot when greedy."""
    m = tl.load(stat_max_ptr + j, mask=j < NB, other=-float("inf"))
    s = tl.load(stat_sum_ptr + j, mask=j < NB, other=0.0)
    return tl.where(greedy, (j == best_blk).to(tl.float32), s * tl.exp(m - top))


@triton.jit
def _pick_kernel(probs_ptr, stat_max_ptr, stat_sum_ptr, stat_arg_ptr, temperature_ptr, uniforms_ptr, vocab_ptr,
                 tokens_ptr, row_top_ptr, row_denom_ptr, row_best_ptr, step, G, NB, stride_pb, stride_pg, V,
                 GREEDY_EPS: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, HAS_VOCAB: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    greedy = tl.load(temperature_ptr + b) < GREEDY_EPS
    stats = b * NB
    top, best_blk = _row_max(stat_max_ptr + stats, NB, CHUNK)
    best = tl.load(stat_arg_ptr + stats + best_blk)
    denom = 0.0
    for start in range(0, NB, CHUNK):
        j = start + tl.arange(0, CHUNK)
        denom += tl.sum(_block_mass(stat_max_ptr + stats, stat_sum_ptr + stats, j, NB, top, NB, False), 0)
    denom = tl.where(greedy, 1.0, denom)
    # the block where the cdf of the normalised masses passes u, and the cdf before it
    threshold = tl.load(uniforms_ptr + b * G + step)
    total, found, carry_before, last_nonzero = 0.0, NB, 0.0, 0
    for start in range(0, NB, CHUNK):
        j = start + tl.arange(0, CHUNK)
        mass = _block_mass(stat_max_ptr + stats, stat_sum_ptr + stats, j, NB, top, best_blk, greedy) / denom
        cdf = total + tl.cumsum(mass, 0)
        first = tl.min(tl.where((cdf > threshold) & (j < NB), j, NB), 0)
        before = tl.sum(tl.where(j == first, cdf - mass, 0.0), 0)
        carry_before = tl.where((found == NB) & (first < NB), before, carry_before)
        found = tl.minimum(found, first)
        last_nonzero = tl.maximum(last_nonzero, tl.max(tl.where(mass > 0, j, 0), 0))
        total = tl.max(cdf, 0)
    carry_before = tl.where(found == NB, total, carry_before)  # rounding left u past the end: last block
    blk = tl.where(found == NB, last_nonzero, found)
    # the token inside that block
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = cols < V
    x = tl.load(probs_ptr + b * stride_pb + step * stride_pg + cols, mask=in_v, other=-float("inf"))
    q = tl.where(greedy, (cols == best).to(tl.float32), tl.exp(x - top) / denom)
    cdf = carry_before + tl.cumsum(q, 0)
    col = tl.min(tl.where((cdf > threshold) & in_v, cols, V), 0)
    col = tl.where(col == V, tl.max(tl.where((q > 0) & in_v, cols, 0), 0), col)  # never a zero-probability token
    token = tl.load(vocab_ptr + col).to(tl.int64) if HAS_VOCAB else col.to(tl.int64)
    tl.store(tokens_ptr + b * G + step, token)
    tl.store(row_top_ptr + b * G + step, top)
    tl.store(row_denom_ptr + b * G + step, denom)
    tl.store(row_best_ptr + b * G + step, best)


@triton.jit
def _normalize_kernel(probs_ptr, temperature_ptr, row_top_ptr, row_denom_ptr, row_best_ptr, G, V,
                      GREEDY_EPS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Every (request, step) row: logits -> probabilities in place."""
    blk, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    greedy = tl.load(temperature_ptr + row // G) < GREEDY_EPS
    top, denom, best = tl.load(row_top_ptr + row), tl.load(row_denom_ptr + row), tl.load(row_best_ptr + row)
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = cols < V
    x = tl.load(probs_ptr + row * V + cols, mask=in_v, other=-float("inf"))
    q = tl.where(greedy, (cols == best).to(tl.float32), tl.exp(x - top) / denom)
    tl.store(probs_ptr + row * V + cols, q, mask=in_v)


def markov_sample(base_logits: torch.Tensor, anchors: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  temperature: torch.Tensor, uniforms: torch.Tensor,
                  vocab_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DSparkDraft.sample_sequentially for a VanillaMarkov head, temperature only: no top-k / top-p / min-p, so the
    engine may use it only when no request in the batch sets them. base_logits [B, G, V'] fp32, anchors [B],
    w1 (markov_w1 embedding) [V, r], w2 (markov_w2, stored [V', r]), temperature [B] (< GREEDY_EPS: greedy),
    uniforms [B, G], optional vocab_ids [V'] (the token id of each column; None: V' = V) -> (tokens [B, G] int64,
    probs [B, G, V'] fp32)."""
    require_triton_device(base_logits, anchors, w1, w2, temperature, uniforms)
    _check_markov_inputs(base_logits, anchors, w1, w2, temperature, uniforms, vocab_ids)
    B, G, V = base_logits.shape
    on = {"device": base_logits.device}
    tokens = torch.empty(B, G, dtype=torch.int64, **on)
    probs = torch.empty(B, G, V, dtype=torch.float32, **on)
    if B == 0 or G == 0:
        return tokens, probs
    rank = w1.shape[1]
    block_rank = triton.next_power_of_2(rank)
    block_v = max(16, min(triton.next_power_of_2(V), TILE // block_rank))
    nb = triton.cdiv(V, block_v)
    stat_max, stat_sum = torch.empty(B, nb, dtype=torch.float32, **on), torch.empty(B, nb, dtype=torch.float32, **on)
    stat_arg = torch.empty(B, nb, dtype=torch.int32, **on)
    row_top, row_denom = torch.empty(B, G, dtype=torch.float32, **on), torch.empty(B, G, dtype=torch.float32, **on)
    row_best = torch.empty(B, G, dtype=torch.int32, **on)
    anchors, temperature = anchors.to(torch.int64).contiguous(), temperature.to(torch.float32).contiguous()
    uniforms = uniforms.to(torch.float32).contiguous()
    vocab = tokens if vocab_ids is None else vocab_ids.to(torch.int64).contiguous()  # unread without a vocabulary
    chunk = min(STATS_CHUNK, max(16, triton.next_power_of_2(nb)))
    for step in range(G):
        prev, stride_prev = (anchors, 1) if step == 0 else (tokens[:, step - 1], G)
        _logits_kernel[(nb,)](base_logits, prev, w1, w2, temperature, probs, stat_max, stat_sum, stat_arg, B, step,
                              nb, stride_prev, base_logits.stride(0), base_logits.stride(1), G * V, V, w1.stride(0),
                              w2.stride(0), V, rank, GREEDY_EPS=GREEDY_EPS, BLOCK_V=block_v, BLOCK_RANK=block_rank)
        _pick_kernel[(B,)](probs, stat_max, stat_sum, stat_arg, temperature, uniforms, vocab, tokens, row_top,
                           row_denom, row_best, step, G, nb, G * V, V, V, GREEDY_EPS=GREEDY_EPS, BLOCK_V=block_v,
                           CHUNK=chunk, HAS_VOCAB=vocab_ids is not None)
    normalize_block = min(NORMALIZE_BLOCK, max(16, triton.next_power_of_2(V)))
    _normalize_kernel[(triton.cdiv(V, normalize_block), B * G)](probs, temperature, row_top, row_denom, row_best, G,
                                                                V, GREEDY_EPS=GREEDY_EPS, BLOCK_V=normalize_block)
    return tokens, probs


def _check_markov_inputs(base_logits, anchors, w1, w2, temperature, uniforms, vocab_ids):
    if base_logits.dim() != 3 or base_logits.dtype != torch.float32 or base_logits.stride(2) != 1:
        raise ValueError(f"markov_sample: base_logits must be [B, G, V] float32 with a contiguous last dim, got "
                         f"{tuple(base_logits.shape)} {base_logits.dtype}")
    B, G, V = base_logits.shape
    if vocab_ids is not None and vocab_ids.shape != (V,):
        raise ValueError(f"markov_sample: vocab_ids {tuple(vocab_ids.shape)} must be [V'={V}], one id per column")
    rows = V if vocab_ids is None else w1.shape[0]
    if (w1.dim() != 2 or w1.shape[0] != rows or w2.shape != (V, w1.shape[1]) or w1.stride(1) != 1
            or w2.stride(1) != 1):
        raise ValueError(f"markov_sample: w1 {tuple(w1.shape)} must be [{rows}, r] and w2 {tuple(w2.shape)} "
                         f"[V'={V}, r], both with a contiguous last dim")
    if anchors.shape != (B,) or temperature.shape != (B,):
        raise ValueError(f"markov_sample: anchors {tuple(anchors.shape)} and temperature "
                         f"{tuple(temperature.shape)} must be [B={B}]")
    if uniforms.shape != (B, G):
        raise ValueError(f"markov_sample: uniforms {tuple(uniforms.shape)} must be [B={B}, G={G}]")
