// Software prefetch of a register tile's weight stream, shared by the bf16 linear kernels (each includes it in its
// own target region; the anonymous namespace keeps the two compilations apart at link time).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace {

// A register tile walks its R rows in parallel, so a fixed address distance would give the tile's last rows little
// or no lead. Instead each row prefetches lead / R bytes ahead along its own row, wrapping into the same row of the
// next tile (tiles are contiguous), which keeps a uniform lead of ~lead bytes of consumption.
template <int R>
struct WeightPrefetch {
  const char* base;
  int64_t row_bytes, pos, adv;  // per row: byte `pos` of the row, `adv` bytes (whole tiles) further on

  WeightPrefetch(const uint16_t* rows, int64_t K, int64_t lead)
      : base(reinterpret_cast<const char*>(rows)), row_bytes(2 * K), pos((lead / R) & ~int64_t(63)), adv(0) {
    if (pos >= row_bytes) adv = pos / row_bytes * R * row_bytes, pos %= row_bytes;
  }

  // One prefetch per row, then on by the bytes of each row that a step consumes.
  inline void step(int64_t bytes) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm_prefetch(base + adv + r * row_bytes + pos, _MM_HINT_T0);
    pos += bytes;
    if (pos >= row_bytes) pos -= row_bytes, adv += R * row_bytes;
  }
};

}  // namespace
