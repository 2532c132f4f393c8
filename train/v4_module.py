"""Training DeepSeek-V4's in-checkpoint DSpark module with the trainer of DeepSpec drafts (train/trainer.py): the
module starts from the checkpoint's own `mtp.*` tensors, its target features are the V4 target layers' outputs
(hc-averaged, as the engine captures them), its block forward is the one the engine serves with (each anchored block
over the stage's K=V of the `sliding_window` positions before its anchor, made from the features), and the trained
module is written back into a copy of the checkpoint in the released layout: the shards that hold `mtp.*` tensors
rewritten with them in their stored dtypes, every other file linked or copied as it was."""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.drafts.v4_dspark import V4DSparkDraft
from engine.models.deepseek_v4.checkpoint import STAGE_PREFIX, weight_map
from engine.models.deepseek_v4.model import V4Model
from train.blocks import Blocks


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
    spans = [(max(0, a - draft.window), a) for a in blocks.anchors.tolist()]

    def windows_of(stage: int) -> list[torch.Tensor]:
        kv = draft.mtp[stage].attn.context_kv(main_x, cos, sin)
        return [kv[lo:hi] for lo, hi in spans]
    return draft.run_blocks(blocks.input_ids[:, 0], blocks.anchors, windows_of)


def write_back(draft: V4DSparkDraft, source_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of the checkpoint at out_dir whose `mtp.*` tensors are the draft's, in the dtypes they were stored in
    (FP8 / MXFP4 stage weights cannot be written back yet: a ValueError names the first)."""
    source, out = Path(source_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = {n: t.detach() for n, t in draft.state_dict().items()}
    shards = sorted(set(weight_map(source).values()))
    for path in sorted(source.iterdir()):
        if path.is_file() and path not in shards:
            shutil.copyfile(path, out / path.name)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())
            if not any(n.startswith(STAGE_PREFIX) for n in names):
                link_or_copy(shard, out / shard.name)
                continue
            tensors = {n: stored(n, f.get_tensor(n), trained) for n in names}
        save_file(tensors, str(out / (shard.name + ".part")), metadata={"format": "pt"})
        (out / (shard.name + ".part")).replace(out / shard.name)
    return out


def stored(name: str, tensor: torch.Tensor, trained: dict[str, torch.Tensor]) -> torch.Tensor:
    if not name.startswith(STAGE_PREFIX):
        return tensor
    if name not in trained:
        raise ValueError(f"{name}: stored beside the DSpark module's tensors but not one of them (a scale of a "
                         "quantized stage weight?): writing quantized stage weights back is not supported yet")
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} is stored as {tensor.dtype}: writing quantized stage weights back is not "
                         "supported yet")
    return trained[name].to(tensor.dtype).contiguous()


def link_or_copy(source: Path, target: Path):
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
