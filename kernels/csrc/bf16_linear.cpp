// bf16-weight linear for x86 CPUs with AVX2 + FMA (no avx512 / native bf16 needed).
//
//   y[m, n] = sum_k x[m, k] * W[n, k]  (+ bias[n]),   fp32 accumulation
//
// W is a bf16 [N, K] row-major weight (nn.Linear layout); x is [..., K] in any floating dtype (bf16 / fp32 are the
// fast paths). The output has x's dtype (fp32 results rounded to nearest-even for bf16), matching F.linear.
//
// Design (decode is memory-bandwidth bound, so each weight byte is read from DRAM exactly once):
//   * x is converted to fp32 once, into a "pair-split" layout (see below), padded with zeros to a multiple of 16.
//   * Threads split the output rows N into contiguous ranges (at::parallel_for -> torch's thread count).
//   * Rows are processed in blocks of 12: while a block's weights (12*K*2 bytes) are hot in L1/L2, every input row m
//     is multiplied with it, in register tiles of R output rows x MB input rows (R*MB <= 12 accumulators of 8 floats).
//   * bf16 -> fp32 conversion is done 16 at a time on one 256-bit load with two integer ops and no shuffle:
//     32-bit lane i of the load holds bf16 elements 2i (low half) and 2i+1 (high half), so
//     (lane << 16) is element 2i as fp32 and (lane & 0xffff0000) is element 2i+1 as fp32. x is stored in the matching
//     order (per 16-chunk: the 8 even-indexed values, then the 8 odd-indexed ones), so the dot product is unchanged.
//     (Equivalent to _mm256_cvtepu16_epi32 + _mm256_slli_epi32 on 8 elements at a time, minus the shuffle, in a
//     different summation order; measured ~10-15% faster from cache at M = 1, and the same (+-3%) elsewhere.)
//   * Multi-row tiles software-prefetch the weight stream about kPrefetchLead bytes ahead; 1-2 input rows go one output
//     row at a time, a single sequential stream that the hardware prefetcher serves best alone.
//   * K % 16 leftovers are done in scalar code; accumulators are reduced with a horizontal-add tree. The summation order
//     of an output never depends on M, the tile shape or the thread split, so results are batch invariant.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_linear_avx512.h"
#include "hsum.h"
#include "weight_prefetch.h"

namespace {

constexpr int kRowBlock = 12;  // output rows per cache block; every register tile's R divides it
// Software prefetch lead (bytes of weight stream; weight_prefetch.h). The hardware prefetcher alone falls behind once
// the FMAs take a while in multi-row tiles; measured 1.3-1.8x faster at M = 1..8 than without (8-32 KiB all within
// noise). Single-row tiles (1-2 input rows) read one sequential stream and skip it.
constexpr int64_t kPrefetchLead = 16 << 10;

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename OutT>
inline void store_out(OutT* p, float v) {
  *p = static_cast<OutT>(v);
}

// One register tile: output rows n0..n0+R, input rows m0..m0+MB.
//   w:  bf16 weight rows, row stride K (elements)
//   xp: pair-split fp32 x, row stride Kp (multiple of 16, zero padded)
//   xs: plain fp32 x (row stride K), only read for the K % 16 tail
//   prefetch: issue software prefetches for the weight stream (only the first pass over a row block reads DRAM)
template <int R, int MB, typename OutT>
inline void tile(const uint16_t* __restrict w, int64_t K, const float* __restrict xp, int64_t Kp,
                 const float* __restrict xs, const float* __restrict bias, OutT* __restrict y, int64_t N, int64_t n0,
                 int64_t m0, bool prefetch) {
  const int64_t K16 = K & ~int64_t(15);
  __m256 acc[R * MB];
#pragma GCC unroll 16
  for (int i = 0; i < R * MB; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const uint16_t* wr = w + n0 * K;
  const float* xr = xp + m0 * Kp;

  WeightPrefetch<R> ahead(wr, K, kPrefetchLead);

  for (int64_t k = 0; k < K16; k += 16) {
    if (R > 1 && prefetch) ahead.step(32);  // one row is one sequential stream: the hardware prefetcher's alone
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + r * K + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m)
        acc[r * MB + m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xr + m * Kp + k), acc[r * MB + m]);
      // odd elements: (raw & 0xffff0000). For MB > 1 the 12 accumulators leave no register for the mask and GCC's
      // allocation gets worse (~7% slower when compute bound), so use two shifts there; same bits either way.
      const __m256 wo = MB == 1 ? _mm256_castsi256_ps(_mm256_and_si256(raw, hi_mask))
                                : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(raw, 16), 16));
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m)
        acc[r * MB + m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xr + m * Kp + k + 8), acc[r * MB + m]);
    }
  }

  float sums[R * MB];
  reduce_accs<R * MB>(acc, sums);

  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    const float b = bias ? bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) {
      float s = sums[r * MB + m];
      if (K16 < K) {
        const uint16_t* wt = wr + r * K;
        const float* xt = xs + (m0 + m) * K;
        float t = 0.0f;
        for (int64_t k = K16; k < K; ++k) t += bf16_bits_to_float(wt[k]) * xt[k];
        s += t;
      }
      store_out(y + (m0 + m) * N + n, s + b);
    }
  }
}

// All M input rows against output rows [n0, n0 + rows), rows <= kRowBlock.
template <typename OutT>
void row_block(const uint16_t* w, int64_t K, const float* xp, int64_t Kp, const float* xs, const float* bias, OutT* y,
               int64_t M, int64_t N, int64_t n0, int64_t rows) {
  int64_t m0 = 0;
  if (rows == kRowBlock) {
    for (; m0 + 4 <= M; m0 += 4)
      for (int64_t r = 0; r < kRowBlock; r += 3) tile<3, 4>(w, K, xp, Kp, xs, bias, y, N, n0 + r, m0, m0 == 0);
    const bool pf = m0 == 0;
    switch (M - m0) {
      case 3:
        for (int64_t r = 0; r < kRowBlock; r += 4) tile<4, 3>(w, K, xp, Kp, xs, bias, y, N, n0 + r, m0, pf);
        break;
      // 1-2 rows: one output row at a time, one sequential weight stream per thread for the hardware prefetcher
      // (Zen 4: 1.4x / 1.13x faster than 4-6 row tiles with software prefetch; 3+ rows are faster tiled)
      case 2:
        for (int64_t r = 0; r < kRowBlock; ++r) tile<1, 2>(w, K, xp, Kp, xs, bias, y, N, n0 + r, m0, pf);
        break;
      case 1:
        for (int64_t r = 0; r < kRowBlock; ++r) tile<1, 1>(w, K, xp, Kp, xs, bias, y, N, n0 + r, m0, pf);
        break;
      default:
        break;
    }
  } else {  // ragged tail of N: one output row at a time
    for (int64_t r = 0; r < rows; ++r) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile<1, 4>(w, K, xp, Kp, xs, bias, y, N, n0 + r, m, m == 0);
      for (; m < M; ++m) tile<1, 1>(w, K, xp, Kp, xs, bias, y, N, n0 + r, m, m == 0);
    }
  }
}

// x (M x K, fp32 or bf16 bits) -> pair-split fp32 rows of length Kp.
template <typename InT>
void pack_x(const InT* x, int64_t M, int64_t K, int64_t Kp, float* xp) {
  for (int64_t m = 0; m < M; ++m) {
    const InT* src = x + m * K;
    float* dst = xp + m * Kp;
    for (int64_t k0 = 0; k0 < Kp; k0 += 16) {
      for (int i = 0; i < 8; ++i) {
        const int64_t ke = k0 + 2 * i, ko = ke + 1;
        dst[k0 + i] = ke < K ? static_cast<float>(src[ke]) : 0.0f;
        dst[k0 + 8 + i] = ko < K ? static_cast<float>(src[ko]) : 0.0f;
      }
    }
  }
}

template <typename OutT>
void run(const uint16_t* w, const float* xp, int64_t Kp, const float* xs, const float* bias, OutT* y, int64_t M,
         int64_t N, int64_t K) {
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  // Don't wake a second thread for less than ~128 KiB of weights (+ some M-proportional compute).
  const int64_t block_work = kRowBlock * K * (2 + M / 4);
  const int64_t grain = std::max<int64_t>(1, (int64_t(128) << 10) / std::max<int64_t>(1, block_work));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowBlock;
      row_block<OutT>(w, K, xp, Kp, xs, bias, y, M, N, n0, std::min<int64_t>(kRowBlock, N - n0));
    }
  });
}

}  // namespace

bool native_bf16_available() { return native_bf16::supported(); }

// y = x @ w.T + bias with fp32 accumulation. x: [..., K] floating; w: [N, K] bf16; bias: [N] or None.
// Returns [..., N] in x's dtype. bf16 x goes through the native bf16 kernel where the CPU has one, unless !allow_native.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool allow_native) {
  TORCH_CHECK(w.device().is_cpu() && x.device().is_cpu(), "bf16_linear: CPU tensors only");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2, "bf16_linear: w must be a 2-D bfloat16 tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bf16_linear: x must be floating point");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "bf16_linear: x.shape[-1] (", x.size(-1), ") != w.shape[1] (", K, ")");
  const at::Tensor wc = w.contiguous();
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const at::Tensor x2 = x.reshape({M, K}).contiguous();

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const bool out_f32 = x.scalar_type() == at::kFloat, out_bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty(out_shape, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  if (M == 0 || N == 0) return out_f32 || out_bf16 ? y : y.to(x.scalar_type());

  at::Tensor b32;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bf16_linear: bias must have N = ", N, " elements");
    b32 = bias->to(at::kFloat).contiguous();
    bp = b32.data_ptr<float>();
  }

  if (K == 0) {  // empty sum: just the bias
    y.zero_();
    if (bp) y.add_(b32);
    return out_f32 || out_bf16 ? y : y.to(x.scalar_type());
  }

  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  if (out_bf16 && allow_native && native_bf16::supported()) {
    native_bf16::run(wp, reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>()), bp, y.data_ptr(), true, M,
                     N, K);
    return y;
  }

  const int64_t Kp = (K + 15) / 16 * 16;
  at::Tensor xp = at::empty({M, Kp}, x.options().dtype(at::kFloat));
  at::Tensor xs;  // plain fp32 copy, only needed for the K % 16 tail
  if (x2.scalar_type() == at::kBFloat16) {
    pack_x(x2.data_ptr<at::BFloat16>(), M, K, Kp, xp.data_ptr<float>());
    if (Kp != K) xs = x2.to(at::kFloat);
  } else {
    xs = x2.to(at::kFloat).contiguous();
    pack_x(xs.data_ptr<float>(), M, K, Kp, xp.data_ptr<float>());
  }
  const float* xsp = xs.defined() ? xs.data_ptr<float>() : nullptr;

  if (out_bf16)
    run<at::BFloat16>(wp, xp.data_ptr<float>(), Kp, xsp, bp, y.data_ptr<at::BFloat16>(), M, N, K);
  else
    run<float>(wp, xp.data_ptr<float>(), Kp, xsp, bp, y.data_ptr<float>(), M, N, K);
  return out_f32 || out_bf16 ? y : y.to(x.scalar_type());
}
