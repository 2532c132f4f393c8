"""Read an HF-style model directory (config.json + safetensors, single file or sharded) into our model."""
import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine import distributed
from engine.models.decoder import ARCHITECTURES, DecoderModel
from engine.models.deepseek_v4.checkpoint import load_v4_state
from engine.models.deepseek_v4.model import V4Model
from engine.models.deepseek_v4.stored import assign_state
from engine.models.gguf import load_gguf
from engine.parallel import shard_state, whole_shapes

V4_ARCHITECTURE = "DeepseekV4ForCausalLM"

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist "
                                "(for the default model run `python -m engine.default_model`)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a model directory needs config.json and safetensors weights")
    config = json.loads(path.read_text())
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in ARCHITECTURES and arch != V4_ARCHITECTURE:
        raise ValueError(f"unknown architecture {arch!r} in {path}; supported: "
                         f"{', '.join([*ARCHITECTURES, V4_ARCHITECTURE])}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r} in {path} (only silu)")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(model_dir):
        if not file.is_file():
            raise FileNotFoundError(f"weight shard {file} listed in the index is missing")
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name.removeprefix("model.")] = f.get_tensor(name)
    return tensors


def fuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name in [n for n in tensors if ".q_proj." in n or ".gate_proj." in n]:
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in name:
                names = [name.replace(parts[0], p) for p in parts]
                tensors[name.replace(parts[0], fused)] = torch.cat([tensors.pop(n) for n in names])
    return tensors


def gguf_weights(model_dir: Path) -> Path | None:
    """The one GGUF file a model directory holds (python -m engine.default_model, or --model FILE.gguf), if any."""
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{model_dir} holds several GGUF files ({', '.join(f.name for f in files)}); keep one")
    return files[0] if files else None


def load_model(model_dir: str | Path, dtype: torch.dtype, quantization: str = "none") -> DecoderModel | V4Model:
    """quantization 'gguf': the directory's GGUF weights kept in their own block types (CPU); 'fp8': DeepSeek-V4's
    FP8 / MXFP4 weights kept as stored, dequantized per call; 'none': dense dtype weights (its safetensors, else its
    GGUF dequantized)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    gguf = gguf_weights(model_dir)
    if gguf and (quantization == "gguf" or not list(model_dir.glob("*.safetensors"))):
        return load_gguf(gguf, config, dtype, keep_blocks=quantization == "gguf")
    if config["architectures"][0] == V4_ARCHITECTURE:
        return load_v4(model_dir, config, dtype, keep_quantized=quantization == "fp8")
    if distributed.expert_parallel():
        raise ValueError(f"expert_parallel shards DeepSeek-V4's routed experts; {config['architectures'][0]} has "
                         "none (leave it off)")
    with torch.device("meta"):
        model = DecoderModel(config)
    state = fuse(read_tensors(model_dir))
    state = {n: t.to(dtype) for n, t in state.items()}
    if model.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state = shard_state(state, model)  # this rank's slices (all of every tensor in one process)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"weights in {model_dir} do not match the {config['architectures'][0]} config: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, assign=True)
    if model.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = model.make_rotary()
    return model.eval().requires_grad_(False)


def load_v4(model_dir: Path, config: dict, dtype: torch.dtype, keep_quantized: bool = False) -> V4Model:
    """A released DeepSeek-V4 checkpoint (FP8 / FP4 dequantized to dtype, or kept as stored); what the release keeps
    in fp32 stays fp32. Its DSpark stages (mtp.*) are read by the DSpark module, not here."""
    with torch.device("meta"):
        model = V4Model(config)
    state, _ = load_v4_state(model_dir, dtype, whole_shapes(lambda: V4Model(config)), parts=("target",),
                             keep_quantized=keep_quantized)
    assign_state(model, shard_state(state, model), str(model_dir))  # tensor parallel: this rank's slices
    for layer in model.layers:
        layer.attn.make_rope(model.v4)
    return model.eval().requires_grad_(False)
