"""The start-up check of a DeepSeek-V4 checkpoint (the Docker recipe runs it before loading anything): config.json,
the index and every safetensors header it names, checked against what the engine builds from that config (the target
and, where the config declares one, its DSpark module) without reading a byte of weights; then the deployment plan
(engine/models/deepseek_v4/plan.py) for the parallelism asked for."""
from pathlib import Path

import torch

from engine.drafts.v4_dspark import build_draft, declares_dspark, expected_shapes
from engine.loader import V4_ARCHITECTURE, read_config
from engine.models.deepseek_v4.checkpoint import load_v4_state, weight_map
from engine.models.deepseek_v4.model import V4Model
from engine.models.deepseek_v4.plan import plan_model


def is_v4(model_dir: str | Path) -> bool:
    path = Path(model_dir) / "config.json"
    return path.is_file() and V4_ARCHITECTURE in (read_config(model_dir).get("architectures") or [])


def check_v4_checkpoint(model_dir: str | Path, tensor_parallel_size: int = 1, expert_parallel: bool = False,
                        memory_gb: float = 0.0) -> str:
    """The plan of a V4 checkpoint whose config, index and tensor headers agree with the model the engine builds;
    ValueError / FileNotFoundError naming the first problem (a missing shard, a missing, unexpected or mis-shaped
    tensor, a config that declares DSpark without its keys)."""
    config = read_config(model_dir)
    with torch.device("meta"):
        target = V4Model(config)
    expected = {name: tuple(t.shape) for name, t in target.state_dict().items()}
    stages = None
    if declares_dspark(config):
        stages = expected_shapes(build_draft(target.v4, config, weight_map(model_dir), str(model_dir)))
    load_v4_state(model_dir, torch.bfloat16, expected, stages, parts=())
    module = f"its DSpark module ({len({n.split('.')[1] for n in stages})} stages)" if stages else "no DSpark module"
    plan = plan_model(model_dir, tensor_parallel_size, expert_parallel, memory_gb)
    return f"checked {model_dir}: config, index and {len(expected) + len(stages or ())} tensors of the target and " \
           f"{module}\n{plan.render()}"
