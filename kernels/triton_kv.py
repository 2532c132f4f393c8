"""Triton KV store by slot mapping (twin: kernels.attention.store_kvcache)."""
import torch
import triton
import triton.language as tl

from kernels.triton_support import require_triton_device


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_slots,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + row)
    if slot >= 0:  # -1 marks a padding row (CUDA-graph buckets): nothing to store
        d = tl.arange(0, BLOCK_D)
        keep = d < HEAD_DIM
        k = tl.load(k_ptr + row * stride_kt + head * stride_kh + d, mask=keep)
        v = tl.load(v_ptr + row * stride_vt + head * stride_vh + d, mask=keep)
        dst = (head * num_slots + slot) * HEAD_DIM + d
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=keep)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=keep)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor):
    """k, v: [T, Hkv, D] (last dim contiguous); caches: contiguous [Hkv, num_slots, D]; slot -1 rows skipped."""
    require_triton_device(k, v, k_cache, v_cache, slot_mapping)
    T, Hkv, D = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.shape[0] != Hkv or k_cache.shape[2] != D:
        raise ValueError(f"store_kvcache: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if slot_mapping.shape != (T,):
        raise ValueError(f"store_kvcache: slot_mapping {tuple(slot_mapping.shape)} must be [{T}]")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kvcache: k/v need a contiguous last dim and the caches must be contiguous")
    if T:
        _store_kv_kernel[(T, Hkv)](k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
                                   k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                   HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D))
