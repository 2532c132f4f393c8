"""Fused CPU ops for small steps (kernels/csrc/decode_ops.cpp; built by kernels/cpu_build): RMSNorm, SiLU·up,
per-head norm + rotary, paged KV store, short-query paged attention, and the draft's sequential vanilla-Markov
sampler over a whole block (twin: kernels/markov.py). At batch 1 a decoder layer is ~40 tiny torch
ops whose launch cost exceeds their math; these replace them with one call each. Every op equals its plain-torch twin
(engine/models/layers.py, kernels/attention.py) up to fp32 summation order, including the twin's bf16 roundings.
Inference only: `usable(x)` is False while autograd is recording, so training keeps the differentiable twins."""
import torch

from kernels.cpu_build import available, module
from kernels.sampling import GREEDY_EPS

FLOAT_DTYPES = (torch.bfloat16, torch.float32)


def usable(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in FLOAT_DTYPES and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return module().rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate, up) -> silu(gate) * up [..., I]."""
    return module().silu_mul(gate_up)


def norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None,
              k_norm: torch.Tensor | None, eps: float, num_heads: int, num_kv_heads: int):
    """qkv [T, (H + 2 Hkv) * D] -> q [T, H, D], k [T, Hkv, D], normed per head (if given) and rotated."""
    return module().norm_rope(qkv, cos, sin, q_norm, k_norm, eps, num_heads, num_kv_heads)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor):
    module().store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor,
                    row_seq: torch.Tensor, row_limit: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D]: row r sees the first row_limit[r] keys of sequence row_seq[r] (slots kv_slots[row_seq[r]])."""
    return module().paged_attention(q, k_cache, v_cache, kv_slots, row_seq, row_limit, scale)


def decoder_stack(layers: list[list[torch.Tensor]], num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
    """All decoder layers in one C++ call for short-query steps: .forward(h, cos, sin, slot_mapping, kv_slots,
    row_seq, row_limit, capture) -> [h, *captured]. Per layer: input norm, qkv weight, qkv bias, q norm, k norm,
    o weight, o bias, post-attention norm, gate_up weight, down weight, k cache, v cache (empty tensor = absent)."""
    return module().DecoderStack(layers, num_heads, num_kv_heads, head_dim, eps)


def markov_sample(base_logits: torch.Tensor, anchors: torch.Tensor, w1: torch.Tensor, w2_transposed: torch.Tensor,
                  temperature: torch.Tensor, uniforms: torch.Tensor,
                  vocab_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.markov.markov_sample with W2 given transposed as fp32 [rank, V'] (the caller keeps that copy): the
    whole sequential block in one call instead of ~15 torch ops per position."""
    return tuple(module().markov_sample(base_logits.float(), anchors, w1, w2_transposed, temperature, uniforms,
                                        vocab_ids, GREEDY_EPS))
