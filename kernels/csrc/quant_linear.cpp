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
#include <vector>

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
at::Tensor quant_dequantize(const at::Tensor& blocks, int64_t type, int64_t k, const c10::optional<at::Tensor>& rows) {
  check_blocks(blocks, type, k);
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1);
  const bool all = !(rows.has_value() && rows->defined());
  const at::Tensor ids = all ? at::Tensor() : rows->to(at::kLong).contiguous();
  const int64_t R = all ? N : ids.numel();
  const int64_t* idp = all ? nullptr : ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R && idp; ++r)
    TORCH_CHECK(idp[r] >= 0 && idp[r] < N, "quantized dequantize: row ", idp[r], " is outside [0, ", N, ")");
  at::Tensor out = at::empty({R, k}, blocks.options().dtype(at::kFloat));
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(64) << 10) / (4 * k)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      dequant_row(static_cast<int>(type), w + (idp ? idp[r] : r) * row_bytes, op + r * k, k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(dspark_quant, m) {
  m.def("linear(Tensor x, Tensor blocks, int type, int k, Tensor? bias) -> Tensor");
  m.def("dequantize(Tensor blocks, int type, int k, Tensor? rows) -> Tensor");
  m.def("avx512() -> bool", [] { return quant_avx512::supported(); });
}

TORCH_LIBRARY_IMPL(dspark_quant, CPU, m) {
  m.impl("linear", &quant_linear);
  m.impl("dequantize", &quant_dequantize);
}
