import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors); it must be chosen before they are
# defined, i.e. before any kernels.triton_* module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from tiny_models import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session", params=["llama", "qwen3", "qwen2"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where Triton kernel tests put their inputs: the GPU when there is one, else CPU (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gpu_memory(monkeypatch):
    """torch.cuda's memory readings, faked (no GPU in CI): 3 GiB resident, the warm-up peaking 1 GiB above it."""
    GIB = 2**30
    reading = {"free": 10 * GIB, "calls": []}
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda dev: reading["calls"].append("reset"))
    monkeypatch.setattr(cuda, "memory_allocated", lambda dev: 3 * GIB)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda dev: 4 * GIB)
    monkeypatch.setattr(cuda, "mem_get_info", lambda dev: (reading["free"], 80 * GIB))
    return reading
