// GGUF-block linear and dequantization (quant_linear.cpp; the AVX-512 build of the same rows in
// quant_linear_avx512.cpp). Registered as torch.ops.dspark_quant.* when the extension loads.
#pragma once
#include <cstdint>

namespace quant_avx512 {
// bf16 bits of (i & 15) - offset for i = 0..31: the 4-bit lookup table of the AVX512-BF16 paths (vpermw reads an
// index's low 5 bits, so it repeats after 16)
inline void bf16_nibble_table(int offset, uint16_t* t) {
  for (int i = 0; i < 32; ++i) {
    const float v = static_cast<float>((i & 15) - offset);
    uint32_t bits;
    __builtin_memcpy(&bits, &v, 4);
    t[i] = static_cast<uint16_t>(bits >> 16);
  }
}

bool supported();
void linear_rows(int type, const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y,
                 int64_t N, int64_t n0, int64_t n1, float* wbuf);
void dequant_row(int type, const uint8_t* src, float* dst, int64_t k);
// bf16 x (its bits) over Q4_0 / Q4_1 / Q8_0 blocks, where the CPU has AVX512-BF16; sx: x's sums per 32-block
bool bf16_supported();
void linear_rows_bf16(int type, const uint8_t* w, int64_t row_bytes, const uint16_t* x, const float* sx, int64_t M,
                      int64_t K, float* y, int64_t N, int64_t n0, int64_t n1);
// bf16 x over weights repacked in tiles of 16 output rows (quant_packed_avx512.cpp): output groups [g0, g1) for all
// M rows of x, y fp32 or bf16 bits [M, N]; sx: x's sums per 32-block (Q4_1 only, else null)
void packed_block_sums(const uint16_t* x, int64_t M, int64_t K, float* sx);
void packed_groups(int type, const uint8_t* packed, const uint16_t* x, const float* sx, const float* bias, void* y,
                   bool out_bf16, int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1);
}  // namespace quant_avx512
