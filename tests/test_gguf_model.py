"""Llama / Qwen2 / Qwen3 served from GGUF files with their weights in their own block types (engine/models/gguf.py).

Tiny models: a random transformers model is quantized by the `gguf` library (llama's Q/K permuted the way llama.cpp's
converter does) and written with gguf's GGUFWriter; the oracle is transformers' model over gguf's dequantization of
the same blocks (fp32), and ours must match its logits as closely as our dense fp32 path matches transformers.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.models.gguf import LAYER_NAMES, read_config
from engine.models.quant import KERNEL_MAX_ROWS, QuantConcat, QuantEmbedding, QuantLinear
from kernels import quant_linear
from tests.test_engine_parity import record_sampled_logits
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(not quant_linear.available(), reason="CPU kernels unavailable here")

ATOL = 2e-4  # as tests/test_engine_parity.py: fp32 against transformers
GGUF_NAMES = {v: k for k, v in LAYER_NAMES.items()} | {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                                                        "lm_head": "output"}
# a type per projection: q|k|v of three types (a QuantConcat), gate|up of one (one fused block tensor)
TYPES = {"q_proj": T.Q4_0, "k_proj": T.Q4_1, "v_proj": T.Q8_0, "o_proj": T.Q4_1, "gate_proj": T.Q4_0,
         "up_proj": T.Q4_0, "down_proj": T.Q8_0, "embed_tokens": T.Q8_0, "lm_head": T.Q4_1}


def gguf_name(hf: str) -> str:
    module, _, kind = hf.rpartition(".")
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}.{kind}"
    return f"{GGUF_NAMES[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf LlamaModel.permute, on whole rows (of values or of block bytes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, path, family: str, types: dict, permute: bool = True) -> AutoModelForCausalLM:
    """The HF model as a GGUF; returns the oracle: transformers over gguf's dequantization of the written blocks."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = GGUFWriter(str(path), family)
    for key, value in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads), ("vocab_size", c.vocab_size),
                       ("attention.key_length", head_dim)):
        w.add_uint32(f"{family}.{key}", value)
    w.add_float32(f"{family}.rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_float32(f"{family}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_uint32("tokenizer.ggml.eos_token_id", c.eos_token_id)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        value, kind = tensor.numpy(), name.split(".")[-2]
        qtype = types.get(kind, T.F32) if value.ndim == 2 else T.F32
        data = quantize(value, qtype)
        state[name] = torch.from_numpy(dequantize(data, qtype).astype(np.float32)).view(tensor.shape)
        if family == "llama" and kind in heads and permute:
            data = llama_cpp_permute(data, heads[kind])
        w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.load_state_dict(state, strict=False)
    return model


def gguf_model_dir(tmp_path, family: str, types: dict = TYPES, **kw):
    """A model directory holding a GGUF (config.json from it, the tiny tokenizer) and the oracle for it."""
    hf_dir = save_tiny_model(tmp_path / "hf", family)
    out = tmp_path / "gguf"
    out.mkdir()
    oracle = write_gguf(hf_dir, out / "model.gguf", family, types, **kw)
    (out / "config.json").write_text(json.dumps(read_config(GGUFReader(out / "model.gguf"))))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, out / name)
    return out, oracle


def oracle_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy_recording(llm: LLM, prompts: list[list[int]], max_tokens: int):
    """Greedy outputs, and the logits each step sampled from by (request, position)."""
    recorded = record_sampled_logits(llm)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return outs, recorded


def max_error(oracle, prompts, outs, recorded) -> float:
    """The largest logit difference from the oracle over every sampled position."""
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        ref = oracle_logits(oracle, prompt + out.token_ids)
        for pos in range(len(prompt) - 1, len(prompt) + len(out.token_ids) - 1):
            worst = max(worst, (recorded[(out.request_id, pos)] - ref[pos]).abs().max().item())
    return worst


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_matches_transformers_over_gguf_dequantization(tmp_path, family):
    model_dir, oracle = gguf_model_dir(tmp_path, family)
    llm = LLM(model=str(model_dir), dtype="float32", kv_cache_gb=0.01, spec_method="none")
    assert llm.config.quantization == "gguf"
    model = llm.model_runner.model
    assert isinstance(model.layers[0].self_attn.qkv_proj, QuantConcat)  # q, k, v of three types
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantLinear)  # gate and up of one type: one tensor
    assert isinstance(model.embed_tokens, QuantEmbedding)
    prompts = [[7, 8, 9, 10, 11], list(range(3, 3 + KERNEL_MAX_ROWS + 20))]  # kernel rows; dequantize + GEMM
    outs, recorded = greedy_recording(llm, prompts, 12)
    assert max_error(oracle, prompts, outs, recorded) <= ATOL
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == oracle_logits(oracle, prompt + out.token_ids)[len(prompt) - 1:-1].argmax(-1).tolist()


def test_negative_control_unpermuted_llama_fails(tmp_path):
    """The same llama written without llama.cpp's Q/K permutation: un-permuting it at load must break the match."""
    model_dir, oracle = gguf_model_dir(tmp_path, "llama", permute=False)
    llm = LLM(model=str(model_dir), dtype="float32", kv_cache_gb=0.01, spec_method="none")
    prompts = [list(range(3, 40))]
    outs, recorded = greedy_recording(llm, prompts, 4)
    assert max_error(oracle, prompts, outs, recorded) > 100 * ATOL


def test_dense_load_dequantizes_and_types_without_kernel_are_named(tmp_path):
    types = TYPES | {"o_proj": T.Q5_0}  # gguf quantizes Q5_0; we have no kernel for it
    model_dir, oracle = gguf_model_dir(tmp_path, "qwen3", types)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_output\.weight: GGML type Q5_0 has no CPU kernel"):
        LLM(model=str(model_dir), dtype="float32", kv_cache_gb=0.01, spec_method="none")
    llm = LLM(model=str(model_dir), dtype="float32", kv_cache_gb=0.01, spec_method="none", quantization="none")
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in llm.model_runner.model.modules())
    prompt = list(range(3, 30))
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out.token_ids == oracle_logits(oracle, prompt + out.token_ids)[len(prompt) - 1:-1].argmax(-1).tolist()


def test_quantization_errors_name_the_problem(tiny_model_dir):
    with pytest.raises(ValueError, match="needs GGUF weights"):
        LLM(model=str(tiny_model_dir), quantization="gguf")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(model=str(tiny_model_dir), quantization="int4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(model="/nonexistent/model.gguf")


# one packable type per fused linear (no QuantConcat), so every layer's linears are x16-packed in a bf16 model
PACKED_TYPES = {"q_proj": T.Q4_1, "k_proj": T.Q4_1, "v_proj": T.Q4_1, "o_proj": T.Q4_0, "gate_proj": T.Q8_0,
                "up_proj": T.Q8_0, "down_proj": T.Q4_1, "embed_tokens": T.Q8_0, "lm_head": T.Q4_0}


@pytest.mark.skipif(not quant_linear.packed_available(), reason="no AVX512-BF16 here")
def test_packed_weights_run_in_the_decoder_stack_bitwise_as_layer_by_layer(tmp_path, monkeypatch):
    """A bf16 model over x16-packed GGUF weights: a short-query step through the C++ decoder stack (really taken)
    equals the Python layers bitwise, logits and captured features."""
    from tests.test_cpu_ops import assert_stack_equals_layers, short_query_step
    model_dir, _ = gguf_model_dir(tmp_path, "qwen2", PACKED_TYPES)
    llm, seqs = short_query_step(model_dir)
    model = llm.model_runner.model
    assert llm.config.quantization == "gguf" and model.layers[0].mlp.gate_up_proj.packed
    assert len(model.layers[0].fused_weights()) == 16
    assert_stack_equals_layers(llm, seqs, monkeypatch, (-1, 0, 1))
