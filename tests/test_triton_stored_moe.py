"""Grouped GEMMs over DeepSeek-V4's experts kept as stored (kernels/triton_stored_moe.py and its twin
kernels/stored_moe.py): the routing by hand; the kernel and the twin against each pair's product with its expert's
weight dequantized by tests/test_v4_checkpoint.py's decoders (written from the formats' definitions), MXFP4 and FP8
(a K cut inside an FP8 block, outputs over two tiles, an expert spanning two blocks, pairs of experts held elsewhere),
with negative controls (the nibbles swapped, the FP8 scales one block off); the MoE's stored path against its experts
summed by hand, all experts held and experts 2-5 held; and the engine: a checkpoint stored as the release stores it,
its experts on this path (eager and in graph replays), gives the tokens of the same checkpoint dequantized at load."""
import json

import pytest
import torch
from test_v4_checkpoint import oracle, quantize_fp8_block, quantize_mxfp4
from test_v4_step_rows import count_runs, graph_engine
from test_v4_stored import quantized_checkpoint

from engine import LLM, SamplingParams
from engine.graphs import DraftGraphs, TargetGraphs
from engine.models.deepseek_v4.checkpoint import StoredTensor, scale_to_float
from engine.models.deepseek_v4.config import v4_config
from engine.models.deepseek_v4.moe import MoE
from engine.models.deepseek_v4.stored import StoredWeight
from engine.models.layers import Linear
from kernels import stored_moe as twin
from kernels import triton_stored_moe as kernel
from kernels import triton_support

EXPERTS, N, K = 5, 80, 320  # outputs over two 64-wide tiles; K = 2.5 FP8 blocks, 10 MXFP4 groups
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (0.3, 2e-2)}  # atol, rtol
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def stored_experts(kind: str, seed: int = 0):
    """EXPERTS random [N, K] weights as the checkpoint stores them -> (bytes [E, ...], scales as the MoE holds them
    [E, ...], dense float32 [E, N, K] from the independent decoders)."""
    g = torch.Generator().manual_seed(seed)
    data, scales, dense = [], [], []
    for _ in range(EXPERTS):
        w = torch.randn(N, K, generator=g) * 0.2
        if kind == "fp4":
            d, s = quantize_mxfp4(w)
        else:
            d, s = quantize_fp8_block(w, e8m0=False)
        data.append(d)
        scales.append(s.view(torch.uint8) if kind == "fp4" else scale_to_float(s))
        dense.append(oracle({"w.weight": d, "w.scale": s}, "w.weight", torch.float32))
    return torch.stack(data), torch.stack(scales), torch.stack(dense)


def pairs_of(rows: int, top_k: int, seed: int = 1) -> torch.Tensor:
    """Each row's top_k distinct experts among EXPERTS + 1 (the last: held elsewhere); expert 2 in almost every row,
    so its run spans two blocks of 16."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.stack([torch.randperm(EXPERTS + 1, generator=g)[:top_k] for _ in range(rows)])
    choice[:-1, 0] = 2
    choice[:-1, 1:] = torch.where(choice[:-1, 1:] == 2, 0, choice[:-1, 1:])
    return choice.flatten()


def by_hand(x: torch.Tensor, dense: torch.Tensor, expert: torch.Tensor, rows_per_x: int) -> torch.Tensor:
    out = torch.zeros(expert.numel(), dense.shape[1])
    for p, e in enumerate(expert.tolist()):
        if e < EXPERTS:
            out[p] = dense[e] @ x[p // rows_per_x].float()
    return out


def test_route_by_hand():
    """Pairs of experts 2, 0, 2, none, 0, 2 in blocks of 2: expert 0's run [1, 4], expert 2's [0, 2, 5] padded with
    the pair count (6); five blocks at most (min(pairs, ceil((6 + 3 * 1) / 2))), the last two empty."""
    routing = twin.route(torch.tensor([2, 0, 2, 3, 0, 2]), 3, block_m=2)
    assert routing.pairs.tolist() == [1, 4, 0, 2, 5, 6, 6, 6, 6, 6]
    assert routing.block_expert.tolist() == [0, 2, 2, -1, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["fp4", "fp8"])
def test_kernel_and_twin_equal_the_experts_by_hand(kernel_device, kind, dtype):
    data, scale, dense = stored_experts(kind)
    rows, top_k = 19, 3
    expert = pairs_of(rows, top_k)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(2))
    expected = by_hand(x.to(dtype), dense, expert, top_k)
    assert (expert == 2).sum() > 16 and (expert == EXPERTS).any()
    atol, rtol = TOLERANCE[dtype]
    for gemm, device in ((kernel.stored_moe_gemm, kernel_device), (twin.stored_moe_gemm, torch.device("cpu"))):
        routing = twin.route(expert.to(device), EXPERTS)
        out = gemm(x.to(dtype).to(device), data.to(device), scale.to(device), kind == "fp4", routing, top_k)
        assert out.dtype == dtype and out.shape == (rows * top_k, N)
        torch.testing.assert_close(out.cpu().float(), expected, atol=atol, rtol=rtol)
    second = torch.randn(rows * top_k, K, generator=torch.Generator().manual_seed(3))  # one row per pair
    routing = twin.route(expert.to(kernel_device), EXPERTS)
    out = kernel.stored_moe_gemm(second.to(kernel_device), data.to(kernel_device), scale.to(kernel_device),
                                 kind == "fp4", routing, 1)
    torch.testing.assert_close(out.cpu(), by_hand(second, dense, expert, 1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fp4", "fp8"])
def test_a_misread_format_is_caught(kernel_device, kind):
    """Negative controls: the oracle reading the high nibble as the even element (MXFP4), or each FP8 block's scale
    from the next block column, is far from the kernel."""
    data, scale, dense = stored_experts(kind)
    if kind == "fp4":
        swapped = ((data.view(torch.uint8) >> 4) | (data.view(torch.uint8) << 4)).view(torch.int8)
        wrong = torch.stack([oracle({"w.weight": swapped[e], "w.scale": scale[e].view(torch.float8_e8m0fnu)},
                                    "w.weight", torch.float32) for e in range(EXPERTS)])
    else:
        shifted = scale.roll(1, dims=2)
        wrong = torch.stack([oracle({"w.weight": data[e], "w.scale": shifted[e]}, "w.weight", torch.float32)
                             for e in range(EXPERTS)])
    expert = pairs_of(7, 2)
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(2))
    out = kernel.stored_moe_gemm(x.to(kernel_device), data.to(kernel_device), scale.to(kernel_device), kind == "fp4",
                                 twin.route(expert.to(kernel_device), EXPERTS), 2).cpu()
    torch.testing.assert_close(out, by_hand(x, dense, expert, 2), atol=1e-4, rtol=1e-5)
    assert (out - by_hand(x, wrong, expert, 2)).abs().max() > 0.5


@pytest.mark.parametrize("kind", ["fp4", "fp8"])
def test_stored_linear_equals_the_dense_weight(kernel_device, triton_path, monkeypatch, kind):
    """A kept linear on the Triton path: up to DENSE_ROWS rows through the kernel as one expert (1, 5 and 64 rows,
    leading dims, a bias), more rows through the dense weight; both equal x @ the decoded weight.T + bias."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(N, K, generator=g) * 0.2
    data, scale = quantize_mxfp4(w) if kind == "fp4" else quantize_fp8_block(w, e8m0=True)
    dense = oracle({"w.weight": data, "w.scale": scale}, "w.weight", torch.float32)
    stored = StoredWeight(StoredTensor("w", kind, data, scale)).to(kernel_device)
    bias = torch.randn(N, generator=g)
    launches = []
    real = kernel.stored_moe_gemm
    monkeypatch.setattr(kernel, "stored_moe_gemm", lambda *a: launches.append(a[0].shape[0]) or real(*a))
    for shape in ((1, K), (5, K), (2, 32, K), (65, K)):
        x = torch.randn(*shape, generator=g)
        out = stored.linear(x.to(kernel_device), bias.to(kernel_device)).cpu()
        torch.testing.assert_close(out, x @ dense.T + bias, atol=1e-4, rtol=1e-5)
    assert launches == [1, 5, 64]


@pytest.mark.parametrize("width", [128, 64], ids=["kernel", "ragged-blocks-dense"])
def test_grouped_output_projection_over_stored_bytes(triton_path, monkeypatch, width):
    """V4's wo_a (Linear.grouped): group g of x through the g-th block of rows of an FP8 weight. Groups of 128 rows
    split the scale blocks and run as experts in the kernel; groups of 64 do not and take the dense weight."""
    g = torch.Generator().manual_seed(6)
    groups, k = 3, 256
    w = torch.randn(groups * width, k, generator=g) * 0.2
    data, scale = quantize_fp8_block(w, e8m0=True)
    dense = oracle({"w.weight": data, "w.scale": scale}, "w.weight", torch.float32)
    linear = Linear(k, groups * width, bias=False)
    linear.keep_stored(StoredWeight(StoredTensor("w", "fp8", data, scale)))
    launches = []
    real = kernel.stored_moe_gemm
    monkeypatch.setattr(kernel, "stored_moe_gemm", lambda *a: launches.append(a[0].shape[0]) or real(*a))
    x = torch.randn(5, groups, k, generator=g)
    expected = torch.einsum("sgi,gri->sgr", x, dense.view(groups, width, k))
    torch.testing.assert_close(linear.grouped(x, groups), expected, atol=1e-4, rtol=1e-5)
    assert launches == ([5 * groups] if width == 128 else [])
    wrong = torch.einsum("sgi,gri->sgr", x, dense.view(groups, width, k).roll(1, 0))  # negative control: groups
    assert (linear.grouped(x, groups) - wrong).abs().max() > 0.5


@pytest.fixture
def triton_path():
    triton_support.select("triton")
    yield
    triton_support.select("torch")


def kept_moe(config, kind: str) -> tuple[MoE, dict]:
    """A routed MoE layer whose experts are kept as stored (random weights quantized), and their dense weights."""
    torch.manual_seed(0)
    moe = MoE(config, config.num_hash_layers)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.requires_grad_(False)
    dense = {}
    for e, expert in enumerate(moe.experts):
        for name in ("w1", "w2", "w3"):
            linear = getattr(expert, name)
            data, scale = quantize_mxfp4(linear.weight) if kind == "fp4" else quantize_fp8_block(linear.weight, False)
            linear.keep_stored(StoredWeight(StoredTensor(f"{e}.{name}", kind, data, scale)))
            dense[e, name] = oracle({"w.weight": data, "w.scale": scale}, "w.weight", torch.float32)
    return moe, dense


@pytest.mark.parametrize("held", [None, range(2, 6)], ids=["all", "experts-2-5"])
@pytest.mark.parametrize("kind", ["fp4", "fp8"])
@torch.inference_mode()
def test_moe_stored_path_equals_experts_by_hand(tmp_path, triton_path, kind, held):
    from tiny_models import save_tiny_v4
    save_tiny_v4(tmp_path / "v4", seed=3)
    config = v4_config(json.loads((tmp_path / "v4" / "config.json").read_text()))
    moe, dense = kept_moe(config, kind)
    if held is not None:  # expert parallelism: this rank holds experts 2..5 only
        moe.held = held
    x = torch.randn(29, config.hidden_size)
    ids, weights = moe.gate(x, torch.zeros(29, dtype=torch.long))
    assert moe.stack() and moe.path == "stored"
    expected = torch.zeros_like(x)
    limit = moe.experts[moe.held.start].limit
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in moe.held:
                gate = (dense[e, "w1"] @ x[t]).clamp(max=limit)
                up = (dense[e, "w3"] @ x[t]).clamp(min=-limit, max=limit)
                expected[t] += weights[t, k] * (dense[e, "w2"] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe.stored(x, ids, weights), expected, atol=1e-5, rtol=1e-4)
    assert moe.experts[moe.held.start].w1.stored.data.data_ptr() == moe.stacked_stored["w1"][0].data_ptr()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory, "fp4")


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 8, (n,), generator=g).tolist() for n in (13, 3, 21)]


def test_engine_on_the_stored_path_gives_the_dequantized_tokens(quantized, monkeypatch):
    """Plain decoding eager and in graph replays (captured by hand on CPU: a replay re-runs the step on the static
    buffers), then speculative decoding with the DSpark module (its stages' experts on the same path) in replays."""
    expected = [o.token_ids for o in LLM(model=str(quantized), dtype="float32", quantization="none", kv_cache_gb=0.02,
                                         kv_block_size=8, spec_method="none").generate(prompts(), GREEDY,
                                                                                       use_tqdm=False)]
    eager = graph_engine(quantized, False, quantization="fp8", spec_method="none")
    assert [o.token_ids for o in eager.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    assert {layer.ffn.path for layer in eager.model_runner.model.layers} == {"stored"}
    calls = {}
    count_runs(monkeypatch, TargetGraphs, calls)
    count_runs(monkeypatch, DraftGraphs, calls)
    graphs = graph_engine(quantized, True, quantization="fp8", spec_method="none")
    assert [o.token_ids for o in graphs.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    assert calls["TargetGraphs"] >= GREEDY.max_tokens - 1
    calls.clear()
    speculative = graph_engine(quantized, True, quantization="fp8", spec_method="dspark", verify_policy="full")
    assert [o.token_ids for o in speculative.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    assert {stage.ffn.path for stage in speculative.speculator.drafter.draft.mtp} == {"stored"}
    assert calls["TargetGraphs"] > 3 and calls["DraftGraphs"] > 3
