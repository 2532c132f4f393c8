"""DeepSeek-V4's mixture of experts: sqrt(softplus) router scores, experts chosen by top-k of scores + the noaux_tc
correction bias (or, on the first num_hash_layers layers, by a fixed token-id -> experts table), weights normalised
and scaled by routed_scaling_factor; SwiGLU experts with clamped pre-activations, plus the shared expert. Names follow
the released checkpoint (ffn.gate, ffn.experts.E.w1/w2/w3, ffn.shared_experts); the math follows transformers 5.24's
DeepseekV4SparseMoeBlock."""
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.deepseek_v4.config import V4Config
from engine.models.layers import Linear


class Expert(nn.Module):
    def __init__(self, hidden: int, inner: int, limit: float):
        super().__init__()
        self.w1 = Linear(hidden, inner, bias=False)  # gate
        self.w2 = Linear(inner, hidden, bias=False)  # down
        self.w3 = Linear(hidden, inner, bias=False)  # up
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


class MoE(nn.Module):
    def __init__(self, config: V4Config, layer: int):
        super().__init__()
        inner, limit = config.moe_intermediate_size, config.swiglu_limit
        self.gate = Router(config, config.is_hash_layer(layer))
        self.experts = nn.ModuleList(Expert(config.hidden_size, inner, limit) for _ in range(config.num_experts))
        self.shared_experts = Expert(config.hidden_size, inner * config.num_shared_experts, limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x, input_ids)
        routed = torch.zeros_like(x)
        for expert in ids.unique().tolist():
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            out = self.experts[expert](x[rows]) * weights[rows, slot, None]
            routed.index_add_(0, rows, out.to(x.dtype))
        return routed + self.shared_experts(x)
