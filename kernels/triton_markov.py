"""Triton sequential vanilla-Markov draft sampling fused over the G steps (twin: kernels.markov.markov_sample).
One program per request walks the steps on the device, so sampling token k and biasing step k + 1 by it needs no
host round trip. Each step makes three passes over the vocabulary in blocks: logits (written to the probs row as
scratch) with an online max / sum / argmax, then the probabilities, then the inverse-CDF search."""
import torch
import triton
import triton.language as tl

from engine.sampling_params import GREEDY_EPS
from kernels.triton_support import require_triton_device

MAX_BLOCK_V = 1024
TILE = 8192  # elements of one [BLOCK_V, BLOCK_RANK] block of W2


@triton.jit
def _logits_pass(base_ptr, w1_ptr, w2_ptr, out_ptr, prev, scale, stride_w1, stride_w2, V, RANK,
                 BLOCK_V: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """Writes (base + W2 · W1[prev]) / scale to out; returns its max, softmax denominator and first argmax."""
    ranks = tl.arange(0, BLOCK_RANK)
    latent = tl.load(w1_ptr + prev * stride_w1 + ranks, mask=ranks < RANK, other=0.0).to(tl.float32)
    top, denom, best = -float("inf"), 0.0, 0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_v = cols < V
        w2 = tl.load(w2_ptr + cols[:, None] * stride_w2 + ranks[None, :],
                     mask=in_v[:, None] & (ranks[None, :] < RANK), other=0.0).to(tl.float32)
        base = tl.load(base_ptr + cols, mask=in_v, other=0.0)
        x = tl.where(in_v, (base + tl.sum(w2 * latent[None, :], 1)) / scale, -float("inf"))
        tl.store(out_ptr + cols, x, mask=in_v)
        block_top, block_best = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        best = tl.where(block_top > top, start + block_best, best)  # strict: ties keep the earlier block
        new_top = tl.maximum(top, block_top)
        denom = denom * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
        top = new_top
    return top, denom, best


@triton.jit
def _probs_pass(row_ptr, top, denom, best, greedy, V, BLOCK_V: tl.constexpr):
    """Turns the logits in row into probabilities in place; returns the row's cdf total."""
    total = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_v = cols < V
        x = tl.load(row_ptr + cols, mask=in_v, other=-float("inf"))
        q = tl.where(greedy, (cols == best).to(tl.float32), tl.exp(x - top) / denom)
        tl.store(row_ptr + cols, q, mask=in_v)
        total = tl.max(total + tl.cumsum(q, 0), 0)  # carried like the search below, so both end on the same total
    return total


@triton.jit
def _inverse_cdf_pass(row_ptr, threshold, V, BLOCK_V: tl.constexpr):
    """First index whose running cdf exceeds threshold (V - 1 if rounding leaves none)."""
    token, carry = V - 1, 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_v = cols < V
        cdf = carry + tl.cumsum(tl.load(row_ptr + cols, mask=in_v, other=0.0), 0)
        token = tl.minimum(token, tl.min(tl.where((cdf > threshold) & in_v, cols, V), 0))
        carry = tl.max(cdf, 0)
    return token


@triton.jit
def _markov_kernel(base_ptr, anchors_ptr, w1_ptr, w2_ptr, temperature_ptr, uniforms_ptr, vocab_ptr, tokens_ptr,
                   probs_ptr, stride_bb, stride_bg, stride_w1, stride_w2, G, V, RANK, GREEDY_EPS: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_VOCAB: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperature_ptr + b)
    greedy = temperature < GREEDY_EPS
    scale = tl.where(greedy, 1.0, temperature)
    prev = tl.load(anchors_ptr + b)
    for k in range(G):
        row_ptr = probs_ptr + (b * G + k) * V
        top, denom, best = _logits_pass(base_ptr + b * stride_bb + k * stride_bg, w1_ptr, w2_ptr, row_ptr, prev,
                                        scale, stride_w1, stride_w2, V, RANK, BLOCK_V, BLOCK_RANK)
        tl.debug_barrier()  # the row is re-read by other threads of this program
        total = _probs_pass(row_ptr, top, denom, best, greedy, V, BLOCK_V)
        tl.debug_barrier()
        u = tl.load(uniforms_ptr + b * G + k)
        prev = _inverse_cdf_pass(row_ptr, u * total, V, BLOCK_V).to(tl.int64)
        if HAS_VOCAB:  # column -> token id: the next step's Markov row and the output are token ids
            prev = tl.load(vocab_ptr + prev)
        tl.store(tokens_ptr + b * G + k, prev)


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
    tokens = torch.empty(B, G, dtype=torch.int64, device=base_logits.device)
    probs = torch.empty(B, G, V, dtype=torch.float32, device=base_logits.device)
    if B == 0 or G == 0:
        return tokens, probs
    rank = w1.shape[1]
    block_rank = triton.next_power_of_2(rank)
    block_v = max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V, TILE // block_rank))
    vocab = tokens if vocab_ids is None else vocab_ids.to(torch.int64).contiguous()  # unread without a vocabulary
    _markov_kernel[(B,)](base_logits, anchors.to(torch.int64).contiguous(), w1, w2,
                         temperature.to(torch.float32).contiguous(),
                         uniforms.to(torch.float32).contiguous(), vocab, tokens, probs,
                         base_logits.stride(0), base_logits.stride(1), w1.stride(0), w2.stride(0), G, V, rank,
                         GREEDY_EPS=GREEDY_EPS, BLOCK_V=block_v, BLOCK_RANK=block_rank,
                         HAS_VOCAB=vocab_ids is not None)
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
