"""DeepSeek-V4's configuration as one flat dataclass, read from a released config.json (DeepSeek's own keys:
`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`) or from one transformers 5.24 wrote
(`layer_types` + `compress_rates`, `mlp_layer_types`, nested `rope_parameters`). Field meanings follow transformers'
DeepseekV4Config; the released key names follow vLLM's DeepSeek-V4 model code."""
import json
from dataclasses import dataclass, field
from pathlib import Path

LAYER_TYPE_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
SPARSE_RATIO = 4  # in a released config, the ratio whose layers have an indexer (CSA); other non-zero ones are HCA
KIND_OF_TYPE = {"sliding_attention": "window", "compressed_sparse_attention": "csa",
                "heavily_compressed_attention": "hca"}


@dataclass
class V4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    compress_ratios: list[int]          # per target layer: 0 window only, 4 CSA, 128 HCA (DSpark stages not included)
    layer_kinds: list[str]              # per target layer: window | csa (compressed, sparse: an indexer) | hca (dense)
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    num_hash_layers: int
    routed_scaling_factor: float
    scoring_func: str
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    compress_rope_scaling: dict = field(default_factory=dict)  # yarn for the compressed layers ({} = plain rope)
    max_position_embeddings: int = 1 << 20
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = None
    stage_compress_ratios: list[int] = field(default_factory=list)  # entries past the target's layers
    dspark: dict = field(default_factory=dict)  # the dspark_* keys, without the prefix
    quantization: dict = field(default_factory=dict)

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers


def kind_of(ratio: int) -> str:
    return "window" if ratio == 0 else "csa" if ratio == SPARSE_RATIO else "hca"


def read_v4_config(model_dir: str | Path) -> V4Config:
    return v4_config(json.loads((Path(model_dir) / "config.json").read_text()))


def v4_config(c: dict) -> V4Config:
    """From a config.json dict, released or transformers-written."""
    n = c["num_hidden_layers"]
    ratios = compress_ratios(c)
    heads, head_dim = c["num_attention_heads"], c["head_dim"]
    return V4Config(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=n, num_heads=heads, head_dim=head_dim,
        rope_head_dim=rope_head_dim(c), q_lora_rank=c["q_lora_rank"], o_groups=c["o_groups"],
        o_lora_rank=c["o_lora_rank"], compress_ratios=ratios[:n], layer_kinds=layer_kinds(c, ratios)[:n],
        sliding_window=c["sliding_window"],
        index_n_heads=c["index_n_heads"], index_head_dim=c["index_head_dim"], index_topk=c["index_topk"],
        moe_intermediate_size=c["moe_intermediate_size"], num_experts=c["n_routed_experts"],
        num_experts_per_tok=c["num_experts_per_tok"], num_shared_experts=c.get("n_shared_experts", 1),
        num_hash_layers=num_hash_layers(c), routed_scaling_factor=c["routed_scaling_factor"],
        scoring_func=c.get("scoring_func", "sqrtsoftplus"), swiglu_limit=c["swiglu_limit"], hc_mult=c["hc_mult"],
        hc_sinkhorn_iters=c["hc_sinkhorn_iters"], hc_eps=c["hc_eps"], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=main_rope(c).get("rope_theta", c.get("rope_theta", 10000.0)),
        compress_rope_theta=compress_rope(c).get("rope_theta", c.get("compress_rope_theta", 160000.0)),
        compress_rope_scaling=yarn_of(compress_rope(c)),
        max_position_embeddings=c.get("max_position_embeddings", 1 << 20),
        tie_word_embeddings=c.get("tie_word_embeddings", False), eos_token_id=c.get("eos_token_id"),
        stage_compress_ratios=ratios[n:], dspark={k[7:]: v for k, v in c.items() if k.startswith("dspark_")},
        quantization=dict(c.get("quantization_config") or {}) | ({"expert_dtype": c["expert_dtype"]}
                                                                 if "expert_dtype" in c else {}))


def compress_ratios(c: dict) -> list[int]:
    if "compress_ratios" in c:
        return list(c["compress_ratios"])
    rates = c.get("compress_rates") or {}
    return [rates.get(t, LAYER_TYPE_RATIO[t]) if t != "sliding_attention" else 0 for t in c["layer_types"]]


def layer_kinds(c: dict, ratios: list[int]) -> list[str]:
    if "layer_types" in c and "compress_ratios" not in c:
        return [KIND_OF_TYPE[t] for t in c["layer_types"]]
    return [kind_of(r) for r in ratios]


def num_hash_layers(c: dict) -> int:
    if "num_hash_layers" in c:
        return c["num_hash_layers"]
    kinds = c.get("mlp_layer_types") or []
    return sum(1 for k in kinds if k == "hash_moe")


def rope_head_dim(c: dict) -> int:
    if "qk_rope_head_dim" in c:
        return c["qk_rope_head_dim"]
    return int(c["head_dim"] * c["partial_rotary_factor"])


def main_rope(c: dict) -> dict:
    return (c.get("rope_parameters") or {}).get("main") or {}


def compress_rope(c: dict) -> dict:
    nested = (c.get("rope_parameters") or {}).get("compress")
    return nested if nested is not None else dict(c.get("rope_scaling") or {})


def yarn_of(rope: dict) -> dict:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind != "yarn":
        raise ValueError(f"DeepSeek-V4 compressed layers use plain or yarn rope, got {kind!r}")
    return {k: rope[k] for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow") if k in rope}
