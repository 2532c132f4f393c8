"""A DeepSeek-V4 deployment plan without a GPU: `python -m engine --model DIR --plan [--tensor-parallel-size N]
[--expert-parallel] [--memory-gb G]`. From config.json alone (model.safetensors.index.json, when present, is only
compared with), it counts the parameters of every released tensor analytically, prices them in the released format,
splits them over N tensor-parallel devices, and sizes the KV cache per layer kind and how much of it fits.

Every tensor of the release is listed once (`released_tensors`) with its shape, its stored format and how tensor
parallelism splits it; the weights table, the per-device bytes and the parameter counts are sums over that list.

Formats (what the released checkpoint stores):
- `fp8`: FP8 e4m3 values plus one scale per `weight_block_size` block (128x128), 1 byte (ue8m0) in checkpoints whose
  routed experts are FP4, 4 bytes (fp32) in those whose experts are FP8 (Flash-Base). vLLM's
  `vllm/model_executor/models/deepseek_v4.py` (`DeepseekV4FP8Config.is_scale_e8m0`) keys the scale format off
  `expert_dtype` the same way; a published shard listing of DeepSeek-V4-Flash shows `attn.wq_a.scale F8_E8M0 [8, 32]`
  for `attn.wq_a.weight F8_E4M3 [1024, 4096]`. Quantized: wq_a, wkv, wq_b, wo_a, wo_b, the indexer's wq_b, the shared
  expert, DSpark's main_proj and NextN's e_proj / h_proj (the linears vLLM builds with the quant config).
- `mxfp4`: routed experts (`expert_dtype: fp4`): e2m1 values packed two per byte plus one e8m0 byte per 32 values
  along the input (the shard listing: `experts.0.w1.weight I8 [2048, 2048]`, `.scale F8_E8M0 [2048, 128]`; vLLM's
  MXFP4 MoE parameters `w13_weight [E, 2I, H/2]`, `w13_weight_scale [E, 2I, H/32]`).
- `bf16`: the embedding, the head (vLLM's `ParallelLMHead` takes no quant config), the router gate (`gate.weight BF16`
  in the listing), the compressors' and the indexer's wkv / wgate and the indexer's weights_proj (transformers 5.24
  `modeling_deepseek_v4.py` `_keep_in_fp32_modules`: "these projections ship in BF16 with no companion scale_inv";
  vLLM builds them with `quant_config=None`), DSpark's Markov head and confidence projection.
- `fp32`: the mHC parameters, attention sinks, the compressors' position biases (`ape`), the router bias and every
  RMSNorm weight (transformers' `_keep_in_fp32_modules_strict`; vLLM's hc_* / attn_sink / ape / bias parameters are
  fp32). The norms are the one guess: if the release stores them in bf16 the total moves by under 1 MB.
- `int64`: the hash layers' token-to-expert table `gate.tid2eid [vocab, top-k]` (`I64` in the listing).
A config without `quantization_config` (a bf16 checkpoint, e.g. one transformers wrote) is priced in bf16, with the
fp32 and int64 tensors as above.

Tensor parallelism, as vLLM's DeepSeek-V4 model does it: wq_b and wo_a are column-parallel (heads and o-groups split
N ways), wo_b row-parallel, the sinks narrowed to the rank's heads; wq_a and wkv (the single shared K/V head) are one
replicated linear, and the compressors, the indexer (`vllm/model_executor/layers/deepseek_v4_attention.py`: "no tensor
parallel, just replicated"), the router, mHC and norms are replicated. The shared expert is a merged-column /
row-parallel MLP (split N ways). Routed experts are split N ways along the intermediate size, or, with
`--expert-parallel`, each rank holds E/N whole experts: the same bytes. The embedding and head are vocabulary-parallel
(V/N rows). DSpark stages follow the same rules; their main_proj and confidence projection are replicated and the
Markov head's two V x rank matrices vocabulary-parallel (vllm-ascend's DSpark draft model). The assumption that
every device holds exactly the shares above ignores vLLM's padding of the sinks to 64 heads and of the vocabulary to
multiples of 64 (kilobytes to a megabyte).

The DSpark module (`dspark_*` keys): stages counted from the config's compress_ratios past the target's layers
(else `dspark_target_layer_ids`), each a full V4 block with window-only attention (no compressor, no indexer) and a
non-hash MoE (`dspark_n_routed_experts` / `dspark_moe_intermediate_size` where a config gives them), plus main_proj
(H x len(target layers)*H) and main_norm on stage 0, and hc_head, norm, the Markov head (w1: V x rank embedding,
w2: rank -> V) and the confidence projection (H + rank -> 1) on the last. A config with trailing compress ratios
but no `dspark_*` keys (the June V4-Flash) has NextN MTP blocks instead: a window-only block plus e_proj, h_proj,
enorm, hnorm, norm and hc_head (vLLM's `deepseek_v4_mtp.py`).

KV cache, bf16 logical, one K/V head of head_dim (shared by all query heads, so replicated, not split, on every
tensor-parallel device):
- per token: a CSA layer (ratio 4) stores head_dim / 4 plus the indexer's key, index_head_dim / 4; an HCA layer
  (ratio 128) head_dim / 128; a window-only layer nothing beyond its ring;
- per request, fixed: every layer (and every DSpark / NextN stage) a ring of sliding_window raw entries, plus the
  draft block when the config declares DSpark (verification writes it before the window moves on); every compressed
  layer the compressor's partial group, sized as vLLM's `CompressorStateCache` does
  (`vllm/model_executor/layers/deepseek_compressor.py`): coff*ratio rows of kv + score, each coff*dim wide, in fp32
  (coff = 2 for the overlapping ratio-4 compressor, 1 for ratio 128), for the CSA layer's indexer as well (dim =
  index_head_dim).
vLLM itself stores FP8 entries (448 e4m3 + 64 bf16 + scales, 584 B a 512-wide entry) and an FP8 or FP4 indexer key,
so its physical bytes per token are below this bf16 figure; see docs/deepseek-v4-plan.md for the comparison with a
published KV pool. This engine's own V4 caches (`engine_kv_bytes`) have the same bytes per token; per request it keeps
rings in the KV dtype instead of fp32 state: each layer's window plus the verify width, each compressor's raw
wkv | wgate rows of coff windows plus the verify width.

GB = 1e9 bytes, GiB = 2**30 bytes; `--memory-gb` is in GB. The KV budget is memory - weights per device, an upper
bound: activations, CUDA graphs and the framework's own buffers come off it (vLLM keeps 10 % back by default).
"""
import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.models.deepseek_v4.config import V4Config, read_v4_config

GB, GiB, MiB = 10**9, 2**30, 2**20
FORMAT_BYTES = {"bf16": 2, "fp32": 4, "int64": 8}
ENGINE_BYTES = {"fp8": 2, "mxfp4": 2, "bf16": 2, "fp32": 4, "int64": 8}  # this engine dequantizes to bf16 at load
TP_SIZES = (1, 2, 4, 8, 16, 32)
MXFP4_GROUP = 32
CONTEXTS = (8192, 131072, 1 << 20)  # request lengths the plan sizes (those within max_position_embeddings)
STAGE_KIND = "window"
KIND_TITLES = {"window": "window", "csa": "CSA", "hca": "HCA"}


@dataclass(frozen=True)
class Tensor:
    """`count` released tensors of one shape: `split` is how tensor parallelism divides each ("none", "rows" or
    "cols"); `expert` marks routed experts, whose count (not shape) expert parallelism divides instead."""
    component: str
    name: str
    shape: tuple[int, ...]
    fmt: str
    split: str = "none"
    count: int = 1
    expert: bool = False

    @property
    def params(self) -> int:
        return self.count * math.prod(self.shape)


@dataclass(frozen=True)
class Formats:
    linear: str        # fp8 | bf16
    experts: str       # mxfp4 | fp8 | bf16
    scale_bytes: int   # bytes of one fp8 block scale
    block: tuple[int, int]

    @classmethod
    def of(cls, cfg: V4Config) -> "Formats":
        q = cfg.quantization
        if q.get("quant_method") not in ("fp8", "deepseek_v4_fp8"):
            return cls("bf16", "bf16", 0, (128, 128))
        expert_dtype = q.get("expert_dtype", "fp4")  # vLLM's default for a V4 FP8 checkpoint
        if expert_dtype not in ("fp4", "fp8"):
            raise ValueError(f"unknown DeepSeek-V4 expert_dtype {expert_dtype!r} (fp4 or fp8)")
        block = tuple(q.get("weight_block_size") or (128, 128))
        return cls("fp8", "mxfp4" if expert_dtype == "fp4" else "fp8", 1 if expert_dtype == "fp4" else 4, block)

    def describe(self) -> list[str]:
        rest = "fp32 norms / mHC / sinks / biases, int64 hash tables"
        if self.linear == "bf16":
            return ["bf16 (no quantization_config)", rest]
        scale = "1-byte ue8m0" if self.scale_bytes == 1 else "4-byte fp32"
        experts = "MXFP4 routed experts (e8m0 per 32)" if self.experts == "mxfp4" else "FP8 routed experts"
        return [f"FP8 e4m3 linears ({self.block[0]}x{self.block[1]} blocks, {scale} scales), {experts}",
                f"bf16 embedding / head / router / compressors, {rest}"]

    def nbytes(self, fmt: str, shape: tuple[int, ...]) -> int:
        if fmt in FORMAT_BYTES:
            return FORMAT_BYTES[fmt] * math.prod(shape)
        rows, cols = shape
        if fmt == "fp8":
            blocks = math.ceil(rows / self.block[0]) * math.ceil(cols / self.block[1])
            return rows * cols + blocks * self.scale_bytes
        if fmt == "mxfp4":
            return rows * math.ceil(cols / 2) + rows * math.ceil(cols / MXFP4_GROUP)
        raise ValueError(f"unknown format {fmt!r}")


def local_shape(t: Tensor, tp: int, ep: bool) -> tuple[int, ...]:
    if t.split == "none" or (t.expert and ep):
        return t.shape
    if t.split == "rows":
        return (math.ceil(t.shape[0] / tp), *t.shape[1:])
    return (t.shape[0], math.ceil(t.shape[1] / tp))


def local_count(t: Tensor, tp: int, ep: bool) -> int:
    return t.count // tp if t.expert and ep else t.count


def block_tensors(cfg: V4Config, fm: Formats, component: str, kind: str, count: int, hash_layer: bool = False,
                  experts: int | None = None, inter: int | None = None) -> list[Tensor]:
    """The tensors of `count` identical V4 blocks of one attention kind: attention, compressor / indexer, mHC,
    norms and the MoE. `component` names the attention's row (DSpark and NextN stages pass their own row name for
    all of a stage's tensors)."""
    own = component.startswith(("DSpark", "MTP"))
    row = (lambda name: component) if own else (lambda name: name)
    return (attention_tensors(cfg, fm, row, kind, count) + mhc_tensors(cfg, row("mHC"), count)
            + moe_tensors(cfg, fm, row, count, hash_layer, experts or cfg.num_experts,
                          inter or cfg.moe_intermediate_size))


def attention_tensors(cfg: V4Config, fm: Formats, row, kind: str, count: int) -> list[Tensor]:
    h, hd, heads = cfg.hidden_size, cfg.head_dim, cfg.num_heads
    attention, norms = row(f"attention: {KIND_TITLES[kind]}"), row("norms")
    out = [
        Tensor(attention, "attn.wq_a", (cfg.q_lora_rank, h), fm.linear, count=count),
        Tensor(attention, "attn.wkv", (hd, h), fm.linear, count=count),
        Tensor(attention, "attn.wq_b", (heads * hd, cfg.q_lora_rank), fm.linear, "rows", count),
        Tensor(attention, "attn.wo_a", (cfg.o_groups * cfg.o_lora_rank, heads * hd // cfg.o_groups), fm.linear,
               "rows", count),
        Tensor(attention, "attn.wo_b", (h, cfg.o_groups * cfg.o_lora_rank), fm.linear, "cols", count),
        Tensor(attention, "attn.attn_sink", (heads,), "fp32", "rows", count),
    ]
    out += [Tensor(norms, name, (dim,), "fp32", count=count)
            for name, dim in (("attn_norm", h), ("ffn_norm", h), ("attn.q_norm", cfg.q_lora_rank),
                              ("attn.kv_norm", hd))]
    if kind != "window":
        ratio = next((r for r, k in zip(cfg.compress_ratios, cfg.layer_kinds) if k == kind), 128)
        out += compressor_tensors(row("compressor + indexer"), norms, "attn.compressor", ratio, hd, kind == "csa",
                                  h, count)
    if kind == "csa":
        indexer = row("compressor + indexer")
        out += [Tensor(indexer, "attn.indexer.wq_b", (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
                       fm.linear, count=count),
                Tensor(indexer, "attn.indexer.weights_proj", (cfg.index_n_heads, h), "bf16", count=count)]
        out += compressor_tensors(indexer, norms, "attn.indexer.compressor", 4, cfg.index_head_dim, True, h, count)
    return out


def mhc_tensors(cfg: V4Config, component: str, count: int) -> list[Tensor]:
    hc, mix = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult
    return [Tensor(component, f"hc_{site}_{part}", shape, "fp32", count=count) for site in ("attn", "ffn")
            for part, shape in (("fn", (mix, hc * cfg.hidden_size)), ("base", (mix,)), ("scale", (3,)))]


def moe_tensors(cfg: V4Config, fm: Formats, row, count: int, hash_layer: bool, experts: int,
                inter: int) -> list[Tensor]:
    h, router, routed, shared = cfg.hidden_size, row("router"), row("routed experts"), row("shared experts")
    out = [Tensor(router, "ffn.gate.weight", (experts, h), "bf16", count=count)]
    if hash_layer:
        out.append(Tensor(router, "ffn.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "int64",
                          count=count))
    else:
        out.append(Tensor(router, "ffn.gate.bias", (experts,), "fp32", count=count))
    n = count * experts
    out += [Tensor(routed, "ffn.experts.w1", (inter, h), fm.experts, "rows", n, True),
            Tensor(routed, "ffn.experts.w3", (inter, h), fm.experts, "rows", n, True),
            Tensor(routed, "ffn.experts.w2", (h, inter), fm.experts, "cols", n, True)]
    si = cfg.num_shared_experts * cfg.moe_intermediate_size
    if si:
        out += [Tensor(shared, "ffn.shared_experts.w1", (si, h), fm.linear, "rows", count),
                Tensor(shared, "ffn.shared_experts.w3", (si, h), fm.linear, "rows", count),
                Tensor(shared, "ffn.shared_experts.w2", (h, si), fm.linear, "cols", count)]
    return out


def compressor_tensors(component: str, norms: str, prefix: str, ratio: int, dim: int, overlap: bool, h: int,
                       count: int) -> list[Tensor]:
    coff = 2 if overlap else 1
    return [Tensor(component, f"{prefix}.wkv", (coff * dim, h), "bf16", count=count),
            Tensor(component, f"{prefix}.wgate", (coff * dim, h), "bf16", count=count),
            Tensor(component, f"{prefix}.ape", (ratio, coff * dim), "fp32", count=count),
            Tensor(norms, f"{prefix}.norm", (dim,), "fp32", count=count)]


def head_tensors(cfg: V4Config, norm_component: str, mhc_component: str) -> list[Tensor]:
    """hc_head (collapse of the hc streams) and the final norm, which the target and the last stage each own."""
    h, hc = cfg.hidden_size, cfg.hc_mult
    return [Tensor(mhc_component, "hc_head_fn", (hc, hc * h), "fp32"),
            Tensor(mhc_component, "hc_head_base", (hc,), "fp32"),
            Tensor(mhc_component, "hc_head_scale", (1,), "fp32"),
            Tensor(norm_component, "norm", (h,), "fp32")]


def num_stages(cfg: V4Config) -> int:
    """DSpark stages: the compress ratios past the target's layers, else one per target layer it reads, else 3."""
    return len(cfg.stage_compress_ratios) or len(cfg.dspark.get("target_layer_ids") or ()) or 3


def released_tensors(cfg: V4Config) -> list[Tensor]:
    fm, h, v = Formats.of(cfg), cfg.hidden_size, cfg.vocab_size
    out = [Tensor("embedding", "embed.weight", (v, h), "bf16", "rows"),
           Tensor("head", "head.weight", (v, h), "bf16", "rows")]
    out += head_tensors(cfg, "norms", "mHC")
    for layer, kind in enumerate(cfg.layer_kinds):
        out += block_tensors(cfg, fm, "", kind, 1, hash_layer=cfg.is_hash_layer(layer))
    if cfg.dspark:
        stages, d = num_stages(cfg), cfg.dspark
        rank, targets = d.get("markov_rank", 256), len(d.get("target_layer_ids") or ()) or 3
        out += block_tensors(cfg, fm, f"DSpark: {stages} window-only blocks", STAGE_KIND, stages,
                             experts=d.get("n_routed_experts"), inter=d.get("moe_intermediate_size"))
        heads = "DSpark: main_proj, Markov + confidence heads"
        out += [Tensor(heads, "mtp.0.main_proj", (h, targets * h), fm.linear),
                Tensor(heads, "mtp.0.main_norm", (h,), "fp32"),
                Tensor(heads, "markov_head.w1", (v, rank), "bf16", "rows"),
                Tensor(heads, "markov_head.w2", (v, rank), "bf16", "rows"),
                Tensor(heads, "confidence_head.proj", (1, h + rank), "bf16")]
        out += head_tensors(cfg, heads, heads)
    elif cfg.stage_compress_ratios:
        stages = len(cfg.stage_compress_ratios)
        name = f"MTP: {stages} NextN block" + ("s" if stages > 1 else "")
        out += block_tensors(cfg, fm, name, STAGE_KIND, stages)
        for _ in range(stages):
            out += [Tensor(name, "e_proj", (h, h), fm.linear), Tensor(name, "h_proj", (h, h), fm.linear),
                    Tensor(name, "enorm", (h,), "fp32"), Tensor(name, "hnorm", (h,), "fp32")]
            out += head_tensors(cfg, name, name)
    return out


@dataclass
class WeightRow:
    component: str
    params: int = 0
    nbytes: int = 0
    device_bytes: int = 0
    engine_device_bytes: int = 0  # as this engine holds them: bf16 for what is stored FP8 / MXFP4 / bf16


def weight_rows(cfg: V4Config, tp: int = 1, ep: bool = False) -> list[WeightRow]:
    """Parameters, released bytes and bytes per device by component, in the order the table prints them."""
    check_parallel(cfg, tp, ep)
    fm, rows = Formats.of(cfg), {}
    for t in released_tensors(cfg):
        row = rows.setdefault(t.component, WeightRow(t.component))
        row.params += t.params
        row.nbytes += t.count * fm.nbytes(t.fmt, t.shape)
        row.device_bytes += local_count(t, tp, ep) * fm.nbytes(t.fmt, local_shape(t, tp, ep))
        row.engine_device_bytes += local_count(t, tp, ep) * math.prod(local_shape(t, tp, ep)) * ENGINE_BYTES[t.fmt]
    order = ["embedding", "head"] + [f"attention: {KIND_TITLES[k]}" for k in ("window", "csa", "hca")]
    order += ["compressor + indexer", "mHC", "routed experts", "shared experts", "router", "norms"]
    return [rows[c] for c in order if c in rows] + [r for c, r in rows.items() if c not in order]


def check_parallel(cfg: V4Config, tp: int, ep: bool):
    if tp < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {tp}")
    for what, n in (("num_attention_heads", cfg.num_heads), ("o_groups", cfg.o_groups)):
        if n % tp:
            raise ValueError(f"tensor parallelism {tp} does not divide {what} = {n}")
    experts = [cfg.num_experts] + ([cfg.dspark["n_routed_experts"]] if "n_routed_experts" in cfg.dspark else [])
    if ep and any(e % tp for e in experts):
        raise ValueError(f"expert parallelism over {tp} devices does not divide the routed experts {experts}")


@dataclass
class KVRow:
    kind: str            # window | csa | hca | stages
    layers: int
    per_token: float     # bytes per token, all layers of the kind together
    per_request: int     # fixed bytes per request, all layers of the kind together
    ratios: list[int] = field(default_factory=list)  # the compress ratios of its layers


def engine_kv_bytes(cfg: V4Config, rollback: int) -> tuple[float, int, int]:
    """This engine's V4 caches for the target's layers in bf16 (engine/models/deepseek_v4/attention.py, rings.py):
    (bytes per token, bytes per request, bytes per prefix-cache state). Per token each compressor's entries, dim /
    ratio (a CSA layer has two: its own and its indexer's); per request each layer's window ring of sliding_window +
    rollback K=V rows and each compressor's ring of coff * ratio + rollback raw rows (wkv | wgate, 2 * coff * dim wide;
    coff = 2 where windows overlap), rollback being the most tokens a verify step rejects; per state saved at a block
    end the rows a step starting there reads back: sliding_window - 1 K=V rows per layer, (coff - 1) * ratio raw rows
    per compressor."""
    hd, idx, per_token, per_request, per_state = cfg.head_dim, cfg.index_head_dim, 0.0, 0, 0
    for kind, ratio in zip(cfg.layer_kinds, cfg.compress_ratios):
        per_request += (cfg.sliding_window + rollback) * hd
        per_state += (cfg.sliding_window - 1) * hd
        for dim, coff in {"window": [], "hca": [(hd, 1)], "csa": [(hd, 2), (idx, 2)]}[kind]:
            per_token += dim / ratio
            per_request += (coff * ratio + rollback) * 2 * coff * dim
            per_state += (coff - 1) * ratio * 2 * coff * dim
    return 2 * per_token, 2 * per_request, 2 * per_state


def kv_rows(cfg: V4Config) -> list[KVRow]:
    """KV bytes per token and fixed bytes per request by layer kind (bf16 logical; fp32 compressor state)."""
    hd, idx = cfg.head_dim, cfg.index_head_dim
    ring = (cfg.sliding_window + (cfg.dspark.get("block_size", 0) if cfg.dspark else 0)) * hd * 2
    rows = []
    for kind in ("window", "csa", "hca"):
        ratios = [r for k, r in zip(cfg.layer_kinds, cfg.compress_ratios) if k == kind]
        if not ratios:
            continue
        per_token, state = 0.0, 0
        for ratio in ratios:
            if kind == "csa":
                per_token += hd * 2 / ratio + idx * 2 / ratio
                state += compressor_state(ratio, hd, True) + compressor_state(ratio, idx, True)
            elif kind == "hca":
                per_token += hd * 2 / ratio
                state += compressor_state(ratio, hd, False)
        rows.append(KVRow(kind, len(ratios), per_token, len(ratios) * ring + state, sorted(set(ratios))))
    stages = (num_stages(cfg) if cfg.dspark else 0) or len(cfg.stage_compress_ratios)
    if stages:
        rows.append(KVRow("stages", stages, 0.0, stages * ring))
    return rows


def compressor_state(ratio: int, dim: int, overlap: bool) -> int:
    coff = 2 if overlap else 1
    return coff * ratio * (2 * coff * dim) * 4


@dataclass
class Plan:
    cfg: V4Config
    name: str
    tp: int = 1
    ep: bool = False
    memory_gb: float = 0.0
    index_total: int | None = None
    index_stages: int | None = None
    weights: list[WeightRow] = field(default_factory=list)
    kv: list[KVRow] = field(default_factory=list)

    def __post_init__(self):
        self.weights = self.weights or weight_rows(self.cfg, self.tp, self.ep)
        self.kv = self.kv or kv_rows(self.cfg)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.weights)

    @property
    def weight_bytes(self) -> int:
        return sum(r.nbytes for r in self.weights)

    @property
    def device_weight_bytes(self) -> int:
        return sum(r.device_bytes for r in self.weights)

    @property
    def engine_device_weight_bytes(self) -> int:
        return sum(r.engine_device_bytes for r in self.weights)

    @property
    def kv_per_token(self) -> float:
        return sum(r.per_token for r in self.kv)

    @property
    def kv_per_request(self) -> int:
        return sum(r.per_request for r in self.kv)

    @property
    def contexts(self) -> list[int]:
        top = self.cfg.max_position_embeddings
        return sorted({c for c in CONTEXTS if c <= top} | ({top} if top < CONTEXTS[0] else set()))

    def request_bytes(self, context: int) -> float:
        return context * self.kv_per_token + self.kv_per_request

    @property
    def kv_budget(self) -> float:
        return self.memory_gb * GB - self.device_weight_bytes

    @property
    def tokens_fit(self) -> int:
        return max(0, int(self.kv_budget // self.kv_per_token)) if self.kv_per_token else 0

    def requests_fit(self, context: int) -> int:
        return max(0, int(self.kv_budget // self.request_bytes(context)))

    @property
    def fits(self) -> bool:
        return self.memory_gb > 0 and self.requests_fit(self.contexts[0]) >= 1

    def verdict(self) -> str:
        first, where = self.contexts[0], f"TP {self.tp} x {self.memory_gb:g} GB"
        need = self.device_weight_bytes + self.request_bytes(first)
        if self.memory_gb <= 0:
            return (f"verdict: no --memory-gb given; each of the {self.tp} devices needs at least {need / GB:.2f} GB "
                    f"(the weights and one {first:,}-token request)")
        if self.fits:
            return (f"verdict: fits ({where}): {self.device_weight_bytes / GB:.2f} GB of weights per device, "
                    f"{self.kv_budget / GB:.2f} GB left for KV: {self.tokens_text()}, "
                    f"{self.requests_fit(first):,} requests of {first:,} tokens")
        if self.kv_budget < 0:
            return (f"verdict: does not fit ({where}): {self.device_weight_bytes / GB:.2f} GB of weights per device "
                    f"exceed the memory by {-self.kv_budget / GB:.2f} GB")
        return (f"verdict: does not fit ({where}): the weights ({self.device_weight_bytes / GB:.2f} GB per device) "
                f"leave {self.kv_budget / GB:.2f} GB, less than one {first:,}-token request "
                f"({self.request_bytes(first) / GB:.3f} GB)")

    def render(self) -> str:
        cfg, fm = self.cfg, Formats.of(self.cfg)
        kinds = ", ".join(f"{cfg.layer_kinds.count(k)} {KIND_TITLES[k]}" for k in ("window", "csa", "hca")
                          if k in cfg.layer_kinds)
        first, second = fm.describe()
        lines = [f"DeepSeek-V4 deployment plan: {self.name}",
                 f"config: {cfg.num_layers} layers ({kinds}), hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
                 f"{cfg.head_dim}, window {cfg.sliding_window}",
                 f"        {cfg.num_experts} routed experts (top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size:,}",
                 f"format: {first}", f"        {second}"]
        if cfg.dspark:
            lines.append(f"DSpark: {num_stages(cfg)} stages (mtp.*), block {cfg.dspark.get('block_size', '?')}, "
                         f"Markov rank {cfg.dspark.get('markov_rank', 256)}")
        experts = (f"expert parallel: {cfg.num_experts // self.tp} whole experts per device" if self.ep
                   else "routed experts tensor-split (the same bytes as expert parallel)")
        lines += [f"tensor parallel {self.tp}; {experts}", "units: GB = 1e9 bytes, GiB = 2**30 bytes", ""]
        lines += self.weight_table()
        lines += ["", *self.kv_table(), "", *self.fit_lines(), self.engine_verdict(), self.verdict()]
        return "\n".join(lines)

    def engine_verdict(self) -> str:
        """This engine on CUDA keeps the FP8 / MXFP4 weights as stored (--quantization auto: fp8), the bytes above;
        with --quantization none it holds them dequantized to bf16, which needs more devices."""
        held = f"this engine keeps FP8 / MXFP4 as stored on CUDA (the bytes above); with --quantization none it " \
               f"holds bf16: {self.engine_device_weight_bytes / GB:.2f} GB per device at TP {self.tp}"
        if self.memory_gb <= 0:
            return held
        left = self.memory_gb * GB - self.engine_device_weight_bytes - self.request_bytes(self.contexts[0])
        if left >= 0:
            return f"{held}: fits on {self.memory_gb:g} GB ({left / GB:.2f} GB more for KV)"
        return f"{held}: does not fit on {self.memory_gb:g} GB; {self.engine_fitting_tp()}"

    def engine_fitting_tp(self) -> str:
        for tp in TP_SIZES:
            try:
                other = Plan(self.cfg, self.name, tp, self.ep, self.memory_gb)
            except ValueError:
                continue
            if self.memory_gb * GB >= other.engine_device_weight_bytes + other.request_bytes(self.contexts[0]):
                return f"TP {tp} does ({other.engine_device_weight_bytes / GB:.2f} GB of weights per device)"
        return f"no tensor-parallel size up to {TP_SIZES[-1]} does"

    def weight_table(self) -> list[str]:
        unit, scale = byte_unit(self.weight_bytes)
        per_device = f"{unit}/device" if self.tp > 1 else f"{unit}/device (TP 1)"
        rows = [(r.component, f"{r.params:,}", f"{r.nbytes / scale:.3f}", f"{r.device_bytes / scale:.3f}")
                for r in self.weights]
        rows.append(("total", f"{self.params:,}", f"{self.weight_bytes / scale:.3f}",
                     f"{self.device_weight_bytes / scale:.3f}"))
        lines = table(("weights (released format)", "parameters", unit, per_device), rows)
        lines.append(f"total: {self.weight_bytes / GB:.3f} GB = {self.weight_bytes / GiB:.3f} GiB; per device "
                     f"{self.device_weight_bytes / GB:.3f} GB = {self.device_weight_bytes / GiB:.3f} GiB")
        if self.index_total is not None:
            diff = (self.weight_bytes - self.index_total) / self.index_total * 100
            lines.append(f"model.safetensors.index.json metadata.total_size: {self.index_total / GB:.3f} GB "
                         f"(this plan: {diff:+.2f} %)")
        if self.index_stages is not None and self.index_stages != self.planned_stages:
            lines.append(f"note: the index holds {self.index_stages} mtp.* stages, the config declares "
                         f"{self.planned_stages}")
        return lines

    @property
    def planned_stages(self) -> int:
        return (num_stages(self.cfg) if self.cfg.dspark else 0) or len(self.cfg.stage_compress_ratios)

    def kv_table(self) -> list[str]:
        stages = "DSpark stages (window)" if self.cfg.dspark else "NextN MTP (window)"
        ratios = {r.kind: "/".join(map(str, r.ratios)) for r in self.kv}
        titles = {"window": "window only (ratio 0)", "csa": f"CSA (ratio {ratios.get('csa')}) + indexer",
                  "hca": f"HCA (ratio {ratios.get('hca')})", "stages": stages}
        rows = [(titles[r.kind], str(r.layers), f"{r.per_token / r.layers:g}", f"{r.per_token:g}",
                 f"{r.per_request / MiB:.3f}") for r in self.kv]
        rows.append(("total", str(sum(r.layers for r in self.kv)), "", f"{self.kv_per_token:g}",
                     f"{self.kv_per_request / MiB:.3f}"))
        return ["KV cache (bf16, one K/V head, the same on every device)",
                *table(("layer kind", "layers", "B/token/layer", "B/token", "MiB/request"), rows),
                f"per request: ring of {self.kv_ring} entries per layer and stage, the compressors' fp32 partial "
                "groups",
                self.engine_line()]

    def engine_line(self) -> str:
        rollback = self.cfg.dspark.get("block_size", 0) if self.cfg.dspark else 0
        per_token, per_request, per_state = engine_kv_bytes(self.cfg, rollback)
        return (f"this engine (bf16, the target's layers): {per_token:,g} B/token; {per_request / MiB:.3f} MiB a "
                f"request in rings of window + {rollback} (the verify width) rows per layer and coff windows + "
                f"{rollback} raw rows per compressor (one request's more: the rings padding rows write to); "
                f"{per_state / MiB:.3f} MiB per ring state the prefix cache keeps at a block end (2 per max_num_seqs "
                "by default)")

    @property
    def kv_ring(self) -> int:
        return self.cfg.sliding_window + (self.cfg.dspark.get("block_size", 0) if self.cfg.dspark else 0)

    def fit_lines(self) -> list[str]:
        if self.memory_gb <= 0:
            return [f"KV for one request: {', '.join(self.context_sizes())}"]
        memory = self.memory_gb * GB
        lines = [f"per device: {self.memory_gb:g} GB ({memory / GiB:.2f} GiB) - weights "
                 f"{self.device_weight_bytes / GB:.3f} GB = {max(self.kv_budget, 0) / GB:.3f} GB "
                 f"({max(self.kv_budget, 0) / GiB:.3f} GiB) for KV (no reserve for activations)"]
        if self.kv_budget > 0:
            lines.append(f"tokens of KV that fit: {self.tokens_text()}")
            lines += [f"requests of {c:,} tokens: {self.requests_fit(c):,} ({self.request_bytes(c) / MiB:,.1f} MiB "
                      "each)" for c in self.contexts]
        return lines

    def tokens_text(self) -> str:
        return f"{self.tokens_fit:,} tokens" if self.kv_per_token else "no per-token KV (window-only layers)"

    def context_sizes(self) -> list[str]:
        return [f"{c:,} tokens {self.request_bytes(c) / MiB:,.1f} MiB" for c in self.contexts]


def byte_unit(nbytes: float) -> tuple[str, float]:
    for unit, scale in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return unit, scale
    return "B", 1


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()
    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def read_index(model_dir: Path) -> tuple[int | None, int | None]:
    """The index's metadata.total_size and how many mtp.N stages its weight map holds (None: no index)."""
    path = model_dir / "model.safetensors.index.json"
    if not path.is_file():
        return None, None
    index = json.loads(path.read_text())
    total = (index.get("metadata") or {}).get("total_size")
    stages = {key.split(".")[1] for key in index.get("weight_map", {}) if key.startswith("mtp.")}
    return (int(total) if total is not None else None), len(stages)


def plan_model(model_dir: str | Path, tp: int = 1, ep: bool = False, memory_gb: float = 0.0) -> Plan:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"a model directory with config.json is needed; {model_dir} has none")
    total, stages = read_index(model_dir)
    return Plan(read_v4_config(model_dir), str(model_dir), tp, ep, memory_gb, total, stages)


def add_plan_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--plan and its flags. --tensor-parallel-size and --expert-parallel keep vLLM's meaning; where the engine's
    own options come to hold them, the flags the engine added are the ones used."""
    parser.add_argument("--plan", action="store_true", help="print a DeepSeek-V4 deployment plan of --model (config "
                        "and optional index only, no weights) and exit")
    parser.add_argument("--memory-gb", type=float, default=0.0, help="--plan: memory per device in GB (1e9 bytes)")
    for flags, options in ((("--tensor-parallel-size",), {"type": int, "default": 1,
                                                          "help": "--plan: tensor-parallel devices"}),
                           (("--expert-parallel",), {"action": "store_true",
                                                     "help": "--plan: each device holds E/N whole routed experts"})):
        try:
            parser.add_argument(*flags, **options)
        except argparse.ArgumentError:
            pass  # already an engine option of the same name
    return parser


def print_plan(args: argparse.Namespace):
    if not args.model:
        raise SystemExit("--plan needs --model DIR (a directory with a DeepSeek-V4 config.json)")
    try:
        plan = plan_model(args.model, args.tensor_parallel_size, args.expert_parallel, args.memory_gb)
    except ValueError as e:
        raise SystemExit(f"--plan: {e}") from None
    print(plan.render())
