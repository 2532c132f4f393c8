// Python bindings of the CPU kernels (one extension module for all of them, built once per machine).
#include <torch/extension.h>

#include <vector>

#include "decode_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("bf16_linear", &bf16_linear, "y = x @ w.T (+ bias), bf16 weight, fp32 accumulation (AVX2/FMA, AVX512-BF16)",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("allow_native") = true);
  m.def("native_bf16_available", &native_bf16_available, "the CPU has AVX512-BF16 (bf16 inputs use it)");
  m.def("rms_norm", &rms_norm, "T(T(rms_norm(x.float())) * w)", py::arg("x"), py::arg("w"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [..., 2I] -> [..., I]", py::arg("gate_up"));
  m.def("norm_rope", &norm_rope, "qkv -> (q, k): optional per-head RMSNorm, then rotary", py::arg("qkv"),
        py::arg("cos"), py::arg("sin"), py::arg("q_norm"), py::arg("k_norm"), py::arg("eps"), py::arg("num_heads"),
        py::arg("num_kv_heads"));
  m.def("store_kv", &store_kv, "write k/v rows into the paged fp32 caches by slot (-1 skipped)", py::arg("k"),
        py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"));
  m.def("paged_attention", &paged_attention, "short-query attention straight from the paged cache", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("kv_slots"), py::arg("row_seq"), py::arg("row_limit"),
        py::arg("scale"));
  m.def("markov_sample", &markov_sample, "sequential vanilla-Markov draft sampling over a block -> (tokens, probs)",
        py::arg("base_logits"), py::arg("anchors"), py::arg("w1"), py::arg("w2t"), py::arg("temperature"),
        py::arg("uniforms"), py::arg("vocab_ids"), py::arg("greedy_eps"));
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<std::vector<std::vector<at::Tensor>>, int64_t, int64_t, int64_t, double>())
      .def("forward", &DecoderStack::forward, "all decoder layers of a short-query step -> [h, *captured]");
}
