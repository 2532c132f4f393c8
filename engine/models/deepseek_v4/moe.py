"""DeepSeek-V4's mixture of experts: sqrt(softplus) router scores, experts chosen by top-k of scores + the noaux_tc
correction bias (or, on the first num_hash_layers layers, by a fixed token-id -> experts table), weights normalised
and scaled by routed_scaling_factor; SwiGLU experts with clamped pre-activations, plus the shared expert. Names follow
the released checkpoint (ffn.gate, ffn.experts.E.w1/w2/w3, ffn.shared_experts); the math follows transformers 5.24's
DeepseekV4SparseMoeBlock.

Over tensor-parallel ranks the shared expert is split by its inner columns, and so is every routed expert; with expert
parallelism each rank holds E / N whole routed experts instead. Either way each rank's activations are the whole
batch (the attention before it ends in an all-reduce), so dispatch is local (a rank runs its experts on the rows
routed to them) and the combine is one all-reduce of the block's output, the one the shared expert's split needs
anyway: no all-to-all (that pays when tokens are spread over ranks, as with data-parallel attention, which this engine
does not do). vLLM's FusedMoE without EP splits each expert the same way; with EP it places whole experts."""
import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed
from engine.models.deepseek_v4.config import V4Config
from engine.models.layers import column_linear, row_linear
from engine.parallel import rows


class Expert(nn.Module):
    def __init__(self, hidden: int, inner: int, limit: float, split: bool = True):
        """split: this rank's share of the inner columns (all of them in one process, or when not split); the MoE
        all-reduces the partial outputs."""
        super().__init__()
        part = distributed.split(inner) if split else (0, inner)
        self.w1 = column_linear(hidden, rows(part), bias=False)  # gate
        self.w2 = row_linear(part, hidden, bias=False)  # down
        self.w3 = column_linear(hidden, rows(part), bias=False)  # up
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Router(nn.Module):
    def __init__(self, config: V4Config, hashed: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, config.num_experts_per_tok,
                                                        dtype=torch.long))
        else:
            self.bias = nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32))
        self.hashed, self.top_k, self.scaling = hashed, config.num_experts_per_tok, config.routed_scaling_factor

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, k], weights [T, k])."""
        scores = F.softplus(F.linear(x, self.weight)).sqrt()
        if self.hashed:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = torch.topk(scores + self.bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        return ids, weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.scaling


class ElsewhereExpert(nn.Module):
    """A routed expert another rank holds (expert parallelism): no weights here; the loader drops its tensors."""
    held_elsewhere = True


class MoE(nn.Module):
    def __init__(self, config: V4Config, layer: int):
        super().__init__()
        inner, limit, whole = config.moe_intermediate_size, config.swiglu_limit, distributed.expert_parallel()
        self.gate = Router(config, config.is_hash_layer(layer))
        first, count = distributed.split(config.num_experts) if whole else (0, config.num_experts)
        self.held = range(first, first + count)
        self.experts = nn.ModuleList(Expert(config.hidden_size, inner, limit, split=not whole) if e in self.held
                                     else ElsewhereExpert() for e in range(config.num_experts))
        self.shared_experts = Expert(config.hidden_size, inner * config.num_shared_experts, limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x, input_ids)
        routed = torch.zeros_like(x)
        for expert in ids.unique().tolist():
            if expert not in self.held:
                continue
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            out = self.experts[expert](x[rows]) * weights[rows, slot, None]
            routed.index_add_(0, rows, out.to(x.dtype))
        return distributed.all_reduce(routed + self.shared_experts(x))
