"""Triton KV store and verify-budget kernels against their torch twins (on CPU: Triton's interpreter)."""
import pytest
import torch

from engine.sps import top_k_lengths
from kernels import budget as budget_twin
from kernels import triton_budget, triton_kv
from kernels.attention import store_kvcache as store_twin


def random_kv(T, Hkv, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, 3 * Hkv, D, generator=g, dtype=torch.float32).to(dtype)
    return qkv[:, Hkv:2 * Hkv], qkv[:, 2 * Hkv:]  # strided views, as the attention layer passes them


@pytest.mark.parametrize("kv_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("D", [64, 80])
def test_store_kv_equals_twin(kernel_device, kv_dtype, cache_dtype, D):
    k, v = random_kv(9, 2, D, seed=D, dtype=kv_dtype)
    slots = torch.tensor([5, -1, 63, 0, 17, -1, 40, 2, 33])
    caches = [torch.randn(2, 64, D, generator=torch.Generator().manual_seed(1)).to(cache_dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    store_twin(k, v, *expected, slots)
    got = [c.clone().to(kernel_device) for c in caches]
    triton_kv.store_kvcache(k.to(kernel_device), v.to(kernel_device), *got, slots.to(kernel_device))
    for g, e, before in zip(got, expected, caches):
        if kv_dtype == cache_dtype:
            assert torch.equal(g.cpu(), e)
        else:  # Triton's interpreter truncates fp32 -> bf16 where torch rounds: allow one bf16 ulp
            torch.testing.assert_close(g.cpu().float(), e.float(), rtol=2 ** -7, atol=0)
        assert not torch.equal(e, before)  # the store did write (the comparison is not vacuous)


def test_store_kv_skips_padding_rows_only(kernel_device):
    k, v = random_kv(3, 1, 64, seed=0)
    k_cache, v_cache = torch.zeros(1, 8, 64, device=kernel_device), torch.zeros(1, 8, 64, device=kernel_device)
    triton_kv.store_kvcache(k.to(kernel_device), v.to(kernel_device), k_cache, v_cache,
                            torch.tensor([-1, 6, -1], device=kernel_device))
    written = (k_cache.cpu()[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert written == [6] and torch.equal(k_cache.cpu()[0, 6], k[1, 0])


def test_store_kv_names_bad_shapes(kernel_device):
    k, v = random_kv(4, 2, 64, seed=0)
    cache = torch.zeros(1, 8, 64, device=kernel_device)
    with pytest.raises(ValueError, match="do not fit caches"):
        triton_kv.store_kvcache(k.to(kernel_device), v.to(kernel_device), cache, cache.clone(),
                                torch.arange(4, device=kernel_device))
    with pytest.raises(ValueError, match="slot_mapping"):
        cache = torch.zeros(2, 8, 64, device=kernel_device)
        triton_kv.store_kvcache(k.to(kernel_device), v.to(kernel_device), cache, cache.clone(),
                                torch.arange(3, device=kernel_device))


def dyadic_confidences(R, G, seed):
    """Multiples of 1/8: every survival product is exact in fp32 and fp64, and ties are common."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 9, (R, G), generator=g).float() / 8


def list_oracle(conf, rooms, budget):
    survivals = [conf[r, :rooms[r]].double().cumprod(0).tolist() for r in range(conf.shape[0])]
    return top_k_lengths(survivals, budget)


@pytest.mark.parametrize("R,G,seed", [(1, 7, 0), (5, 7, 1), (12, 3, 2), (33, 16, 3)])
def test_budget_kernel_equals_twin_and_planner(kernel_device, R, G, seed):
    conf = dyadic_confidences(R, G, seed)
    rooms = torch.randint(0, G + 1, (R,), generator=torch.Generator().manual_seed(seed))
    for budget in sorted({0, 1, 2, R, R * G // 3, R * G, R * G + 5}):
        surv, lengths = triton_budget.allocate_budget(conf.to(kernel_device), rooms.to(kernel_device), budget)
        twin_surv, twin_lengths = budget_twin.allocate_budget(conf, rooms, budget)
        assert torch.equal(surv.cpu(), twin_surv)
        assert lengths.cpu().tolist() == twin_lengths.tolist() == list_oracle(conf, rooms, budget)
        positive = int((twin_surv > 0).sum())
        assert int(lengths.sum()) == min(budget, positive)


def test_budget_kernel_on_random_confidences(kernel_device):
    g = torch.Generator().manual_seed(7)
    conf = torch.rand(20, 7, generator=g)
    rooms = torch.full((20,), 7)
    for budget in (1, 9, 40, 140):
        _, lengths = triton_budget.allocate_budget(conf.to(kernel_device), rooms.to(kernel_device), budget)
        assert lengths.cpu().tolist() == budget_twin.allocate_budget(conf, rooms, budget)[1].tolist()


def test_budget_ties_go_to_lower_positions_then_lower_requests(kernel_device):
    conf = torch.tensor([[1.0, 0.5, 1.0], [0.5, 1.0, 1.0]])  # survivals [1, .5, .5] and [.5, .5, .5]
    rooms = torch.tensor([3, 3])
    expect = {1: [1, 0], 2: [1, 1], 3: [2, 1], 4: [2, 2], 5: [3, 2]}
    for budget, lengths in expect.items():
        got = triton_budget.allocate_budget(conf.to(kernel_device), rooms.to(kernel_device), budget)[1]
        assert got.cpu().tolist() == lengths == list_oracle(conf, rooms, budget)


def test_budget_comparison_can_fail(kernel_device):
    """Negative control: lowering one request's first confidence moves the budget to the other request."""
    conf, rooms = torch.tensor([[0.9, 0.9], [0.8, 0.8]]), torch.tensor([2, 2])
    before = triton_budget.allocate_budget(conf.to(kernel_device), rooms.to(kernel_device), 2)[1].cpu().tolist()
    conf[0, 0] = 0.5
    after = triton_budget.allocate_budget(conf.to(kernel_device), rooms.to(kernel_device), 2)[1].cpu().tolist()
    assert before == [2, 0] and after == [0, 2] and after != before


def test_budget_names_bad_shapes(kernel_device):
    with pytest.raises(ValueError, match="rooms"):
        triton_budget.allocate_budget(torch.rand(3, 4, device=kernel_device),
                                      torch.ones(2, dtype=torch.long, device=kernel_device), 2)
