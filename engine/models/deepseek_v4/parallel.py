"""DeepSeek-V4's attention split over tensor-parallel ranks by the groups of its low-rank output: each rank holds some
of the o_groups groups (wo_a's rows of them, wo_b's columns: row-parallel, all-reduced) and the query heads those
groups read (wq_b's rows, the sinks). The low-rank query (wq_a, q_norm), the one K=V head shared by every query head
(wkv, kv_norm), the compressors and the indexer are whole on every rank: each computes the same K=V, entries and
top-k, so the paged KV cache is the same on every rank. The MoE's split is in moe.py. After vLLM's DeepSeek-V4 model
(its heads split by tensor-parallel rank, the single-head latent K/V replicated; learned from, not copied)."""
import dataclasses

from engine import distributed
from engine.models.deepseek_v4.config import V4Config
from engine.models.layers import reduced_row_linear
from engine.parallel import rows


def attention(cls: type, config: V4Config, layer: int):
    """cls(config, layer) (V4Attention or a DSpark stage's) holding this rank's output groups and their heads."""
    if not distributed.is_parallel():
        return cls(config, layer)
    groups, world = config.o_groups, distributed.world_size()
    if world > groups:
        raise ValueError(f"tensor_parallel_size {world} exceeds this DeepSeek-V4's {groups} output groups "
                         "(o_groups): each rank needs at least one group of heads")
    first, count = distributed.split(groups)
    per_group, d, rank = config.num_heads // groups, config.head_dim, config.o_lora_rank
    attn = cls(dataclasses.replace(config, num_heads=count * per_group, o_groups=count), layer)
    heads = (first * per_group, count * per_group)
    attn.wq_b.shard = rows((heads[0] * d, heads[1] * d))
    attn.param_shards = {"attn_sink": rows(heads)}
    attn.wo_a.shard = rows((first * rank, count * rank))
    attn.wo_b = reduced_row_linear((first * rank, count * rank), config.hidden_size)
    return attn
