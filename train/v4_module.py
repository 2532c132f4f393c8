"""Training DeepSeek-V4's in-checkpoint DSpark module with the trainer of DeepSpec drafts (train/trainer.py): the
module starts from the checkpoint's own `mtp.*` tensors, its target features are the V4 target layers' outputs
(hc-averaged, as the engine captures them), its block forward is the one the engine serves with (each anchored block
over the stage's K=V of the `sliding_window` positions before its anchor, made from the features), and the trained
module is written back into a copy of the checkpoint in the released layout: the shards that hold `mtp.*` tensors
rewritten with them in their stored formats (FP8 and MXFP4 quantized again), every other file linked or copied as it
was."""
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.drafts.v4_dspark import V4DSparkDraft, window_positions
from engine.models.deepseek_v4.checkpoint import PACKED_FP4_DTYPES, STAGE_PREFIX, scale_name, weight_map
from engine.models.deepseek_v4.model import V4Model
from train.blocks import Blocks
from train.v4_quantize import quantize_fp8_block, quantize_mxfp4

# safetensors header dtypes -> torch's: what a stage tensor is stored as, read without loading it
HEADER_DTYPES = {"F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3": torch.float8_e4m3fn, "F4": torch.float4_e2m1fn_x2,
                 "U8": torch.uint8, "I8": torch.int8, "F32": torch.float32, "BF16": torch.bfloat16,
                 "F16": torch.float16}


def is_v4(target_dir: str | Path) -> bool:
    config = json.loads((Path(target_dir) / "config.json").read_text())
    return "DeepseekV4ForCausalLM" in (config.get("architectures") or [])


def v4_layer_ids(target_config: dict) -> list[int]:
    ids = target_config.get("dspark_target_layer_ids")
    if not ids:
        raise ValueError("a DeepSeek-V4 target trains the DSpark module its config declares (dspark_* keys); "
                         "this config declares none")
    return [int(i) for i in ids]


def v4_features(model: V4Model, sequences: list[list[int]], layer_ids: list[int]):
    """Per sequence (features [S, k * hidden]: layer_ids' outputs averaged over the hc streams, last_hidden [S, hidden]:
    the final-normed hidden state the LM head reads)."""
    out = []
    for tokens in sequences:
        captured = dict.fromkeys(layer_ids)
        last = model.sequence_hidden(torch.tensor(tokens), captured)
        out.append((torch.cat([captured[i] for i in layer_ids], -1).clone(), last.clone()))
    return out


def block_hidden(draft: V4DSparkDraft, features: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """The anchored blocks' pre-norm hidden states [A, G, hidden], with gradients: block a sits at positions
    anchors[a].. and each stage reads its K=V of positions anchors[a] - window .. anchors[a] - 1, as when serving
    after anchors[a] committed tokens."""
    main_x = draft.main_x(features)
    cos, sin = draft.rope(torch.arange(main_x.shape[0]))
    positions, present = window_positions(blocks.anchors, draft.window)

    def windows_of(stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        return draft.mtp[stage].attn.context_kv(main_x, cos, sin)[positions], present
    return draft.run_blocks(blocks.input_ids[:, 0], blocks.anchors, windows_of)


def write_back(draft: V4DSparkDraft, source_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of the checkpoint at out_dir whose `mtp.*` tensors are the draft's, stored as they were: floats in
    their dtype, FP8 / MXFP4 weights quantized again with new scales (train/v4_quantize.py), wherever the index puts
    a weight and its scale."""
    source, out = Path(source_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = weight_map(source)
    replacements = stored_stage_tensors({n: t.detach() for n, t in draft.state_dict().items()}, files)
    shards = sorted(set(files.values()))
    for path in sorted(source.iterdir()):
        if path.is_file() and path not in shards:
            shutil.copyfile(path, out / path.name)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())
            if not any(n.startswith(STAGE_PREFIX) for n in names):
                link_or_copy(shard, out / shard.name)
                continue
            tensors = {n: replacements.get(n, f.get_tensor(n)) for n in names}
        unknown = [n for n in names if n.startswith(STAGE_PREFIX) and n not in replacements]
        if unknown:
            raise ValueError(f"{unknown[0]}: stored among the DSpark module's tensors but not one of its weights or "
                             "their scales")
        save_file(tensors, str(out / (shard.name + ".part")), metadata={"format": "pt"})
        (out / (shard.name + ".part")).replace(out / shard.name)
    return out


def stored_stage_tensors(trained: dict[str, torch.Tensor], files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Released name -> the tensor to store for every trained stage weight (and the scale of a quantized one), in
    the layout the source stores it in."""
    out = {}
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in set(files.values())}
        for name, weight in trained.items():
            if name not in files:
                raise ValueError(f"{name}: a trained DSpark weight the checkpoint does not hold")
            stored = HEADER_DTYPES[handles[files[name]].get_slice(name).get_dtype()]
            scale = scale_name(name)
            if stored == torch.float8_e4m3fn or stored in PACKED_FP4_DTYPES:
                if scale not in files:
                    raise ValueError(f"{name} is stored as {stored} but the checkpoint has no {scale}")
                scale_dtype = HEADER_DTYPES[handles[files[scale]].get_slice(scale).get_dtype()]
                out[name], out[scale] = (quantize_fp8_block(weight, scale_dtype) if stored == torch.float8_e4m3fn
                                         else quantize_mxfp4(weight, stored))
            else:
                out[name] = weight.to(stored).contiguous()
    return out


def link_or_copy(source: Path, target: Path):
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
