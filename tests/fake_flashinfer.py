"""A stand-in for flashinfer's BatchPrefillWithPagedKVCacheWrapper on CPU, written from its documented contract
(flashinfer 0.6: the constructor's CUDA-graph buffers, plan's page-table arguments and checks, run's paged cache in
NHD or HND layout, causal masks aligned to the newest key), with plain per-request attention and no code of ours.
It reads the page tables on the host, so a real CUDA graph cannot capture it. It lets CI check how the engine drives
FlashInfer: the page tables it builds, padding to a graph's fixed request
count, and that runs read only what plan wrote into the graph buffers. Rows past the planned queries come back NaN, so
an engine that used them would show it."""
import math
import types

import torch
import torch.nn.functional as F


class BatchPrefillWithPagedKVCacheWrapper:
    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf=None,
                 paged_kv_last_page_len_buf=None, custom_mask_buf=None, mask_indptr_buf=None, backend: str = "auto"):
        if kv_layout not in ("NHD", "HND"):
            raise KeyError(f"Invalid kv_layout {kv_layout}")
        self.layout, self.graph = kv_layout, use_cuda_graph
        self.max_rows = None
        if use_cuda_graph:
            for name, buf in [("qo_indptr_buf", qo_indptr_buf), ("paged_kv_indptr_buf", paged_kv_indptr_buf),
                              ("paged_kv_indices_buf", paged_kv_indices_buf),
                              ("paged_kv_last_page_len_buf", paged_kv_last_page_len_buf)]:
                if not torch.is_tensor(buf):
                    raise ValueError(f"{name} should be a torch.Tensor in CUDA graph mode")
            self.batch_size = len(qo_indptr_buf) - 1
            if len(paged_kv_indptr_buf) != self.batch_size + 1 or len(paged_kv_last_page_len_buf) != self.batch_size:
                raise ValueError("graph buffers disagree on the batch size")
        self.bufs = [qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf]
        self.plans = 0

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
             num_kv_heads: int, head_dim_qk: int, page_size: int, head_dim_vo=None, custom_mask=None,
             packed_custom_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale=None, window_left: int = -1, logits_soft_cap=None,
             rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None, o_data_type=None,
             non_blocking: bool = True):
        arrays = [qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len]
        assert all(a.dtype == torch.int32 for a in arrays), "page tables are int32"
        assert num_qo_heads % num_kv_heads == 0
        batch, rows = len(qo_indptr) - 1, int(qo_indptr[-1])
        assert len(paged_kv_indptr) == batch + 1 and len(paged_kv_last_page_len) == batch
        assert len(paged_kv_indices) == int(paged_kv_indptr[-1])
        assert bool((qo_indptr.diff() >= 0).all()) and bool((paged_kv_indptr.diff() >= 0).all())
        if self.graph:
            self.max_rows = rows if self.max_rows is None else self.max_rows
            if rows > self.max_rows:
                raise ValueError("The total number of rows in qo_indptr in cuda graph mode cannot exceed the number "
                                 "of rows set during initialization")
            if batch != self.batch_size:
                raise ValueError("The batch size should be fixed during the lifecycle of the wrapper in cuda graph "
                                 "mode")
            if len(paged_kv_indices) > len(self.bufs[2]):
                raise ValueError("The length of paged_kv_indices exceeds the allocated buffer size.")
            for buf, a in zip(self.bufs, arrays):
                buf[:len(a)].copy_(a)
        else:
            self.bufs = [a.clone() for a in arrays]
        self.heads, self.head_dim, self.page_size = (num_qo_heads, num_kv_heads), head_dim_qk, page_size
        self.causal = causal
        self.scale = sm_scale if sm_scale is not None else 1 / math.sqrt(head_dim_qk)
        self.q_dtype = q_data_type
        self.kv_dtype = kv_data_type if kv_data_type is not None else q_data_type
        self.plans += 1

    def run(self, q: torch.Tensor, paged_kv_cache, *, out=None, lse=None, return_lse: bool = False):
        k_cache, v_cache = paged_kv_cache
        if q.dtype != self.q_dtype or k_cache.dtype != self.kv_dtype:
            raise ValueError("q / kv dtypes do not match the plan")
        if self.layout == "HND":  # [pages, Hkv, page, D] -> [pages, page, Hkv, D]
            k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        num_heads, num_kv = self.heads
        assert k_cache.shape[1:] == (self.page_size, num_kv, self.head_dim) and q.shape[1:] == (num_heads,
                                                                                                  self.head_dim)
        qo, kv, indices, last = (b.tolist() for b in self.bufs)
        result = torch.full_like(q, float("nan"))
        for b in range(len(last)):
            pages = indices[kv[b]:kv[b + 1]]
            kv_len = max(len(pages) - 1, 0) * self.page_size + last[b]
            rows = slice(qo[b], qo[b + 1])
            if qo[b + 1] > qo[b]:
                keys = k_cache[pages].flatten(0, 1)[:kv_len]
                values = v_cache[pages].flatten(0, 1)[:kv_len]
                result[rows] = self.attend(q[rows], keys, values)
        return result

    def attend(self, q, keys, values):
        """q [Q, H, D] against keys/values [L, Hkv, D]: query i sees key j when j <= L - Q + i (if causal)."""
        Q, L = q.shape[0], keys.shape[0]
        visible = torch.ones(Q, L, dtype=torch.bool, device=q.device)
        if self.causal:
            visible = torch.arange(L, device=q.device)[None, :] <= (L - Q + torch.arange(Q, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), keys.transpose(0, 1).float(),
                                             values.transpose(0, 1).float(), attn_mask=visible, scale=self.scale,
                                             enable_gqa=True)
        return out.transpose(0, 1).to(q.dtype)


def module() -> types.ModuleType:
    fake = types.ModuleType("flashinfer")
    fake.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    return fake
