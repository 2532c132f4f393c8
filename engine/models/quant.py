"""Layers over GGUF weight blocks kept in the file's own types (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K; CPU only).

A bf16 model on a CPU with AVX512-BF16 repacks Q4_0 / Q4_1 / Q8_0 weights at load into tiles of 16 output rows
(kernels/quant_linear.pack, the same bytes rearranged) and runs every bf16 input through the x16 kernel, whatever its
row count: it streams ~3x fewer bytes than bf16 (Q4_1) and costs about what the bf16 kernel does from 8 rows up,
~3x less than dequantize + an fp32 GEMM even at 512 rows. Otherwise short inputs (decode, verify, draft steps) go
through the row-major block kernel, which unpacks each row once per call, and long prefills dequantize the weight and
take one fp32 GEMM, which beats many passes over the blocks there (as vLLM's GGUF linear method does:
vllm/model_executor/layers/quantization/gguf.py, dequantize + matmul past a row count, its own kernel below).
"""
import torch
import torch.nn.functional as F
from torch import nn

from kernels import quant_linear

KERNEL_MAX_ROWS = 64  # above this, dequantize + GEMM (the crossover measured on SmolLM2's shapes, 2 threads)


def packs(qtype: int, dtype: torch.dtype) -> bool:
    """Weights of this type in a model of this dtype are kept x16-packed (see the module's docstring)."""
    return dtype == torch.bfloat16 and qtype in quant_linear.PACKED_TYPES and quant_linear.packed_available()


class QuantLinear(nn.Module):
    """y = x @ dequant(blocks).T (+ bias): blocks uint8 [out_features, row bytes] of GGML type qtype, as in the file
    (kept x16-packed where packs(); `packed` True: blocks are already packed, for out_features rows)."""
    use_kernel = False  # not a bf16 weight: the fused bf16 decoder stack passes over layers holding these
    cpu_ready = True

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None,
                 dtype: torch.dtype, packed: bool = False, out_features: int | None = None):
        super().__init__()
        row_bytes = quant_linear.row_bytes(qtype, in_features)
        if blocks.shape[-1] != row_bytes * (16 if packed else 1):
            raise ValueError(f"blocks of {blocks.shape[-1]} bytes a row do not hold {in_features} elements of GGML "
                             f"type {qtype}")
        self.out_features = out_features if packed else blocks.shape[0]
        self.packed = packed or packs(qtype, dtype)
        if self.packed and not packed:
            blocks = quant_linear.pack(blocks.contiguous(), qtype, in_features)
        self.register_buffer("blocks", blocks.contiguous())
        self.qtype, self.in_features, self.dtype = qtype, in_features, dtype
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.dtype == torch.bfloat16:
            return quant_linear.linear_packed(x, self.blocks, self.qtype, self.in_features, self.out_features,
                                              self.bias)
        if not self.packed and x.numel() <= KERNEL_MAX_ROWS * self.in_features:
            return quant_linear.linear(x, self.blocks, self.qtype, self.in_features, self.bias)
        return F.linear(x.float(), self.dense(), self.bias).to(x.dtype)

    def dense(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight's rows (all, or those indexed by rows) dequantized to fp32."""
        if self.packed:
            return quant_linear.dequantize_packed(self.blocks, self.qtype, self.in_features, self.out_features, rows)
        return quant_linear.dequantize(self.blocks, self.qtype, self.in_features, rows)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight in the model's dtype, dequantized on each access (start-up use: a draft's vocabulary
        head takes rows of it)."""
        return self.dense().to(self.dtype)

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
    """Token embeddings as rows dequantized on lookup; `head`: a tied LM head's QuantLinear, whose blocks (packed or
    not) it reads instead of its own."""

    def __init__(self, blocks: torch.Tensor, qtype: int, dim: int, dtype: torch.dtype,
                 head: QuantLinear | None = None):
        super().__init__()
        quant_linear.row_bytes(qtype, dim)
        self.packed = head is not None and head.packed
        self.register_buffer("blocks", head.blocks if head is not None else blocks.contiguous())
        self.qtype, self.embedding_dim, self.dtype = qtype, dim, dtype
        self.num_embeddings = head.out_features if head is not None else blocks.shape[0]

    def dense(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed:
            return quant_linear.dequantize_packed(self.blocks, self.qtype, self.embedding_dim, self.num_embeddings,
                                                  rows)
        return quant_linear.dequantize(self.blocks, self.qtype, self.embedding_dim, rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense(ids.reshape(-1)).view(*ids.shape, self.embedding_dim).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dense().to(self.dtype)
