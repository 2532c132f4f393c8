"""A draft training leg on one GPU with no network, from a pack made here (issue 32's GPU leg).

`pack` (here) writes what the GPU side needs beside the repository's tracked files (the committed draft that starts
the run and its draft_vocab.json travel with them):

    OUT/base/meta.json            the training config, the sizes and sha256 of the target's parts
    OUT/base/conversations.npz    every training conversation: token ids (uint16), where each answer starts
    OUT/base/target_config.json   the target's config.json
    OUT/base/site/gguf/           the pure-Python `gguf` reader (not installed on the GPU image)
    OUT/part-NN/target.gguf.NN    the target's GGUF file (SmolLM2's Q4_1, what the engine serves) in parts

`train` (there) reassembles and checks the target, computes the target's features for every conversation on the GPU
(a plain-torch prefill over the engine's own modules, equal to the CPU feature cache up to bf16 rounding), trains the
draft with train/trainer.py for a wall-clock budget (the cosine schedule sized from timed steps), and writes the draft
in shards of at most 15 MiB (the device tool returns files up to 16 MiB) with its config, vocabulary and log.
The result is then calibrated and measured on CPU (`train calibrate`, `bench accept`); docs/training.md has the recipe.
"""
import argparse
import copy
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.config import TrainConfig

MIB = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- pack (here)

def pack(config: str, out: str, part_mib: float = 16.0, max_conversations: int = 0) -> Path:
    from engine.loader import gguf_weights
    from train.data import read_rows
    cfg = TrainConfig.load(config)
    rows = [r for r in read_rows(Path(cfg.data)) if sum(r["loss_mask"]) >= cfg.min_loss_tokens]
    if not rows:
        raise ValueError(f"no usable conversations in {cfg.data}")
    rows = rows[:max_conversations] if max_conversations else rows
    starts = []
    for i, r in enumerate(rows):
        mask, start = r["loss_mask"], r["loss_mask"].index(1)
        if any(mask[:start]) or not all(mask[start:]) or max(r["input_ids"]) >= 1 << 16:
            raise ValueError(f"row {i} of {cfg.data}: the pack needs uint16 ids and one answer at the end")
        starts.append(start)
    gguf = gguf_weights(Path(cfg.target))
    if gguf is None:
        raise FileNotFoundError(f"no GGUF file in {cfg.target}: the pack carries the target as its GGUF "
                                "(python -m engine.default_model downloads it)")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    base = out / "base"
    base.mkdir(parents=True)
    lengths = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
    ids = np.concatenate([r["input_ids"] for r in rows]).astype(np.uint16)
    np.savez_compressed(base / "conversations.npz", ids=ids,
                        offsets=np.concatenate([[0], np.cumsum(lengths)]), answer_start=np.array(starts, np.int32))
    shutil.copyfile(Path(cfg.target) / "config.json", base / "target_config.json")
    import gguf as gguf_lib
    shutil.copytree(Path(gguf_lib.__file__).parent, base / "site" / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    parts, size, step = [], gguf.stat().st_size, int(part_mib * MIB)
    with open(gguf, "rb") as f:
        for n in range(math.ceil(size / step)):
            path = out / f"part-{n:02d}" / f"target.gguf.{n:02d}"
            path.parent.mkdir()
            path.write_bytes(f.read(step))
            parts.append({"file": str(path.relative_to(out)), "bytes": path.stat().st_size, "sha256": sha256(path)})
    meta = {"config": asdict(cfg), "conversations": len(rows), "tokens": int(lengths.sum()),
            "answer_tokens": int(sum(len(r["input_ids"]) - s for r, s in zip(rows, starts))),
            "gguf_name": gguf.name, "gguf_bytes": size, "gguf_sha256": sha256(gguf), "parts": parts}
    (base / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    base_mib = sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) / MIB
    print(f"packed {len(rows)} conversations ({meta['tokens']} tokens) and the target "
          f"({size / MIB:.1f} MiB in {len(parts)} parts) into {out}: base {base_mib:.1f} MiB")
    smallest = min(range(len(parts)), key=lambda n: parts[n]["bytes"])  # travels with base
    calls = [[out / "base", out / f"part-{smallest:02d}"]] + [[out / f"part-{n:02d}"] for n in range(len(parts))
                                                              if n != smallest]
    for n, carry in enumerate(calls, 1):
        mib = sum(f.stat().st_size for c in carry for f in c.rglob("*") if f.is_file()) / MIB
        print(f"  device call {n}: carry {[str(c) for c in carry]} ({mib:.1f} MiB)")
    return out


# ---------------------------------------------------------------- train (there)

def assemble_target(pack_dir: Path, meta: dict) -> Path:
    """pack_dir/target: config.json beside the GGUF rebuilt from its parts (checked against the pack's sha256)."""
    target = pack_dir / "target"
    gguf = target / meta["gguf_name"]
    target.mkdir(exist_ok=True)
    shutil.copyfile(pack_dir / "base" / "target_config.json", target / "config.json")
    if gguf.is_file() and gguf.stat().st_size == meta["gguf_bytes"] and sha256(gguf) == meta["gguf_sha256"]:
        return target
    missing = [p["file"] for p in meta["parts"] if not (pack_dir / p["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"parts of the target missing from {pack_dir}: {missing}")
    with open(gguf.with_suffix(".part"), "wb") as f:
        for p in meta["parts"]:
            f.write((pack_dir / p["file"]).read_bytes())
    gguf.with_suffix(".part").replace(gguf)
    if sha256(gguf) != meta["gguf_sha256"]:
        raise ValueError(f"{gguf} does not match the packed target's sha256 (a part is stale or cut)")
    return target


def load_conversations(pack_dir: Path, limit: int = 0) -> list[tuple[list[int], int]]:
    data = np.load(pack_dir / "base" / "conversations.npz")
    ids, offsets, starts = data["ids"].astype(np.int64), data["offsets"], data["answer_start"]
    n = len(starts) if not limit else min(limit, len(starts))
    return [(ids[offsets[i]:offsets[i + 1]].tolist(), int(starts[i])) for i in range(n)]


@torch.no_grad()
def prefill_features(model, sequences: list[list[int]], layer_ids: list[int], device: torch.device,
                     dtype: torch.dtype = torch.bfloat16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The engine model's prefill in plain torch (causal SDPA over a right-padded batch, no KV cache), on any
    device: per sequence (outputs of layer_ids concatenated [S, n*h], final-normed hidden [S, h])."""
    B, T = len(sequences), max(len(s) for s in sequences)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, :len(s)] = torch.tensor(s)
    ids, positions = ids.to(device), torch.arange(T, device=device).repeat(B)
    h = model.embed_tokens(ids.flatten()).to(dtype)
    cos, sin = model.rotary.cos_sin_at(positions, dtype)
    captured = {}
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        q, k, v = attn.norm_rope(attn.qkv_proj(layer.input_layernorm(h)), cos, sin)
        q, k, v = (x.view(B, T, -1, attn.head_dim).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale, enable_gqa=True)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(B * T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if i in layer_ids:
            captured[i] = h
    last = model.norm(h).view(B, T, -1)
    features = torch.cat([captured[i] for i in layer_ids], dim=-1).view(B, T, -1)
    return [(features[b, :len(s)].clone(), last[b, :len(s)].clone()) for b, s in enumerate(sequences)]


def feature_records(model, conversations, layer_ids: list[int], device: torch.device,
                    batch_tokens: int = 65536) -> list[dict]:
    """Trainer records with the target's features kept on `device` (bf16; ~7 KB per token for SmolLM2)."""
    order = sorted(range(len(conversations)), key=lambda i: len(conversations[i][0]))
    records, batch = [None] * len(conversations), []

    def flush():
        outs = prefill_features(model, [conversations[i][0] for i in batch], layer_ids, device)
        for i, (f, h) in zip(batch, outs):
            ids, start = conversations[i]
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[start:] = True
            records[i] = {"input_ids": torch.tensor(ids, dtype=torch.int32), "loss_mask": mask, "features": f,
                          "last_hidden": h}
        batch.clear()

    for i in order:  # batches of similar lengths, padded to their longest
        if batch and (len(batch) + 1) * len(conversations[i][0]) > batch_tokens:
            flush()
        batch.append(i)
    if batch:
        flush()
    return records


def merge(records: list[dict], blocks: list) -> tuple[dict, object]:
    """Several conversations as one forward: their features and blocks concatenated, each block's context limited to
    its own conversation (context_start). Positions run on across conversations: rotary attention depends only on
    the distance between query and key, so every block sees what it would see alone."""
    from train.blocks import Blocks
    offsets = [0]
    for r in records[:-1]:
        offsets.append(offsets[-1] + len(r["features"]))
    record = {key: torch.cat([r[key] for r in records]) for key in ("features", "last_hidden")}
    cat = {name: torch.cat([getattr(b, name) + (o if name in ("anchors", "positions") else 0)
                            for b, o in zip(blocks, offsets)]) for name in ("anchors", "positions")}
    cat |= {name: torch.cat([getattr(b, name) for b in blocks]) for name in ("input_ids", "labels", "valid")}
    starts = torch.cat([torch.full_like(b.anchors, o) for b, o in zip(blocks, offsets)])
    return record, Blocks(cat["anchors"], cat["input_ids"], cat["positions"], cat["labels"], cat["valid"], starts)


def merged_trainer_class():
    from train.trainer import Trainer

    class MergedTrainer(Trainer):
        """Trainer whose optimiser step runs its conversations in forwards of up to merge_tokens tokens each (one GPU
        forward per batch instead of one per conversation); the loss is the same sum, normalised the same way."""
        merge_tokens = 3000

        def forward_units(self, items):
            groups, size = [[]], 0
            for i, b in items:
                n = len(self.records[i]["features"])
                if groups[-1] and size + n > self.merge_tokens:
                    groups.append([])
                    size = 0
                groups[-1].append((i, b))
                size += n
            return [merge([self.records[i] for i, _ in group], [b for _, b in group]) for group in groups]

    return MergedTrainer


def save_sharded(draft_dir: Path, out: Path, max_mib: float = 15.0):
    """Copy an exported draft to out with model.safetensors split into shards of at most max_mib (plus the
    safetensors index the draft loader reads), so each file fits the device tool's 16 MiB return limit."""
    from safetensors.torch import load_file, save_file
    out.mkdir(parents=True, exist_ok=True)
    state, shards, current, size = load_file(str(draft_dir / "model.safetensors")), [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_mib * MIB:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name))
        weight_map |= dict.fromkeys(shard, name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2) + "\n")
    for name in ("config.json", "draft_vocab.json"):
        if (draft_dir / name).is_file():
            shutil.copyfile(draft_dir / name, out / name)


def train(pack_dir: str, out: str, minutes: float, device: str = "cuda", max_steps: int = 0,
          max_conversations: int = 0, batch_size: int = 0, lr: float = 0.0, export_to: str = "",
          merge_tokens: int = 3000) -> Path:
    from engine.loader import load_model
    from train.trainer import layer_ids_of, lr_lambda
    pack_dir, t0 = Path(pack_dir), time.monotonic()
    meta = json.loads((pack_dir / "base" / "meta.json").read_text())
    site = pack_dir / "base" / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))  # `gguf` for the target's weights, unless installed
    target_dir = assemble_target(pack_dir, meta)
    shutil.rmtree(out, ignore_errors=True)  # a fresh leg (a warm machine may hold an earlier one's checkpoint)
    values = meta["config"] | {"target": str(target_dir), "out": out, "device": device, "max_minutes": 0.0,
                               "num_threads": 0, "features_dir": ""}
    values |= {k: v for k, v in (("batch_size", batch_size), ("lr", lr)) if v}
    cfg = TrainConfig(**values)
    dev = torch.device(device)
    target = load_model(target_dir, torch.float32).to(dev)
    layer_ids = layer_ids_of(cfg, target.config)
    conversations = load_conversations(pack_dir, max_conversations)
    features_model = copy.deepcopy(target).to(torch.bfloat16)
    records = feature_records(features_model, conversations, layer_ids, dev)
    del features_model
    print(f"target features for {len(records)} conversations ({sum(len(c[0]) for c in conversations)} tokens) "
          f"in {time.monotonic() - t0:.0f} s", flush=True)
    cfg.max_steps = max_steps or 10 ** 6
    trainer = merged_trainer_class()(cfg, records=records, target=target)
    trainer.merge_tokens = min(merge_tokens, trainer.draft.rotary.cos_sin.shape[0] - cfg.block_size)
    if not max_steps:  # size the cosine schedule to the time left, from timed steps (then start again from step 0)
        initial = copy.deepcopy(trainer.draft.state_dict())
        trainer.train_step()
        synchronize(dev)
        start = time.monotonic()
        for _ in range(3):
            trainer.train_step()
        synchronize(dev)
        per_step = (time.monotonic() - start) / 3
        left = 60 * minutes - (time.monotonic() - t0) - 30  # export and copies
        trainer.total_steps = max(1, int(left / per_step))
        trainer.draft.load_state_dict(initial)
        params = [p for p in trainer.draft.parameters() if p.requires_grad]
        trainer.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer,
                                                              lr_lambda(trainer.total_steps, cfg.warmup_ratio))
        trainer.step = 0
        print(f"{per_step:.3f} s per step of {cfg.batch_size} conversations: {trainer.total_steps} steps", flush=True)
    trainer.cfg.max_minutes = max(0.1, minutes - (time.monotonic() - t0) / 60 - 0.5)  # a backstop
    draft = trainer.train()
    (Path(out) / "train_config.json").write_text(cfg.to_json())
    if export_to:
        save_sharded(draft, Path(export_to))
        for name in ("train_log.jsonl", "train_config.json"):
            shutil.copyfile(Path(out) / name, Path(export_to) / name)
    print(f"trained {trainer.step} steps in {(time.monotonic() - t0) / 60:.1f} min; draft in {draft}"
          + (f", shards in {export_to}" if export_to else ""), flush=True)
    return draft


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(prog="python -m train.gpu_leg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the data and the target's parts for a GPU leg")
    p.add_argument("--config", required=True, help="a training config (train/configs/*.json)")
    p.add_argument("--out", default="data/gpupack")
    p.add_argument("--part-mib", type=float, default=16.0, help="the size of each part of the target's GGUF")
    p.add_argument("--max-conversations", type=int, default=0)
    t = sub.add_parser("train", help="train from a pack (on the GPU)")
    t.add_argument("--pack", default="data/gpupack")
    t.add_argument("--out", default="runs/gpu_leg", help="checkpoints, log and the exported draft (out/draft)")
    t.add_argument("--export-to", default="", help="also write the draft here in shards of <= 15 MiB")
    t.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget, features and export included")
    t.add_argument("--device", default="cuda")
    t.add_argument("--max-steps", type=int, default=0, help="a fixed number of steps (0 = as many as --minutes allow)")
    t.add_argument("--max-conversations", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=0, help="conversations per step (0 = the packed config's)")
    t.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0 = the packed config's)")
    t.add_argument("--merge-tokens", type=int, default=3000,
                   help="conversations of a step run in forwards of up to this many context tokens")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.config, args.out, args.part_mib, args.max_conversations)
    else:
        train(args.pack, args.out, args.minutes, args.device, args.max_steps, args.max_conversations,
              args.batch_size, args.lr, args.export_to, args.merge_tokens)


if __name__ == "__main__":
    main()
