"""Llama / Qwen2 / Qwen3 from a GGUF file (llama.cpp's format), read with the pinned `gguf` library: the config from
the file's metadata, each weight kept in its own block type (engine/models/quant.py) or dequantized to a dense dtype.
Tensor names and the Q/K un-permutation invert llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute: llama only;
Qwen2/Qwen3 are stored unpermuted)."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import distributed
from engine.models.decoder import DecoderModel
from engine.models.quant import QuantConcat, QuantEmbedding, QuantLinear
from kernels import quant_linear

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
DENSE_TYPES = (0, 1, 30)  # F32, F16, BF16: read as dense tensors
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class Blocks:
    """A weight kept as its GGUF bytes: uint8 [rows, row bytes] of GGML type qtype."""
    data: torch.Tensor
    qtype: int
    name: str  # the GGUF tensor's, for errors


def field(reader, key: str, default=None):
    return reader.fields[key].contents() if key in reader.fields else default


def read_config(reader) -> dict:
    """An HF-style config.json dict from the file's metadata."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    get = lambda key, default=None: field(reader, f"{arch}.{key}", default)
    if get("rope.scaling.type", "none") not in ("none", "") or "rope_freqs.weight" in tensor_names(reader):
        raise ValueError("GGUF rope scaling (rope.scaling.* or a rope_freqs tensor) is not supported yet")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    theta = float(get("rope.freq_base", 10000.0))
    return dict(
        architectures=[ARCHITECTURES[arch]], model_type=arch, num_hidden_layers=get("block_count"),
        hidden_size=hidden, intermediate_size=get("feed_forward_length"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        vocab_size=get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        max_position_embeddings=get("context_length"), rope_theta=theta,
        rms_norm_eps=float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),  # 1e-05, not 9.99999974e-06
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
        rope_parameters={"rope_type": "default", "rope_theta": theta}, hidden_act="silu",
        attention_bias=arch == "qwen2", mlp_bias=False, attention_dropout=0.0,
        tie_word_embeddings="output.weight" not in tensor_names(reader), use_cache=True,
        torch_dtype="float32", dtype="float32",
    )


def tensor_names(reader) -> set[str]:
    return {t.name for t in reader.tensors}


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in GLOBAL_NAMES and len(parts) == 2:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute(weight, n_head: int):
    """Inverse of llama.cpp convert_hf_to_gguf's permute(): interleaved rotary pairs -> HF halves per head. Moves
    whole rows, so it applies to a block-quantized weight's rows of bytes as well."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def read_weight(tensor, keep_blocks: bool) -> torch.Tensor | Blocks:
    """One GGUF tensor: its blocks (a quantized type, when keep_blocks), else dense fp32 in torch's dim order."""
    qtype, shape = int(tensor.tensor_type), tuple(int(n) for n in reversed(tensor.shape))
    if keep_blocks and qtype not in DENSE_TYPES:
        if qtype not in quant_linear.BLOCK_SHAPES:
            raise ValueError(f"{tensor.name}: GGML type {tensor.tensor_type.name} has no CPU kernel (kept types: "
                             f"{', '.join(quant_name(t) for t in quant_linear.BLOCK_SHAPES)}); quantization='none' "
                             "dequantizes it at load")
        return Blocks(torch.from_numpy(np.array(tensor.data)).view(shape[0], -1), qtype, tensor.name)
    from gguf.quants import dequantize
    try:
        dense = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"{tensor.name}: GGML type {tensor.tensor_type.name} cannot be read: {e}") from None
    return torch.from_numpy(np.array(dense, dtype=np.float32)).view(shape)


def quant_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType(qtype).name


def read_weights(reader, config: dict, keep_blocks: bool) -> dict:
    """Our parameter names (model.* stripped) -> dense tensor or Blocks; llama's Q/K rows un-permuted."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name).removeprefix("model.")
        value = read_weight(tensor, keep_blocks)
        if config["model_type"] == "llama" and (proj := name.split(".")[-2]) in heads:
            value = unpermute_value(value, heads[proj])
        weights[name] = value
    return weights


def unpermute_value(value: torch.Tensor | Blocks, n_head: int):
    if isinstance(value, Blocks):
        return Blocks(unpermute(value.data, n_head).contiguous(), value.qtype, value.name)
    return unpermute(value, n_head).contiguous()


def fuse(weights: dict) -> dict:
    """q|k|v and gate|up side by side, as our decoder holds them: dense tensors or same-type blocks concatenated,
    blocks of different types kept as a list (a QuantConcat); dense and blocks mixed are all made dense."""
    for name in [n for n in weights if ".q_proj." in n or ".gate_proj." in n]:
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in name:
                values = [weights.pop(name.replace(parts[0], p)) for p in parts]
                weights[name.replace(parts[0], fused)] = fuse_values(values)
    return weights


def fuse_values(values: list):
    blocks = [v for v in values if isinstance(v, Blocks)]
    if not blocks:
        return torch.cat(values)
    if len(blocks) < len(values):
        return torch.cat([dense_of(v) for v in values])
    if len({b.qtype for b in blocks}) == 1:
        return Blocks(torch.cat([b.data for b in blocks]), blocks[0].qtype, blocks[0].name)
    return blocks


def dense_of(value: torch.Tensor | Blocks) -> torch.Tensor:
    if isinstance(value, Blocks):
        return quant_linear.dequantize(value.data, value.qtype, in_features(value))
    return value


def in_features(value: Blocks) -> int:
    elements, nbytes = quant_linear.BLOCK_SHAPES[value.qtype]
    return value.data.shape[1] // nbytes * elements


def quant_module(value: Blocks | list[Blocks], bias: torch.Tensor | None, dtype: torch.dtype):
    if isinstance(value, list):
        return QuantConcat([QuantLinear(b.data, b.qtype, in_features(b), None, dtype) for b in value], bias)
    return QuantLinear(value.data, value.qtype, in_features(value), bias, dtype)


def install(model: DecoderModel, path: str, module: torch.nn.Module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_gguf(path: Path, config: dict, dtype: torch.dtype, keep_blocks: bool) -> DecoderModel:
    """The decoder over the file's weights: quantized ones in their blocks when keep_blocks (CPU), else dense."""
    from gguf import GGUFReader
    if distributed.is_parallel():
        raise ValueError("tensor parallelism does not cover GGUF models yet (use tensor_parallel_size=1)")
    weights = fuse(read_weights(GGUFReader(path), config, keep_blocks))
    with torch.device("meta"):
        model = DecoderModel(config)
    installed = install_quantized(model, weights, dtype)
    dense = {name: value.to(dtype) for name, value in weights.items()}
    if model.tie_word_embeddings and "embed_tokens" not in installed:
        dense["lm_head.weight"] = dense["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    missing = [m for m in missing if not any(m.startswith(f"{module}.") for module in installed)]
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not match the {config['architectures'][0]} config: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if model.tie_word_embeddings and "embed_tokens" not in installed:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = model.make_rotary()
    return model.eval().requires_grad_(False)


def install_quantized(model: DecoderModel, weights: dict, dtype: torch.dtype) -> set[str]:
    """Replace the linears (and embedding / LM head) whose weights are blocks; their names are popped from weights.
    Returns the module paths replaced."""
    installed = set()
    for name in [n for n, v in weights.items() if isinstance(v, (Blocks, list))]:
        path, value = name.removesuffix(".weight"), weights.pop(name)
        if path == "embed_tokens":
            head = None
            if model.tie_word_embeddings:  # the LM head reads the same blocks (packed for it where they are)
                head = QuantLinear(value.data, value.qtype, in_features(value), None, dtype)
                install(model, "lm_head", head)
                installed.add("lm_head")
            install(model, path, QuantEmbedding(value.data, value.qtype, in_features(value), dtype, head))
        else:
            install(model, path, quant_module(value, weights.pop(f"{path}.bias", None), dtype))
        installed.add(path)
    return installed
