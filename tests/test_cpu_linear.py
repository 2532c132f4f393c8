"""kernels/cpu_linear.bf16_linear (AVX2 bf16-weight linear, and the AVX512-BF16 one for bf16 inputs where the CPU has
it) against an fp32 torch reference."""
import json

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_build, cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(),
                                reason=f"cpu bf16_linear unavailable: {cpu_linear.load_error()}")

MS = (1, 2, 3, 5, 6, 7, 8, 9, 16, 33)
# both kernels where this CPU has the native one (bf16 inputs take it by default)
NATIVE = (False, True) if cpu_linear.native_bf16_available() else (False,)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    # bound for fp32 accumulation: proportional to sum_k |x_k w_k| (+ |bias|); a wrong/missing term is ~1/K of it
    scale = F.linear(x.float().abs(), w.float().abs()) + (0 if bias is None else bias.float().abs())
    tol = 1e-5 * scale + 1e-6
    if y.dtype == torch.bfloat16:
        tol = tol + ref.abs() * 2.0 ** -8  # final rounding to bf16
    assert y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert torch.isfinite(y).all()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, max err/tol {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("N,K", [(49152, 576), (3072, 576), (960, 576), (576, 1536), (49152, 64), (960, 64),
                                 (1, 576), (7, 1536), (13, 64), (25, 100), (7, 17), (30, 5), (3, 1), (12, 8),
                                 (1, 24)])
def test_matches_fp32_reference(N, K):
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    bias = torch.randn(N, generator=g)
    for M in MS:
        x = torch.randn(M, K, generator=g)
        for dtype, native in [(torch.float32, False)] + [(torch.bfloat16, n) for n in NATIVE]:
            for b in (None, bias):
                xd = x.to(dtype)
                y = cpu_linear.bf16_linear(xd, w, b, allow_native=native)
                assert y.dtype == dtype
                _check(y, xd, w, b)


def test_native_kernel_is_used_exactly_where_the_cpu_has_avx512_bf16():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert cpu_linear.native_bf16_available() == ("avx512_bf16" in flags)


@pytest.mark.skipif(len(NATIVE) < 2, reason="this CPU has no AVX512-BF16")
def test_native_kernel_negative_control():
    """The reference check above tells a kernel that drops one input column per 32 from a right one."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(300, 576, generator=g).bfloat16(), torch.randn(8, 576, generator=g).bfloat16()
    _check(cpu_linear.bf16_linear(x, w), x, w, None)
    x_wrong = x.clone()
    x_wrong[:, ::32] = 0
    with pytest.raises(AssertionError, match="max err"):
        _check(cpu_linear.bf16_linear(x_wrong, w), x, w, None)


def test_leading_dims_bias_dtype_and_other_float_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 72, generator=g).bfloat16()
    bias = torch.randn(40, generator=g).bfloat16()
    x = torch.randn(2, 3, 72, generator=g)
    y = cpu_linear.bf16_linear(x, w, bias)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    _check(y.reshape(6, 40), x.reshape(6, 72), w, bias)
    # fp16 / fp64 inputs go through fp32 and come back in their own dtype
    for dtype in (torch.float16, torch.float64):
        y = cpu_linear.bf16_linear(x.to(dtype), w, bias)
        assert y.dtype == dtype
        ref = F.linear(x.to(dtype).float(), w.float(), bias.float())
        torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)
    # 1-D x, non-contiguous x and w
    torch.testing.assert_close(cpu_linear.bf16_linear(x[0, 0], w), F.linear(x[0, 0], w.float()), rtol=1e-5, atol=1e-5)
    wt = torch.randn(72, 40, generator=g).bfloat16().t()
    xs = torch.randn(72, 5, generator=g).t()
    torch.testing.assert_close(cpu_linear.bf16_linear(xs, wt), F.linear(xs, wt.float()), rtol=1e-5, atol=1e-5)


def test_empty_and_bad_inputs():
    w = torch.randn(9, 32).bfloat16()
    assert cpu_linear.bf16_linear(torch.randn(0, 32), w).shape == (0, 9)
    b = torch.randn(5)
    torch.testing.assert_close(cpu_linear.bf16_linear(torch.randn(2, 0), torch.randn(5, 0).bfloat16(), b),
                               b.expand(2, 5))
    with pytest.raises(RuntimeError):
        cpu_linear.bf16_linear(torch.randn(2, 31), w)
    with pytest.raises(RuntimeError):
        cpu_linear.bf16_linear(torch.randn(2, 32), w.float())
    with pytest.raises(RuntimeError):
        cpu_linear.bf16_linear(torch.randn(2, 32), w, torch.randn(8))


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("K", [576, 100])
def test_batch_and_thread_invariant(K, native):
    """An output row is bitwise the same whatever M, its position in the batch, or the number of threads."""
    g = torch.Generator().manual_seed(K)
    w = torch.randn(1000, K, generator=g).bfloat16()
    bias = torch.randn(1000, generator=g)
    x = torch.randn(33, K, generator=g).bfloat16()

    def linear(rows, weight=w, b=bias):
        return cpu_linear.bf16_linear(rows, weight, b, allow_native=native)

    full = linear(x)
    for m in (0, 5, 32):
        assert torch.equal(linear(x[m:m + 1]), full[m:m + 1])
    for m0, m1 in ((3, 10), (1, 6), (8, 15), (20, 33)):  # every tile shape: 1..7 rows, 8-row groups and their rest
        assert torch.equal(linear(x[m0:m1]), full[m0:m1])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = linear(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(single, full)
    # N tail rows (N % 12 != 0) go through a different tile than full blocks: same values as in a bigger N
    assert torch.equal(linear(x, w[:7], bias[:7]), full[:, :7])


def test_available_never_raises(monkeypatch):
    monkeypatch.setattr(cpu_build, "_tried", False)
    monkeypatch.setattr(cpu_build, "_module", None)
    monkeypatch.setattr(cpu_build, "_error", None)
    monkeypatch.setenv("DSPARK_DISABLE_CPU_KERNELS", "1")
    assert cpu_linear.available() is False
    assert "DSPARK_DISABLE_CPU_KERNELS" in cpu_linear.load_error()
    with pytest.raises(RuntimeError):
        cpu_linear.bf16_linear(torch.randn(1, 8), torch.randn(4, 8).bfloat16())


def test_bench_linear_runs_every_path_on_the_models_shapes(tmp_path):
    from types import SimpleNamespace

    from bench import linear
    smollm2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "intermediate_size": 1536, "vocab_size": 49152}
    shapes = linear.layer_shapes(smollm2)
    assert len(shapes) == 121 and shapes[:4] == [(960, 576), (576, 576), (3072, 576), (576, 1536)]
    # SmolLM2-135M's 134,515,008 parameters less its 61 norm weights (the LM head is the tied embedding)
    assert shapes[-1] == (49152, 576) and sum(n * k for n, k in shapes) == 134_515_008 - 61 * 576
    tiny = tmp_path / "model"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({**smollm2, "num_hidden_layers": 2, "vocab_size": 300}))
    result = linear.run(SimpleNamespace(model=str(tiny), num_threads=1, rows=[1, 3], repeats=2, paths=None))
    assert result["layers"] == 9 and set(result["ms"]["kernel AVX2"]) == {1, 3}
    assert ("kernel AVX512-BF16" in result["ms"]) == cpu_linear.native_bf16_available()
    linear.report(result, tmp_path / "out")
    assert (tmp_path / "out" / "linear.png").stat().st_size > 0
