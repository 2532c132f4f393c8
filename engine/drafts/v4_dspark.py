"""DeepSeek-V4's in-checkpoint DSpark module (V4-Flash-DSpark, V4-Pro-DSpark, V4-Flash-0731), read from the target's
own checkpoint (`mtp.0` .. `mtp.{S-1}`) and driven by the engine like any DSpark draft.

- Features: the target's output streams of each `dspark_target_layer_ids` layer, averaged over the hc copies and
  concatenated; main_x = main_norm(main_proj(features)) (`mtp.0`). Each stage keeps, per committed position, the
  K=V made from main_x (engine/drafts/v4_stage.py) in the target's KV slots: the window a query reads is the last
  `sliding_window` of them, which is the module's 128-entry ring, and rolling the target back truncates it too.
- The block: [anchor, noise x (G - 1)] at positions n .. n + G - 1 (n = committed tokens), the target's embedding
  spread over the hc streams, the stages in a chain, then the last stage's hc_head collapse (pre-norm hidden), its
  norm and the target's LM head (base logits). The Markov head adds W2 W1[prev] as each token is sampled; the
  confidence head reads [pre-norm hidden ; W1[prev]] in fp32.

The capture point (open in public prose) is settled from vLLM's code: its DeepseekV4Model.forward appends
`mhc_post(...).mean(dim=1)` after layer idx when idx + 1 is an aux layer, and DSpark's aux layers are
dspark_target_layer_ids + 1 (the model even reuses that capture for the final layer, which only id = last layer
needs): each target layer's output. Followed (learned from, not copied): vLLM's DeepSeek-V4 DSpark draft
(`forward_embed`, `precompute_dspark_context_kv`, `_build_dspark_topk_idxs`, `forward_head`, `load_weights`)."""
import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from engine import parallel_step
from engine.context import TIMINGS
from engine.drafts.dspark import DSparkDraft
from engine.drafts.heads import ConfidenceHead, VanillaMarkov
from engine.drafts.v4_stage import DSparkStage
from engine.models.deepseek_v4.attention import V4Norm
from engine.models.deepseek_v4.config import V4Config
from engine.models.deepseek_v4.mhc import hc_head
from engine.models.deepseek_v4.rope import cos_sin
from engine.models.layers import Linear
from engine.sampler import SamplingTensors

REQUIRED_KEYS = ("block_size", "noise_token_id", "target_layer_ids", "markov_rank")  # after `dspark_`
STAGE_NAME = re.compile(r"^mtp\.(\d+)\.")


@dataclass
class V4DraftConfig:
    """What the engine reads of a draft (the names of engine/drafts/dspark.DraftConfig)."""
    block_size: int
    target_layer_ids: list[int]
    mask_token_id: int       # dspark_noise_token_id
    markov_rank: int
    num_layers: int          # stages
    hf: dict                 # the target's config.json
    confidence_with_markov: bool = True


def declares_dspark(config: dict) -> bool:
    return any(k.startswith("dspark_") for k in config)


def draft_config(v4: V4Config, raw: dict, num_stages: int, where: str) -> V4DraftConfig:
    missing = [f"dspark_{k}" for k in REQUIRED_KEYS if k not in v4.dspark]
    if missing:
        raise ValueError(f"{where}: config.json declares a DSpark module but lacks {missing}")
    d = v4.dspark
    ids = [int(i) for i in d["target_layer_ids"]]
    bad = [i for i in ids if not 0 <= i < v4.num_layers]
    if bad or not ids:
        raise ValueError(f"{where}: dspark_target_layer_ids {ids} must be layers of the {v4.num_layers}-layer target")
    if not 0 <= int(d["noise_token_id"]) < v4.vocab_size or int(d["block_size"]) < 1 or int(d["markov_rank"]) < 1:
        raise ValueError(f"{where}: dspark_noise_token_id must be a token id, dspark_block_size and "
                         f"dspark_markov_rank >= 1 (got {d})")
    if num_stages < 1:
        raise ValueError(f"{where}: config.json declares a DSpark module but the checkpoint has no mtp.* tensors")
    return V4DraftConfig(int(d["block_size"]), ids, int(d["noise_token_id"]), int(d["markov_rank"]), num_stages, raw)


class V4DSparkDraft(DSparkDraft):
    """Reuses DSparkDraft's sampling, vocabulary restriction, proposals and confidence calibration; its backbone is
    the stages. Its own parameters are named as the checkpoint's (`mtp.K. ...`)."""

    def __init__(self, c: V4DraftConfig, v4: V4Config):
        nn.Module.__init__(self)
        self.config, self.v4 = c, v4
        stages = dataclasses.replace(v4, layer_kinds=v4.layer_kinds + ["window"] * c.num_layers,
                                     compress_ratios=v4.compress_ratios + [0] * c.num_layers)
        self.mtp = nn.ModuleList(DSparkStage(stages, v4.num_layers + s) for s in range(c.num_layers))
        self.add_heads(c, v4)
        self.use_sequential_head = True
        self.target, self.vocab_ids, self.vocab_head, self.scratch_slots = (), None, None, None
        self.kv_caches: list[torch.Tensor] = []

    def add_heads(self, c: V4DraftConfig, v4: V4Config):
        h, n, eps = v4.hidden_size, v4.hc_mult, v4.rms_norm_eps
        first, last = self.mtp[0], self.mtp[-1]
        first.main_proj = Linear(len(c.target_layer_ids) * h, h, bias=False)
        first.main_norm = V4Norm(h, eps)
        last.hc_head_fn = nn.Parameter(torch.zeros(n, n * h, dtype=torch.float32))
        last.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        last.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        last.norm = V4Norm(h, eps)
        last.markov_head = VanillaMarkov(v4.vocab_size, c.markov_rank, h)
        last.confidence_head = ConfidenceHead(h + c.markov_rank, bias=False)

    @property
    def markov_head(self) -> VanillaMarkov:
        return self.mtp[-1].markov_head

    @property
    def confidence_head(self) -> ConfidenceHead:
        return self.mtp[-1].confidence_head

    @property
    def dtype(self) -> torch.dtype:
        """The module's activations' dtype (its Markov embedding's: never stored quantized)."""
        return self.markov_head.markov_w1.weight.dtype

    @property
    def window(self) -> int:
        return self.v4.sliding_window

    @property
    def context_window(self) -> int:
        """The draft step reads the slots of each request's last `window` positions only."""
        return self.window

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        return self.config.num_layers * self.v4.head_dim * kv_dtype.itemsize

    def allocate_kv_cache(self, num_slots: int, kv_dtype: torch.dtype, device: torch.device):
        self.kv_caches = [torch.zeros(num_slots, self.v4.head_dim, dtype=kv_dtype, device=device) for _ in self.mtp]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(self.mtp[0].attn.freqs, positions)

    def main_x(self, features: torch.Tensor) -> torch.Tensor:
        first = self.mtp[0]
        return first.main_norm(first.main_proj(features.to(self.dtype)))

    @torch.inference_mode()
    def extend_context(self, features: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor):
        """Committed rows' features [N, len(target_layer_ids) * hidden] -> every stage's K=V at their slots."""
        if not features.shape[0]:
            return
        parallel_step.send_context(features, positions, slot_mapping)
        main_x = self.main_x(features)
        cos, sin = self.rope(positions)
        for stage, cache in zip(self.mtp, self.kv_caches):
            cache[slot_mapping] = stage.attn.context_kv(main_x, cos, sin).to(cache.dtype)

    def backbone(self, anchors: torch.Tensor, starts: torch.Tensor, kv_slots: torch.Tensor,
                 ctx_lens: torch.Tensor) -> torch.Tensor:
        """The blocks' pre-norm hidden states [B, G, hidden] (the last stage's hc_head collapse), each stage reading
        its cached K=V of the request's last `window` committed positions, whose slots kv_slots [B, window] holds
        (context_window: the drafter passes only those)."""
        present = window_positions(ctx_lens, self.window)[1]
        return self.run_blocks(anchors, starts, lambda stage: (self.kv_caches[stage][kv_slots], present))

    def run_blocks(self, anchors: torch.Tensor, starts: torch.Tensor, windows_of) -> torch.Tensor:
        """Blocks [anchor, noise...] at positions starts.. through the stages -> pre-norm hidden [B, G, hidden];
        windows_of(stage index) gives each block's window K=V for that stage and which rows of it exist (the cache
        when serving, K=V made from the features when training: train/v4_module.py)."""
        B, G = anchors.shape[0], self.config.block_size
        ids = torch.full((B, G), self.config.mask_token_id, device=anchors.device)
        ids[:, 0] = anchors
        ids = ids.flatten()
        cos, sin = self.rope((starts[:, None] + torch.arange(G, device=starts.device)).flatten())
        x = self.target[0](ids)
        streams = x.unsqueeze(1).expand(-1, self.v4.hc_mult, -1).contiguous()
        for index, stage in enumerate(self.mtp):
            streams = stage(streams, cos, sin, ids, windows_of(index))
        last = self.mtp[-1]
        return hc_head(streams, last.hc_head_fn, last.hc_head_base, last.hc_head_scale, self.v4.hc_eps,
                       self.v4.rms_norm_eps).view(B, G, -1)

    @torch.inference_mode()
    def draft_block(self, anchors, starts, kv_slots, ctx_lens, num_tokens: int, sampling: SamplingTensors,
                    uniforms: torch.Tensor, temperature_only: bool):
        """As DSparkDraft.draft_block; the confidence head reads the pre-norm hidden state."""
        parallel_step.send_draft(anchors, starts, kv_slots, ctx_lens, num_tokens)
        with TIMINGS.section("draft_backbone"):
            hidden = self.backbone(anchors, starts, kv_slots, ctx_lens)[:, :num_tokens]
        with TIMINGS.section("draft_lm_head"):
            base_logits = self.block_logits(hidden)
        tokens, probs = self.sample_block(hidden, base_logits, anchors, sampling, uniforms, temperature_only)
        with TIMINGS.section("confidence_head"):
            return (tokens, probs, *self.confidence(hidden, anchors, tokens))

    def block_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head reads the last stage's norm of the hidden state (the confidence head reads it before)."""
        return self.vocab_logits(self.mtp[-1].norm(hidden))

    def draft_collectives(self, anchors, starts, kv_slots, ctx_lens, num_tokens: int):
        """A tensor-parallel worker's part of draft_block: the backbone and the LM head (rank 0 samples)."""
        hidden = self.backbone(anchors, starts, kv_slots, ctx_lens)[:, :num_tokens]
        if self.vocab_head is None:
            self.target[1](self.mtp[-1].norm(hidden))

    @property
    def graph_capturable(self) -> bool:
        """DSparkDraft.fused_block without a host sync: a vanilla Markov head and every stage's experts grouped."""
        return self.has_fused_markov and all(stage.ffn.stack() for stage in self.mtp)

    def confidence_logits_from_prev(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        features = torch.cat([hidden.float(), self.markov_head.markov_w1(prev).float()], dim=-1)
        return self.confidence_head.logits(features.to(self.confidence_head.proj.weight.dtype))


def window_positions(ends: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `window` positions before each of ends [B] -> (positions [B, window], clamped to 0 where absent;
    present [B, window])."""
    positions = ends[:, None].long() - window + torch.arange(window, device=ends.device)
    return positions.clamp_min(0), positions >= 0


def stage_count(names) -> int:
    stages = {int(m.group(1)) for n in names if (m := STAGE_NAME.match(n))}
    return max(stages) + 1 if stages else 0


def expected_shapes(draft: V4DSparkDraft) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in draft.state_dict().items()}


def build_draft(v4: V4Config, raw: dict, stage_names, where: str) -> V4DSparkDraft:
    """The module on the meta device, sized from the config and the checkpoint's stage count."""
    with torch.device("meta"):
        return V4DSparkDraft(draft_config(v4, raw, stage_count(stage_names), where), v4)


def finish_load(draft: V4DSparkDraft) -> V4DSparkDraft:
    """After load_state_dict(assign=True): rope frequencies made again, the confidence projection in fp32."""
    for stage in draft.mtp:
        stage.attn.make_rope(draft.v4)
    head = draft.confidence_head
    head.proj.weight = nn.Parameter(head.proj.weight.detach().float(), requires_grad=False)
    return draft
