// bf16 x over Q4_0 / Q4_1 / Q8_0 weights repacked at load time into tiles of 16 output rows (the "x16" layout), on
// CPUs with AVX512-BF16. One 16-lane fp32 register holds 16 outputs, so a block's scale is applied once per 32
// weights for 16 outputs at once (one multiply-add per register), not once per output row, and no horizontal sum
// is ever needed; an input row's pair of bf16 values is broadcast to all lanes straight from memory
// (vdpbf16ps {1to16}). Per input row and tile (16 outputs x 32 weights) that is 16 vdpbf16ps and one scale FMA (two
// for Q4_1), against the row-major kernel's 16 vdpbf16ps + 16 FMAs + 16 scalar min terms, so 8..64 rows (verify,
// draft, short prefill chunks) cost what the bf16 kernel does while 1..4 rows read ~3x fewer bytes.
//
// Layout (quant_pack in quant_linear.cpp, kernels/quant_linear.pack): tile (g, b) = output rows 16g..16g+15, block
// b (32 elements):
//   Q4_0: d[16] (fp16)          | qs 256 bytes      (288 bytes = 16 x 18)
//   Q4_1: d[16] (fp16), m[16]   | qs 256 bytes      (320 bytes = 16 x 20)
//   Q8_0: d[16] (fp16)          | qs 512 bytes      (544 bytes = 16 x 34)
// 4-bit qs: byte 32c + 2l + h = q[l][4c + h] | q[l][4c + 2 + h] << 4 (c = 0..7, lane l, h = 0..1), so one 32-byte
// load, widened to words, gives register 2c (its low nibbles: elements 4c, 4c+1 of each lane, a bf16 pair per lane
// after a 16-entry lookup) and register 2c+1 (its high nibbles: elements 4c+2, 4c+3). 8-bit qs: byte 32j + 2l + h =
// q[l][2j + h]. Register j always pairs with x's elements 2j, 2j+1 of the block. Tiles run block-fastest within a
// group, so a thread streams each group's bytes sequentially. Missing rows of the last group are zero.
//
// Each output's arithmetic is fixed by K alone: per block, two chains of 8 vdpbf16ps (even and odd registers),
// added, times d, added to the output's accumulator (then m_b * sum(x_b) for Q4_1, the sums in a fixed order) --
// whatever M, the row's position, the output's group or the thread split (batch invariant). Up to 8 input rows
// share a pass over a group's tiles; more rows take further passes, which find the tiles in L1 and unpack them again
// (measured faster than reloading them unpacked from a scratch buffer: unpacking is 2 instructions a register).
#include <immintrin.h>

#include <cstdint>

#include "quant_linear.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace quant_packed_impl {

constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int kMaxRows = 8;
// Software prefetch of the tile stream, this many bytes ahead (it runs on across groups), by the first pass over a
// group: without it a full pass over SmolLM2's weights took 1.1x as long at 1 row and 1.4x at 16 (one thread); 4 to
// 32 KiB measured alike.
constexpr int64_t kPrefetchLead = 16 << 10;

template <int TYPE>
constexpr int64_t tile_bytes() {
  return TYPE == kQ4_1 ? 320 : TYPE == kQ4_0 ? 288 : 544;
}
template <int TYPE>
constexpr int64_t qs_offset() {
  return TYPE == kQ4_1 ? 64 : 32;
}

inline __m512i nibble_table(int offset) {  // bf16 of (i & 15) - offset, i = 0..31
  alignas(64) uint16_t t[32];
  quant_avx512::bf16_nibble_table(offset, t);
  return _mm512_load_si512(t);
}

// Registers 2c and 2c+1 of a 4-bit tile: vpermw reads an index's low 5 bits, and the table repeats after 16, so the
// low nibble needs no mask (bit 4 is the high nibble's lowest bit).
inline void unpack_q4(const uint8_t* qs, int c, __m512i table, __m512bh* lo, __m512bh* hi) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c)));
  *lo = (__m512bh)_mm512_permutexvar_epi16(b, table);
  *hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
}

// Register j of an 8-bit tile: int8 -> fp32 -> bf16, exact (|q| <= 128 has at most 8 significant bits).
inline __m512bh unpack_q8(const uint8_t* qs, int j) {
  const __m128i* p = reinterpret_cast<const __m128i*>(qs + 32 * j);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

template <int TYPE>
inline void unpack_pair(const uint8_t* qs, int c, __m512i table, __m512bh* r0, __m512bh* r1) {
  if (TYPE == kQ8_0) {
    *r0 = unpack_q8(qs, 2 * c);
    *r1 = unpack_q8(qs, 2 * c + 1);
  } else {
    unpack_q4(qs, c, table, r0, r1);
  }
}

inline __m512bh bcast_pair(const uint16_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

// acc[m] (16 outputs of group g) = W_g . x[m] for MB input rows (bf16 bits, row stride K).
template <int TYPE, int MB>
inline void group_rows(const uint8_t* tiles, int64_t nb, const uint16_t* x, int64_t K, const float* sx,
                       __m512i table, bool prefetch, __m512* out) {
  __m512 acc[MB];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* t = tiles + b * tile_bytes<TYPE>();
    const uint8_t* qs = t + qs_offset<TYPE>();
    const uint16_t* xb = x + b * 32;
    if (prefetch)
      for (int64_t line = 0; line < tile_bytes<TYPE>(); line += 64) _mm_prefetch(t + kPrefetchLead + line, _MM_HINT_T0);
    __m512 ev[MB], od[MB];  // even and odd registers: two dependency chains
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) ev[m] = od[m] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      __m512bh r0, r1;
      unpack_pair<TYPE>(qs, c, table, &r0, &r1);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        ev[m] = _mm512_dpbf16_ps(ev[m], r0, bcast_pair(xb + m * K + 4 * c));
        od[m] = _mm512_dpbf16_ps(od[m], r1, bcast_pair(xb + m * K + 4 * c + 2));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(d, _mm512_add_ps(ev[m], od[m]), acc[m]);
    if (TYPE == kQ4_1) {
      const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)));
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[m * nb + b]), acc[m]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) out[m] = acc[m];
}

template <int TYPE>
inline void rows_pass(const uint8_t* tiles, int64_t nb, const uint16_t* x, int64_t K, const float* sx,
                      __m512i table, bool prefetch, __m512* out, int64_t rows) {
  switch (rows) {
#define QP_CASE(R) \
  case R: return group_rows<TYPE, R>(tiles, nb, x, K, sx, table, prefetch, out);
    QP_CASE(1) QP_CASE(2) QP_CASE(3) QP_CASE(4) QP_CASE(5) QP_CASE(6) QP_CASE(7)
#undef QP_CASE
    default: return group_rows<TYPE, kMaxRows>(tiles, nb, x, K, sx, table, prefetch, out);
  }
}

// fp32 -> bf16 bits, round to nearest even, NaN -> quiet NaN (c10::BFloat16's rounding)
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline void store_rows(const __m512* acc, int64_t rows, const float* bias, void* y, bool out_bf16, int64_t N,
                       int64_t n0, __mmask16 lanes) {
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(lanes, bias + n0) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 v = _mm512_add_ps(acc[m], bv);
    if (out_bf16)
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + m * N + n0, lanes, to_bf16(v));
    else
      _mm512_mask_storeu_ps(static_cast<float*>(y) + m * N + n0, lanes, v);
  }
}

template <int TYPE>
void groups(const uint8_t* packed, const uint16_t* x, const float* sx, const float* bias, void* y, bool out_bf16,
            int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1) {
  const __m512i table = nibble_table(TYPE == kQ4_0 ? 8 : 0);
  const int64_t nb = K / 32, group_bytes = nb * tile_bytes<TYPE>();
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* tiles = packed + g * group_bytes;
    const int64_t n0 = g * 16, width = N - n0 < 16 ? N - n0 : 16;
    const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t rows = M - m < kMaxRows ? M - m : kMaxRows;
      __m512 acc[kMaxRows];
      rows_pass<TYPE>(tiles, nb, x + m * K, K, sx ? sx + m * nb : nullptr, table, m == 0, acc, rows);
      void* ym = out_bf16 ? static_cast<void*>(static_cast<uint16_t*>(y) + m * N)
                          : static_cast<void*>(static_cast<float*>(y) + m * N);
      store_rows(acc, rows, bias, ym, out_bf16, N, n0, lanes);
    }
  }
}

// sx[m * nb + b] = sum of block b of row m (bf16 bits), in a fixed order
void block_sums(const uint16_t* x, int64_t M, int64_t K, float* sx) {
  const int64_t nb = K / 32;
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i v = _mm512_loadu_si512(x + m * K + b * 32);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
      sx[m * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
    }
}

}  // namespace quant_packed_impl

namespace quant_avx512 {

void packed_block_sums(const uint16_t* x, int64_t M, int64_t K, float* sx) {
  quant_packed_impl::block_sums(x, M, K, sx);
}

void packed_groups(int type, const uint8_t* packed, const uint16_t* x, const float* sx, const float* bias, void* y,
                   bool out_bf16, int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1) {
  if (type == quant_packed_impl::kQ4_0)
    quant_packed_impl::groups<quant_packed_impl::kQ4_0>(packed, x, sx, bias, y, out_bf16, M, K, N, g0, g1);
  else if (type == quant_packed_impl::kQ4_1)
    quant_packed_impl::groups<quant_packed_impl::kQ4_1>(packed, x, sx, bias, y, out_bf16, M, K, N, g0, g1);
  else
    quant_packed_impl::groups<quant_packed_impl::kQ8_0>(packed, x, sx, bias, y, out_bf16, M, K, N, g0, g1);
}

}  // namespace quant_avx512

#pragma GCC pop_options
