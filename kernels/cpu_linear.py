"""bf16-weight linear for x86 CPUs with AVX2 + FMA (kernels/csrc/bf16_linear.cpp), and for bf16 inputs on CPUs with
AVX512-BF16 the native dot-product kernel (kernels/csrc/bf16_linear_avx512.cpp); built by kernels/cpu_build.

    from kernels import cpu_linear
    if cpu_linear.available():                    # builds (once per machine, cached) or loads the extension
        y = cpu_linear.bf16_linear(x, w, bias)    # x [..., K] (bf16/fp32), w [N, K] bf16, bias [N] or None
    else:
        y = F.linear(x, w, bias)

y = x @ w.T + bias with fp32 accumulation, in x's dtype (fp16/fp64 x go through fp32). Each weight byte is read from
memory once whatever the number of input rows M, so while memory bound the cost is ~weight_bytes / bandwidth: flat
for M = 1..4 on a 2-core AVX2 machine. Beyond that the FMAs themselves (8-wide fp32, ~85% of peak) take longer than
the weight read and the cost grows with M again, but at ~1/5 of F.linear's rate for bf16 weights, and reading half
the bytes of a oneDNN-packed fp32 copy. The AVX512-BF16 kernel stays near flat to M = 8 and is ~2x the AVX2 rate
beyond (docs/benchmarks.md, `python -m bench linear`). Uses torch.get_num_threads() threads. Results are batch
invariant: an output row is bitwise the same whatever M, its position in the batch or the thread count. Inference
only (no autograd).
"""
import torch

from kernels.cpu_build import available, load_error, module

__all__ = ["available", "bf16_linear", "load_error", "native_bf16_available"]


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                allow_native: bool = True) -> torch.Tensor:
    """x [..., K] (bf16 or fp32; other float dtypes go through fp32), w [N, K] bf16 contiguous, bias [N] or None
    -> x @ w.T + bias as [..., N] in x's dtype, accumulated in fp32. bf16 x uses AVX512-BF16 where the CPU has it
    (native_bf16_available()) unless allow_native is False. Raises RuntimeError if not available()."""
    return module().bf16_linear(x, w, bias, allow_native)


def native_bf16_available() -> bool:
    """The CPU has AVX512-BF16, so bf16 inputs take the native dot-product kernel."""
    return available() and module().native_bf16_available()
