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
does not do). vLLM's FusedMoE without EP splits each expert the same way; with EP it places whole experts.

Dense experts run as one grouped GEMM per projection (torch._grouped_mm over the experts' weights stacked once; the
experts' own weights become views of the stack): the rows sorted by expert, the group sizes counted on the device. No
host sync, so a CUDA graph can hold the MoE (torchtitan's MoE does the same). Where the grouped GEMM lacks the dtype
(fp32 on CUDA) every expert runs over every row instead, also without a sync. Experts kept as stored (FP8 / MXFP4)
run as grouped GEMMs over their stored bytes on the Triton path (kernels/triton_stored_moe.py: each expert's bytes
stacked once, decoded inside the kernel), also without a sync. Otherwise (kept experts on CPU, bf16 ones on GPUs
before sm_90) one expert at a time runs over its rows, which needs the rows on the host."""
import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed
from engine.models.deepseek_v4.config import V4Config
from engine.models.layers import column_linear, row_linear
from engine.parallel import rows
from kernels import dispatch, stored_moe, triton_support


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
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SwiGLU with V4's clamped pre-activations."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


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


def dense_path(weight: torch.Tensor) -> str:
    """How dense experts run without a host sync: 'grouped' where torch._grouped_mm takes the weight (bf16 or fp32 on
    CPU, bf16 on CUDA from sm_90: H100 / H200), 'every' for fp32 on CUDA (the tiny test models), else 'loop' (one
    expert at a time)."""
    if weight.device.type == "cpu":
        return "grouped" if weight.dtype in (torch.bfloat16, torch.float32) else "loop"
    if weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device)[0] >= 9:
        return "grouped"
    return "every" if weight.dtype == torch.float32 else "loop"


def stack_stored(kept: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The experts' stored weights (StoredWeight) of one projection stacked: (bytes [E, ...], scales [E, ...], fp4);
    each expert's buffers become views of the stacks, so the bytes are held once."""
    data, scale = torch.stack([k.data for k in kept]), torch.stack([k.scale for k in kept])
    for i, k in enumerate(kept):
        k.data, k.scale = data[i], scale[i]
    return data, scale, kept[0].kind == "fp4"


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
        self.stacked_w13 = self.stacked_w2 = None  # the held experts' weights stacked (stack)
        self.stacked_stored: dict[str, tuple] = {}  # kept experts: w1 / w3 / w2 -> (bytes, scales, fp4) stacked
        self.path: str | None = None  # how the routed experts run, once settled (stack)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x, input_ids)
        self.stack()
        run = {"grouped": self.grouped, "every": self.every_expert, "stored": self.stored}.get(self.path,
                                                                                             self.one_by_one)
        return distributed.all_reduce(run(x, ids, weights) + self.shared_experts(x))

    def stack(self) -> bool:
        """Stack the held experts' dense weights once ([E, 2 * inner, hidden] gate | up, [E, hidden, inner] down) and
        make each expert's weights views of them, settling self.path -> whether the experts run without a host
        sync."""
        if self.path is not None:
            return self.path != "loop"
        experts = [self.experts[e] for e in self.held]
        if any(w.weight is not None and w.weight.requires_grad for e in experts for w in (e.w1, e.w2, e.w3)):
            return False  # not settled: training may freeze the weights later
        self.path = self.settle_path(experts)
        if self.path == "loop":
            return False
        if self.path == "stored":
            self.stacked_stored = {name: stack_stored([getattr(e, name).kept for e in experts])
                                   for name in ("w1", "w3", "w2")}
            return True
        inner = experts[0].w1.weight.shape[0]
        self.stacked_w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts])
        self.stacked_w2 = torch.stack([e.w2.weight for e in experts])
        for i, e in enumerate(experts):
            e.w1.weight = nn.Parameter(self.stacked_w13[i, :inner], False)
            e.w3.weight = nn.Parameter(self.stacked_w13[i, inner:], False)
            e.w2.weight = nn.Parameter(self.stacked_w2[i], False)
        return True

    @staticmethod
    def settle_path(experts: list[Expert]) -> str:
        """'stored' for experts kept as stored on the Triton path (all in one format), 'loop' for other kept experts
        or those whose rows grouped GEMMs cannot take (16-byte aligned; the tiny models' are), else dense_path's
        choice."""
        w = experts[0].w1
        kept = [x.kept for e in experts for x in (e.w1, e.w2, e.w3)]
        if any(k is not None for k in kept):
            same_kind = all(k is not None and k.kind == kept[0].kind for k in kept)
            return "stored" if same_kind and triton_support.enabled() else "loop"
        if any(size * w.weight.element_size() % 16 for size in w.weight.shape):
            return "loop"
        return dense_path(w.weight)

    def grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum over fixed shapes: every (row, choice) sorted by held expert (choices of experts
        held elsewhere last, outside every group), two grouped GEMMs, weighted and added back per row."""
        held, local = len(self.held), self.local_ids(ids).flatten()
        order = torch.sort(local, stable=True).indices
        counts = torch.zeros(held + 1, dtype=torch.int32, device=x.device).index_add_(
            0, local, torch.ones_like(local, dtype=torch.int32))
        offsets = counts[:held].cumsum(0, dtype=torch.int32)
        token = order // ids.shape[1]
        gate_up = torch._grouped_mm(x[token], self.stacked_w13.transpose(1, 2), offs=offsets)
        out = torch._grouped_mm(self.activate(gate_up), self.stacked_w2.transpose(1, 2), offs=offsets)
        kept = (local[order] < held)[:, None]
        out = torch.where(kept, out * weights.flatten()[order, None].to(out.dtype), 0)
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))

    def every_expert(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum over fixed shapes for dtypes the grouped GEMM lacks (fp32 on CUDA: the tiny test models):
        every held expert over every row, weighted by the row's routing weight, 0 where it did not choose it."""
        held, local = len(self.held), self.local_ids(ids)
        mix = torch.zeros(x.shape[0], held + 1, dtype=weights.dtype, device=x.device).scatter_add_(1, local, weights)
        gate_up = torch.einsum("th,eih->eti", x, self.stacked_w13)
        out = torch.einsum("eti,ehi->eth", self.activate(gate_up), self.stacked_w2)
        return (out * mix[:, :held].T[..., None].to(out.dtype)).sum(0).to(x.dtype)

    def stored(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum over experts kept as stored: three grouped GEMMs over their bytes, one (row, choice) pair per
        output row (zero for experts held elsewhere), weighted and summed per row."""
        routing = stored_moe.route(self.local_ids(ids), len(self.held))
        top_k, w = ids.shape[1], self.stacked_stored
        gate = dispatch.stored_moe_gemm(x, *w["w1"], routing, top_k)
        up = dispatch.stored_moe_gemm(x, *w["w3"], routing, top_k)
        out = dispatch.stored_moe_gemm(swiglu(gate, up, self.experts[self.held.start].limit), *w["w2"], routing, 1)
        return (out.view(*ids.shape, -1) * weights[..., None].to(out.dtype)).sum(1).to(x.dtype)

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Expert ids -> indexes among the held experts; an expert held elsewhere -> len(held), past them all."""
        local = ids - self.held.start
        return torch.where((local >= 0) & (local < len(self.held)), local, len(self.held))

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2 * inner] gate | up of the stacked experts -> swiglu [..., inner]."""
        inner = gate_up.shape[-1] // 2
        return swiglu(gate_up[..., :inner], gate_up[..., inner:], self.experts[self.held.start].limit)

    def one_by_one(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        routed = torch.zeros_like(x)
        for expert in ids.unique().tolist():
            if expert not in self.held:
                continue
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            out = self.experts[expert](x[rows]) * weights[rows, slot, None]
            routed.index_add_(0, rows, out.to(x.dtype))
        return routed
