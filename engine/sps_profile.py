"""Where the engine's SPS(B) curve comes from: a profile file, a cached quick profile keyed by what it measured, or
none (then the sps policies verify the full block)."""
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.config import REPO_ROOT
from engine.cost_model import measure_curve
from engine.model_runner import ModelRunner
from engine.sps import SpsCurve
from kernels import cpu_linear

CACHE_DIR = Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark")) / "sps"
QUICK_REPEATS = 5  # a median of 5 survives one stalled forward (of 2 it would not)
TIMED_CODE = ("engine/models/*.py", "engine/drafts/*.py", "engine/model_runner.py", "engine/attention_inputs.py",
              "engine/drafter.py", "engine/speculator.py", "engine/graphs.py", "engine/sampler.py", "engine/cpu.py",
              "engine/cost_model.py", "kernels/*.py", "kernels/csrc/*")


def code_version() -> str:
    """A hash of the code whose speed the profile measures: a faster kernel invalidates the cached profile."""
    files = sorted(f for pattern in TIMED_CODE for f in REPO_ROOT.glob(pattern) if f.is_file())
    return hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def profile_key(runner: ModelRunner) -> dict:
    """What a profile was measured for: a profile for anything else is not reused."""
    c = runner.config
    return {"model": str(Path(c.model).resolve()), "draft": str(Path(c.draft).resolve()) if c.draft else "",
            "spec_method": c.spec_method, "num_draft_tokens": c.num_draft_tokens, "dtype": c.dtype,
            "quantization": c.quantization,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu": platform.processor() or platform.node(), "device": device_name(c.device), "kernels": c.kernels,
            "attention": runner.attention, "graph_tiers": [] if runner.graphs is None else list(runner.graphs.tiers),
            "draft_vocab": runner.drafter.proposable_tokens if runner.drafter else 0, "code": code_version(),
            "native_bf16": c.device == "cpu" and cpu_linear.native_bf16_available(),  # no CPU kernel build on GPU
            "huge_pages": c.device == "cpu" and c.huge_pages}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def load_sps_curve(runner: ModelRunner, blocks: BlockManager, setting: str) -> SpsCurve | None:
    """setting: a profile file, "" for the cached quick profile (measured now if missing), or "none"."""
    if setting == "none":
        return None
    if setting:
        return SpsCurve.load(setting)
    key = profile_key(runner)
    path = CACHE_DIR / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        return SpsCurve.load(path)
    before, start = cpu_snapshot(), time.monotonic()
    curve = measure_curve(runner, blocks, repeats=QUICK_REPEATS)
    if measured_beside_other_work(before, cpu_snapshot(), time.monotonic() - start):
        warnings.warn("the quick SPS(B) profile was measured on a busy machine (other processes used the CPU while "
                      "it ran); it is used for this run only and not cached", stacklevel=2)
        return curve
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "quick": True, **curve.to_json()}, indent=2))
    return curve


def cpu_snapshot() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, hypervisor steal included; CPU seconds this process has used),
    or None where /proc/stat is missing."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def measured_beside_other_work(before, after, wall_s: float, max_cores: float = 0.5) -> bool:
    """Whether other processes used more than max_cores of CPU on average between two cpu_snapshot()s: step times
    measured then say more about them than about the engine, and a cached profile from such a moment would mislead
    every later run (a curve flattened by contention makes verifying many tokens look free). Without /proc/stat, a
    1-minute load average above the CPU count stands in (it lags: a machine busy a minute ago counts as busy)."""
    if before is None or after is None:
        try:
            return os.getloadavg()[0] > (os.cpu_count() or 1)
        except OSError:
            return False
    others = (after[0] - before[0]) - (after[1] - before[1])
    return others > max_cores * max(wall_s, 1e-3)
