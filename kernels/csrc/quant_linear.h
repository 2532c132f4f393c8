// GGUF-block linear and dequantization (quant_linear.cpp; the AVX-512 build of the same rows in
// quant_linear_avx512.cpp). Registered as torch.ops.dspark_quant.* when the extension loads.
#pragma once
#include <cstdint>

namespace quant_avx512 {
bool supported();
void linear_rows(int type, const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y,
                 int64_t N, int64_t n0, int64_t n1, float* wbuf);
void dequant_row(int type, const uint8_t* src, float* dst, int64_t k);
// bf16 x (its bits) over Q4_0 / Q4_1 / Q8_0 blocks, where the CPU has AVX512-BF16; sx: x's sums per 32-block
bool bf16_supported();
void linear_rows_bf16(int type, const uint8_t* w, int64_t row_bytes, const uint16_t* x, const float* sx, int64_t M,
                      int64_t K, float* y, int64_t N, int64_t n0, int64_t n1);
}  // namespace quant_avx512
