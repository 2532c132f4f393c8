"""Draft training loop (DeepSpec-equivalent): AdamW, linear warmup + cosine, grad clipping, checkpoints with resume,
DDP over torchrun (gloo on CPU, NCCL on GPU). One step = `batch_size` conversations spread over the ranks, each a
micro-step with its own random anchors; the loss is normalised by the whole batch's weight sum."""
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from engine.drafts.loader import VOCAB_FILE, load_draft, load_v4_dspark, read_vocab_file
from engine.drafts.v4_dspark import V4DSparkDraft
from engine.loader import load_model
from train.blocks import Blocks, make_blocks, sample_anchors
from train.config import TrainConfig
from train.data import read_rows
from train.export import save_draft
from train.features import build_feature_cache, cache_key, load_feature_cache, shard_paths
from train.forward import backbone_hidden, confidence_logits, draft_logits, target_probs, teacher_forced_prev
from train.init_draft import default_layer_ids, init_draft
from train.losses import LossSums, combine, expected_acceptance_length, loss_sums, position_weights
from train.v4_module import block_hidden, is_v4, v4_layer_ids, write_back


class DraftLoss(nn.Module):
    """The draft plus its training forward, so DDP can wrap one module whose forward returns the loss sums.
    vocab_ids: the tokens the draft will propose (FR-Spec), None = every token; bf16: autocast the forward."""

    def __init__(self, draft, lm_head, decay_gamma: float, vocab_ids: torch.Tensor | None = None, bf16: bool = False):
        super().__init__()
        self.draft, self.decay_gamma, self.bf16 = draft, decay_gamma, bf16
        weight = lm_head.weight.detach().to(torch.bfloat16 if bf16 else torch.float32)  # frozen, shared
        self.frozen = {"target_head": weight, "draft_head": weight if vocab_ids is None else weight[vocab_ids]}
        self.vocab_ids = vocab_ids
        if vocab_ids is not None:
            self.column = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            self.column[vocab_ids] = torch.arange(len(vocab_ids), device=weight.device)

    def forward(self, record: dict, blocks) -> LossSums:
        with torch.autocast(record["features"].device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden, confidence_hidden = self.hidden(record["features"], blocks)
            prev = teacher_forced_prev(blocks)
            logits = draft_logits(self.draft, hidden, prev, self.frozen["draft_head"], self.vocab_ids)
            confidence = confidence_logits(self.draft, confidence_hidden, prev)
        target = target_probs(self.frozen["target_head"], record["last_hidden"], blocks, self.vocab_ids)
        labels, outside = blocks.labels, None
        if self.vocab_ids is not None:
            labels, outside = self.column[labels], (1 - target.sum(-1)).clamp(min=0)
        confidence = None if confidence is None else confidence.float()
        return loss_sums(logits, target, labels, blocks.valid, confidence, self.decay_gamma, outside)


    def hidden(self, features: torch.Tensor, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the LM head reads, what the confidence head reads): the same final-normed hidden for DeepSpec
        drafts; DeepSeek-V4's module normalises for the LM head only."""
        if isinstance(self.draft, V4DSparkDraft):
            pre_norm = block_hidden(self.draft, features, blocks)
            return self.draft.mtp[-1].norm(pre_norm), pre_norm
        hidden = backbone_hidden(self.draft, features, blocks)
        return hidden, hidden


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def layer_ids_of(cfg: TrainConfig, target_config: dict) -> list[int]:
    if "DeepseekV4ForCausalLM" in (target_config.get("architectures") or []):
        return v4_layer_ids(target_config)
    return cfg.target_layer_ids or default_layer_ids(target_config["num_hidden_layers"])


def feature_records(cfg: TrainConfig, rank: int = 0) -> list[dict]:
    """The training conversations with their cached target features (rank 0 builds the cache, others wait)."""
    rows = [r for r in read_rows(Path(cfg.data)) if sum(r["loss_mask"]) >= cfg.min_loss_tokens]
    if not rows:
        raise ValueError(f"no usable conversations in {cfg.data} (need >= {cfg.min_loss_tokens} answer tokens)")
    layer_ids = layer_ids_of(cfg, json.loads((Path(cfg.target) / "config.json").read_text()))
    cache = Path(cfg.features_dir) / cache_key(cfg.target, layer_ids, cfg.data)
    if rank == 0:
        build_feature_cache(rows, cfg.target, layer_ids, cache)
    if dist.is_initialized():
        dist.barrier()
    records = load_feature_cache(shard_paths(len(rows), cache))
    stale = next((i for i, (r, rec) in enumerate(zip(rows, records)) if rec["input_ids"].tolist() != r["input_ids"]),
                 None)
    if stale is not None or len(records) != len(rows):
        raise ValueError(f"the feature cache {cache} was built from other conversations than {cfg.data} "
                         f"(first mismatch at row {stale}); delete it to rebuild")
    return records


class Trainer:
    """records: the conversations with their target features (None = the feature cache of cfg); target: the loaded
    target model (None = load cfg.target). Both on cfg.device."""

    def __init__(self, cfg: TrainConfig, records: list[dict] | None = None, target=None):
        init_distributed()
        self.cfg, (self.rank, self.world_size) = cfg, world()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {self.world_size} ranks")
        torch.manual_seed(cfg.seed)
        self.out, self.device = Path(cfg.out), torch.device(cfg.device)
        target = target if target is not None else load_model(cfg.target, torch.float32).to(self.device)
        self.layer_ids = layer_ids_of(cfg, target.config)
        self.records = records if records is not None else feature_records(cfg, self.rank)
        self.draft = self.initial_draft(target).to(self.device)
        self.vocab_ids = None if not cfg.draft_vocab else \
            read_vocab_file(cfg.draft_vocab, 0, target.config["vocab_size"]).to(self.device)
        self.module = DraftLoss(self.draft, self.draft.target[1], cfg.loss_decay_gamma, self.vocab_ids, cfg.bf16)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.module) if self.world_size > 1 else self.module
        params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.total_steps = cfg.max_steps or max(1, cfg.epochs * len(self.records) // cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(self.total_steps, cfg.warmup_ratio))
        self.step = 0
        self.resume()

    def initial_draft(self, target):
        cfg = self.cfg
        if is_v4(cfg.target):  # its module, in its own checkpoint, is what trains (shaped by the checkpoint)
            if cfg.method != "dspark" or cfg.init_from:
                raise ValueError("a DeepSeek-V4 target trains the DSpark module in its checkpoint: method 'dspark', "
                                 "no init_from")
            return load_v4_dspark(cfg.target, target, torch.float32, "dspark", vocab_size=-1).train().requires_grad_()
        if cfg.init_from:
            return self.pretrained_draft(target)
        init_dir = self.out / "init"
        if self.rank == 0 and not (init_dir / "config.json").is_file():
            init_draft(cfg.target, init_dir, cfg.num_layers, cfg.block_size, cfg.markov_rank, cfg.markov_head_type,
                       self.layer_ids, dtype="float32", seed=cfg.seed)
        if dist.is_initialized():
            dist.barrier()
        draft = load_draft(init_dir, target, torch.float32, cfg.method)
        if cfg.init_from_target:
            copy_target_layers(draft, target)
        return draft.train().requires_grad_(True)

    def pretrained_draft(self, target):
        """cfg.init_from's weights (every token, uncalibrated logits), after checking it is the draft configured."""
        cfg = self.cfg
        draft = load_draft(cfg.init_from, target, torch.float32, cfg.method, vocab_size=-1)
        c = draft.config
        found = (c.num_layers, c.block_size, c.markov_rank if cfg.method == "dspark" else 0, list(c.target_layer_ids))
        wanted = (cfg.num_layers, cfg.block_size, cfg.markov_rank, self.layer_ids)
        if found != wanted:
            raise ValueError(f"init_from {cfg.init_from} has (layers, block, markov rank, target layers) {found}, "
                             f"the config asks for {wanted}")
        return draft.train().requires_grad_(True)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self):
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, weights_only=False, map_location=self.device)
        self.draft.load_state_dict(state["draft"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if self.rank == 0:
            print(f"resumed from {self.checkpoint_path} at step {self.step}/{self.total_steps}", flush=True)

    def save(self):
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"draft": self.draft.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step, "config": self.cfg.to_json()}
        torch.save(state, self.checkpoint_path.with_suffix(".part"))
        self.checkpoint_path.with_suffix(".part").replace(self.checkpoint_path)
        self.export()

    def export(self) -> Path:
        if isinstance(self.draft, V4DSparkDraft):  # a copy of the checkpoint with the trained mtp.* tensors
            return write_back(self.draft, self.cfg.target, self.out / "draft")
        out = save_draft(self.draft, self.out / "draft", extra_config={"num_anchors": self.cfg.num_anchors})
        if self.cfg.draft_vocab:  # the draft was trained to propose these tokens only
            shutil.copyfile(self.cfg.draft_vocab, out / VOCAB_FILE)
        return out

    def batch_indices(self, step: int) -> list[int]:
        """The conversations of optimiser step `step` handled by this rank (a seeded permutation per epoch)."""
        n, B = len(self.records), self.cfg.batch_size
        per_epoch = max(1, n // B)
        epoch, offset = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(self.cfg.seed + epoch).shuffle(order)
        batch = order[offset * B:(offset + 1) * B]
        return batch[self.rank::self.world_size]

    def blocks_for(self, index: int, step: int):
        record = self.records[index]
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 10_007 + index)
        anchors = sample_anchors(record["loss_mask"], self.cfg.num_anchors, g)
        c = self.draft.config
        blocks = make_blocks(record["input_ids"].long(), record["loss_mask"], anchors, c.block_size, c.mask_token_id)
        return blocks if self.device.type == "cpu" else blocks.to(self.device)

    def train_step(self) -> dict:
        stats = self.accumulate_gradients(self.step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return stats | {"grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0]}

    def accumulate_gradients(self, step: int) -> dict:
        """Forward and backward of optimiser step `step`'s batch; gradients are left in the draft's parameters
        (all-reduced across ranks by DDP)."""
        cfg = self.cfg
        items = [(i, self.blocks_for(i, step)) for i in self.batch_indices(step)]
        total = torch.tensor([sum(float(position_weights(b.valid, cfg.loss_decay_gamma).sum()) for _, b in items)],
                             dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(total)
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "ce": 0.0, "l1": 0.0, "conf": 0.0}
        accept_sum = accept_count = 0
        units = self.forward_units(items)
        for n, (record, blocks) in enumerate(units):
            sync = n == len(units) - 1 or not dist.is_initialized()
            with (self.ddp.no_sync() if not sync else torch.enable_grad()):
                sums = self.ddp(record, blocks)
                loss = combine(sums, float(total), cfg.ce_alpha, cfg.l1_alpha, cfg.confidence_alpha)
                (loss * self.world_size).backward()
            stats["loss"] += float(loss.detach())
            for key in ("ce", "l1", "conf"):
                stats[key] += float(getattr(sums, key).detach()) / max(float(total), 1e-8)
            accept_sum, accept_count = accept_sum + sums.accept_sum, accept_count + sums.accept_count
        return stats | {"accept_sum": accept_sum, "accept_count": accept_count}

    def forward_units(self, items: list[tuple[int, Blocks]]) -> list[tuple[dict, Blocks]]:
        """What each forward of a step runs: one conversation's record and blocks (train/gpu_leg.py merges several)."""
        return [(self.records[index], blocks) for index, blocks in items]

    def train(self) -> Path:
        cfg, start = self.cfg, time.monotonic()
        log = self.out / "train_log.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        window = []
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"Training {cfg.method}", disable=self.rank != 0,
                   dynamic_ncols=True)
        while self.step < self.total_steps:
            window.append(self.train_step())
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                summary = summarise(window, self.step)
                window = []
                bar.set_postfix(loss=f"{summary['loss']:.3f}", acc1=f"{summary['accept'][0]:.2f}",
                                tau=f"{summary['tau_estimate']:.2f}")
                if self.rank == 0:
                    with open(log, "a") as f:
                        f.write(json.dumps(summary) + "\n")
            timed_out = cfg.max_minutes and time.monotonic() - start > 60 * cfg.max_minutes
            if self.step % cfg.checkpoint_every == 0 or timed_out:
                self.save()
            if timed_out:
                break
        bar.close()
        self.save()
        return self.out / "draft"


@torch.no_grad()
def copy_target_layers(draft, target):
    """Start the draft's layers from the target's last layers and its final norm: a random draft's logits through the
    shared LM head start far off scale (CE ~50 on SmolLM2), a copied stack starts near CE 16 (measured)."""
    draft.norm.weight.copy_(target.norm.weight)
    for ours, theirs in zip(draft.layers, target.layers[-len(draft.layers):]):
        attn = theirs.self_attn
        q, k, v = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
        ours.self_attn.q_proj.weight.copy_(q)
        ours.self_attn.kv_proj.weight.copy_(torch.cat([k, v]))
        ours.self_attn.o_proj.weight.copy_(attn.o_proj.weight)
        if attn.qk_norm:
            ours.self_attn.q_norm.weight.copy_(attn.q_norm.weight)
            ours.self_attn.k_norm.weight.copy_(attn.k_norm.weight)
        for name in ("input_layernorm", "post_attention_layernorm", "mlp.gate_up_proj", "mlp.down_proj"):
            ours.get_submodule(name).weight.copy_(theirs.get_submodule(name).weight)


def summarise(window: list[dict], step: int) -> dict:
    accept = sum(s["accept_sum"] for s in window) / sum(s["accept_count"] for s in window).clamp(min=1)
    keys = ("loss", "ce", "l1", "conf", "grad_norm")
    return {"step": step, **{k: sum(s[k] for s in window) / len(window) for k in keys},
            "lr": window[-1]["lr"], "accept": [round(float(a), 4) for a in accept],
            "tau_estimate": expected_acceptance_length(accept)}
