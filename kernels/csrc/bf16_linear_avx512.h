// The AVX512-BF16 linear (bf16_linear_avx512.cpp): bf16 x and bf16 W, fp32 accumulation.
#pragma once
#include <cstdint>

namespace native_bf16 {

// The CPU has AVX512-BF16 (and the AVX-512 subsets the kernel uses).
bool supported();

// y [M, N] (fp32, or bf16 bits when out_bf16) = x [M, K] @ w [N, K].T + bias [N] (nullable); all contiguous.
void run(const uint16_t* w, const uint16_t* x, const float* bias, void* y, bool out_bf16, int64_t M, int64_t N,
         int64_t K);

}  // namespace native_bf16
