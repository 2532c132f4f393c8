"""DeepSeek-V4's FP8 and MXFP4 weights kept on the device as the checkpoint stores them (`quantization='fp8'`), and
used as they are: weight-only quantization, so that the released 167 GB of V4-Flash-DSpark take 167 GB of device
memory, not the 3.6x that bf16 weights take. On the Triton path a call of up to DENSE_ROWS rows (decode and verify
steps) runs kernels/triton_stored_moe.py's GEMM over the stored bytes as one expert, decoding them inside the kernel;
other calls (prefill, the CPU) dequantize to a transient dense weight in the activations' dtype, one pass over the
stored bytes, and run a dense GEMM.

The formats are the loader's (checkpoint.py): FP8 e4m3 with one scale per 128x128 block, MXFP4 e2m1 pairs (the low
nibble the even element) with one e8m0 scale per 32 inputs. Tensor parallelism cuts a stored weight along whole blocks
(Shard.take calls take_shard): a cut inside a block is an error naming the weight. vLLM keeps V4's FP8 block weights
and MXFP4 experts on the GPU alike (its Fp8LinearMethod with block scales, its MXFP4 MoE), with fused kernels; learned
from, not copied."""
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.deepseek_v4.checkpoint import (
    E2M1_VALUES,
    FP8_BLOCK,
    MX_GROUP,
    StoredTensor,
    dequant_fp8_block,
    e8m0_to_float,
    scale_to_float,
)
from kernels import dispatch, stored_moe, triton_support


class StoredWeight(nn.Module):
    """forward(dtype) -> the dense weight, from the stored bytes and scales (buffers: they move with the model)."""

    def __init__(self, stored: StoredTensor):
        super().__init__()
        self.kind, self.shape = stored.kind, stored.shape
        self.register_buffer("data", stored.data)
        # FP8's block scales as float32 (few); MXFP4's e8m0 bytes as stored (one per 32 values), decoded per call
        self.register_buffer("scale", scale_to_float(stored.scale) if stored.kind == "fp8" else
                             stored.scale.view(torch.uint8))
        if stored.kind == "fp4":
            self.register_buffer("values", E2M1_VALUES.clone(), persistent=False)  # e2m1 code -> value
        self.exact_in_bf16 = stored.kind == "fp4" or bool(torch.all(torch.frexp(self.scale)[0].abs() == 0.5))

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        return self.fp4(dtype) if self.kind == "fp4" else self.fp8(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] @ the weight.T (+ bias): over the stored bytes where the Triton path has few rows (one group),
        else over the dense weight."""
        out = self.grouped_linear(x.reshape(-1, 1, x.shape[-1]), 1)
        if out is None:
            return F.linear(x, self(x.dtype), bias)
        out = out.view(*x.shape[:-1], -1)
        return out if bias is None else out + bias

    def grouped_linear(self, x: torch.Tensor, groups: int) -> torch.Tensor | None:
        """x [S, groups, in] -> [S, groups, out / groups], group g through the weight's g-th block of rows (V4's
        grouped output projection wo_a; one group: a linear), over the stored bytes as `groups` experts, each group's
        rows in one block, where the Triton path has few rows and the groups split the scale blocks; else None (the
        caller uses the dense weight)."""
        rows, width = x.shape[0], self.shape[0] // groups
        if (not triton_support.enabled() or not 0 < rows <= stored_moe.DENSE_ROWS
                or (groups > 1 and self.kind == "fp8" and width % FP8_BLOCK)):
            return None
        data = self.data.view(groups, width, -1)
        scale = self.scale.view(groups, -1, self.scale.shape[-1])
        routing = stored_moe.route(torch.arange(groups, device=x.device).repeat(rows), groups,
                                   stored_moe.block_for(rows))
        out = dispatch.stored_moe_gemm(x.reshape(rows * groups, -1).contiguous(), data, scale, self.kind == "fp4",
                                       routing, 1)
        return out.view(rows, groups, width)

    def fp8(self, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = self.shape
        if rows % FP8_BLOCK or cols % FP8_BLOCK:
            return dequant_fp8_block(self.data, self.scale, dtype)
        work = dtype if self.exact_in_bf16 else torch.float32  # e4m3 times a power of two is exact in bf16
        blocks = self.data.view(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK).to(work)
        return (blocks * self.scale.to(work)[:, None, :, None]).view(rows, cols).to(dtype)

    def fp4(self, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = self.shape
        raw = self.data.view(torch.uint8)
        codes = torch.stack((raw & 0x0F, raw >> 4), dim=-1).view(rows, cols // MX_GROUP, MX_GROUP)
        values = self.values.to(dtype)[codes.long()]  # e2m1 times a power of two: exact in bf16
        return (values * e8m0_to_float(self.scale).to(dtype)[..., None]).view(rows, cols)


def assign_state(model: nn.Module, state: dict, what: str):
    """Load state (tensors and StoredTensors by module path) into model: a StoredTensor becomes its linear's kept
    weight; every other key as load_state_dict(assign=True) would, strictly."""
    kept = [name for name, value in state.items() if isinstance(value, StoredTensor)]
    for name in kept:
        model.get_submodule(name.removesuffix(".weight")).keep_stored(StoredWeight(state.pop(name)))
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    missing = [n for n in missing if ".stored." not in n]
    if missing or unexpected:
        raise ValueError(f"{what}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
