"""The Triton paged varlen attention kernel against its torch twins (kernels.attention), on scattered cache slots."""
import pytest
import torch

from kernels import attention as twin
from kernels import triton_attention as kernel

NUM_SLOTS = 512
# (q_len, kv_len, non_causal_tail): prefill, chunked prefill, decode, verify, verify ending in a draft block
MIXED_BATCH = [(70, 70, 0), (20, 85, 0), (1, 67, 0), (5, 41, 0), (6, 99, 4)]
# (query heads, KV heads, head_dim, dtype); bf16 with head_dim 80 runs in the block tests
CASES = {"gqa-d64-fp32": (8, 2, 64, torch.float32), "gqa-d64-bf16": (8, 2, 64, torch.bfloat16),
         "mha-d80-fp32": (2, 2, 80, torch.float32)}
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1e-2, 1.6e-2)}  # (atol, rtol)


def make_cache(gen: torch.Generator, heads: int, head_dim: int, dtype: torch.dtype, device):
    k_cache = torch.randn(heads, NUM_SLOTS, head_dim, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(heads, NUM_SLOTS, head_dim, generator=gen).to(dtype).to(device)
    return k_cache, v_cache


def scattered_slots(gen: torch.Generator, kv_lens: list[int], device) -> torch.Tensor:
    """Each sequence owns distinct slots drawn from a random permutation of the cache; padding points at slot 0."""
    perm = torch.randperm(NUM_SLOTS, generator=gen)
    slots = torch.zeros(len(kv_lens), max(kv_lens) + 3, dtype=torch.int32)
    start = 0
    for b, n in enumerate(kv_lens):
        slots[b, :n] = perm[start:start + n]
        start += n
    return slots.to(device)


def make_varlen(batch, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_lens, kv_lens, tails = (list(col) for col in zip(*batch))
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype).to(device)
    k_cache, v_cache = make_cache(gen, kv_heads, head_dim, dtype, device)
    cu_seqlens_q = int32([0] + q_lens, device).cumsum(0).to(torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_seqlens_q,
                kv_slots=scattered_slots(gen, kv_lens, device), kv_lens=int32(kv_lens, device),
                non_causal_tail=int32(tails, device) if any(tails) else None, scale=head_dim ** -0.5)


def int32(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def on_cpu_fp32(inputs: dict) -> dict:
    """The twin's inputs: CPU copies, widened to fp32 so the oracle itself is not a bf16 computation."""
    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.cpu().float() if x.is_floating_point() else x.cpu()
    return {name: move(x) for name, x in inputs.items()}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert out.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_mixed_batch_matches_twin(kernel_device, case):
    *shape, dtype = case
    inputs = make_varlen(MIXED_BATCH, *shape, dtype, kernel_device)
    out = kernel.varlen_paged_attention(**inputs)
    assert_close(out, twin.varlen_paged_attention(**on_cpu_fp32(inputs)), dtype)


def test_causal_decode_and_prefill_without_tail(kernel_device):
    inputs = make_varlen([(1, 64, 0), (1, 1, 0), (17, 17, 0), (1, 129, 0)], 8, 2, 64, torch.float32, kernel_device,
                         seed=1)
    assert inputs["non_causal_tail"] is None
    out = kernel.varlen_paged_attention(**inputs)
    assert_close(out, twin.varlen_paged_attention(**on_cpu_fp32(inputs)), torch.float32)


def make_block(ctx_lens: list[int], block: int, heads: int, kv_heads: int, head_dim: int, dtype, device):
    gen = torch.Generator().manual_seed(2)
    B = len(ctx_lens)
    q, k, v = (torch.randn(B, block, h, head_dim, generator=gen).to(dtype).to(device)
               for h in (heads, kv_heads, kv_heads))
    k_cache, v_cache = make_cache(gen, kv_heads, head_dim, dtype, device)
    kv_slots = scattered_slots(gen, [max(n, 1) for n in ctx_lens], device)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, kv_slots=kv_slots, ctx_lens=int32(ctx_lens, device),
                scale=head_dim ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ctx_lens", [[0, 0], [0, 13, 70]], ids=["no-context", "unequal-context"])
def test_block_attention_matches_twin(kernel_device, ctx_lens, dtype):
    inputs = make_block(ctx_lens, 4, 8, 2, 80, dtype, kernel_device)
    out = kernel.block_attention(**inputs)
    assert_close(out, twin.block_attention(**on_cpu_fp32(inputs)), dtype)


def test_comparison_can_fail(kernel_device):
    """Negative controls: one key fewer, or the draft tail made causal, must show up as a mismatch."""
    inputs = make_varlen(MIXED_BATCH, 8, 2, 64, torch.float32, kernel_device)
    out = kernel.varlen_paged_attention(**inputs).cpu()
    one_key_fewer = on_cpu_fp32(inputs)
    one_key_fewer["kv_lens"] = one_key_fewer["kv_lens"] - torch.tensor([0, 1, 0, 0, 0], dtype=torch.int32)
    all_causal = {**on_cpu_fp32(inputs), "non_causal_tail": None}
    for wrong in (one_key_fewer, all_causal):
        assert not torch.allclose(out, twin.varlen_paged_attention(**wrong), atol=1e-3)


def test_bad_shapes_name_the_problem(kernel_device):
    inputs = make_varlen([(3, 9, 0), (1, 5, 0)], 4, 2, 64, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="head_dim must match"):
        kernel.varlen_paged_attention(**{**inputs, "q": inputs["q"][..., :32]})
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernel.varlen_paged_attention(**{**inputs, "q": inputs["q"][:, :3]})
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        kernel.varlen_paged_attention(**{**inputs, "cu_seqlens_q": inputs["cu_seqlens_q"][:2]})
    with pytest.raises(ValueError, match="non_causal_tail"):
        kernel.varlen_paged_attention(**{**inputs, "non_causal_tail": inputs["kv_lens"][:1]})
    block = make_block([2, 3], 4, 4, 2, 64, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="block k"):
        kernel.block_attention(**{**block, "k": block["k"][:, :3]})
