"""One stage of DeepSeek-V4's in-checkpoint DSpark module: a full V4 block (mHC around attention and the MoE, the
released names `mtp.K.attn...`, `mtp.K.ffn...`, `mtp.K.hc_*`) whose attention is window-only and drafts a block: each
of the block's queries sees the K=V of the request's last `sliding_window` committed positions and every position of
the block (bidirectional), with the per-head sink. The committed positions' K=V come from main_x (the projected target
features), not from the block: kv_norm(wkv(main_x)) with the rope at its own position.

Both K=V kinds get the module's fake FP8 (QAT): the non-rope channels rounded through float8_e4m3 per 64 channels with
a power-of-two scale, as vLLM's DeepSeek-V4 DSpark draft mirrors from DeepSeek's own inference code
(`_apply_dspark_kv_qat_`); the rest follows that draft's `_dspark_attention` and `_compute_main_kv`."""
import torch

from engine.models.deepseek_v4 import parallel
from engine.models.deepseek_v4.attention import V4Attention
from engine.models.deepseek_v4.mhc import collapse, spread, unit_rms
from engine.models.deepseek_v4.model import V4Block
from engine.models.deepseek_v4.rope import rotate
from kernels.v4_attention import attend

KV_QUANT_GROUP = 64
FP8_E4M3_MAX = 448.0


def fake_fp8(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """kv [..., D] with its first D - rope_dim channels rounded through float8_e4m3 in groups of KV_QUANT_GROUP, each
    scaled by the power of two at or above its absolute max / 448; the rope channels pass through."""
    nope = kv[..., :kv.shape[-1] - rope_dim]
    if nope.shape[-1] % KV_QUANT_GROUP:
        raise ValueError(f"the DSpark module's K=V has {nope.shape[-1]} non-rope channels, not a multiple of "
                         f"{KV_QUANT_GROUP} (its fake-FP8 groups)")
    groups = nope.float().unflatten(-1, (-1, KV_QUANT_GROUP))
    scale = torch.exp2(torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True).clamp_min(1e-4) / FP8_E4M3_MAX)))
    rounded = (groups / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    return torch.cat([rounded.flatten(-2).to(kv.dtype), kv[..., kv.shape[-1] - rope_dim:]], -1)


class StageAttention(V4Attention):
    """V4's window-only attention weights, attending over a request's window K=V and its whole drafted block."""

    def context_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rows x [N, hidden] (main_x of committed positions, or the block's normed input) -> their K=V [N, D]."""
        return fake_fp8(rotate(self.kv_norm(self.wkv(x)), cos, sin), 2 * cos.shape[-1])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                windows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B * G, hidden]: the blocks' rows request by request, cos / sin at their positions; windows: each
        request's committed K=V [B, W, D] (its last sliding_window positions) and which of them exist [B, W] (a
        request with fewer positions has fewer). Fixed shapes: the draft step's CUDA graph holds it."""
        window_kv, present = windows
        B = window_kv.shape[0]
        q = rotate(unit_rms(self.wq_b(self.q_norm(self.wq_a(x))).unflatten(-1, (self.heads, self.dim)), self.eps),
                   cos, sin)
        kv = self.context_kv(x, cos, sin)
        G = kv.shape[0] // B
        keys = torch.cat([window_kv.to(kv.dtype), kv.view(B, G, -1)], 1)  # [B, W + G, D]: each block row's keys
        allowed = torch.cat([present, present.new_ones(B, G)], 1)
        per_row = (keys.repeat_interleave(G, 0), allowed.repeat_interleave(G, 0))
        return self.output(attend(q, *per_row, self.attn_sink, self.dim ** -0.5), cos, sin)


class DSparkStage(V4Block):
    """config must list a window-only kind for `layer` (the stage's index past the target's layers)."""

    def __init__(self, config, layer: int):
        super().__init__(config, layer)
        self.attn = parallel.attention(StageAttention, config, layer)  # tensor parallel: this rank's heads

    def forward(self, streams: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_ids: torch.Tensor,
                windows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pre, post, comb = self.mix_weights(streams, "attn")
        streams = spread(post, comb, self.attn(self.attn_norm(collapse(pre, streams)), cos, sin, windows), streams)
        pre, post, comb = self.mix_weights(streams, "ffn")
        return spread(post, comb, self.ffn(self.ffn_norm(collapse(pre, streams)), input_ids), streams)
