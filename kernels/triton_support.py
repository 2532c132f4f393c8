"""Whether the engine calls the Triton kernels or their torch twins. The engine picks once (EngineConfig.kernels):
Triton on CUDA, the twins on CPU; tests run the Triton path on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1)."""
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_use_triton = False


def select(backend: str):
    global _use_triton
    _use_triton = backend == "triton"


def enabled() -> bool:
    return _use_triton


def require_triton_device(*tensors: torch.Tensor):
    """A kernel launched on CPU tensors outside the interpreter would crash deep inside Triton; say why instead."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed (pip install '.[gpu]')")
    for t in tensors:
        if not t.is_cuda and not INTERPRETING:
            raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
