// Fused CPU ops for small steps (decode, verify, draft blocks), where eager torch spends more time launching its ~40
// small ops per layer than computing them. Each op equals its plain-torch twin in engine/models/layers.py and
// kernels/attention.py, including the twin's intermediate bf16 roundings; only fp32 summation order differs.
// Inputs are bf16 or fp32 (the model dtype); math is fp32; outputs have the input's dtype. Rows are independent, so
// results are batch invariant.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "decode_ops.h"
#include "hsum.h"

namespace {

template <typename T>
inline float rounded(float v) {  // v as the twin would hold it in dtype T
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
inline float inv_rms(const T* x, int64_t n, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  return 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// out = T(T(x * inv_rms) * w): F.rms_norm(x.float()).to(T) * weight
template <typename T>
inline void rms_norm_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  const float r = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(rounded<T>(static_cast<float>(x[i]) * r) * static_cast<float>(w[i]));
}

// Grain for at::parallel_for so that a second thread is woken only for ~`min_work` elements of work.
inline int64_t grain_for(int64_t work_per_item, int64_t min_work = 16384) {
  return std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_item));
}

void check_cpu_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, what, ": bf16 or fp32 only");
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(1, n);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, grain_for(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(xp + r * n, wp, op + r * n, n, static_cast<float>(eps));
  });
}

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7,
// about one fp32 ulp, like std::exp), 2^n built in the exponent bits. Inputs above 88.3 are clamped to it; inputs
// below -87.3 (-inf included) give 0, so a softmax gives impossible tokens exactly zero probability, as torch's does.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 in_range = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 split in two for an exact n*ln2
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), in_range);
}

// v[j] = e^(v[j] - shift) in place; returns their sum.
inline float exp_shifted_sum(float* v, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + j), sh));
    _mm256_storeu_ps(v + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum8);
  float total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; j < n; ++j) total += (v[j] = std::exp(v[j] - shift));
  return total;
}

// silu(g) = g / (1 + e^-g) over n floats, in place.
inline void silu_inplace(float* g, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 denom = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
    _mm256_storeu_ps(g + i, _mm256_div_ps(x, denom));
  }
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i]));
}

// out = T(T(silu(gate)) * up): F.silu(gate) * up
template <typename T>
void silu_mul_impl(const at::Tensor& gu, at::Tensor& out) {
  const int64_t n = out.size(-1), rows = out.numel() / std::max<int64_t>(1, n);
  const T* gp = gu.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, grain_for(8 * n), [&](int64_t r0, int64_t r1) {
    std::vector<float> silu(n);
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = gp + r * 2 * n;
      const T* up = gate + n;
      for (int64_t i = 0; i < n; ++i) silu[i] = static_cast<float>(gate[i]);
      silu_inplace(silu.data(), n);
      for (int64_t i = 0; i < n; ++i) op[r * n + i] = static_cast<T>(rounded<T>(silu[i]) * static_cast<float>(up[i]));
    }
  });
}

// One head of D values, normed (optional) and rotated in place into `out`:
//   x = T(T(rms(x)) * w);  out = T(T(x * cos) + T(rotate_half(x) * sin))
template <typename T>
void norm_rope_head(const T* x, const T* norm_w, const T* cos, const T* sin, T* out, int64_t D, float eps,
                    float* tmp) {
  if (norm_w) {
    const float r = inv_rms(x, D, eps);
    for (int64_t i = 0; i < D; ++i)
      tmp[i] = rounded<T>(rounded<T>(static_cast<float>(x[i]) * r) * static_cast<float>(norm_w[i]));
  } else {
    for (int64_t i = 0; i < D; ++i) tmp[i] = static_cast<float>(x[i]);
  }
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rot = i < half ? -tmp[i + half] : tmp[i - half];
    const float a = rounded<T>(tmp[i] * static_cast<float>(cos[i]));
    const float b = rounded<T>(rot * static_cast<float>(sin[i]));
    out[i] = static_cast<T>(a + b);
  }
}

template <typename T>
void norm_rope_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const T* qn, const T* kn,
                    double eps, int64_t H, int64_t Hkv, int64_t D, at::Tensor& q, at::Tensor& k) {
  const int64_t rows = qkv.size(0), width = qkv.size(1), heads = H + Hkv;
  const T* xp = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  at::parallel_for(0, rows * heads, grain_for(8 * D), [&](int64_t i0, int64_t i1) {
    std::vector<float> tmp(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / heads, h = i % heads;
      const bool is_q = h < H;
      T* out = is_q ? qp + (r * H + h) * D : kp + (r * Hkv + h - H) * D;
      norm_rope_head(xp + r * width + h * D, is_q ? qn : kn, cp + r * D, sp + r * D, out, D,
                     static_cast<float>(eps), tmp.data());
    }
  });
}

template <typename T>
void store_kv_impl(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   const int64_t* slots) {
  const int64_t rows = k.size(0), Hkv = k.size(1), D = k.size(2), S = k_cache.size(1);
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t slot = slots[r];
    if (slot < 0) continue;  // padding row
    TORCH_CHECK(slot < S, "store_kv: slot ", slot, " out of range (", S, " slots)");
    for (int64_t h = 0; h < Hkv; ++h) {
      float* kd = kc + (h * S + slot) * D;
      float* vd = vc + (h * S + slot) * D;
      for (int64_t d = 0; d < D; ++d) {
        kd[d] = static_cast<float>(kp[r * ks0 + h * ks1 + d]);
        vd[d] = static_cast<float>(vp[r * vs0 + h * vs1 + d]);
      }
    }
  }
}

// s[j] = scale * <q, key j> for j < limit, D % 8 == 0: four keys at a time, each with its own accumulator, q read
// from L1 (the dot products are independent FMA chains instead of one horizontal sum per key).
inline void qk_scores(const float* q, const float* keys, const int64_t* slots, int64_t limit, int64_t D, float scale,
                      float* s) {
  int64_t j = 0;
  for (; j + 4 <= limit; j += 4) {
    const float* k0 = keys + slots[j] * D;
    const float* k1 = keys + slots[j + 1] * D;
    const float* k2 = keys + slots[j + 2] * D;
    const float* k3 = keys + slots[j + 3] * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
    }
    _mm_storeu_ps(s + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
  }
  for (; j < limit; ++j) {
    const float* k = keys + slots[j] * D;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a);
    const __m256 z = _mm256_setzero_ps();
    s[j] = _mm_cvtss_f32(hsum4(a, z, z, z)) * scale;
  }
}

// out[0..D) = sum_j p[j] * value j, D % 8 == 0: 64 output floats at a time held in registers across all keys.
inline void pv_sum(const float* p, const float* values, const int64_t* slots, int64_t limit, int64_t D, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t chunks = std::min<int64_t>(64, D - d0) / 8;
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < limit; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const float* v = values + slots[j] * D + d0;
      if (chunks == 8) {
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * c), acc[c]);
      } else {
        for (int c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * c), acc[c]);
      }
    }
    for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
  }
}

// One (row, kv head): its G query heads attend to the row's first `limit` keys of its sequence.
template <typename T>
void attend_row(const T* q, const float* kc, const float* vc, const int64_t* slots, int64_t limit, int64_t S,
                int64_t hkv, int64_t G, int64_t D, float scale, T* out, std::vector<float>& scores,
                std::vector<float>& qf, std::vector<float>& acc) {
  scores.resize(G * limit);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[i]);
  const float* keys = kc + hkv * S * D;
  const float* values = vc + hkv * S * D;
  const bool vectorized = D % 8 == 0;
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * limit;
    const float* qg = qf.data() + g * D;
    if (vectorized) {
      qk_scores(qg, keys, slots, limit, D, scale, sg);
    } else {
      for (int64_t j = 0; j < limit; ++j) {
        const float* kp = keys + slots[j] * D;
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += qg[d] * kp[d];
        sg[j] = s * scale;
      }
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < limit; ++j) mx = std::max(mx, sg[j]);
    const float inv = 1.0f / exp_shifted_sum(sg, limit, mx);
    for (int64_t j = 0; j < limit; ++j) sg[j] *= inv;
    float* ag = acc.data() + g * D;
    if (vectorized) {
      pv_sum(sg, values, slots, limit, D, ag);
    } else {
      std::fill(ag, ag + D, 0.0f);
      for (int64_t j = 0; j < limit; ++j) {
        const float* vp = values + slots[j] * D;
        for (int64_t d = 0; d < D; ++d) ag[d] += sg[j] * vp[d];
      }
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& kv_slots, const int64_t* row_seq, const int64_t* row_limit, double scale,
                          at::Tensor& out) {
  const int64_t rows = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(0), S = k_cache.size(1);
  const int64_t G = H / Hkv, L = kv_slots.size(1);
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* sp = kv_slots.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  int64_t mean_limit = 0;
  for (int64_t r = 0; r < rows; ++r) mean_limit += row_limit[r];
  mean_limit /= std::max<int64_t>(1, rows);
  at::parallel_for(0, rows * Hkv, grain_for(2 * G * D * std::max<int64_t>(1, mean_limit)), [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, qf(G * D), acc(G * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / Hkv, h = i % Hkv;
      attend_row(qp + (r * H + h * G) * D, kc, vc, sp + row_seq[r] * L, row_limit[r], S, h, G, D,
                 static_cast<float>(scale), op + (r * H + h * G) * D, scores, qf, acc);
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu_float(x, "rms_norm");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.dim() == 1 && x.size(-1) == w.size(0),
              "rms_norm: weight must be [", x.size(-1), "] of x's dtype");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_impl<at::BFloat16>(xc, wc, out, eps);
  else
    rms_norm_impl<float>(xc, wc, out, eps);
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_cpu_float(gate_up, "silu_mul");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "silu_mul: last dimension must be even (gate and up halves)");
  const at::Tensor gu = gate_up.contiguous();
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, gu.options());
  if (gu.scalar_type() == at::kBFloat16)
    silu_mul_impl<at::BFloat16>(gu, out);
  else
    silu_mul_impl<float>(gu, out);
  return out;
}

// qkv [T, (H + 2 Hkv) * D] -> q [T, H, D], k [T, Hkv, D]: optional per-head RMSNorm (Qwen3), then rotary with
// cos/sin [T, D] (both halves repeated, in x's dtype).
std::vector<at::Tensor> norm_rope(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                  const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                                  double eps, int64_t H, int64_t Hkv) {
  check_cpu_float(qkv, "norm_rope");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) % (H + 2 * Hkv) == 0, "norm_rope: qkv must be [T, (H + 2 Hkv) * D]");
  const int64_t T = qkv.size(0), D = qkv.size(1) / (H + 2 * Hkv);
  TORCH_CHECK(D % 2 == 0, "norm_rope: head_dim must be even");
  const at::Tensor x = qkv.contiguous(), c = cos.reshape({T, D}).contiguous(), s = sin.reshape({T, D}).contiguous();
  TORCH_CHECK(c.scalar_type() == x.scalar_type() && s.scalar_type() == x.scalar_type(), "norm_rope: cos/sin dtype");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "norm_rope: give both q_norm and k_norm or neither");
  at::Tensor qn, kn;
  if (q_norm.has_value()) {
    qn = q_norm->contiguous();
    kn = k_norm->contiguous();
    TORCH_CHECK(qn.numel() == D && kn.numel() == D && qn.scalar_type() == x.scalar_type() &&
                    kn.scalar_type() == x.scalar_type(), "norm_rope: q_norm/k_norm must be [head_dim] of x's dtype");
  }
  at::Tensor q = at::empty({T, H, D}, x.options()), k = at::empty({T, Hkv, D}, x.options());
  if (x.scalar_type() == at::kBFloat16)
    norm_rope_impl<at::BFloat16>(x, c, s, qn.defined() ? qn.data_ptr<at::BFloat16>() : nullptr,
                                 kn.defined() ? kn.data_ptr<at::BFloat16>() : nullptr, eps, H, Hkv, D, q, k);
  else
    norm_rope_impl<float>(x, c, s, qn.defined() ? qn.data_ptr<float>() : nullptr,
                          kn.defined() ? kn.data_ptr<float>() : nullptr, eps, H, Hkv, D, q, k);
  return {q, k};
}

// Writes k, v [T, Hkv, D] (last dim contiguous) at slot_mapping [T] of the fp32 caches [Hkv, slots, D]; slot -1 skips.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  check_cpu_float(k, "store_kv");
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && k.dim() == 3 && v.sizes() == k.sizes(), "store_kv: k/v shapes");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "store_kv: k/v last dimension must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(), "store_kv: caches must be fp32");
  TORCH_CHECK(k_cache.size(0) == k.size(1) && k_cache.size(2) == k.size(2), "store_kv: cache shape != k shape");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == k.size(0), "store_kv: one slot per row");
  if (k.scalar_type() == at::kBFloat16)
    store_kv_impl<at::BFloat16>(k, v, k_cache, v_cache, slots.data_ptr<int64_t>());
  else
    store_kv_impl<float>(k, v, k_cache, v_cache, slots.data_ptr<int64_t>());
}

// q [T, H, D]; row r attends to the first row_limit[r] keys of sequence row_seq[r], whose cache slots are
// kv_slots[row_seq[r]] ([B, L]); caches fp32 [Hkv, slots, D]. -> [T, H, D] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& kv_slots, const at::Tensor& row_seq, const at::Tensor& row_limit,
                           double scale) {
  check_cpu_float(q, "paged_attention");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && q.size(1) % k_cache.size(0) == 0 && q.size(2) == k_cache.size(2),
              "paged_attention: q [T, H, D] with H a multiple of the cache's KV heads and the same D");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(), "paged_attention: caches must be contiguous fp32");
  const at::Tensor slots = kv_slots.to(at::kLong).contiguous(), seq = row_seq.to(at::kLong).contiguous();
  const at::Tensor limit = row_limit.to(at::kLong).contiguous(), qc = q.contiguous();
  TORCH_CHECK(seq.numel() == q.size(0) && limit.numel() == q.size(0), "paged_attention: one row_seq/limit per row");
  const int64_t* sq = seq.data_ptr<int64_t>();
  const int64_t* lm = limit.data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r)
    TORCH_CHECK(sq[r] >= 0 && sq[r] < slots.size(0) && lm[r] >= 1 && lm[r] <= slots.size(1),
                "paged_attention: row ", r, " has sequence ", sq[r], " and limit ", lm[r], " outside kv_slots");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < k_cache.size(1), "paged_attention: slot ", sp[i], " outside the cache");
  at::Tensor out = at::empty_like(qc);
  if (q.scalar_type() == at::kBFloat16)
    paged_attention_impl<at::BFloat16>(qc, k_cache, v_cache, slots, sq, lm, scale, out);
  else
    paged_attention_impl<float>(qc, k_cache, v_cache, slots, sq, lm, scale, out);
  return out;
}

namespace {

// logits[v] = base[v] + sum_r latent[r] * w2t[r, v] (w2t [rank, V] fp32): 32 columns at a time in registers.
void markov_logits(const float* base, const float* latent, const float* w2t, int64_t rank, int64_t V, float* out) {
  int64_t v = 0;
  for (; v + 32 <= V; v += 32) {
    __m256 acc[4];
    for (int c = 0; c < 4; ++c) acc[c] = _mm256_loadu_ps(base + v + 8 * c);
    for (int64_t r = 0; r < rank; ++r) {
      const __m256 l = _mm256_set1_ps(latent[r]);
      const float* w = w2t + r * V + v;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(l, _mm256_loadu_ps(w + 8 * c), acc[c]);
    }
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + v + 8 * c, acc[c]);
  }
  for (; v < V; ++v) {
    float x = base[v];
    for (int64_t r = 0; r < rank; ++r) x += latent[r] * w2t[r * V + v];
    out[v] = x;
  }
}

// row := softmax(row / temperature), or one-hot at the first argmax when greedy; in place.
void markov_probs(float* row, int64_t V, float temperature, bool greedy) {
  const int64_t best = std::max_element(row, row + V) - row;
  if (greedy) {
    std::fill(row, row + V, 0.0f);
    row[best] = 1.0f;
    return;
  }
  for (int64_t v = 0; v < V; ++v) row[v] /= temperature;
  const float inv_total = 1.0f / exp_shifted_sum(row, V, row[best]);
  for (int64_t v = 0; v < V; ++v) row[v] *= inv_total;
}

inline float sum8(const float* p) {
  const __m256 z = _mm256_setzero_ps();
  return _mm_cvtss_f32(hsum4(_mm256_loadu_ps(p), z, z, z));
}

// The inverse-CDF draw of kernels/sampling.sample_inverse_cdf: the first v whose running sum exceeds u * total,
// found eight at a time (the sums' rounding differs from the twin's cumsum). Tokens of zero probability are never
// drawn: a draw that no running sum exceeds takes the last token of nonzero probability.
int64_t inverse_cdf(const float* probs, int64_t V, float u) {
  const int64_t V8 = V & ~int64_t(7);
  __m256 lanes = _mm256_setzero_ps();
  for (int64_t v = 0; v < V8; v += 8) lanes = _mm256_add_ps(lanes, _mm256_loadu_ps(probs + v));
  const __m256 z = _mm256_setzero_ps();
  float total = _mm_cvtss_f32(hsum4(lanes, z, z, z));
  for (int64_t v = V8; v < V; ++v) total += probs[v];
  const float target = u * total;
  float cdf = 0.0f;
  for (int64_t v0 = 0; v0 < V; v0 += 8) {
    const int64_t end = std::min<int64_t>(v0 + 8, V);
    if (end - v0 == 8) {
      const float chunk = sum8(probs + v0);
      if (cdf + chunk <= target) {
        cdf += chunk;
        continue;
      }
    }
    for (int64_t v = v0; v < end; ++v) {
      if (probs[v] <= 0.0f) continue;
      cdf += probs[v];
      if (cdf > target) return v;
    }
  }
  for (int64_t v = V - 1; v > 0; --v)
    if (probs[v] > 0.0f) return v;
  return 0;
}

}  // namespace

// Sequential vanilla-Markov draft sampling fused over the block (twin: kernels/markov.markov_sample).
std::vector<at::Tensor> markov_sample(const at::Tensor& base_logits, const at::Tensor& anchors, const at::Tensor& w1,
                                      const at::Tensor& w2t, const at::Tensor& temperature, const at::Tensor& uniforms,
                                      const c10::optional<at::Tensor>& vocab_ids, double greedy_eps) {
  TORCH_CHECK(base_logits.dim() == 3 && base_logits.scalar_type() == at::kFloat, "markov_sample: base_logits must be "
              "fp32 [B, G, V]");
  const int64_t B = base_logits.size(0), G = base_logits.size(1), V = base_logits.size(2), rank = w1.size(1);
  TORCH_CHECK(w2t.scalar_type() == at::kFloat && w2t.dim() == 2 && w2t.size(0) == rank && w2t.size(1) == V,
              "markov_sample: w2t must be fp32 [rank, V] (W2 transposed)");
  TORCH_CHECK(w1.dim() == 2 && (w1.scalar_type() == at::kFloat || w1.scalar_type() == at::kBFloat16),
              "markov_sample: w1 must be a bf16 or fp32 [vocab, rank] embedding");
  TORCH_CHECK(anchors.numel() == B && temperature.numel() == B && uniforms.numel() == B * G,
              "markov_sample: one anchor and temperature per request, one uniform per position");
  const at::Tensor base = base_logits.contiguous(), w2c = w2t.contiguous(), w1c = w1.contiguous();
  const at::Tensor prev0 = anchors.to(at::kLong).contiguous(), temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor u = uniforms.to(at::kFloat).contiguous();
  at::Tensor ids;
  if (vocab_ids.has_value()) {
    ids = vocab_ids->to(at::kLong).contiguous();
    TORCH_CHECK(ids.numel() == V, "markov_sample: vocab_ids must name one token per column");
  } else {
    TORCH_CHECK(w1.size(0) == V, "markov_sample: without vocab_ids, w1 must have V rows");
  }
  at::Tensor tokens = at::empty({B, G}, prev0.options()), probs = at::empty({B, G, V}, base.options());
  const int64_t* idp = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  const bool w1_bf16 = w1c.scalar_type() == at::kBFloat16;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> latent(rank);
    for (int64_t b = b0; b < b1; ++b) {
      int64_t prev = prev0.data_ptr<int64_t>()[b];
      const float t = temp.data_ptr<float>()[b];
      for (int64_t k = 0; k < G; ++k) {
        TORCH_CHECK(prev >= 0 && prev < w1c.size(0), "markov_sample: token ", prev, " outside w1");
        for (int64_t r = 0; r < rank; ++r)
          latent[r] = w1_bf16 ? static_cast<float>(w1c.data_ptr<at::BFloat16>()[prev * rank + r])
                              : w1c.data_ptr<float>()[prev * rank + r];
        float* row = probs.data_ptr<float>() + (b * G + k) * V;
        markov_logits(base.data_ptr<float>() + (b * G + k) * V, latent.data(), w2c.data_ptr<float>(), rank, V, row);
        markov_probs(row, V, t, t < greedy_eps);
        const int64_t col = inverse_cdf(row, V, u.data_ptr<float>()[b * G + k]);
        prev = idp ? idp[col] : col;
        tokens.data_ptr<int64_t>()[b * G + k] = prev;
      }
    }
  });
  return {tokens, probs};
}

namespace {

c10::optional<at::Tensor> optional(const at::Tensor& t) {  // empty = absent
  return t.defined() && t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// A layer's linear j (qkv, o, gate_up, down): its bf16 weight, or a GGUF weight packed in tiles of 16 rows (uint8)
// whose int64 meta tensor (layer tensor 12 + j) holds its GGML type, K and N.
at::Tensor stack_linear(const at::Tensor& x, const std::vector<at::Tensor>& layer, int j, int slot,
                        const c10::optional<at::Tensor>& bias) {
  const at::Tensor& w = layer[slot];
  if (w.scalar_type() != at::kByte) return bf16_linear(x, w, bias);
  const int64_t* meta = layer[12 + j].data_ptr<int64_t>();
  return packed_linear(x, w, meta[0], meta[1], meta[2], bias);
}

}  // namespace

// The decoder layers of a Llama/Qwen2/Qwen3 model for a step whose rows are all short queries against the paged cache
// (decode, verify): the same fused ops as engine/models/decoder.py's fused path, in the same order, with no Python
// between them. Each layer's tensors are, in order: input norm, qkv weight, qkv bias, q norm, k norm, o weight,
// o bias, post-attention norm, gate_up weight, down weight, k cache, v cache (absent = empty); weights are bf16, or
// (then 16 tensors: qkv, o, gate_up and down metas follow) GGUF weights packed in tiles of 16 rows (stack_linear).
DecoderStack::DecoderStack(std::vector<std::vector<at::Tensor>> layers, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, double eps)
    : layers_(std::move(layers)), H_(num_heads), Hkv_(num_kv_heads), D_(head_dim), eps_(eps) {
  for (const auto& l : layers_) {
    TORCH_CHECK(l.size() == 12 || l.size() == 16, "DecoderStack: 12 tensors per layer, or 16 with linears' metas");
    for (int j = 0; j < 4; ++j) {
      const int slot = j == 0 ? 1 : j == 1 ? 5 : 7 + j;
      TORCH_CHECK(l[slot].scalar_type() != at::kByte ||
                      (l.size() == 16 && l[12 + j].scalar_type() == at::kLong && l[12 + j].numel() == 3),
                  "DecoderStack: a packed weight needs its meta tensor (type, K, N)");
    }
  }
}

std::vector<at::Tensor> DecoderStack::forward(at::Tensor h, const at::Tensor& cos, const at::Tensor& sin,
                                              const at::Tensor& slot_mapping, const at::Tensor& kv_slots,
                                              const at::Tensor& row_seq, const at::Tensor& row_limit,
                                              const std::vector<int64_t>& capture) const {
  const int64_t T = h.size(0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D_));
  std::vector<at::Tensor> captured(capture.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& w = layers_[i];
    at::Tensor x = rms_norm(h, w[0], eps_);
    const at::Tensor qkv = stack_linear(x, w, 0, 1, optional(w[2]));
    const auto qk = norm_rope(qkv, cos, sin, optional(w[3]), optional(w[4]), eps_, H_, Hkv_);
    const at::Tensor v = qkv.slice(1, (H_ + Hkv_) * D_).view({T, Hkv_, D_});
    at::Tensor k_cache = w[10], v_cache = w[11];
    store_kv(qk[1], v, k_cache, v_cache, slot_mapping);
    const at::Tensor attn = paged_attention(qk[0], k_cache, v_cache, kv_slots, row_seq, row_limit, scale);
    h = h + stack_linear(attn.view({T, H_ * D_}), w, 1, 5, optional(w[6]));
    x = rms_norm(h, w[7], eps_);
    h = h + stack_linear(silu_mul(stack_linear(x, w, 2, 8, c10::nullopt)), w, 3, 9, c10::nullopt);
    for (size_t c = 0; c < capture.size(); ++c)
      if (capture[c] == static_cast<int64_t>(i)) captured[c] = h;
  }
  captured.insert(captured.begin(), h);
  return captured;
}
