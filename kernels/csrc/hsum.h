// Horizontal sums of 256-bit fp32 accumulators with one fixed summation tree per lane, shared by the AVX2 and the
// AVX-512 bf16 linear kernels (each includes it in its own target region; the anonymous namespace keeps the two
// compilations apart at link time).
#pragma once
#include <immintrin.h>

namespace {

// Sums of 8 vectors -> one vector whose lane j is the horizontal sum of v[j].
inline __m256 hsum8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
  __m256 a = _mm256_hadd_ps(v0, v1);  // per 128-bit half: v0[01] v0[23] v1[01] v1[23]
  __m256 b = _mm256_hadd_ps(v2, v3);
  __m256 c = _mm256_hadd_ps(v4, v5);
  __m256 d = _mm256_hadd_ps(v6, v7);
  __m256 ab = _mm256_hadd_ps(a, b);  // lo half: partial sums of v0..v3 (low 4 lanes), hi half: (high 4 lanes)
  __m256 cd = _mm256_hadd_ps(c, d);
  __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20);  // [ab.lo, cd.lo]
  __m256 hi = _mm256_permute2f128_ps(ab, cd, 0x31);  // [ab.hi, cd.hi]
  return _mm256_add_ps(lo, hi);
}

// The same tree as hsum8 for 4 vectors: lane j (j < 4) of the result is the sum of v[j].
inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(ab), _mm256_extractf128_ps(ab, 1));
}

// Horizontal sums of NACC accumulators into out[0..NACC). Every lane goes through the same tree,
// ((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7)), whatever the group size (zero padding for groups < 4), so a result
// never depends on which tile shape computed it: outputs are bitwise identical whatever M, the row position or the
// thread count (batch invariance).
template <int NACC>
inline void reduce_accs(const __m256* acc, float* out) {
  int i = 0;
  for (; i + 8 <= NACC; i += 8) {
    _mm256_storeu_ps(out + i, hsum8(acc[i], acc[i + 1], acc[i + 2], acc[i + 3], acc[i + 4], acc[i + 5], acc[i + 6],
                                    acc[i + 7]));
  }
  for (; i + 4 <= NACC; i += 4) _mm_storeu_ps(out + i, hsum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
  if constexpr (NACC % 4 != 0) {
    const __m256 z = _mm256_setzero_ps();
    alignas(16) float tmp[4];
    _mm_store_ps(tmp, hsum4(acc[i], i + 1 < NACC ? acc[i + 1] : z, i + 2 < NACC ? acc[i + 2] : z, z));
    for (int j = 0; i + j < NACC; ++j) out[i + j] = tmp[j];
  }
}

}  // namespace
