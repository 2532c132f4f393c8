"""Every Triton kernel compiles for a Hopper GPU (sm_90), ahead of time, on a machine without one.

The interpreter runs a kernel's Python semantics; it never lowers it, so a construct the GPU compiler rejects (a
type mismatch, an unsupported op, a loop-carried variable that changes type, which the interpreter runs happily) would
first show on a lent GPU. Here each kernel's public
wrapper runs on small CPU inputs under the interpreter while its launches are recorded (argument types and
constexpr values), and a child process without the interpreter compiles each recorded launch through Triton's own
pipeline down to a cubin with the ptxas that ships in the triton wheel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from kernels import (
    stored_moe,
    triton_attention,
    triton_budget,
    triton_kv,
    triton_markov,
    triton_rejection,
    triton_sinkhorn,
    triton_stored_moe,
    triton_v4_attention,
    triton_v4_indexer,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="with a GPU the kernel tests compile and run the kernels themselves")
REPO = Path(__file__).resolve().parents[1]
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.uint8: "*u8"}
COMPILE = r"""
import json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
for launch in json.load(sys.stdin):
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    values, signature, constexprs = launch["args"], {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = tl.core.dtype(value["dtype"]) if isinstance(value, dict) else value
        elif isinstance(value, dict):
            signature[param.name] = value["pointer"]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    if "DOT_TYPE" in constexprs:  # the interpreter's fp32 stand-in; on the GPU the dot runs in its operands' dtype
        operand = next(name for name in ("k_cache_ptr", "window_ptr", "x_ptr") if name in signature)
        constexprs["DOT_TYPE"] = tl.core.dtype(signature[operand][1:])
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=launch["options"])
    # a kernel needing more shared memory than an H100 block may have compiles but never launches
    assert compiled.metadata.shared <= 227 * 1024, (launch["kernel"], compiled.metadata.shared)
    print(launch["kernel"], len(compiled.asm["cubin"]), "bytes of sm_90 code", flush=True)
"""


def describe(value):
    """A launch argument as the child needs it: a tensor's pointer type, a triton dtype, or the Python value."""
    if isinstance(value, torch.Tensor):
        return {"pointer": POINTER_TYPES[value.dtype]}
    if isinstance(value, triton.language.dtype):
        return {"dtype": value.name}
    return value


@pytest.fixture
def recorded(monkeypatch):
    """Launches made while the fixture is active: (module, kernel name, {argument: description})."""
    launches, run = [], InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        values = dict(zip(names, args)) | kwargs
        launches.append({"module": self.fn.__module__, "kernel": self.fn.__name__,
                         "args": {name: describe(values[name]) for name in names if name in values},
                         "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return launches


def run_every_kernel():
    """Each wrapper once, on the dtypes the GPU path uses (bf16 caches and activations, fp32 probabilities)."""
    g = torch.Generator().manual_seed(0)
    T, Hkv, H, D, slots = 5, 2, 8, 128, 64
    k, v = torch.randn(T, Hkv, D, generator=g).bfloat16(), torch.randn(T, Hkv, D, generator=g).bfloat16()
    k_cache, v_cache = (torch.zeros(Hkv, slots, D, dtype=torch.bfloat16) for _ in range(2))
    triton_kv.store_kvcache(k, v, k_cache, v_cache, torch.tensor([3, -1, 7, 8, 9]))
    q = torch.randn(T, H, D, generator=g).bfloat16()
    cu = torch.tensor([0, 1, 5], dtype=torch.int32)
    kv_slots = torch.arange(2 * 12).view(2, 12)
    kv_lens = torch.tensor([6, 12], dtype=torch.int32)
    triton_attention.varlen_paged_attention(q, k_cache, v_cache, cu, kv_slots, kv_lens, None, 0.1)
    block_q = torch.randn(2, 3, H, D, generator=g).bfloat16()
    block_kv = torch.randn(2, 3, Hkv, D, generator=g).bfloat16()
    triton_attention.block_attention(block_q, block_kv, block_kv, k_cache, v_cache, kv_slots,
                                     torch.tensor([4, 0], dtype=torch.int32), 0.1)
    V = 100
    target, draft = torch.rand(5, V, generator=g).softmax(-1), torch.rand(3, V, generator=g).softmax(-1)
    triton_rejection.rejection_sample(target, draft, torch.tensor([1, 2, 3]), torch.tensor([3, 0]),
                                      torch.rand(3, generator=g), torch.rand(2, generator=g))
    rank = 16
    w1, w2 = torch.randn(V, rank, generator=g).bfloat16(), torch.randn(60, rank, generator=g).bfloat16()
    args = (torch.randn(2, 3, 60, generator=g), torch.tensor([1, 2]), w1, w2, torch.tensor([0.0, 0.7]),
            torch.rand(2, 3, generator=g))
    triton_markov.markov_sample(*args, torch.arange(60))
    triton_markov.markov_sample(args[0], args[1], w1[:60], *args[3:])
    triton_budget.allocate_budget(torch.rand(3, 7, generator=g), torch.tensor([7, 3, 0]), 5)
    for head_dim in (512, 128):  # DeepSeek-V4's head size (its big-head tiles), and the small-head tiles
        v4_q = torch.randn(3, 5, head_dim, generator=g).bfloat16()
        v4_kv = torch.randn(6, head_dim, generator=g).bfloat16()
        triton_v4_attention.v4_attention(v4_q, v4_kv, 4, v4_kv, torch.tensor([[0, -1], [2, 1], [-1, -1]]),
                                         torch.zeros(5), 0.1)
        triton_v4_attention.v4_rows_attention(v4_q, v4_kv, torch.tensor([[0, 1], [3, -1], [-1, 5]]), v4_kv,
                                              torch.tensor([[0, -1], [2, 1], [-1, -1]]), torch.zeros(5), 0.1)
    triton_sinkhorn.sinkhorn(torch.rand(3, 4, 4, generator=g) + 0.1, 20, 1e-6)  # DeepSeek-V4's hc_mult, iterations
    index = torch.tensor([[3, -1, 0], [5, 5, 1]], dtype=torch.int32)  # V4's 64 index heads of 128
    triton_v4_indexer.indexer_scores(torch.randn(2, 64, 128, generator=g).bfloat16(), torch.randn(2, 64, generator=g),
                                     torch.randn(6, 128, generator=g).bfloat16(), index, 128 ** -0.5)
    experts = torch.tensor([0, 2, 3, 1, 2, 2])  # 3: held elsewhere
    routing = stored_moe.route(experts, 3)
    x = torch.randn(3, 256, generator=g).bfloat16()
    fp4 = (torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8),
           torch.full((3, 96, 8), 127, dtype=torch.uint8))
    fp8 = torch.randn(3, 96, 256, generator=g).to(torch.float8_e4m3fn), torch.rand(3, 1, 2, generator=g)
    triton_stored_moe.stored_moe_gemm(x, *fp4, True, routing, 2)  # V4-Flash's MXFP4 experts
    triton_stored_moe.stored_moe_gemm(x, *fp8, False, routing, 2)  # Flash-Base's FP8 ones
    rows = torch.randn(40, 256, generator=g).bfloat16()  # a linear over a stored FP8 weight: one 64-row block
    triton_stored_moe.stored_moe_gemm(rows, fp8[0][:1], fp8[1][:1], False, stored_moe.route(torch.zeros(40), 1, 64), 1)


def test_every_kernel_compiles_for_sm90(recorded):
    run_every_kernel()
    kernels = {(launch["module"], launch["kernel"]) for launch in recorded}
    assert {k for _, k in kernels} == {"_store_kv_kernel", "_varlen_attention_kernel", "_rejection_kernel",
                                       "_logits_kernel", "_pick_kernel", "_normalize_kernel",
                                       "_allocate_budget_kernel", "_v4_attention_kernel", "_v4_rows_kernel",
                                       "_sinkhorn_kernel", "_stored_moe_kernel",
                                       "_indexer_kernel"}
    unique = list({json.dumps(launch, sort_keys=True): launch for launch in recorded}.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(unique), capture_output=True, text=True,
                          cwd=REPO, env=env | {"PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bytes of sm_90 code") == len(unique), proc.stdout
