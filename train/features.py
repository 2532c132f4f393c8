"""Target features for training, computed by our engine's own model code (bf16, the same numerics the draft sees at
serving time) and cached once per conversation: the raw outputs of `target_layer_ids` (concatenated, as the draft's
fc expects) and the final-normed hidden state (target logits are recomputed from it through the frozen LM head).

The cache is a few shard files of {input_ids, loss_mask, features, last_hidden} (bf16), ~7 KB per token for
SmolLM2 with 5 layers; it is keyed by the target and layer ids so a stale cache is never reused."""
import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.context import AttentionGroup, reset_context, set_context
from engine.loader import load_model
from engine.models.decoder import DecoderModel
from engine.models.deepseek_v4.model import V4Model
from engine.models.layers import pack_linears_for_cpu
from train.v4_module import v4_features

SHARD_SIZE = 64  # conversations per cache file


def cache_key(target: str, layer_ids: list[int], data: str) -> str:
    blob = json.dumps([str(Path(target).resolve()), layer_ids, str(Path(data).resolve())])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


@torch.inference_mode()
def target_features(model: DecoderModel, sequences: list[list[int]], layer_ids: list[int]):
    """One prefill over several whole sequences (no KV cache) -> per sequence (features [S, n*h], last_hidden
    [S, h])."""
    for layer in model.layers:
        attn = layer.self_attn
        attn.k_cache = attn.v_cache = torch.empty(attn.num_kv_heads, 0, attn.head_dim)
    lengths = [len(s) for s in sequences]
    ids = torch.tensor([t for s in sequences for t in s])
    positions = torch.cat([torch.arange(n) for n in lengths])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    groups = [AttentionGroup(None, None, None, True, start, n, 1, n, None) for start, n in zip(starts, lengths)]
    set_context(torch.full((len(ids),), -1), groups)
    try:
        last, captured = model(ids, positions, tuple(layer_ids))
    finally:
        reset_context()
    features = torch.cat(captured, dim=-1)
    return [(features[s:s + n].clone(), last[s:s + n].clone()) for s, n in zip(starts, lengths)]


def shard_paths(num_rows: int, out_dir: Path, shard_size: int = SHARD_SIZE) -> list[Path]:
    """The cache's shard files, in row order."""
    return [out_dir / f"shard-{i:05d}.pt" for i in range((num_rows + shard_size - 1) // shard_size)]


def build_feature_cache(rows: list[dict], target: str, layer_ids: list[int], out_dir: Path,
                        shard_size: int = SHARD_SIZE, batch_tokens: int = 2048) -> list[Path]:
    """Writes (once) shards of cached features for rows; returns the shard paths in row order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_paths(len(rows), out_dir, shard_size)
    if all(p.is_file() for p in shards):
        return shards
    model = load_model(target, torch.bfloat16)
    pack_linears_for_cpu(model)
    with tqdm(total=sum(len(r["input_ids"]) for r in rows), desc="Target features", unit="tok") as bar:
        for i, path in enumerate(shards):
            chunk = rows[i * shard_size:(i + 1) * shard_size]
            if path.is_file():
                bar.update(sum(len(r["input_ids"]) for r in chunk))
                continue
            records = []
            for batch in token_batches(chunk, batch_tokens):
                features_of = v4_features if isinstance(model, V4Model) else target_features
                outs = features_of(model, [r["input_ids"] for r in batch], layer_ids)
                records += [{"input_ids": torch.tensor(r["input_ids"], dtype=torch.int32),
                             "loss_mask": torch.tensor(r["loss_mask"], dtype=torch.bool),
                             "features": f, "last_hidden": h} for r, (f, h) in zip(batch, outs)]
                bar.update(sum(len(r["input_ids"]) for r in batch))
            torch.save(records, path.with_suffix(".part"))
            path.with_suffix(".part").replace(path)
    return shards


def token_batches(rows: list[dict], batch_tokens: int):
    batch, size = [], 0
    for r in rows:
        if batch and size + len(r["input_ids"]) > batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(r)
        size += len(r["input_ids"])
    if batch:
        yield batch


def load_feature_cache(shards: list[Path]) -> list[dict]:
    return [record for path in shards for record in torch.load(path)]
