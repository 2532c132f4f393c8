"""The engine's entry points to the kernels it has in two versions: Triton (the GPU path) when selected, else the
plain-torch twins (the CPU path). Triton modules are imported only when used, so CPU installs need no Triton.
(The fused Markov loop is chosen in DSparkDraft.draft_block: Triton on the Triton path, the C++ loop of
kernels/cpu_ops on CPU. The budget kernel has no CPU counterpart in the engine. Their twins kernels/markov.py and
kernels/budget.py are the test oracles.)"""
import torch

from kernels import attention, sampling, triton_support
from kernels import sinkhorn as sinkhorn_twin
from kernels import stored_moe as stored_moe_twin
from kernels import v4_attention as v4_attention_twin
from kernels import v4_indexer as v4_indexer_twin


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor):
    if triton_support.enabled():
        from kernels import triton_kv
        return triton_kv.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    return attention.store_kvcache(k, v, k_cache, v_cache, slot_mapping)


def block_attention(q, k, v, k_cache, v_cache, kv_slots, ctx_lens, scale: float) -> torch.Tensor:
    if triton_support.enabled():
        from kernels import triton_attention
        return triton_attention.block_attention(q, k, v, k_cache, v_cache, kv_slots, ctx_lens, scale)
    return attention.block_attention(q, k, v, k_cache, v_cache, kv_slots, ctx_lens, scale)


def v4_attention(q, window_kv, window: int, entries, entry_index, sinks, scale: float) -> torch.Tensor:
    """DeepSeek-V4's window + indexed-entries attention: Triton when selected, else the twin. V4Attention takes this
    path only with Triton selected; its CPU path keeps its own dense sink_attention."""
    if triton_support.enabled():
        from kernels import triton_v4_attention
        return triton_v4_attention.v4_attention(q, window_kv, window, entries, entry_index, sinks, scale)
    return v4_attention_twin.v4_attention(q, window_kv, window, entries, entry_index, sinks, scale)


def v4_rows_attention(q, window_keys, window_index, entries, entry_index, sinks, scale: float) -> torch.Tensor:
    """v4_attention for the rows of many sequences, keys by index (a DeepSeek-V4 decode / verify step in fixed
    shapes): Triton when selected, else the twin."""
    if triton_support.enabled():
        from kernels import triton_v4_attention
        return triton_v4_attention.v4_rows_attention(q, window_keys, window_index, entries, entry_index, sinks, scale)
    return v4_attention_twin.v4_rows_attention(q, window_keys, window_index, entries, entry_index, sinks, scale)


def stored_moe_gemm(x, data, scale, fp4: bool, routing, rows_per_x: int) -> torch.Tensor:
    """A grouped GEMM over experts kept in DeepSeek-V4's stored FP8 / MXFP4 bytes: Triton when selected, else the
    twin (which dequantizes every expert: the MoE takes this path only with Triton selected)."""
    if triton_support.enabled():
        from kernels import triton_stored_moe
        return triton_stored_moe.stored_moe_gemm(x, data, scale, fp4, routing, rows_per_x)
    return stored_moe_twin.stored_moe_gemm(x, data, scale, fp4, routing, rows_per_x)


def indexer_scores(q, weights, keys, index, scale: float) -> torch.Tensor:
    """DeepSeek-V4's Lightning indexer scores of rows whose keys come by index ([R, J] fp32): Triton when selected,
    else the twin."""
    if triton_support.enabled():
        from kernels import triton_v4_indexer
        return triton_v4_indexer.indexer_scores(q, weights, keys, index, scale)
    return v4_indexer_twin.indexer_scores(q, weights, keys, index, scale)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """mHC's Sinkhorn normalisation of [T, N, N] fp32 matrices: one Triton launch when selected (and no gradient is
    asked for: the kernel has no backward), else the twin."""
    if triton_support.enabled() and not comb.requires_grad:
        from kernels import triton_sinkhorn
        return triton_sinkhorn.sinkhorn(comb, iters, eps)
    return sinkhorn_twin.sinkhorn(comb, iters, eps)


def rejection_sample(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms):
    if triton_support.enabled():
        from kernels import triton_rejection
        return triton_rejection.rejection_sample(target_probs, draft_probs, draft_tokens, num_drafts, uniforms,
                                                 bonus_uniforms)
    return sampling.rejection_sample(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, bonus_uniforms)
