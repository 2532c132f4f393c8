// The CPU kernels: the bf16 linear (bf16_linear.cpp, and bf16_linear_avx512.cpp for bf16 inputs where the CPU has
// AVX512-BF16), the fused decode ops, the draft's Markov sampler and the decoder stack that chains them
// (decode_ops.cpp).
#pragma once
#include <torch/extension.h>

#include <vector>

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool allow_native = true);
bool native_bf16_available();
// bf16 x over a GGUF weight packed in tiles of 16 output rows (quant_linear.cpp, kernels/quant_linear.linear_packed)
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t type, int64_t k, int64_t n,
                         const c10::optional<at::Tensor>& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
std::vector<at::Tensor> norm_rope(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                  const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                                  double eps, int64_t H, int64_t Hkv);
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& kv_slots, const at::Tensor& row_seq, const at::Tensor& row_limit,
                           double scale);
std::vector<at::Tensor> markov_sample(const at::Tensor& base_logits, const at::Tensor& anchors, const at::Tensor& w1,
                                      const at::Tensor& w2t, const at::Tensor& temperature, const at::Tensor& uniforms,
                                      const c10::optional<at::Tensor>& vocab_ids, double greedy_eps);

class DecoderStack {
 public:
  DecoderStack(std::vector<std::vector<at::Tensor>> layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               double eps);
  // -> [final h, captured hidden states in `capture` order]
  std::vector<at::Tensor> forward(at::Tensor h, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& slot_mapping, const at::Tensor& kv_slots, const at::Tensor& row_seq,
                                  const at::Tensor& row_limit, const std::vector<int64_t>& capture) const;

 private:
  std::vector<std::vector<at::Tensor>> layers_;
  int64_t H_, Hkv_, D_;
  double eps_;
};
