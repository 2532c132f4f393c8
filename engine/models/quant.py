"""Layers over GGUF weight blocks kept in the file's own types (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K; CPU only).

Short inputs (decode, verify, draft steps) go through kernels/quant_linear, which streams the blocks (Q4_1: ~3x fewer
bytes than bf16) and unpacks each row once per call; long prefills dequantize the weight and take one fp32 GEMM,
which beats many passes over the blocks there. As vLLM's GGUF linear method does (vllm/model_executor/layers/
quantization/gguf.py: dequantize + matmul past a row count, its own kernel below), only the crossover differs.
"""
import torch
import torch.nn.functional as F
from torch import nn

from kernels import quant_linear

KERNEL_MAX_ROWS = 64  # above this, dequantize + GEMM (the crossover measured on SmolLM2's shapes, 2 threads)


class QuantLinear(nn.Module):
    """y = x @ dequant(blocks).T (+ bias): blocks uint8 [out_features, row bytes] of GGML type qtype."""
    use_kernel = False  # not a bf16 weight: the fused bf16 decoder stack passes over layers holding these
    cpu_ready = True

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        if blocks.shape[-1] != quant_linear.row_bytes(qtype, in_features):
            raise ValueError(f"blocks of {blocks.shape[-1]} bytes a row do not hold {in_features} elements of GGML "
                             f"type {qtype}")
        self.register_buffer("blocks", blocks.contiguous())
        self.qtype, self.in_features, self.out_features, self.dtype = qtype, in_features, blocks.shape[0], dtype
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= KERNEL_MAX_ROWS * self.in_features:
            return quant_linear.linear(x, self.blocks, self.qtype, self.in_features, self.bias)
        dense = quant_linear.dequantize(self.blocks, self.qtype, self.in_features)
        return F.linear(x.float(), dense, self.bias).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight in the model's dtype, dequantized on each access (start-up use: a draft's vocabulary
        head takes rows of it)."""
        return quant_linear.dequantize(self.blocks, self.qtype, self.in_features).to(self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={self.qtype}"


class QuantConcat(nn.Module):
    """A fused projection (q|k|v, gate|up) whose parts have different block types: their outputs side by side."""
    use_kernel = False
    cpu_ready = True

    def __init__(self, parts: list[QuantLinear], bias: torch.Tensor | None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([part(x) for part in self.parts], dim=-1)
        return out if self.bias is None else (out + self.bias).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([part.weight for part in self.parts])


class QuantEmbedding(nn.Module):
    """Token embeddings as rows dequantized on lookup."""

    def __init__(self, blocks: torch.Tensor, qtype: int, dim: int, dtype: torch.dtype):
        super().__init__()
        quant_linear.row_bytes(qtype, dim)
        self.register_buffer("blocks", blocks.contiguous())
        self.qtype, self.embedding_dim, self.dtype = qtype, dim, dtype
        self.num_embeddings = blocks.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = quant_linear.dequantize(self.blocks, self.qtype, self.embedding_dim, ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return quant_linear.dequantize(self.blocks, self.qtype, self.embedding_dim).to(self.dtype)
