// Linear layers over GGUF blocks, kept in the file's own types (F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K):
//
//   y[m, n] = sum_k x[m, k] * dequant(W)[n, k]  (+ bias[n]),   fp32 activations and accumulation
//
// Each weight row is dequantized once per call into an L1-resident fp32 row (the type's own formula, as GGML and
// gguf-py define it), then dotted with every input row, several rows per pass. A decode step streams the blocks
// (Q4_1: 5 bits a weight, ~3x fewer bytes than bf16) and pays the unpacking once per weight whatever M, so it stays
// memory bound for a row or a few; verify-sized steps add one fp32 FMA per weight per row. Threads split the output
// rows. The summation order of an output depends only on K, never on M, its position or the thread split (batch
// invariant). bf16 inputs are widened to fp32 exactly; the output has x's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "decode_ops.h"
#include "quant_linear.h"

namespace quant_avx2 {
#define QUANT_ROWS_MAX_M 4
#include "quant_rows.inc"
#undef QUANT_ROWS_MAX_M
}  // namespace quant_avx2

namespace {

// (elements, bytes) of one block of a GGML type; {0, 0} for types without a kernel
std::pair<int64_t, int64_t> block_shape(int64_t type) {
  switch (type) {
    case quant_avx2::kF16: return {1, 2};
    case quant_avx2::kQ8_0: return {32, 34};
    case quant_avx2::kQ4_0: return {32, 18};
    case quant_avx2::kQ4_1: return {32, 20};
    case quant_avx2::kQ4_K: return {256, 144};
    case quant_avx2::kQ6_K: return {256, 210};
    default: return {0, 0};
  }
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t k) {
  const auto [elements, bytes] = block_shape(type);
  TORCH_CHECK(elements > 0, "quantized linear: GGML type ", type, " has no kernel");
  TORCH_CHECK(k > 0 && k % elements == 0, "quantized linear: K = ", k, " is not a multiple of the block size ",
              elements);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.device().is_cpu(),
              "quantized linear: blocks must be a contiguous CPU uint8 [N, row bytes] tensor");
  TORCH_CHECK(blocks.size(1) == k / elements * bytes, "quantized linear: rows of ", blocks.size(1),
              " bytes, expected ", k / elements * bytes, " for K = ", k);
}

void linear_rows(int type, const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y,
                 int64_t N, int64_t n0, int64_t n1, float* wbuf) {
  if (quant_avx512::supported())
    quant_avx512::linear_rows(type, w, row_bytes, x, M, K, y, N, n0, n1, wbuf);
  else
    quant_avx2::linear_rows(type, w, row_bytes, x, M, K, y, N, n0, n1, wbuf);
}

void dequant_row(int type, const uint8_t* src, float* dst, int64_t k) {
  if (quant_avx512::supported())
    quant_avx512::dequant_row(type, src, dst, k);
  else
    quant_avx2::dequant_row(type, src, dst, k);
}

bool bf16_path(const at::Tensor& x, int64_t type) {
  return x.scalar_type() == at::kBFloat16 && quant_avx512::bf16_supported() &&
         (type == quant_avx2::kQ4_0 || type == quant_avx2::kQ4_1 || type == quant_avx2::kQ8_0);
}

// y [M, N] fp32 from bf16 x [M, k] through the AVX512-BF16 rows; x's per-block sums feed Q4_1's minimums.
at::Tensor linear_bf16(const at::Tensor& x2, const at::Tensor& blocks, int64_t type, int64_t k) {
  const at::Tensor xb = x2.contiguous();
  const int64_t M = xb.size(0), N = blocks.size(0), row_bytes = blocks.size(1), nb = k / 32;
  const at::Tensor sums = xb.view({M, nb, 32}).to(at::kFloat).sum(-1).contiguous();
  at::Tensor y = at::empty({M, N}, xb.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  const float* sp = sums.data_ptr<float>();
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(32) << 10) / (row_bytes + M * k / 8));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    quant_avx512::linear_rows_bf16(static_cast<int>(type), w, row_bytes, xp, sp, M, k, yp, N, n0, n1);
  });
  return y;
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t type, int64_t k,
                        const c10::optional<at::Tensor>& bias) {
  check_blocks(blocks, type, k);
  TORCH_CHECK(x.size(-1) == k, "quantized linear: x has ", x.size(-1), " features, the weight ", k);
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  if (bf16_path(x, type)) {
    at::Tensor y = linear_bf16(x.reshape({-1, k}), blocks, type, k);
    if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
    return y.view(shape).to(x.scalar_type());
  }
  const at::Tensor xf = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Don't wake a second thread for less than ~32 KiB of blocks (+ M-proportional compute).
  const int64_t grain = std::max<int64_t>(1, (int64_t(32) << 10) / (row_bytes + M * k / 8));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> wbuf(k);
    linear_rows(static_cast<int>(type), w, row_bytes, xp, M, k, yp, N, n0, n1, wbuf.data());
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.view(shape).to(x.scalar_type());
}

// Rows `rows` (all when absent) of the weight, dequantized to fp32 [R, K]: embedding lookups, and the dense copy a
// long prefill multiplies with a GEMM.
// fp32 [R, k] of the rows asked for (all n when rows is absent), each filled by fill(row id, its output row), in
// parallel.
template <typename Fill>
at::Tensor dequantize_rows(const at::Tensor& like, const c10::optional<at::Tensor>& rows, int64_t n, int64_t k,
                           const Fill& fill) {
  const bool all = !(rows.has_value() && rows->defined());
  const at::Tensor ids = all ? at::Tensor() : rows->to(at::kLong).contiguous();
  const int64_t R = all ? n : ids.numel();
  const int64_t* idp = all ? nullptr : ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R && idp; ++r)
    TORCH_CHECK(idp[r] >= 0 && idp[r] < n, "quantized dequantize: row ", idp[r], " is outside [0, ", n, ")");
  at::Tensor out = at::empty({R, k}, like.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(64) << 10) / (4 * k)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fill(idp ? idp[r] : r, op + r * k);
  });
  return out;
}

at::Tensor quant_dequantize(const at::Tensor& blocks, int64_t type, int64_t k, const c10::optional<at::Tensor>& rows) {
  check_blocks(blocks, type, k);
  const int64_t row_bytes = blocks.size(1);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  return dequantize_rows(blocks, rows, blocks.size(0), k, [&](int64_t row, float* out) {
    dequant_row(static_cast<int>(type), w + row * row_bytes, out, k);
  });
}

// ---- the x16 layout (quant_packed_avx512.cpp): tiles of 16 output rows x one 32-element block ----

int64_t packed_tile_bytes(int64_t type) {
  switch (type) {
    case quant_avx2::kQ4_0: return 288;
    case quant_avx2::kQ4_1: return 320;
    case quant_avx2::kQ8_0: return 544;
    default: return 0;
  }
}

void check_packed(const at::Tensor& packed, int64_t type, int64_t k, int64_t n) {
  const int64_t tile = packed_tile_bytes(type);
  TORCH_CHECK(tile > 0, "packed quantized linear: GGML type ", type, " has no packed layout (Q4_0, Q4_1, Q8_0)");
  TORCH_CHECK(k > 0 && k % 32 == 0 && n > 0, "packed quantized linear: K = ", k, " is not a multiple of 32");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.device().is_cpu() && packed.size(0) == (n + 15) / 16 && packed.size(1) == k / 32 * tile,
              "packed quantized linear: expected a contiguous CPU uint8 [", (n + 15) / 16, ", ", k / 32 * tile,
              "] tensor for N = ", n, ", K = ", k);
}

// Byte offset, within a tile's qs, of element e of lane l, and the nibble's shift (4-bit types).
inline std::pair<int64_t, int> q4_position(int64_t l, int64_t e) {
  const int64_t c = e / 4, r = e % 4;
  return {32 * c + 2 * l + (r & 1), (r >> 1) * 4};
}

// GGUF blocks [N, row bytes] -> the x16 layout [ceil(N / 16), nb * tile bytes] (missing rows zero).
at::Tensor quant_pack(const at::Tensor& blocks, int64_t type, int64_t k) {
  check_blocks(blocks, type, k);
  const int64_t tile = packed_tile_bytes(type);
  TORCH_CHECK(tile > 0, "packed quantized linear: GGML type ", type, " has no packed layout (Q4_0, Q4_1, Q8_0)");
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1), nb = k / 32, G = (N + 15) / 16;
  const int64_t bs = row_bytes / nb, qs_src = type == quant_avx2::kQ4_1 ? 4 : 2;
  const int64_t qs_dst = type == quant_avx2::kQ4_1 ? 64 : 32;
  at::Tensor out = at::zeros({G, nb * tile}, blocks.options());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* t = dst + (g * nb + b) * tile;
        for (int64_t l = 0; l < 16 && g * 16 + l < N; ++l) {
          const uint8_t* s = src + (g * 16 + l) * row_bytes + b * bs;
          std::memcpy(t + 2 * l, s, 2);                                            // d
          if (type == quant_avx2::kQ4_1) std::memcpy(t + 32 + 2 * l, s + 2, 2);  // m
          const uint8_t* q = s + qs_src;
          for (int64_t e = 0; e < 32; ++e) {
            if (type == quant_avx2::kQ8_0) {
              t[qs_dst + 32 * (e / 2) + 2 * l + (e & 1)] = q[e];
            } else {
              const uint8_t v = e < 16 ? (q[e] & 15) : (q[e - 16] >> 4);
              const auto [pos, shift] = q4_position(l, e);
              t[qs_dst + pos] |= static_cast<uint8_t>(v << shift);
            }
          }
        }
      }
  });
  return out;
}

// Rows `rows` (all N when absent) of a packed weight in fp32 [R, K]: the GGML formulas, as dequant_row's.
at::Tensor quant_dequantize_packed(const at::Tensor& packed, int64_t type, int64_t k, int64_t n,
                                   const c10::optional<at::Tensor>& rows) {
  check_packed(packed, type, k, n);
  const int64_t tile = packed_tile_bytes(type), nb = k / 32;
  const int64_t qs = type == quant_avx2::kQ4_1 ? 64 : 32;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  return dequantize_rows(packed, rows, n, k, [&](int64_t row, float* o) {
    const int64_t g = row / 16, l = row % 16;
    for (int64_t b = 0; b < nb; ++b, o += 32) {
      const uint8_t* t = w + (g * nb + b) * tile;
      const float d = quant_avx2::half_at(t + 2 * l);
      if (type == quant_avx2::kQ8_0) {
        for (int64_t e = 0; e < 32; ++e)
          o[e] = d * static_cast<float>(static_cast<int8_t>(t[qs + 32 * (e / 2) + 2 * l + (e & 1)]));
        continue;
      }
      const float mn = type == quant_avx2::kQ4_1 ? quant_avx2::half_at(t + 32 + 2 * l) : 0.0f;
      for (int64_t e = 0; e < 32; ++e) {
        const auto [pos, shift] = q4_position(l, e);
        const int q = (t[qs + pos] >> shift) & 15;
        o[e] = type == quant_avx2::kQ4_1 ? d * static_cast<float>(q) + mn : d * static_cast<float>(q - 8);
      }
    }
  });
}

// bf16 x [..., k] over a packed weight -> [..., n] in bf16 (fp32 accumulation); AVX512-BF16 CPUs only.
at::Tensor quant_linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t type, int64_t k, int64_t n,
                               const c10::optional<at::Tensor>& bias) {
  check_packed(packed, type, k, n);
  TORCH_CHECK(quant_avx512::bf16_supported(), "packed quantized linear: this CPU lacks AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(-1) == k, "packed quantized linear: x must be bf16 [..., ",
              k, "]");
  const at::Tensor xb = x.reshape({-1, k}).contiguous();
  const int64_t M = xb.size(0), nb = k / 32, G = packed.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty({M, n}, xb.options());
  if (M == 0) return y.view(shape);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "packed quantized linear: bias of ", bias->numel(), " for N = ", n);
    b32 = bias->to(at::kFloat).contiguous();
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  std::vector<float> sums(type == quant_avx2::kQ4_1 ? M * nb : 0);
  if (!sums.empty()) quant_avx512::packed_block_sums(xp, M, k, sums.data());
  const float* sp = sums.empty() ? nullptr : sums.data();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  void* yp = y.data_ptr();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  // Don't wake a second thread for less than ~64 KiB of tiles (+ M-proportional compute).
  const int64_t group_work = packed.size(1) + M * k;
  const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / group_work);
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    quant_avx512::packed_groups(static_cast<int>(type), w, xp, sp, bp, yp, true, M, k, n, g0, g1);
  });
  return y.view(shape);
}

}  // namespace

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t type, int64_t k, int64_t n,
                         const c10::optional<at::Tensor>& bias) {
  return quant_linear_packed(x, packed, type, k, n, bias);
}

TORCH_LIBRARY(dspark_quant, m) {
  m.def("linear(Tensor x, Tensor blocks, int type, int k, Tensor? bias) -> Tensor");
  m.def("dequantize(Tensor blocks, int type, int k, Tensor? rows) -> Tensor");
  m.def("avx512() -> bool", [] { return quant_avx512::supported(); });
  m.def("packed_available() -> bool", [] { return quant_avx512::bf16_supported(); });
  m.def("pack(Tensor blocks, int type, int k) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor packed, int type, int k, int n, Tensor? bias) -> Tensor");
  m.def("dequantize_packed(Tensor packed, int type, int k, int n, Tensor? rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_quant, CPU, m) {
  m.impl("linear", &quant_linear);
  m.impl("dequantize", &quant_dequantize);
  m.impl("pack", &quant_pack);
  m.impl("linear_packed", &quant_linear_packed);
  m.impl("dequantize_packed", &quant_dequantize_packed);
}
