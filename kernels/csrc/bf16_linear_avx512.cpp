// bf16 x bf16 linear with native bf16 dot products (AVX512-BF16: Zen 4+, Cooper Lake, Sapphire Rapids+), for bf16
// inputs; bf16_linear (bf16_linear.cpp) sends bf16 x here when the CPU has the instruction.
//
//   y[m, n] = sum_k x[m, k] * W[n, k]  (+ bias[n]),   fp32 accumulation
//
// VDPBF16PS takes 32 bf16 of a weight row and 32 of an input row and adds the 16 pair products into 16 fp32 lanes,
// so neither operand is converted or re-laid out: the plain row-major bf16 rows are the operands (x needs no packing).
// Products of two bf16 are exact in fp32; denormal inputs count as zero (the instruction's DAZ), which only touches
// values below 1e-38. Per FMA-equivalent this is ~3x the AVX2 kernel's rate, so verifying 8 tokens costs about what
// reading the weights once does. Tiling, thread split, prefetch and the fixed per-lane reduction tree follow the
// AVX2 kernel, so results are batch and thread invariant in the same way.
//
// Only the kernel bodies are compiled for AVX-512 (a target region holding no torch or std code, so no inline
// function from a header is ever emitted with AVX-512 instructions for other callers); the driver below is plain.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "bf16_linear_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

#include "hsum.h"
#include "weight_prefetch.h"

namespace {

constexpr int kRowBlock = 12;
constexpr int64_t kPrefetchLead = 16 << 10;  // bytes of weight stream, as in the AVX2 kernel

// float -> bf16 bits, round to nearest even (c10::BFloat16's rounding, NaN -> quiet NaN)
inline uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void store_out(float* p, float v) { *p = v; }
inline void store_out(uint16_t* p, float v) { *p = to_bf16_bits(v); }

inline __m512i load32(const uint16_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }

// One register tile: output rows n0..n0+R against input rows m0..m0+MB; the last K % 32 columns through masked
// (zero-filled) loads.
template <int R, int MB, typename OutT>
void tile(const uint16_t* __restrict w, int64_t K, const uint16_t* __restrict x, const float* __restrict bias,
          OutT* __restrict y, int64_t N, int64_t n0, int64_t m0, bool prefetch) {
  const int64_t K32 = K & ~int64_t(31);
  __m512 acc[R * MB];
#pragma GCC unroll 32
  for (int i = 0; i < R * MB; ++i) acc[i] = _mm512_setzero_ps();
  const uint16_t* wr = w + n0 * K;
  const uint16_t* xr = x + m0 * K;

  WeightPrefetch<R> ahead(wr, K, kPrefetchLead);

  for (int64_t k = 0; k < K32; k += 32) {
    if (R > 1 && prefetch) ahead.step(64);  // one row is one sequential stream: the hardware prefetcher's alone
    __m512bh wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)load32(wr + r * K + k);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)load32(xr + m * K + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r * MB + m] = _mm512_dpbf16_ps(acc[r * MB + m], wv[r], xv);
    }
  }
  if (K32 < K) {
    const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (K - K32)) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + r * K + K32);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m)
        acc[r * MB + m] =
            _mm512_dpbf16_ps(acc[r * MB + m], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, xr + m * K + K32));
    }
  }

  __m256 halves[R * MB];  // lane j + lane j+8, then the AVX2 kernel's tree
#pragma GCC unroll 32
  for (int i = 0; i < R * MB; ++i)
    halves[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]), _mm512_extractf32x8_ps(acc[i], 1));
  float sums[R * MB];
  reduce_accs<R * MB>(halves, sums);
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    const float b = bias ? bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) store_out(y + (m0 + m) * N + n, sums[r * MB + m] + b);
  }
}

// Input rows m0..m0+MB against output rows [n0, n0 + 12), in register tiles of R rows.
template <int R, int MB, typename OutT>
void block_tiles(const uint16_t* w, int64_t K, const uint16_t* x, const float* bias, OutT* y, int64_t N, int64_t n0,
                 int64_t m0, bool pf) {
  for (int64_t r = 0; r < kRowBlock; r += R) tile<R, MB>(w, K, x, bias, y, N, n0 + r, m0, pf);
}

// Input rows m0..m0+rem (rem < 8) against output rows [n0, n0 + 12): one pass over the block's weights. Up to 6
// input rows leave the kernel memory bound, and there one output row at a time reads the weights as one sequential
// stream per thread, which the hardware prefetcher serves best: 1-4 rows take 0.6-0.85x the time of tiles walking
// 4-6 weight rows in parallel (the AVX2 kernel's shape) on Zen 4. 7 rows are compute bound enough for a 3-row tile.
template <typename OutT>
void block_rest(const uint16_t* w, int64_t K, const uint16_t* x, const float* bias, OutT* y, int64_t N, int64_t n0,
                int64_t m0, int64_t rem, bool pf) {
  using Tiles = void (*)(const uint16_t*, int64_t, const uint16_t*, const float*, OutT*, int64_t, int64_t, int64_t,
                         bool);
  static constexpr Tiles by_rows[8] = {nullptr,
                                       block_tiles<1, 1, OutT>,
                                       block_tiles<1, 2, OutT>,
                                       block_tiles<1, 3, OutT>,
                                       block_tiles<1, 4, OutT>,
                                       block_tiles<1, 5, OutT>,
                                       block_tiles<1, 6, OutT>,
                                       block_tiles<3, 7, OutT>};
  if (rem > 0) by_rows[rem](w, K, x, bias, y, N, n0, m0, pf);
}

// All M input rows against output rows [n0, n0 + rows), rows <= kRowBlock. Up to 8 input rows share one pass over
// the weights, so the first (prefetching) pass carries as much of the compute as possible.
template <typename OutT>
void row_block(const uint16_t* w, int64_t K, const uint16_t* x, const float* bias, OutT* y, int64_t M, int64_t N,
               int64_t n0, int64_t rows) {
  int64_t m0 = 0;
  if (rows == kRowBlock) {
    for (; m0 + 8 <= M; m0 += 8) block_tiles<3, 8>(w, K, x, bias, y, N, n0, m0, m0 == 0);
    block_rest(w, K, x, bias, y, N, n0, m0, M - m0, m0 == 0);
  } else {  // ragged tail of N: one output row at a time
    for (int64_t r = 0; r < rows; ++r) {
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) tile<1, 8>(w, K, x, bias, y, N, n0 + r, m, m == 0);
      for (; m < M; ++m) tile<1, 1>(w, K, x, bias, y, N, n0 + r, m, m == 0);
    }
  }
}

}  // namespace

namespace native_bf16 {

void row_block_f32(const uint16_t* w, int64_t K, const uint16_t* x, const float* bias, float* y, int64_t M, int64_t N,
                   int64_t n0, int64_t rows) {
  row_block(w, K, x, bias, y, M, N, n0, rows);
}

void row_block_bf16(const uint16_t* w, int64_t K, const uint16_t* x, const float* bias, uint16_t* y, int64_t M,
                    int64_t N, int64_t n0, int64_t rows) {
  row_block(w, K, x, bias, y, M, N, n0, rows);
}

}  // namespace native_bf16

#pragma GCC pop_options

namespace native_bf16 {

// DSPARK_DISABLE_NATIVE_BF16=1 keeps bf16 inputs on the AVX2 kernel (A/B timings, or a CPU whose bf16 unit is slow)
static bool disabled_by_env() {
  const char* v = std::getenv("DSPARK_DISABLE_NATIVE_BF16");
  return v && *v && std::strcmp(v, "0") != 0;
}

bool supported() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          !disabled_by_env();
  return has;
}

void run(const uint16_t* w, const uint16_t* x, const float* bias, void* y, bool out_bf16, int64_t M, int64_t N,
         int64_t K) {
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  // Don't wake a second thread for less than ~128 KiB of weights (+ some M-proportional compute).
  const int64_t block_work = kRowBlock * K * (2 + M / 8);
  const int64_t grain = std::max<int64_t>(1, (int64_t(128) << 10) / std::max<int64_t>(1, block_work));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowBlock, rows = std::min<int64_t>(kRowBlock, N - n0);
      if (out_bf16)
        row_block_bf16(w, K, x, bias, static_cast<uint16_t*>(y), M, N, n0, rows);
      else
        row_block_f32(w, K, x, bias, static_cast<float*>(y), M, N, n0, rows);
    }
  });
}

}  // namespace native_bf16
