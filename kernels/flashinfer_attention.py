"""FlashInfer's paged attention for the target on a GPU where flashinfer is installed (the Docker image).

One BatchPrefillWithPagedKVCacheWrapper serves prefill chunks, decode and ragged verify alike: each request brings
its newest q_len tokens (qo_indptr) and sees its keys causally, bottom-right aligned, as in kernels.attention. It is
planned once per step (FlashInfer schedules on the host) and run by every layer. The engine's per-layer cache
[Hkv, slots, D] is FlashInfer's HND layout [pages, Hkv, page_size, D] as a strided view, so nothing is copied.
Under CUDA graphs each token tier owns a wrapper over fixed buffers for a fixed number of requests; requests that
pad a step to that number have no queries and no keys."""
from dataclasses import dataclass

import torch

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended split-KV scratch, shared by every wrapper (one runs at a time)
HEAD_DIMS = (64, 128, 256)     # the head sizes FlashInfer's prefill kernels are built for
DTYPES = (torch.bfloat16, torch.float16)


def unavailable_reason() -> str:
    """Why flashinfer cannot be used here ("" when it can)."""
    try:
        import flashinfer  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a broken install (no CUDA libraries) raises more than ImportError
        return f"{type(error).__name__}: {error}"
    return ""


def has_kernels_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashInfer is built for this attention: CUDA, bf16/fp16, a head size its prefill kernels cover."""
    return device.type == "cuda" and dtype in DTYPES and head_dim in HEAD_DIMS


def probe(device: torch.device, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
          dtype: torch.dtype, workspace: torch.Tensor) -> str:
    """Why FlashInfer cannot run this attention here ("" when a one-token step runs). Its kernels compile on first
    use, which needs a CUDA toolkit that an installed package does not guarantee."""
    try:
        attention = FlashInferAttention(device, num_qo_heads, num_kv_heads, head_dim, page_size, dtype,
                                        head_dim ** -0.5, workspace)
        cache = torch.zeros(num_kv_heads, page_size, head_dim, dtype=dtype, device=device)
        attention.plan(page_table([1], [1], [[0]], page_size))
        attention.run(torch.zeros(1, num_qo_heads, head_dim, dtype=dtype, device=device), cache, cache)
    except Exception as error:  # noqa: BLE001 - whatever stops it, the engine says so or uses its own kernel
        return f"{type(error).__name__}: {error}"
    return ""


@dataclass
class PageTable:
    """A step's requests in FlashInfer's terms (int32, on the host; plan copies them to the GPU)."""
    qo_indptr: torch.Tensor      # [B+1] request b's queries are rows qo_indptr[b]:qo_indptr[b+1]
    kv_indptr: torch.Tensor      # [B+1] its pages are kv_indices[kv_indptr[b]:kv_indptr[b+1]]
    kv_indices: torch.Tensor     # [pages in use]
    last_page_len: torch.Tensor  # [B] keys in its last page (0 for a request with no keys)

    @property
    def num_requests(self) -> int:
        return self.last_page_len.shape[0]


def page_table(q_lens: list[int], kv_lens: list[int], block_tables: list[list[int]], page_size: int,
               num_requests: int = 0) -> PageTable:
    """Requests with q_lens new tokens among kv_lens keys, stored in the pages of block_tables, padded up to
    num_requests with requests that have no queries and no keys."""
    pad = max(0, num_requests - len(q_lens))
    pages = [-(-n // page_size) for n in kv_lens]
    qo, kv, indices, last = [0], [0], [], []
    for q, n, used, table in zip(q_lens, kv_lens, pages, block_tables):
        if len(table) < used:
            raise ValueError(f"a request with {n} keys needs {used} pages of {page_size}, its table has {len(table)}")
        qo.append(qo[-1] + q)
        kv.append(kv[-1] + used)
        indices += table[:used]
        last.append(n - (used - 1) * page_size if used else 0)
    qo += [qo[-1]] * pad
    kv += [kv[-1]] * pad
    last += [0] * pad

    def int32(values):
        return torch.tensor(values, dtype=torch.int32)
    return PageTable(int32(qo), int32(kv), int32(indices), int32(last))


def paged_view(cache: torch.Tensor, page_size: int) -> torch.Tensor:
    """[Hkv, slots, D] -> [pages, Hkv, page_size, D] (HND), a view."""
    heads, slots, dim = cache.shape
    return cache.view(heads, slots // page_size, page_size, dim).transpose(0, 1)


class FlashInferAttention:
    """The target's attention through one FlashInfer wrapper: plan(table) once a step, then run() in every layer."""

    def __init__(self, device: torch.device, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, scale: float, workspace: torch.Tensor, graph_requests: int = 0,
                 graph_pages: int = 0):
        import flashinfer
        self.shape = (num_qo_heads, num_kv_heads, head_dim, page_size)
        self.page_size, self.dtype, self.scale = page_size, dtype, scale
        buffers = {}
        if graph_requests:  # a CUDA graph replays fixed addresses: plan() writes each step's table into these
            def int32(n):
                return torch.zeros(n, dtype=torch.int32, device=device)
            buffers = {"use_cuda_graph": True, "qo_indptr_buf": int32(graph_requests + 1),
                       "paged_kv_indptr_buf": int32(graph_requests + 1), "paged_kv_indices_buf": int32(graph_pages),
                       "paged_kv_last_page_len_buf": int32(graph_requests)}
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "HND", **buffers)

    def plan(self, table: PageTable):
        self.wrapper.plan(table.qo_indptr, table.kv_indptr, table.kv_indices, table.last_page_len, *self.shape,
                          causal=True, sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] -> [T, H, D]; rows past the planned requests' queries (graph padding) are left unset."""
        return self.wrapper.run(q, (paged_view(k_cache, self.page_size), paged_view(v_cache, self.page_size)))
