"""Write a draft module back in DeepSpec's checkpoint format (the engine's loader reads it like any DeepSpec draft):
unfused k/v and gate/up projections, bf16, no copies of the target's embedding or LM head."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.drafts.dspark import DSparkDraft
from engine.drafts.loader import FUSED


def deepspec_state(draft: DSparkDraft, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in draft.state_dict().items():
        tensor = tensor.detach().to("cpu", dtype)  # safetensors writes host memory (a GPU leg trains on cuda)
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            state[name] = tensor.contiguous()
            continue
        for part, piece in zip(FUSED[fused], tensor.chunk(2, dim=0)):
            state[name.replace(fused, part)] = piece.contiguous()
    return state


def save_draft(draft: DSparkDraft, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
               extra_config: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(draft.config.hf, dtype=str(dtype).removeprefix("torch.")) | (extra_config or {})
    tmp = out / "model.safetensors.part"
    save_file(deepspec_state(draft, dtype), str(tmp))
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
