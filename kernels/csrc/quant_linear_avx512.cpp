// The AVX-512 build of the quantized linear's rows: Q4_0 / Q4_1 / Q8_0 blocks unpack 32 weights into two 16-lane
// fp32 registers (the type's formula, d * q (+ m), as GGML defines it: a multiply, then an add), and the dot product
// keeps one 16-lane accumulator per input row in a register, 8 input rows per pass over a dequantized weight row.
// F16 and the K-quants unpack through quant_rows.inc's plain loops. Only the row functions are compiled for AVX-512
// (a target region holding no torch or std code); quant_linear.cpp picks this build where the CPU has AVX-512.
#include <immintrin.h>

#include <cstdint>

#include "quant_linear.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

namespace quant_avx512_impl {
#define QUANT_ROWS_MAX_M 8
#include "quant_rows.inc"
#undef QUANT_ROWS_MAX_M

constexpr int kMaxRows = 8;

inline __m512 widen_u8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
inline __m512 widen_i8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

// The 16 low and 16 high nibbles of a 4-bit block's 16 bytes: elements 0..15 and 16..31.
inline void nibbles(const uint8_t* q, __m128i* lo, __m128i* hi) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), mask = _mm_set1_epi8(15);
  *lo = _mm_and_si128(v, mask);
  *hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
}

inline void row_q4_0(const uint8_t* src, float* dst, int64_t k) {
  const __m128i eight = _mm_set1_epi8(8);
  for (int64_t b = 0; b < k / 32; ++b, src += 18, dst += 32) {
    const __m512 d = _mm512_set1_ps(half_at(src));
    __m128i lo, hi;
    nibbles(src + 2, &lo, &hi);
    _mm512_storeu_ps(dst, _mm512_mul_ps(d, widen_i8(_mm_sub_epi8(lo, eight))));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(d, widen_i8(_mm_sub_epi8(hi, eight))));
  }
}

inline void row_q4_1(const uint8_t* src, float* dst, int64_t k) {
  for (int64_t b = 0; b < k / 32; ++b, src += 20, dst += 32) {
    const __m512 d = _mm512_set1_ps(half_at(src)), m = _mm512_set1_ps(half_at(src + 2));
    __m128i lo, hi;
    nibbles(src + 4, &lo, &hi);
    _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_mul_ps(d, widen_u8(lo)), m));
    _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_mul_ps(d, widen_u8(hi)), m));
  }
}

inline void row_q8_0(const uint8_t* src, float* dst, int64_t k) {
  for (int64_t b = 0; b < k / 32; ++b, src += 34, dst += 32) {
    const __m512 d = _mm512_set1_ps(half_at(src));
    const __m128i* q = reinterpret_cast<const __m128i*>(src + 2);
    _mm512_storeu_ps(dst, _mm512_mul_ps(d, widen_i8(_mm_loadu_si128(q))));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(d, widen_i8(_mm_loadu_si128(q + 1))));
  }
}

inline void row_any(int type, const uint8_t* src, float* dst, int64_t k) {
  switch (type) {
    case kQ4_0: return row_q4_0(src, dst, k);
    case kQ4_1: return row_q4_1(src, dst, k);
    case kQ8_0: return row_q8_0(src, dst, k);
    default: return dequant_row(type, src, dst, k);
  }
}

// y[m * ldy] = w . x[m] for MB rows; the k % 16 tail (F16 rows only) through masked loads.
template <int MB>
inline void dot16(const float* __restrict w, const float* __restrict x, int64_t k, float* y, int64_t ldy) {
  __m512 acc[MB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t k16 = k & ~int64_t(15);
  for (int64_t j = 0; j < k16; j += 16) {
    const __m512 wv = _mm512_loadu_ps(w + j);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * k + j), acc[m]);
  }
  if (k16 < k) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (k - k16)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(tail, w + k16);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + m * k + k16), acc[m]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) y[m * ldy] = _mm512_reduce_add_ps(acc[m]);
}

inline void dot_any(const float* w, const float* x, int64_t k, float* y, int64_t ldy, int64_t rows) {
  switch (rows) {
    case 1: return dot16<1>(w, x, k, y, ldy);
    case 2: return dot16<2>(w, x, k, y, ldy);
    case 3: return dot16<3>(w, x, k, y, ldy);
    case 4: return dot16<4>(w, x, k, y, ldy);
    case 5: return dot16<5>(w, x, k, y, ldy);
    case 6: return dot16<6>(w, x, k, y, ldy);
    case 7: return dot16<7>(w, x, k, y, ldy);
    default: return dot16<8>(w, x, k, y, ldy);
  }
}

inline void rows_avx512(int type, const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y,
                        int64_t N, int64_t n0, int64_t n1, float* wbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    row_any(type, w + n * row_bytes, wbuf, K);
    for (int64_t m = 0; m < M; m += kMaxRows)
      dot_any(wbuf, x + m * K, K, y + m * N + n, N, M - m < kMaxRows ? M - m : kMaxRows);
  }
}

}  // namespace quant_avx512_impl

namespace quant_avx512 {

void linear_rows(int type, const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y,
                 int64_t N, int64_t n0, int64_t n1, float* wbuf) {
  quant_avx512_impl::rows_avx512(type, w, row_bytes, x, M, K, y, N, n0, n1, wbuf);
}

void dequant_row(int type, const uint8_t* src, float* dst, int64_t k) { quant_avx512_impl::row_any(type, src, dst, k); }

}  // namespace quant_avx512

#pragma GCC pop_options

// bf16 activations on CPUs with AVX512-BF16: a block's 4- or 8-bit integers become bf16 exactly (a lookup of 16
// values for a nibble; int8 through fp32), vdpbf16ps dots them with 32 elements of x (products exact in fp32), and
// the block's scale applies once to that partial: y = sum_b d_b * (q_b . x_b) (+ m_b * sum(x_b) for Q4_1), the
// sums of x per block computed once per call. No fp32 row is written, so unpacking costs a few instructions per 32
// weights. Each output's order of operations depends on K only (batch invariant). The same idea as llama.cpp's
// vec_dot kernels, but x stays bf16 (exact) instead of being quantized to 8 bits.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace quant_bf16_impl {
using namespace quant_avx512_impl;

inline __m512i nibble_table(int offset) {  // bf16 of (i & 15) - offset, i = 0..31
  alignas(64) uint16_t t[32];
  quant_avx512::bf16_nibble_table(offset, t);
  return _mm512_load_si512(t);
}

inline __m512bh nibbles_bf16(const uint8_t* q, __m512i table) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(b, 4);
  return (__m512bh)_mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), table);
}

inline __m512bh int8_bf16(const uint8_t* q) {
  const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

template <int TYPE>
inline __m512bh block_bf16(const uint8_t* w, __m512i table) {
  return TYPE == kQ8_0 ? int8_bf16(w + 2) : nibbles_bf16(w + (TYPE == kQ4_1 ? 4 : 2), table);
}

// acc[m] += d_b * (q_b . x[m]_b) for MB rows (+ Q4_1's m_b * sum(x[m]_b) into mins[m]): one block.
template <int TYPE, int MB>
inline void block_dot(const uint8_t* w, int64_t b, const uint16_t* x, const float* sx, int64_t K, int64_t nb,
                      __m512i table, __m512* acc, float* mins) {
  const __m512bh wq = block_bf16<TYPE>(w, table);
  const __m512 d = _mm512_set1_ps(half_at(w));
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + b * 32);
    acc[m] = _mm512_fmadd_ps(d, _mm512_dpbf16_ps(_mm512_setzero_ps(), wq, xv), acc[m]);
  }
  if (TYPE == kQ4_1) {
    const float mn = half_at(w + 2);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) mins[m] += mn * sx[m * nb + b];
  }
}

// rows y[m * N] = W[n] . x[m] for MB rows of x (bf16 bits, row stride K); sx[m * nb + b]: sum of block b of row m.
// Even and odd blocks go to two accumulators, two dependency chains instead of one (the order depends on K only).
template <int TYPE, int MB>
inline void row_dot(const uint8_t* w, const uint16_t* x, const float* sx, int64_t K, float* y, int64_t N,
                    __m512i table) {
  constexpr int64_t bytes = TYPE == kQ4_1 ? 20 : TYPE == kQ4_0 ? 18 : 34;
  const int64_t nb = K / 32;
  __m512 even[MB], odd[MB];
  float even_min[MB], odd_min[MB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
    even[m] = odd[m] = _mm512_setzero_ps(), even_min[m] = odd_min[m] = 0.0f;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2, w += 2 * bytes) {
    block_dot<TYPE, MB>(w, b, x, sx, K, nb, table, even, even_min);
    block_dot<TYPE, MB>(w + bytes, b + 1, x, sx, K, nb, table, odd, odd_min);
  }
  if (b < nb) block_dot<TYPE, MB>(w, b, x, sx, K, nb, table, even, even_min);
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
    y[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(even[m], odd[m])) + (even_min[m] + odd_min[m]);
}

template <int TYPE>
void rows_of(const uint8_t* w, int64_t row_bytes, const uint16_t* x, const float* sx, int64_t M, int64_t K, float* y,
             int64_t N, int64_t n0, int64_t n1) {
  const __m512i table = nibble_table(TYPE == kQ4_0 ? 8 : 0);
  const int64_t nb = K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const uint16_t* xm = x + m * K;
      const float* sm = sx + m * nb;
      float* ym = y + m * N + n;
      const uint8_t* wn = w + n * row_bytes;
      switch (M - m < kMaxRows ? M - m : kMaxRows) {
        case 1: row_dot<TYPE, 1>(wn, xm, sm, K, ym, N, table); break;
        case 2: row_dot<TYPE, 2>(wn, xm, sm, K, ym, N, table); break;
        case 3: row_dot<TYPE, 3>(wn, xm, sm, K, ym, N, table); break;
        case 4: row_dot<TYPE, 4>(wn, xm, sm, K, ym, N, table); break;
        case 5: row_dot<TYPE, 5>(wn, xm, sm, K, ym, N, table); break;
        case 6: row_dot<TYPE, 6>(wn, xm, sm, K, ym, N, table); break;
        case 7: row_dot<TYPE, 7>(wn, xm, sm, K, ym, N, table); break;
        default: row_dot<TYPE, 8>(wn, xm, sm, K, ym, N, table); break;
      }
    }
  }
}

void rows(int type, const uint8_t* w, int64_t row_bytes, const uint16_t* x, const float* sx, int64_t M, int64_t K,
          float* y, int64_t N, int64_t n0, int64_t n1) {
  if (type == kQ4_0) return rows_of<kQ4_0>(w, row_bytes, x, sx, M, K, y, N, n0, n1);
  if (type == kQ4_1) return rows_of<kQ4_1>(w, row_bytes, x, sx, M, K, y, N, n0, n1);
  rows_of<kQ8_0>(w, row_bytes, x, sx, M, K, y, N, n0, n1);
}

}  // namespace quant_bf16_impl

namespace quant_avx512 {

void linear_rows_bf16(int type, const uint8_t* w, int64_t row_bytes, const uint16_t* x, const float* sx, int64_t M,
                      int64_t K, float* y, int64_t N, int64_t n0, int64_t n1) {
  quant_bf16_impl::rows(type, w, row_bytes, x, sx, M, K, y, N, n0, n1);
}

}  // namespace quant_avx512

#pragma GCC pop_options

namespace quant_avx512 {

bool bf16_supported() {
  static const bool has = supported() && __builtin_cpu_supports("avx512bf16");
  return has;
}

bool supported() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

}  // namespace quant_avx512
